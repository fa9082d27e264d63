"""Anomaly score for sensor-like angle grids: features, calibration, synthetic anomalies, AUROC.

The score has to be readable without knowing the model, so it is a z-score against normal data of
the same temperature. The nominal temperature of a production line is not an input of the ONNX
contract, so the input's own energy per site stands in for it (on normal data e(T) is monotonic
and sharp at L ≥ 16; a local defect moves e only a little).

Per-site statistics (each has a known mean on normal data at a given energy):
- ε: local bond energy (−cos of the right and up bonds); a dead patch raises it, a stuck patch
  lowers it inside and raises it on the boundary, a misaligned/flipped patch raises it on the edge.
- c₂: diagonal (next-nearest) bond correlation; added noise lowers c₂ relative to ε, a smooth twist
  changes it differently from heat.
- jₓ, j_y: local currents sin Δθ; a twist or a rotated region drives a net current.
- |v|: vortex map (defects create vortex pairs at low T).
- ρ: cos(θ − θ̂) − exp(−σ²/2), the model's residual: zero in expectation when the input looks like
  the training data (θ̂, σ are the HG-VAE reconstruction).
- frozen: bonds whose two ends agree to ~1e-3 rad. Thermal neighbours essentially never do, stuck
  sensors always do, whatever the temperature (the local energy misses a stuck patch whose angle
  happens to match its surroundings).
Each is averaged over several periodic windows (3×3, (L/4)², a row strip, a column strip, the whole
lattice), z-scored with means and spreads interpolated in energy from normal validation data, and
the per-site map is the largest |z| over statistics and windows. The configuration's score is the max
of the map, itself z-scored against normal data of the same energy: `anomaly_score` ≈ 0 ± 1 on
normal data, and the calibration JSON lists its normal quantiles so a threshold reads as a
false-alarm rate.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from training import physics
from training.defects import EXTRA_KINDS, NAMED_KINDS, auroc, inject  # noqa: F401 (re-exported)

TWO_PI = 2.0 * math.pi
FEATURES = ("energy", "diag", "jx", "jy", "vortex", "resid", "frozen")
FROZEN_EPS = 1e-3  # rad: thermal bonds almost never agree this closely; stuck sensors agree exactly
# Measured on Monte Carlo data: local vortex counts, currents and diagonals only added heavy-tailed
# noise to the maximum; the local energy carries the patch defects, the global statistics the rest.
LOCAL_FEATURES = ("energy", "resid", "frozen")
GLOBAL_FEATURES = ("diag", "jx", "jy", "vortex", "resid")  # the global mean of "energy" is e itself


def windows(lattice_size: int) -> list[tuple[int, int]]:
    """(height, width) of the local averaging windows."""
    q = max(4, lattice_size // 4)
    h = lattice_size // 2
    return [(2, 2), (q, q), (h, h), (1, h), (h, 1)]


def site_features(theta: torch.Tensor, theta_hat: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """[B, F, L, L] per-site statistics, in the order of FEATURES."""
    dx, dy = physics.bond_differences(theta)
    ene = -(torch.cos(dx) + torch.cos(dy))
    up_right = torch.roll(torch.roll(theta, -1, -1), -1, -2) - theta
    down_right = torch.roll(torch.roll(theta, -1, -1), 1, -2) - theta
    diag = torch.cos(up_right) + torch.cos(down_right)
    vort = physics.vortex_map(theta).abs()
    resid = torch.cos(theta - theta_hat) - torch.exp(-0.5 * sigma.square())
    # An indicator, not a smooth bump: near |Δ| ≈ ε a smooth bump turns float32 rounding of the angles
    # into visible score differences between torch and onnxruntime.
    fx = (torch.sin(0.5 * dx).abs() < 0.5 * FROZEN_EPS).to(theta.dtype)
    fy = (torch.sin(0.5 * dy).abs() < 0.5 * FROZEN_EPS).to(theta.dtype)
    frozen = fx + fy
    return torch.stack([ene, diag, torch.sin(dx), torch.sin(dy), vort, resid, frozen], dim=1)


def _box(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Periodic moving average over an h×w window (anchored so the window covers the site)."""
    if h == 1 and w == 1:
        return x
    pad = (w // 2, w - 1 - w // 2, h // 2, h - 1 - h // 2)
    xp = F.pad(x, pad, mode="circular")
    return F.avg_pool2d(xp, (h, w), stride=1)


def window_stats(feats: torch.Tensor, lattice_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Local statistics [B, W·F_local, L, L] (window mean minus the lattice mean) and global ones [B, G]."""
    mean = feats.mean(dim=(-2, -1), keepdim=True)
    li = [FEATURES.index(f) for f in LOCAL_FEATURES]
    lf, lm = feats[:, li], mean[:, li]
    local = torch.cat([_box(lf, h, w) - lm for h, w in windows(lattice_size)], dim=1)
    idx = [FEATURES.index(f) for f in GLOBAL_FEATURES]
    glob = mean[:, idx, 0, 0]
    return local, glob


def hat_weights(e: torch.Tensor, grid_lo: float, grid_step: float, n: int) -> torch.Tensor:
    """[B, n] linear-interpolation weights on a uniform energy grid (clamped at both ends).

    Written with relu/abs only so it exports to ONNX as plain arithmetic.
    """
    pos = (e.clamp(grid_lo, grid_lo + grid_step * (n - 1)) - grid_lo) / grid_step
    k = torch.arange(n, dtype=e.dtype, device=e.device)
    return torch.relu(1.0 - (pos.unsqueeze(-1) - k).abs())


@dataclass
class Calibration:
    """Energy-interpolated means/spreads of every statistic on normal data, and of the final score."""

    grid_lo: float
    grid_step: float
    local_mean: np.ndarray  # [G, W·F]
    local_std: np.ndarray
    glob_mean: np.ndarray  # [G, Gf]
    glob_std: np.ndarray
    group_mean: np.ndarray  # [G, K]: each statistic's lattice maximum of |z| (K = local + global)
    group_std: np.ndarray
    max_mean: np.ndarray  # [G]
    max_std: np.ndarray
    quantiles: dict[str, float]  # normal-data quantiles of anomaly_score
    n_normal: int
    lattice_size: int

    def to_json(self) -> str:
        d = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in self.__dict__.items()}
        d["features"] = list(FEATURES)
        d["global_features"] = list(GLOBAL_FEATURES)
        d["windows"] = windows(self.lattice_size)
        d["meaning"] = (
            "anomaly_score is a z-score of the largest per-site deviation against normal data of the same "
            "energy per site (the temperature proxy); quantiles are its values on held-out normal data"
        )
        return json.dumps(d)

    @classmethod
    def from_json(cls, text: str) -> Calibration:
        d = json.loads(text)
        arrays = ("local_mean", "local_std", "glob_mean", "glob_std", "group_mean", "group_std", "max_mean", "max_std")
        kw = {k: (np.asarray(d[k], dtype=np.float32) if k in arrays else d[k]) for k in cls.__dataclass_fields__}
        return cls(**kw)


class AnomalyHead(nn.Module):
    """Torch (and ONNX) evaluation of the calibrated score and map."""

    def __init__(self, cal: Calibration) -> None:
        super().__init__()
        self.lattice_size = cal.lattice_size
        self.calibration_json = cal.to_json()
        self.grid_lo, self.grid_step = float(cal.grid_lo), float(cal.grid_step)
        self.n_grid = int(cal.local_mean.shape[0])
        self.n_local = int(cal.local_mean.shape[1])
        for name in (
            "local_mean",
            "local_std",
            "glob_mean",
            "glob_std",
            "group_mean",
            "group_std",
            "max_mean",
            "max_std",
        ):
            self.register_buffer(name, torch.as_tensor(np.asarray(getattr(cal, name), dtype=np.float32)))

    def group_stats(
        self, theta: torch.Tensor, theta_hat: torch.Tensor, sigma: torch.Tensor, energy: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(|z| maps of the local statistics [B, K_l, L, L], |z| of the global ones [B, K_g], weights [B, G])."""
        local, glob = window_stats(site_features(theta, theta_hat, sigma), self.lattice_size)
        w = hat_weights(energy, self.grid_lo, self.grid_step, self.n_grid)  # [B, G]
        lz = (local - (w @ self.local_mean)[:, :, None, None]) / (w @ self.local_std)[:, :, None, None]
        gz = (glob - w @ self.glob_mean) / (w @ self.glob_std)
        return lz.abs(), gz.abs(), w

    def site_map(
        self, theta: torch.Tensor, theta_hat: torch.Tensor, sigma: torch.Tensor, energy: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(per-site map [B, L, L], raw score [B]) before the final z-scoring.

        Each statistic's |z| is standardised by the normal spread of its lattice maximum, so a window
        that is noisy by nature (many sites, heavy tails) does not drown the others in the maximum.
        """
        lz, gz, w = self.group_stats(theta, theta_hat, sigma, energy)
        gm, gs = w @ self.group_mean, w @ self.group_std  # [B, K]
        nl = self.n_local
        local_site = ((lz - gm[:, :nl, None, None]) / gs[:, :nl, None, None]).amax(dim=1)
        glob_s = ((gz - gm[:, nl:]) / gs[:, nl:]).amax(dim=1)
        site = torch.maximum(local_site, glob_s[:, None, None])  # global evidence floors the whole map
        return site, site.amax(dim=(-2, -1))

    def local_map(
        self, theta: torch.Tensor, theta_hat: torch.Tensor, sigma: torch.Tensor, energy: torch.Tensor
    ) -> torch.Tensor:
        """The local part of the map alone (where in the lattice the evidence sits)."""
        lz, _, w = self.group_stats(theta, theta_hat, sigma, energy)
        gm, gs = w @ self.group_mean, w @ self.group_std
        nl = self.n_local
        return ((lz - gm[:, :nl, None, None]) / gs[:, :nl, None, None]).amax(dim=1)

    def forward(
        self, theta: torch.Tensor, theta_hat: torch.Tensor, sigma: torch.Tensor, energy: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(anomaly_score [B], anomaly_map [B, L, L])."""
        site, raw = self.site_map(theta, theta_hat, sigma, energy)
        w = hat_weights(energy, self.grid_lo, self.grid_step, self.n_grid)
        score = (raw - w @ self.max_mean) / (w @ self.max_std)
        return score, site


def _kernel_moments(e: np.ndarray, x: np.ndarray, grid: np.ndarray, width: float) -> tuple[np.ndarray, np.ndarray]:
    """Mean and conditional spread of x [N, K, ...] as functions of the energy, on `grid`.

    Means are Gaussian-kernel averages; the spread is the kernel RMS of each sample's residual from
    the mean interpolated at its *own* energy, so the slope of the mean across the kernel does not
    inflate it. Trailing axes beyond K (sites) are pooled.
    """
    x = x.reshape(len(e), x.shape[1], -1)  # [N, K, S]
    # Adaptive bandwidth: at least the grid step, and wide enough to hold ~min_n samples, so sparse
    # energies (or a tiny calibration set) do not get spreads fitted to two or three configurations.
    min_n = min(24, len(e))
    dist = np.sort(np.abs(e[None, :] - grid[:, None]), axis=1)[:, min_n - 1]  # [G]
    bw = np.maximum(width, dist)[:, None]
    wts = np.exp(-0.5 * ((e[None, :] - grid[:, None]) / bw) ** 2)  # [G, N]
    wts /= wts.sum(axis=1, keepdims=True)
    xm = x.mean(axis=2)  # [N, K]
    means = wts @ xm  # [G, K]
    lo, step = float(grid[0]), float(grid[1] - grid[0]) if len(grid) > 1 else 1.0
    hw = hat_weights(torch.as_tensor(e, dtype=torch.float64), lo, step, len(grid)).numpy()  # [N, G]
    own = hw @ means  # [N, K]: the mean at each sample's energy
    sq = ((x - own[:, :, None]) ** 2).mean(axis=2)  # [N, K]
    return means, np.sqrt(wts @ sq)


@torch.no_grad()
def calibrate(
    forward: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    angles: np.ndarray,
    lattice_size: int,
    n_grid: int = 24,
    batch: int = 512,
    holdout: float = 0.3,
    seed: int = 0,
) -> Calibration:
    """Fit the calibration on normal configurations `angles` [N, L, L].

    `forward(theta)` returns the model's (θ̂, σ). A `holdout` fraction is kept out of the fit and
    only used to measure the normal quantiles of the final score (an honest false-alarm table).
    """
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(angles))
    n_hold = int(len(angles) * holdout) if len(angles) >= 20 else 0
    fit_idx, hold_idx = perm[n_hold:], perm[:n_hold]

    def stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[torch.Tensor, ...]]:
        L_, G_, E_, keep = [], [], [], []
        for i in range(0, len(x), batch):
            th = torch.as_tensor(x[i : i + batch])
            th_hat, sig = forward(th)
            local, glob = window_stats(site_features(th, th_hat, sig), lattice_size)
            L_.append(local.numpy())
            G_.append(glob.numpy())
            E_.append(physics.energy_per_site(th).numpy())
            keep.append((th, th_hat, sig))
        return np.concatenate(L_), np.concatenate(G_), np.concatenate(E_), tuple(keep)

    local, glob, e, kept = stats(angles[fit_idx])
    lo, hi = float(e.min()), float(e.max())
    step = max((hi - lo) / (n_grid - 1), 1e-3)
    grid = lo + step * np.arange(n_grid)
    width = max(step, 1e-3)
    lm, ls = _kernel_moments(e, local, grid, width)
    gm, gs = _kernel_moments(e, glob, grid, width)
    # Spreads get absolute floors on each statistic's natural scale: a feature that never moves on
    # the normal data (no frozen bonds, no vortices at low T) must not turn one event into z ≈ 10⁶.
    n_sites = lattice_size * lattice_size
    loc_floor = {"energy": 2e-3, "resid": 2e-3, "frozen": 0.05}
    glob_floor = {"diag": 2e-3, "jx": 2e-3, "jy": 2e-3, "vortex": 1.0 / n_sites, "resid": 2e-3}
    lfl = np.array([loc_floor[f] for _ in windows(lattice_size) for f in LOCAL_FEATURES])
    gfl = np.array([glob_floor[f] for f in GLOBAL_FEATURES])
    ls, gs = np.maximum(ls, lfl[None, :]), np.maximum(gs, gfl[None, :])
    cal = Calibration(
        grid_lo=lo, grid_step=step,
        local_mean=lm.astype(np.float32), local_std=ls.astype(np.float32),
        glob_mean=gm.astype(np.float32), glob_std=gs.astype(np.float32),
        group_mean=np.zeros((n_grid, lm.shape[1] + gm.shape[1]), np.float32),
        group_std=np.ones((n_grid, lm.shape[1] + gm.shape[1]), np.float32),
        max_mean=np.zeros(n_grid, np.float32), max_std=np.ones(n_grid, np.float32),
        quantiles={}, n_normal=int(len(angles)), lattice_size=lattice_size,
    )  # fmt: skip
    head = AnomalyHead(cal)
    groups = []
    for th, th_hat, sig in kept:
        lz, gz, _ = head.group_stats(th, th_hat, sig, physics.energy_per_site(th))
        groups.append(torch.cat([lz.amax(dim=(-2, -1)), gz], dim=1).numpy())
    grm, grs = _kernel_moments(e, np.concatenate(groups), grid, width)
    cal.group_mean = grm.astype(np.float32)
    cal.group_std = np.maximum(grs, 0.05).astype(np.float32)
    head = AnomalyHead(cal)
    raws = np.concatenate(
        [head.site_map(th, th_hat, sig, physics.energy_per_site(th))[1].numpy() for th, th_hat, sig in kept]
    )
    mm, ms = _kernel_moments(e, raws[:, None], grid, width)
    cal.max_mean = mm[:, 0].astype(np.float32)
    # The raw score is already in z units; a spread below 0.1 only happens with a handful of normal
    # samples and would turn float32 rounding into visible score differences.
    cal.max_std = np.maximum(ms[:, 0], 0.1).astype(np.float32)
    # Normal quantiles of the final score, on configurations the fit never saw.
    head = AnomalyHead(cal)
    src = angles[hold_idx] if n_hold else angles[fit_idx]
    scores = []
    for i in range(0, len(src), batch):
        th = torch.as_tensor(src[i : i + batch])
        th_hat, sig = forward(th)
        scores.append(head(th, th_hat, sig, physics.energy_per_site(th))[0].numpy())
    s = np.concatenate(scores)
    cal.quantiles = {f"q{q}": float(np.quantile(s, q / 100)) for q in (50, 90, 99, 99.9)}
    cal.quantiles["max"] = float(s.max())
    return cal
