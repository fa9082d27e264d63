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
FEATURES = ("energy", "diag", "jx", "jy", "vortex", "resid")
GLOBAL_FEATURES = ("diag", "jx", "jy", "vortex", "resid")  # the global mean of "energy" is e itself


def windows(lattice_size: int) -> list[tuple[int, int]]:
    """(height, width) of the local averaging windows."""
    q = max(4, lattice_size // 4)
    h = lattice_size // 2
    return [(3, 3), (q, q), (1, h), (h, 1)]


def site_features(theta: torch.Tensor, theta_hat: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """[B, F, L, L] per-site statistics, in the order of FEATURES."""
    dx, dy = physics.bond_differences(theta)
    ene = -(torch.cos(dx) + torch.cos(dy))
    up_right = torch.roll(torch.roll(theta, -1, -1), -1, -2) - theta
    down_right = torch.roll(torch.roll(theta, -1, -1), 1, -2) - theta
    diag = torch.cos(up_right) + torch.cos(down_right)
    vort = physics.vortex_map(theta).abs()
    resid = torch.cos(theta - theta_hat) - torch.exp(-0.5 * sigma.square())
    return torch.stack([ene, diag, torch.sin(dx), torch.sin(dy), vort, resid], dim=1)


def _box(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Periodic moving average over an h×w window (anchored so the window covers the site)."""
    if h == 1 and w == 1:
        return x
    pad = (w // 2, w - 1 - w // 2, h // 2, h - 1 - h // 2)
    xp = F.pad(x, pad, mode="circular")
    return F.avg_pool2d(xp, (h, w), stride=1)


def window_stats(feats: torch.Tensor, lattice_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Local statistics [B, W·F, L, L] (window mean minus the lattice mean) and global ones [B, G]."""
    mean = feats.mean(dim=(-2, -1), keepdim=True)
    local = torch.cat([_box(feats, h, w) - mean for h, w in windows(lattice_size)], dim=1)
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
        arrays = ("local_mean", "local_std", "glob_mean", "glob_std", "max_mean", "max_std")
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
        for name in ("local_mean", "local_std", "glob_mean", "glob_std", "max_mean", "max_std"):
            self.register_buffer(name, torch.as_tensor(np.asarray(getattr(cal, name), dtype=np.float32)))

    def site_map(
        self, theta: torch.Tensor, theta_hat: torch.Tensor, sigma: torch.Tensor, energy: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(per-site map [B, L, L], raw score [B]) before the final z-scoring."""
        local, glob = window_stats(site_features(theta, theta_hat, sigma), self.lattice_size)
        w = hat_weights(energy, self.grid_lo, self.grid_step, self.n_grid)  # [B, G]
        lz = (local - (w @ self.local_mean)[:, :, None, None]) / (w @ self.local_std)[:, :, None, None]
        gz = (glob - w @ self.glob_mean) / (w @ self.glob_std)
        site = torch.maximum(lz.abs().amax(dim=1), gz.abs().amax(dim=1)[:, None, None])
        return site, site.amax(dim=(-2, -1))

    def forward(
        self, theta: torch.Tensor, theta_hat: torch.Tensor, sigma: torch.Tensor, energy: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(anomaly_score [B], anomaly_map [B, L, L])."""
        site, raw = self.site_map(theta, theta_hat, sigma, energy)
        w = hat_weights(energy, self.grid_lo, self.grid_step, self.n_grid)
        score = (raw - w @ self.max_mean) / (w @ self.max_std)
        return score, site


def _kernel_moments(e: np.ndarray, x: np.ndarray, grid: np.ndarray, width: float) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian-kernel weighted mean/std of x [N, ...] at each grid energy; x's trailing axes are pooled."""
    x = x.reshape(len(e), -1, *x.shape[2:]) if x.ndim > 2 else x.reshape(len(e), 1, -1)
    means, stds = [], []
    for g in grid:
        wt = np.exp(-0.5 * ((e - g) / width) ** 2)
        wt = wt / wt.sum()
        m = np.einsum("n,nk...->k...", wt, x)
        m = m.mean(axis=tuple(range(1, m.ndim))) if m.ndim > 1 else m
        m_b = m.reshape((1, -1) + (1,) * (x.ndim - 2))
        v = np.einsum("n,nk...->k...", wt, (x - m_b) ** 2)
        v = v.mean(axis=tuple(range(1, v.ndim))) if v.ndim > 1 else v
        means.append(m)
        stds.append(np.sqrt(v))
    return np.stack(means), np.stack(stds)


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
    gm, gs = _kernel_moments(e, glob[:, :, None], grid, width)
    # Features that (almost) never move at some energies, e.g. vortices at low T: floor each spread at
    # a tenth of its largest value over the grid so that one rare event reads as z ≈ 10, not 10⁴.
    ls = np.maximum(ls, 0.1 * ls.max(axis=0, keepdims=True))
    gs = np.maximum(gs, 0.1 * gs.max(axis=0, keepdims=True))
    floor = 1e-4
    cal = Calibration(
        grid_lo=lo, grid_step=step,
        local_mean=lm.astype(np.float32), local_std=np.maximum(ls, floor).astype(np.float32),
        glob_mean=gm.astype(np.float32), glob_std=np.maximum(gs, floor).astype(np.float32),
        max_mean=np.zeros(n_grid, np.float32), max_std=np.ones(n_grid, np.float32),
        quantiles={}, n_normal=int(len(angles)), lattice_size=lattice_size,
    )  # fmt: skip
    head = AnomalyHead(cal)
    raws = np.concatenate(
        [head.site_map(th, th_hat, sig, physics.energy_per_site(th))[1].numpy() for th, th_hat, sig in kept]
    )
    mm, ms = _kernel_moments(e, raws[:, None, None], grid, width)
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
