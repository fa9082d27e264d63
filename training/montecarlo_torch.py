"""Batched torch XY sampler (CUDA, or CPU for tests): the moves of training.montecarlo as whole-tensor ops.

All replicas live in one tensor pair (cos θ, sin θ) of shape [R, L, L]. Per sweep:

* cluster update: Swendsen–Wang with the Wolff embedding (random axis r per replica, bonds active with
  p = 1 − exp(−2β (r·s_i)(r·s_j)) when positive, every cluster reflected with probability ½). Single Wolff
  clusters are sequential; SW is the parallel form of the same embedding. Clusters are labelled by min-label
  propagation with pointer jumping, all replicas at once;
* checkerboard Metropolis with the symmetric proposal δ = 2·atan(a), a ~ U[−w, w] (no transcendental);
* `overrelax` checkerboard over-relaxation sweeps (reflection about the local field).

The energy per site is recorded after every sweep. Same interface as NumbaSampler.
"""

from __future__ import annotations

import math

import numpy as np
import torch


class TorchSampler:
    backend = "torch"
    tunes_clusters = False  # one SW update per sweep already touches every site

    def __init__(self, size: int, betas: np.ndarray, moves, seed: int, start: np.ndarray, device: str = "cuda") -> None:
        self.size = size
        self.moves = moves
        self.device = torch.device(device)
        self.betas = np.asarray(betas, dtype=np.float64)
        self.beta = torch.as_tensor(self.betas, dtype=torch.float32, device=self.device)[:, None, None]
        theta = torch.as_tensor(start, dtype=torch.float64)
        self.sx = torch.cos(theta).to(torch.float32).to(self.device).contiguous()
        self.sy = torch.sin(theta).to(torch.float32).to(self.device).contiguous()
        self.gen = torch.Generator(device=self.device)
        self.gen.manual_seed(int(seed) & 0x7FFF_FFFF_FFFF_FFFF)
        nrep = len(self.betas)
        self.width = np.full(nrep, 1.0, dtype=np.float32)
        self.n_wolff = np.full(nrep, 1 if moves.wolff > 0 else 0, dtype=np.int64)
        parity = (torch.arange(size)[:, None] + torch.arange(size)[None, :]) % 2
        self.masks = [(parity == c).to(self.device) for c in range(2)]
        self.accepted = np.zeros((nrep, 2), dtype=np.int64)
        self.clusters = np.zeros((nrep, 2), dtype=np.int64)
        self._acc = torch.zeros(nrep, dtype=torch.int64, device=self.device)
        self._flipped = torch.zeros(nrep, dtype=torch.int64, device=self.device)
        self._nclusters = torch.zeros(nrep, dtype=torch.int64, device=self.device)
        self._nsw = torch.zeros(nrep, dtype=torch.int64, device=self.device)

    # -------------------------------------------------------------------------------------------- helpers
    def _rand(self, *shape: int) -> torch.Tensor:
        return torch.rand(shape, generator=self.gen, device=self.device, dtype=torch.float32)

    def _field(self) -> tuple[torch.Tensor, torch.Tensor]:
        sx, sy = self.sx, self.sy
        hx = sx.roll(1, -1) + sx.roll(-1, -1) + sx.roll(1, -2) + sx.roll(-1, -2)
        hy = sy.roll(1, -1) + sy.roll(-1, -1) + sy.roll(1, -2) + sy.roll(-1, -2)
        return hx, hy

    def _energy(self) -> torch.Tensor:
        sx, sy = self.sx.double(), self.sy.double()
        bonds = sx * (sx.roll(-1, -1) + sx.roll(-1, -2)) + sy * (sy.roll(-1, -1) + sy.roll(-1, -2))
        return -bonds.mean(dim=(-2, -1))

    # -------------------------------------------------------------------------------------------- moves
    def metropolis(self) -> None:
        w = torch.as_tensor(self.width, device=self.device)[:, None, None]
        for mask in self.masks:
            hx, hy = self._field()
            a = (2.0 * self._rand(*self.sx.shape) - 1.0) * w
            d = 1.0 / (1.0 + a * a)
            c, s = (1.0 - a * a) * d, 2.0 * a * d
            nx = c * self.sx - s * self.sy
            ny = s * self.sx + c * self.sy
            g = 1.5 - 0.5 * (nx * nx + ny * ny)
            nx, ny = nx * g, ny * g
            de = hx * (self.sx - nx) + hy * (self.sy - ny)
            accept = mask & (self._rand(*self.sx.shape) < torch.exp(-self.beta * de))
            self.sx = torch.where(accept, nx, self.sx)
            self.sy = torch.where(accept, ny, self.sy)
            self._acc += accept.sum(dim=(-2, -1))

    def overrelax(self) -> None:
        for mask in self.masks:
            hx, hy = self._field()
            hh = hx * hx + hy * hy
            ok = mask & (hh > 1e-12)
            t = 2.0 * (self.sx * hx + self.sy * hy) / torch.where(ok, hh, torch.ones_like(hh))
            nx, ny = t * hx - self.sx, t * hy - self.sy
            g = 1.5 - 0.5 * (nx * nx + ny * ny)
            self.sx = torch.where(ok, nx * g, self.sx)
            self.sy = torch.where(ok, ny * g, self.sy)

    def swendsen_wang(self, active: torch.Tensor) -> None:
        """One SW update with the Wolff embedding on the replicas where `active` [R] is true."""
        nrep, size = self.sx.shape[0], self.size
        phi = 2.0 * math.pi * self._rand(nrep)
        rx, ry = torch.cos(phi)[:, None, None], torch.sin(phi)[:, None, None]
        p = rx * self.sx + ry * self.sy
        two_beta = 2.0 * self.beta
        tx = p * p.roll(-1, -1)  # bond (y, x)–(y, x+1)
        ty = p * p.roll(-1, -2)  # bond (y, x)–(y+1, x)
        bx = (tx > 0) & (self._rand(nrep, size, size) < 1.0 - torch.exp(-two_beta * tx))
        by = (ty > 0) & (self._rand(nrep, size, size) < 1.0 - torch.exp(-two_beta * ty))
        labels = self.label_clusters(bx, by)
        flip = self._rand(nrep, size * size) < 0.5
        flip_site = torch.gather(flip, 1, labels.reshape(nrep, -1)).reshape(nrep, size, size)
        flip_site &= active[:, None, None]
        nx, ny = self.sx - 2.0 * p * rx, self.sy - 2.0 * p * ry
        self.sx = torch.where(flip_site, nx, self.sx)
        self.sy = torch.where(flip_site, ny, self.sy)
        self._flipped += flip_site.sum(dim=(-2, -1))
        roots = labels.reshape(nrep, -1) == torch.arange(size * size, device=self.device)
        self._nclusters += torch.where(active, roots.sum(dim=1), torch.zeros_like(self._nclusters))
        self._nsw += active.to(torch.int64)

    @staticmethod
    def label_clusters(bx: torch.Tensor, by: torch.Tensor) -> torch.Tensor:
        """Connected components of active bonds (periodic): each site gets the smallest flat index in its cluster."""
        nrep, size, _ = bx.shape
        n = size * size
        big = torch.full_like(bx, n, dtype=torch.int64)
        labels = torch.arange(n, device=bx.device).reshape(1, size, size).expand(nrep, size, size).clone()
        bx_left, by_down = bx.roll(1, -1), by.roll(1, -2)  # bond to the left / lower neighbour of each site
        while True:
            cand = torch.minimum(
                torch.minimum(torch.where(bx, labels.roll(-1, -1), big), torch.where(bx_left, labels.roll(1, -1), big)),
                torch.minimum(torch.where(by, labels.roll(-1, -2), big), torch.where(by_down, labels.roll(1, -2), big)),
            )
            new = torch.minimum(labels, cand).reshape(nrep, n)
            new = torch.gather(new, 1, new)  # pointer jumping: adopt the label of your label
            new = torch.gather(new, 1, new).reshape(nrep, size, size)
            if torch.equal(new, labels):
                return labels
            labels = new

    # -------------------------------------------------------------------------------------------- interface
    @torch.no_grad()
    def sweep(self, n: int) -> np.ndarray:
        out = torch.empty((len(self.betas), n), dtype=torch.float64, device=self.device)
        m2 = torch.empty_like(out)
        n_w = torch.as_tensor(self.n_wolff, device=self.device)
        for t in range(n):
            for k in range(int(self.n_wolff.max(initial=0))):
                self.swendsen_wang(n_w > k)
            if self.moves.metropolis:
                self.metropolis()
            for _ in range(self.moves.overrelax):
                self.overrelax()
            out[:, t] = self._energy()
            m2[:, t] = self.sx.double().mean(dim=(-2, -1)).square() + self.sy.double().mean(dim=(-2, -1)).square()
        self.mag2 = m2.cpu().numpy()
        self.accepted[:, 0] = self._acc.cpu().numpy()
        self.accepted[:, 1] += n * self.size * self.size * int(self.moves.metropolis)
        self.clusters[:, 0] = self._flipped.cpu().numpy()
        self.clusters[:, 1] = self._nclusters.cpu().numpy()
        return out.cpu().numpy()

    def reset_counters(self) -> None:
        self.accepted[:] = 0
        self.clusters[:] = 0
        self._acc.zero_()
        self._flipped.zero_()
        self._nclusters.zero_()
        self._nsw.zero_()

    def acceptance(self) -> np.ndarray:
        return self.accepted[:, 0] / np.maximum(self.accepted[:, 1], 1)

    def mean_cluster(self) -> np.ndarray:
        """Mean SW cluster size (sites per cluster, flipped or not)."""
        sites = self._nsw.cpu().numpy() * self.size**2
        return sites / np.maximum(self.clusters[:, 1], 1)

    def angles(self) -> np.ndarray:
        theta = torch.atan2(self.sy, self.sx).remainder(2 * math.pi).to(torch.float32).cpu().numpy()
        theta[theta >= np.float32(2 * math.pi)] = 0.0
        return theta
