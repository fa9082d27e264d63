"""Anomaly score for sensor-like angle grids: a calibrated scan of physical likelihood ratios.

Readable without knowing the model: `anomaly_score` is a z-score (≈ 0 ± 1 on normal data of the same
temperature; the calibration JSON lists its normal quantiles, so a threshold reads as a false-alarm
rate), and `anomaly_map` [L, L] gives the same units per site.

The physics (training/oracle.py derives it). For a k×k defect at a known place and temperature the
Neyman–Pearson test is, for a dead patch, λ = −β S + c with S the cos-sum of the bonds touching the
patch, and for a region rotated by an unknown (uniform) angle, λ = log I₀(β|Z|) − β Re Z with
Z = Σ_boundary exp(i(θ_in − θ_out)). The place and size are unknown, so the score uses the Bayes
mixture over them: Λ = log mean_{windows w, places a} exp(λ_{w,a}) over a ladder of squares and
row/column strips (the offsets c_w make E_normal[e^λ] = 1, measured on the calibration data). On
Monte Carlo data this mixture is within a few hundredths of the AUROC of the oracle that knows the
size, far above a max of per-window z-scores. Beside it: the model residual
cos(θ − θ̂) − e^(−σ²/2) (θ̂, σ from any decoder) and "frozen" bonds (neighbours equal to 1e-3 rad:
stuck sensors at any T) scanned over windows, and global statistics (energy, magnetisation,
diagonal correlation, currents, vortex density, residual).

Temperature. A production line knows its nominal temperature T; the model does not. With T, β = 1/T
and every statistic is z-scored against normal data AT THAT T (a dead patch raises the energy, and an
energy-matched calibration reads that as "a bit hotter" and explains part of it away; a frozen
lattice at nominal high T is only anomalous given T). Without T (None, NaN or ≤ 0) the input's own
energy per site stands in: β = 1/T̂(e) and the tables are indexed by e. Both tables are in the graph.

Combination: each statistic's evidence is standardised by its normal mean/spread at τ (T or e) — for
the scans, of its lattice maximum — and read as a tail probability p of its own law: an extreme-value
(Gumbel) law with that mean and spread for Λ and the scans (maxima over windows and places, Λ a soft
one: read as normal tails they claimed several times too many nats and the small groups decided half
of the false alarms), the normal law of a z-score for the global statistics (|z| half-normal); the
evidence is −log p + log(prior share) (Λ gets LR_SHARE, the other groups share the rest). The map is
per site the largest of these (for Λ: the mixture restricted to the windows covering the site), and
the score is the largest of the map, Λ and the global statistics, z-scored once more against normal
data at τ. The map carries the local evidence only (a lattice-wide anomaly raises the score, not the
map), in the score's units.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from training import physics
from training.defects import EXTRA_KINDS, NAMED_KINDS, auroc, inject  # noqa: F401 (re-exported)

TWO_PI = 2.0 * math.pi
FROZEN_EPS = 1e-3  # rad: thermal bonds almost never agree this closely; stuck sensors agree exactly
FROZEN_FREE = 2.0  # frozen bonds per window that are still thermal (see scan_statistics)
GLOBAL_FEATURES = ("energy", "magnetization", "diag", "jx", "jy", "vortex", "resid")
ONE_SIDED_GLOBAL = ("resid",)  # the rest are |z|: either direction is suspicious given T
T_MIN = 0.05  # floor of a temperature estimate (β = 1/T)
# Prior share of the likelihood-ratio mixture among the evidence groups (the rest share the remainder
# equally). A plain max over ~10 standardised groups lets the noisiest decide; the mixture is the
# most powerful statistic for the physical defects, so it gets most of the false-alarm budget.
LR_SHARE = 0.85


def neg_log_tail(u: torch.Tensor) -> torch.Tensor:
    """−log P(N(0,1) > u), ONNX-exportable, relative error < 1.2e-7 at every u.

    Works in log space with the erfc approximation of Numerical Recipes (erfcc): no 1 − erf(x), whose
    cancellation (and onnxruntime's own Erf) cost 1e-4 in the score at u ≈ 3, and no overflow at large u.
    """
    x = u.abs() / math.sqrt(2.0)
    t = 1.0 / (1.0 + 0.5 * x)
    poly = -1.26551223 + t * (1.00002368 + t * (0.37409196 + t * (0.09678418 + t * (-0.18628806 + t * (
        0.27886807 + t * (-1.13520398 + t * (1.48851587 + t * (-0.82215223 + t * 0.17087277))))))))  # fmt: skip
    log_erfc = torch.log(t) - x.square() + poly  # log erfc(|u|/√2)
    upper = math.log(2.0) - log_erfc  # u ≥ 0: P = erfc/2
    lower = -torch.log(1.0 - 0.5 * torch.exp(log_erfc))  # u < 0: P = 1 − erfc/2
    return torch.where(u >= 0, upper, lower)


EULER_GAMMA = 0.5772156649015329
HALF_NORMAL_MEAN, HALF_NORMAL_STD = math.sqrt(2.0 / math.pi), math.sqrt(1.0 - 2.0 / math.pi)  # of |N(0, 1)|


def gumbel_neg_log_tail(u: torch.Tensor) -> torch.Tensor:
    """−log P(G > u) for G Gumbel-distributed with mean 0 and spread 1 (u already standardised), ONNX-exportable.

    Λ and the scan groups are maxima (Λ a log-sum-exp, a soft maximum) over many windows and places, so
    their normal-data levels have extreme-value right tails, not normal ones. Read as normal tails they
    claimed far too small p (held-out normals at L = 16 and 32: Λ passed −log p = 6 in 2.5% of lattices
    instead of 0.25%), and the groups with the smallest prior shares decided half of the top false alarms.
    A Gumbel with the same mean and spread brings P(−log p > 4) to within ~1.5× of nominal.
    """
    y = (math.pi / math.sqrt(6.0)) * u + EULER_GAMMA  # the Gumbel's reduced variable
    t = torch.exp(-y.clamp(min=-30.0))  # −log P = −log(1 − exp(−t))
    direct = -torch.log(1.0 - torch.exp(-t.clamp(min=1e-6)))  # float64 (the head's dtype): no expm1 in ONNX
    return torch.where(t < 1e-6, y + 0.5 * t, direct)  # far tail: −log(t − t²/2) = y + t/2 + O(t²)


def global_neg_log_tail(u: torch.Tensor, two_sided: torch.Tensor) -> torch.Tensor:
    """−log p of standardised global statistics u [B, Gf] under their own law, not an extreme-value one.

    A global statistic is one z-score of a lattice mean (near normal), not a maximum over places. A
    two-sided one enters as |z|, half-normal: |z| = √(2/π) + √(1 − 2/π)·u, so p = 2 P(N > |z|); the
    one-sided one is z itself, p = P(N > u). (Read through the Gumbel the scan groups need, a strong global
    anomaly — a frozen lattice, a twist — lost most of its evidence; read as N(0, 1) in u, as before, the
    half-normal's tail claimed ~7× too little p at u = 3.)
    """
    # One neg_log_tail for both laws (it is ~25 graph nodes): pick the argument, then the log 2.
    z = torch.where(two_sided, HALF_NORMAL_MEAN + HALF_NORMAL_STD * u, u)
    return neg_log_tail(z) - torch.where(two_sided, math.log(2.0), 0.0)


def tail_to_z(nlp: torch.Tensor) -> torch.Tensor:
    """The normal quantile z with P(N(0,1) > z) = exp(−nlp) (Abramowitz & Stegun 26.2.23, |error| < 5e-4)
    for p ≤ ½, so a combined tail probability reads on the familiar z scale (without a log-p tail).

    Below z = 0 (p > ½: no evidence) it continues linearly with the same slope: the exact quantile's
    slope grows without bound as p → 1 and would turn float32 rounding into visible differences.
    """
    t = torch.sqrt(2.0 * nlp.clamp(min=math.log(2.0)))
    upper = t - (2.515517 + t * (0.802853 + t * 0.010328)) / (1.0 + t * (1.432788 + t * (0.189269 + t * 0.001308)))
    slope = 0.5 / math.sqrt(1.0 / TWO_PI) * 1.0  # dz/d(nlp) at p = ½: p / φ(0)
    return torch.where(nlp >= math.log(2.0), upper, slope * (nlp - math.log(2.0)))


def window_specs(lattice_size: int) -> list[tuple[str, int, int]]:
    """(statistic, height, width) of every window.

    lr_dead / lr_ring: likelihood-ratio windows (squares up to L − 2, and row/column strips for
    lines); resid: mean model residual inside; frozen: frozen bonds inside.
    """
    L = lattice_size
    ladder = [k for k in (1, 2, 3, 4, 5, 6, 8, 10, 12, 14, 16, 20, 24, 28, 32, 40, 48, 56) if k <= L - 2]
    h = max(2, L // 2)
    specs = [("lr_dead", k, k) for k in ladder] + [("lr_dead", 1, h), ("lr_dead", h, 1)]
    specs += [("lr_ring", k, k) for k in ladder if k >= 2]
    specs += [("resid", k, k) for k in sorted({2, max(2, L // 4)})]
    specs += [("frozen", 2, 2)]
    return specs


def is_lr(spec: tuple[str, int, int]) -> bool:
    return spec[0].startswith("lr_")


@functools.lru_cache(maxsize=512)
def _band(lattice_size: int, n: int, offset: int = 0, last_sign: float = 1.0, ends_only: bool = False) -> np.ndarray:
    """[L, L] window matrix on the torus, M[a, i] = 1 where (i − a − offset) mod L ∈ [0, n): row a sums the
    n entries that start at a + offset. `ends_only`: only the first (+1) and the last (`last_sign`) of them.

    Every window sum of the head is M_rows · f · M_colsᵀ: two matrix products, exact in float64 and a
    handful of ONNX nodes for all windows at once (the cumulative-sum form cost ~20 nodes per window,
    and node overhead, not arithmetic, was most of the single-lattice latency).
    """
    L = lattice_size
    d = (np.arange(L)[None, :] - np.arange(L)[:, None] - offset) % L
    if not ends_only:
        return (d < n).astype(np.float64)
    return (d == 0).astype(np.float64) + last_sign * (d == n - 1).astype(np.float64)


def _mat(m: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(m).to(like.dtype)


def box_sum(f: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """S[..., y, x] = Σ_{0≤i<h, 0≤j<w} f[..., y+i, x+j] on the torus (window anchored at its top-left corner)."""
    if h == 0 or w == 0:
        return torch.zeros_like(f)
    if h == 1 and w == 1:
        return f
    L = int(f.shape[-1])
    return _mat(_band(L, h), f) @ f @ _mat(_band(L, w).T.copy(), f)


def _at(f: torch.Tensor, oy: int, ox: int) -> torch.Tensor:
    """f at anchor + (oy, ox)."""
    if oy == 0 and ox == 0:
        return f
    return torch.roll(f, shifts=(-oy, -ox), dims=(-2, -1))


def window_bonds(
    bonds: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], h: int, w: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For every h×w window (anchor = top-left corner), from (cos dx, sin dx, cos dy, sin dy):

    (C_int: cos-sum of the internal bonds, Re Z, Im Z: Z = Σ_boundary exp(iΔ), Δ = θ_in − θ_out).
    """
    cx, sx, cy, sy = bonds
    c_int = box_sum(cx, h, w - 1) + box_sum(cy, h - 1, w)
    # left edge: dx at column x0−1 is already θ_in − θ_out; right edge: dx at column x0+w−1 is
    # θ_out − θ_in, so its sine flips. Same for bottom/top with dy.
    col_c, col_s = box_sum(cx, h, 1), box_sum(sx, h, 1)
    row_c, row_s = box_sum(cy, 1, w), box_sum(sy, 1, w)
    re = _at(col_c, 0, -1) + _at(col_c, 0, w - 1) + _at(row_c, -1, 0) + _at(row_c, h - 1, 0)
    im = _at(col_s, 0, -1) - _at(col_s, 0, w - 1) + _at(row_s, -1, 0) - _at(row_s, h - 1, 0)
    return c_int, re, im


def _bonds(theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    dx, dy = physics.bond_differences(theta)
    return torch.cos(dx), torch.sin(dx), torch.cos(dy), torch.sin(dy)


def log_i0(x: torch.Tensor) -> torch.Tensor:
    """log I₀(x) for x ≥ 0 (Abramowitz & Stegun 9.8.1/9.8.2, |rel. error| < 2e-7), ONNX-exportable."""
    xs = x.clamp(max=3.75)
    t = (xs / 3.75).square()
    small = torch.log(
        1.0 + t * (3.5156229 + t * (3.0899424 + t * (1.2067492 + t * (0.2659732 + t * (0.0360768 + t * 0.0045813)))))
    )
    xl = x.clamp(min=3.75)
    u = 3.75 / xl
    poly = 0.39894228 + u * (0.01328592 + u * (0.00225319 + u * (-0.00157565 + u * (0.00916281 + u * (
        -0.02057706 + u * (0.02635537 + u * (-0.01647633 + u * 0.00392377)))))))  # fmt: skip
    large = xl - 0.5 * torch.log(xl) + torch.log(poly)
    return torch.where(x <= 3.75, small, large)


def log_i0e(x: torch.Tensor) -> torch.Tensor:
    """log I₀(x) − x for x ≥ 0 (the same A&S polynomials as `log_i0`) without forming the large x
    (float32: no cancellation at low T); one log on the merged branches (it runs on every window)."""
    xs = x.clamp(max=3.75)
    t = (xs / 3.75).square()
    small = (
        1.0 + t * (3.5156229 + t * (3.0899424 + t * (1.2067492 + t * (0.2659732 + t * (0.0360768 + t * 0.0045813)))))
    ) * torch.exp(-xs)
    xl = x.clamp(min=3.75)
    u = 3.75 / xl
    poly = 0.39894228 + u * (0.01328592 + u * (0.00225319 + u * (-0.00157565 + u * (0.00916281 + u * (
        -0.02057706 + u * (0.02635537 + u * (-0.01647633 + u * 0.00392377)))))))  # fmt: skip
    # A blend rather than `where` (onnxruntime's Where was the slowest node on these tensors); both
    # branches are finite everywhere thanks to the clamps.
    is_small = (x <= 3.75).to(x.dtype)
    return torch.log(is_small * small + (1.0 - is_small) * (poly / torch.sqrt(xl)))


def _dead_then_ring(specs: tuple[tuple[str, int, int], ...]) -> int:
    """Number of lr_dead windows; the lr_ring ones must follow them (one slice each, no gathers in the graph)."""
    kinds = [k for k, _, _ in specs]
    n_dead = kinds.count("lr_dead")
    if kinds != ["lr_dead"] * n_dead + ["lr_ring"] * (len(kinds) - n_dead):
        raise ValueError(f"likelihood-ratio windows must list every lr_dead before every lr_ring, got {kinds}")
    return n_dead


@functools.lru_cache(maxsize=16)
def _lr_matrices(lattice_size: int, specs: tuple[tuple[str, int, int], ...]) -> dict[str, np.ndarray]:
    """Window matrices (see `_band`) of the likelihood-ratio windows, stacked over the windows.

    x-bonds (dx at column x joins x and x + 1): `rows` picks each window's rows; for lr_dead, `dead_x`
    picks every x-bond touching the window (columns x0 − 1 … x0 + w − 1); for lr_ring, `ring_x`
    [S_ring, 2, L, L] picks the two boundary columns x0 − 1 and x0 + w − 1, channel 0 as they are (for
    1 − cos), channel 1 with the sign of θ_in − θ_out (for sin). y-bonds likewise, rows and columns swapped.
    """
    L = lattice_size
    n_dead = _dead_then_ring(specs)
    dead, ring = specs[:n_dead], specs[n_dead:]

    def ends(n: int, offset: int) -> list[np.ndarray]:
        return [_band(L, n, offset, 1.0, True), _band(L, n, offset, -1.0, True)]

    return {
        "rows": np.stack([_band(L, h) for _, h, _ in specs]),
        "cols": np.stack([_band(L, w).T for _, _, w in specs]),
        "dead_x": np.stack([_band(L, w + 1, -1).T for _, _, w in dead]).reshape(-1, L, L),
        "dead_y": np.stack([_band(L, h + 1, -1) for _, h, _ in dead]).reshape(-1, L, L),
        "ring_x": np.array([[m.T for m in ends(w + 1, -1)] for _, _, w in ring]).reshape(-1, 2, L, L),
        "ring_y": np.array([ends(h + 1, -1) for _, h, _ in ring]).reshape(-1, 2, L, L),
        "perimeter": np.array([2.0 * (h + w) for _, h, w in ring]),
    }


def lr_parts(theta: torch.Tensor, specs: list[tuple[str, int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """β-free parts of the likelihood-ratio windows (anchor = top-left corner): a [B, S_lr, L, L] and
    b [B, S_ring, L, L] (the lr_ring windows, which follow the lr_dead ones), with λ = β·a (+ log I₀(β·b)
    − β·b for lr_ring) + offset.

    lr_dead: a = D = Σ (1 − cos Δ) over the bonds touching the window (−β S up to a constant);
    lr_ring: a = |Z| − Re Z, b = |Z|, so λ = log I₀(β|Z|) − β Re Z up to a constant, where
    Z = Σ_boundary exp(iΔ), Δ = θ_in − θ_out.
    Written in 1 − cos Δ = 2 sin²(Δ/2) and Im Z² / (|Z| + Re Z): at T = 0.1, β S ~ 4000 and float32
    would lose the O(1) likelihood ratio to cancellation. All windows at once, as batched matrix products
    (`_lr_matrices`); `window_bonds` is the per-window reference.
    """
    mats = _lr_matrices(int(theta.shape[-1]), tuple(specs))  # constants of a model's graph
    n_dead = len(specs) - len(mats["perimeter"])
    m = {k: _mat(v, theta) for k, v in mats.items()}
    rows, cols = m["rows"][:, None], m["cols"][:, None]  # [S, 1, L, L]
    dx, dy = physics.bond_differences(theta)
    cx, cy = 2.0 * torch.sin(0.5 * dx).square(), 2.0 * torch.sin(0.5 * dy).square()
    a_dead = (rows[:n_dead, 0] @ cx[:, None]) @ m["dead_x"] + m["dead_y"] @ (cy[:, None] @ cols[:n_dead, 0])
    fx = torch.stack([cx, torch.sin(dx)], dim=1)[:, None]  # [B, 1, 2, L, L]
    fy = torch.stack([cy, torch.sin(dy)], dim=1)[:, None]
    both = (rows[n_dead:] @ fx) @ m["ring_x"] + m["ring_y"] @ (fy @ cols[n_dead:])  # [B, S_ring, 2, L, L]
    d_ring, im = both[:, :, 0], both[:, :, 1]  # Σ_boundary (1 − cos Δ), Im Z
    re = m["perimeter"][None, :, None, None] - d_ring
    mod = torch.sqrt(re.square() + im.square() + 1e-12)
    # |Z| − Re Z without cancellation when Re Z > 0 (= Im Z² / (|Z| + Re Z)), branch-free (a `where` on
    # these tensors cost more than the arithmetic): for Re Z ≤ 0 it is Im Z² / (|Z| − Re Z) − 2 Re Z.
    gap = im.square() / (mod + re.abs() + 1e-12) + 2.0 * torch.relu(-re)
    return torch.cat([a_dead, gap], dim=1), mod


def lr_values(a: torch.Tensor, b: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """λ without offsets [B, S_lr, L, L] from `lr_parts`; `beta` [B]."""
    bt = beta[:, None, None, None]
    n_dead = a.shape[1] - b.shape[1]
    # log I₀(x) − x is O(1) and smooth: float32 (its fast exp/log kernels) costs it < 1e-6.
    ring = bt * a[:, n_dead:] + log_i0e((bt * b).float()).to(a.dtype)
    return torch.cat([bt * a[:, :n_dead], ring], dim=1)


def _logmeanexp(x: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    m = x.amax(dim=dims, keepdim=True)
    n = 1
    for d in dims:
        n *= x.shape[d]
    # No squeeze over several axes: the TorchScript ONNX exporter cannot handle it.
    return torch.log(torch.exp(x - m).sum(dim=dims)) + x.amax(dim=dims) - math.log(n)


def scan_statistics(
    theta: torch.Tensor, theta_hat: torch.Tensor, sigma: torch.Tensor, specs: list[tuple[str, int, int]]
) -> torch.Tensor:
    """[B, S_scan, L, L]: the non-likelihood windows at every anchor, larger = more anomalous."""
    dx, dy = physics.bond_differences(theta)
    resid = torch.exp(-0.5 * sigma.square()) - torch.cos(theta - theta_hat)  # > 0: worse than the model expects
    # An indicator, not a smooth bump: near |Δ| ≈ ε a smooth bump turns float32 rounding of the angles
    # into visible score differences between torch and onnxruntime.
    frozen = (torch.sin(0.5 * dx).abs() < 0.5 * FROZEN_EPS).to(theta.dtype) + (
        torch.sin(0.5 * dy).abs() < 0.5 * FROZEN_EPS
    ).to(theta.dtype)
    out = []
    for kind, h, w in specs:
        if kind == "resid":
            out.append(box_sum(resid, h, w) / (h * w))
        else:
            # Frozen bonds beyond the first FROZEN_FREE in a window: one or two thermal bonds within 1e-3
            # rad happen (~2 per lattice at L = 32), three in one 2×2 window essentially never, and a
            # stuck patch freezes all of them. Counting single ones made rare normal lattices look
            # like z ≈ 30 wherever the calibration had seen no frozen bond at that temperature.
            out.append(torch.relu(box_sum(frozen, h, w) - FROZEN_FREE) / (h * w))
    return torch.stack(out, dim=1)


def global_statistics(theta: torch.Tensor, theta_hat: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """[B, G] in the order of GLOBAL_FEATURES.

    Bond sums are taken as Σ (1 − cos Δ) = Σ 2 sin²(Δ/2) (energy above the ground state, and the same
    for the diagonals): their normal spread is ~0.02 at L = 32, and a float32 sum of cosines near 1
    would put 1e-5 of rounding into the z-score.
    """
    dx, dy = physics.bond_differences(theta)
    ur = torch.roll(torch.roll(theta, -1, -1), -1, -2) - theta
    dr = torch.roll(torch.roll(theta, -1, -1), 1, -2) - theta

    def mean(x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(-2, -1))

    def one_minus_cos(d: torch.Tensor) -> torch.Tensor:
        return 2.0 * torch.sin(0.5 * d).square()

    return torch.stack(
        [
            mean(one_minus_cos(dx) + one_minus_cos(dy)),  # e + 2
            physics.magnetization(theta),
            mean(one_minus_cos(ur) + one_minus_cos(dr)),  # 2 − diagonal correlation
            mean(torch.sin(dx)),
            mean(torch.sin(dy)),
            physics.vortex_density(theta),
            mean(torch.exp(-0.5 * sigma.square()) - torch.cos(theta - theta_hat)),
        ],
        dim=1,
    )


def hat_weights(e: torch.Tensor, grid_lo: float, grid_step: float, n: int) -> torch.Tensor:
    """[B, n] linear-interpolation weights on a uniform grid (clamped at both ends).

    Written with relu/abs only so it exports to ONNX as plain arithmetic.
    """
    pos = (e.clamp(grid_lo, grid_lo + grid_step * (n - 1)) - grid_lo) / grid_step
    k = torch.arange(n, dtype=e.dtype, device=e.device)
    return torch.relu(1.0 - (pos.unsqueeze(-1) - k).abs())


_ARRAYS = (
    "t_grid", "lr_offset", "scan_mean", "scan_std", "glob_mean", "glob_std", "group_mean", "group_std",
    "max_mean", "max_std",
)  # fmt: skip


@dataclass
class Table:
    """Normal-data calibration along one conditioning variable τ (a uniform grid of n points)."""

    variable: str  # "energy" (the input's own energy per site) or "temperature" (nominal, given by the caller)
    grid_lo: float
    grid_step: float
    t_grid: np.ndarray  # [G] temperature at each grid point (β = 1/T for the likelihood ratios)
    lr_offset: np.ndarray  # [G, S_lr] c_w: E_normal[exp(λ_w + c_w)] = 1
    scan_mean: np.ndarray  # [G, S_scan] per-anchor residual / frozen statistics
    scan_std: np.ndarray
    glob_mean: np.ndarray  # [G, Gf]
    glob_std: np.ndarray
    group_mean: np.ndarray  # [G, S_scan + Gf + 1]: scan maxima of z, global z, Λ
    group_std: np.ndarray
    max_mean: np.ndarray  # [G] the raw score
    max_std: np.ndarray
    quantiles: dict[str, float] = field(default_factory=dict)  # normal-data quantiles of anomaly_score

    def to_dict(self) -> dict:
        return {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in self.__dict__.items()}

    @classmethod
    def from_dict(cls, d: dict) -> Table:
        kw = {k: (np.asarray(d[k], dtype=np.float32) if k in _ARRAYS else d[k]) for k in cls.__dataclass_fields__}
        return cls(**kw)


@dataclass
class Calibration:
    """An energy-indexed table (always) and a temperature-indexed one (when the normal data came with
    temperatures)."""

    lattice_size: int
    energy: Table
    temperature: Table | None
    n_normal: int
    specs: list[tuple[str, int, int]]

    @property
    def quantiles(self) -> dict[str, float]:
        """Normal quantiles of the score without a temperature (the default use)."""
        return self.energy.quantiles

    def to_json(self) -> str:
        d = {
            "lattice_size": self.lattice_size,
            "n_normal": self.n_normal,
            "specs": [list(s) for s in self.specs],
            "global_features": list(GLOBAL_FEATURES),
            "energy": self.energy.to_dict(),
            "temperature": self.temperature.to_dict() if self.temperature else None,
            "quantiles": self.energy.quantiles,
            "quantiles_given_temperature": self.temperature.quantiles if self.temperature else None,
            "meaning": (
                "anomaly_score is a z-score of the strongest evidence (likelihood-ratio scan for dead and "
                "rotated regions, model residual, frozen bonds, global statistics) against normal data at the "
                "same temperature: the nominal one when the 'temperature' input is given (> 0), else the "
                "input's own energy per site as a proxy; quantiles are its values on held-out normal data "
                "(quantiles_given_temperature: with the nominal temperature given)"
            ),
        }
        return json.dumps(d)

    @classmethod
    def from_json(cls, text: str) -> Calibration:
        d = json.loads(text)
        return cls(
            lattice_size=int(d["lattice_size"]),
            energy=Table.from_dict(d["energy"]),
            temperature=Table.from_dict(d["temperature"]) if d.get("temperature") else None,
            n_normal=int(d["n_normal"]),
            specs=[(str(s[0]), int(s[1]), int(s[2])) for s in d["specs"]],
        )


class _TableModule(nn.Module):
    def __init__(self, table: Table) -> None:
        super().__init__()
        self.grid_lo, self.grid_step = float(table.grid_lo), float(table.grid_step)
        self.n_grid = int(table.t_grid.shape[0])
        # Every per-τ column side by side: reading a row's calibration is one matrix product (and choosing
        # between the two tables one `where`), not one node per field.
        cols = [np.asarray(getattr(table, name), dtype=np.float64).reshape(self.n_grid, -1) for name in _ARRAYS]
        self.sizes = [c.shape[1] for c in cols]
        self.register_buffer("packed", torch.as_tensor(np.concatenate(cols, axis=1)))
        two = torch.tensor([f not in ONE_SIDED_GLOBAL for f in GLOBAL_FEATURES], dtype=torch.bool)
        self.register_buffer("two_sided", two)

    def read(self, tau: torch.Tensor) -> torch.Tensor:
        """[B, Σ sizes]: every column interpolated at each row's τ."""
        return hat_weights(tau, self.grid_lo, self.grid_step, self.n_grid) @ self.packed


@dataclass
class _Rows:
    """The calibration read off at each row's τ ([B, ...], small): lets rows with a nominal temperature and
    rows without share one evaluation of the (large) window statistics."""

    beta: torch.Tensor
    lr_offset: torch.Tensor
    scan_mean: torch.Tensor
    scan_std: torch.Tensor
    glob_mean: torch.Tensor
    glob_std: torch.Tensor
    group_mean: torch.Tensor
    group_std: torch.Tensor
    max_mean: torch.Tensor
    max_std: torch.Tensor

    @staticmethod
    def unpack(packed: torch.Tensor, sizes: list[int]) -> _Rows:
        t, *rest, mm, ms = torch.split(packed, sizes, dim=1)  # in the order of _ARRAYS
        return _Rows(1.0 / t[:, 0].clamp(min=T_MIN), *rest, mm[:, 0], ms[:, 0])

    @staticmethod
    def of(table: _TableModule, tau: torch.Tensor) -> _Rows:
        return _Rows.unpack(table.read(tau), table.sizes)


@dataclass
class _Inputs:
    a: torch.Tensor  # likelihood-ratio parts [B, S_lr, L, L] (see lr_parts)
    b: torch.Tensor  # [B, S_ring, L, L]
    scan: torch.Tensor  # [B, S_scan, L, L]
    glob: torch.Tensor  # [B, Gf]


class AnomalyHead(nn.Module):
    """Torch (and ONNX) evaluation of the calibrated score and map."""

    def __init__(self, cal: Calibration) -> None:
        super().__init__()
        self.lattice_size = cal.lattice_size
        self.specs = [tuple(s) for s in cal.specs]
        self.lr_specs = [s for s in self.specs if is_lr(s)]
        self.scan_specs = [s for s in self.specs if not is_lr(s)]
        self.calibration_json = cal.to_json()
        self.by_energy = _TableModule(cal.energy)
        self.by_temperature = _TableModule(cal.temperature) if cal.temperature is not None else None
        _dead_then_ring(tuple(self.lr_specs))
        # Scan windows of one shape share the map dilation (a max over covering anchors).
        self.scan_shapes = sorted({(h, w) for _, h, w in self.scan_specs})
        self.scan_index = [[i for i, s in enumerate(self.scan_specs) if (s[1], s[2]) == sh] for sh in self.scan_shapes]

    def inputs(self, theta: torch.Tensor, theta_hat: torch.Tensor, sigma: torch.Tensor) -> _Inputs:
        a, b = lr_parts(theta, self.lr_specs)
        scan = scan_statistics(theta, theta_hat, sigma, self.scan_specs)
        return _Inputs(a, b, scan, global_statistics(theta, theta_hat, sigma))

    def levels(
        self, r: _Rows, x: _Inputs
    ) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]:
        """((e^(λ − m) [B, S_lr, L, L], m [B, 1, 1, 1]) with λ the offset likelihood ratios and m their
        lattice maximum, Λ [B], scan z [B, S_scan, L, L], global z [B, Gf])."""
        lam = lr_values(x.a, x.b, r.beta) + r.lr_offset[:, :, None, None]
        # Λ = log mean e^λ; the exponentials are kept for the site map (`_lr_site`), not recomputed.
        m = lam.amax(dim=(1, 2, 3), keepdim=True)
        # λ − m is exact in float64; its exponential (≤ 1, one term = 1) needs only float32's relative 1e-7,
        # and float32 exp and matrix products run several times faster in onnxruntime. Floored at e^−80
        # (normal in float32: denormals run ~5× slower on x86, measured 0.6 ms on a gross defect at L = 32);
        # up to 10⁵ terms below e^−80 add < 1e-29 to a sum that holds a 1.
        e = torch.exp((lam - m).clamp(min=-80.0).float())
        big = torch.log(e.sum(dim=(1, 2, 3)).to(lam.dtype)) + m.flatten() - math.log(lam[0].numel())
        zs = (x.scan - r.scan_mean[:, :, None, None]) / r.scan_std[:, :, None, None]
        gz = (x.glob - r.glob_mean) / r.glob_std
        gz = torch.where(self.by_energy.two_sided, gz.abs(), gz)
        return (e, m), big, zs, gz

    def _lr_site(self, e: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        """log of the mixture restricted to the windows covering each site (same normalisation as Λ), from
        `levels`' e^(λ − m) and m.

        The anchors covering site y are y − h + 1 … y: the transposed window matrices (`_lr_matrices`)."""
        mats = _lr_matrices(self.lattice_size, tuple(self.lr_specs))
        cover = _mat(mats["rows"], e).transpose(-1, -2) @ e @ _mat(mats["cols"], e).transpose(-1, -2)
        return torch.log(cover.sum(dim=1).clamp(min=1e-30)).to(m.dtype) + m[:, 0] - math.log(e[0].numel())

    def _scan_site(self, u: torch.Tensor) -> torch.Tensor:
        maps = []
        for (h, w), idx in zip(self.scan_shapes, self.scan_index, strict=True):
            m = u[:, idx].amax(dim=1, keepdim=True).float()  # a max is exact; float32 pools run faster
            if h > 1 or w > 1:
                # max over the covering anchors; separable (two 1-D pools: h + w compares per site, not h·w)
                m = F.pad(m, (w - 1, 0, h - 1, 0), mode="circular")
                m = F.max_pool2d(F.max_pool2d(m, (h, 1), stride=1), (1, w), stride=1)
            maps.append(m)
        return torch.cat(maps, dim=1).amax(dim=1).to(u.dtype)

    def _evaluate(self, r: _Rows, x: _Inputs) -> tuple[torch.Tensor, torch.Tensor]:
        """(score [B], map [B, L, L]) with each row's calibration `r`."""
        mix, big, zs, gz = self.levels(r, x)
        gm, gs = r.group_mean, r.group_std
        ns, ng = zs.shape[1], gz.shape[1]
        u_scan = (zs - gm[:, :ns, None, None]) / gs[:, :ns, None, None]
        u_glob = (gz - gm[:, ns : ns + ng]) / gs[:, ns : ns + ng]  # [B, Gf]
        m_lr, s_lr = gm[:, -1:], gs[:, -1:]
        # Each group's standardised evidence as −log p + log(prior share), p from the group's own tail law:
        # extreme-value for the maxima over windows and places (Λ, the scans), normal for global z-scores.
        # The Gumbel pieces go through one evaluation (and the result through one tail_to_z below): each is
        # ~10-25 graph nodes, so one call on the stacked pieces is visibly faster for a single lattice.
        n = self.lattice_size**2
        lr_site = (self._lr_site(*mix).flatten(1) - m_lr) / s_lr
        u = torch.cat([lr_site, self._scan_site(u_scan).flatten(1), (big[:, None] - m_lr) / s_lr], dim=1)
        w_lr, w_other = math.log(LR_SHARE), math.log((1.0 - LR_SHARE) / (ns + ng))
        e = gumbel_neg_log_tail(u) + torch.tensor([w_lr] * n + [w_other] * n + [w_lr], dtype=u.dtype)
        e_glob = global_neg_log_tail(u_glob, self.by_energy.two_sided).amax(dim=1) + w_other
        site = torch.maximum(e[:, :n], e[:, n : 2 * n])  # [B, L²]
        best = torch.maximum(torch.maximum(site.amax(dim=1), e[:, -1]), e_glob)
        z = tail_to_z(torch.cat([site, best[:, None]], dim=1))
        # The map in the score's units: a site's value is the score the local evidence covering it would
        # give alone. Lattice-wide evidence (noise everywhere, a frozen lattice) shows in the score only:
        # flooring the map with it would erase the place of a local defect.
        mm, ms = r.max_mean[:, None], r.max_std[:, None]
        z = (z - mm) / ms
        score, site = z[:, -1], z[:, :n].reshape(-1, self.lattice_size, self.lattice_size)
        return score, site

    def forward(
        self,
        theta: torch.Tensor,
        theta_hat: torch.Tensor,
        sigma: torch.Tensor,
        energy: torch.Tensor,
        temperature: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(anomaly_score [B], anomaly_map [B, L, L]); `temperature` [B] or [1], NaN/≤ 0 = unknown."""
        # The head runs in float64 (inside the ONNX graph too) and returns the caller's dtype: z-scores of
        # lattice means with spreads ~0.01 and likelihood ratios ~10³ at low T turned float32 rounding into
        # 1e-4 differences between torch and onnxruntime. The cost is small next to the network.
        out_dtype = theta.dtype
        theta, theta_hat, sigma = (v.to(torch.float64) for v in (theta, theta_hat, sigma))
        x = self.inputs(theta, theta_hat, sigma)
        # The energy is recomputed here in float64 (callers' argument stays for the API): the energy-indexed
        # tables are steep at low T, and a float32 energy moved the score by ~1e-4 between runtimes.
        packed = self.by_energy.read(physics.energy_per_site(theta))
        if temperature is not None and self.by_temperature is not None:
            t = temperature.to(theta.dtype).reshape(-1).expand(theta.shape[0])
            known = (t > 0) & ~torch.isnan(t)  # NaN or ≤ 0: unknown → energy-indexed table
            t_safe = torch.where(known, t, torch.ones_like(t))
            # Pick each row's calibration first, then evaluate the windows once (not once per table).
            packed = torch.where(known[:, None], self.by_temperature.read(t_safe), packed)
        score, site = self._evaluate(_Rows.unpack(packed, self.by_energy.sizes), x)
        return score.to(out_dtype), site.to(out_dtype)


def _kernel_weights(e: np.ndarray, grid: np.ndarray, width: float) -> np.ndarray:
    """[G, N] normalised Gaussian-kernel weights of the samples at each grid point. Adaptive bandwidth:
    at least `width`, and wide enough to hold ~24 samples, so sparse regions (or a tiny calibration
    set) do not get spreads fitted to two or three configurations."""
    min_n = min(24, len(e))
    dist = np.sort(np.abs(e[None, :] - grid[:, None]), axis=1)[:, min_n - 1]  # [G]
    bw = np.maximum(width, dist)[:, None]
    wts = np.exp(-0.5 * ((e[None, :] - grid[:, None]) / bw) ** 2)
    return wts / wts.sum(axis=1, keepdims=True)


def _kernel_moments(e: np.ndarray, x: np.ndarray, grid: np.ndarray, width: float) -> tuple[np.ndarray, np.ndarray]:
    """Mean and conditional spread of x [N, K, ...] as functions of the conditioning variable, on `grid`.

    The spread is the kernel RMS of each sample's residual from the mean interpolated at its *own*
    value, so the slope of the mean across the kernel does not inflate it. Trailing axes are pooled.
    """
    x = x.reshape(len(e), x.shape[1], -1)  # [N, K, S]
    wts = _kernel_weights(e, grid, width)
    means = wts @ x.mean(axis=2)  # [G, K]
    lo, step = float(grid[0]), float(grid[1] - grid[0]) if len(grid) > 1 else 1.0
    hw = hat_weights(torch.as_tensor(e, dtype=torch.float64), lo, step, len(grid)).numpy()  # [N, G]
    own = hw @ means  # [N, K]
    sq = ((x - own[:, :, None]) ** 2).mean(axis=2)  # [N, K]
    return means, np.sqrt(wts @ sq)


def _floors(scan_specs: list[tuple[str, int, int]], lattice_size: int) -> tuple[np.ndarray, np.ndarray]:
    # Spreads get absolute floors on each statistic's natural scale: a statistic that never moves on
    # normal data (no frozen bonds, no vortices at low T) must not turn one event into z ≈ 10⁶.
    n = lattice_size * lattice_size
    scan = {"resid": 2e-3, "frozen": 0.05}
    glob = {"energy": 1e-3, "magnetization": 2e-3, "diag": 2e-3, "jx": 2e-3, "jy": 2e-3, "vortex": 1.0 / n,
            "resid": 2e-3}  # fmt: skip
    return np.array([scan[s[0]] for s in scan_specs]), np.array([glob[f] for f in GLOBAL_FEATURES])


def _batches(x: _Inputs, n: int, size: int = 256):
    for i in range(0, n, size):
        sl = slice(i, i + size)
        yield sl, _Inputs(x.a[sl], x.b[sl], x.scan[sl], x.glob[sl])


@torch.no_grad()
def _fit_table(
    variable: str,
    tau: np.ndarray,
    temps: np.ndarray | None,
    x: _Inputs,
    specs: list[tuple[str, int, int]],
    lattice_size: int,
    n_grid: int,
) -> Table:
    n = len(tau)
    lo, hi = float(tau.min()), float(tau.max())
    step = max((hi - lo) / (n_grid - 1), 1e-3)
    grid = lo + step * np.arange(n_grid)
    width = max(step, 1e-3)
    f32 = lambda a: np.asarray(a, np.float32)  # noqa: E731
    if variable == "temperature":
        t_grid = grid
    elif temps is not None:  # the mean temperature of normal data at each energy
        t_grid = _kernel_moments(tau, np.asarray(temps, np.float64)[:, None], grid, width)[0][:, 0]
    else:  # no temperatures at all: invert the spin-wave law e ≈ −2 + T/2 + T²/16 (rough, monotonic)
        t_grid = 4.0 * (np.sqrt(np.clip(grid + 3.0, 1.0, None)) - 1.0)
    t_grid = np.maximum(t_grid, T_MIN)
    scan_specs = [s for s in specs if not is_lr(s)]
    hw = hat_weights(torch.as_tensor(tau, dtype=torch.float64), lo, step, n_grid)
    beta = 1.0 / (hw @ torch.as_tensor(t_grid, dtype=torch.float64)).clamp(min=T_MIN)
    # Offsets c_w: E_normal[exp(λ_w + c_w)] = 1 at each τ (a kernel-weighted log-mean-exp).
    ell = torch.cat([_logmeanexp(lr_values(xb.a, xb.b, beta[sl]), (2, 3)) for sl, xb in _batches(x, n)])
    wts = torch.as_tensor(_kernel_weights(tau, grid, width))
    offs = -torch.logsumexp(torch.log(wts.clamp(min=1e-300))[:, :, None] + ell.double()[None], dim=1)  # [G, S_lr]
    sm, ss = _kernel_moments(tau, x.scan.numpy(), grid, width)
    gm, gs = _kernel_moments(tau, x.glob.numpy(), grid, width)
    sfl, gfl = _floors(scan_specs, lattice_size)
    k = sm.shape[1] + gm.shape[1] + 1
    table = Table(
        variable, lo, step, f32(t_grid), f32(offs.numpy()), f32(sm), f32(np.maximum(ss, sfl[None, :])),
        f32(gm), f32(np.maximum(gs, gfl[None, :])),
        group_mean=np.zeros((n_grid, k), np.float32), group_std=np.ones((n_grid, k), np.float32),
        max_mean=np.zeros(n_grid, np.float32), max_std=np.ones(n_grid, np.float32),
    )  # fmt: skip
    # Second pass: every group's normal level (scan maxima of z, global z, Λ), then the raw score.
    t = torch.as_tensor(tau, dtype=torch.float64)
    head = AnomalyHead(Calibration(lattice_size, table, None, 0, specs))
    levels = []
    for sl, xb in _batches(x, n):
        _, big, zs, gz = head.levels(_Rows.of(head.by_energy, t[sl]), xb)
        levels.append(torch.cat([zs.amax(dim=(-2, -1)), gz, big[:, None]], dim=1).numpy())
    grm, grs = _kernel_moments(tau, np.concatenate(levels), grid, width)
    table.group_mean, table.group_std = f32(grm), f32(np.maximum(grs, 0.05))
    head = AnomalyHead(Calibration(lattice_size, table, None, 0, specs))
    raws = np.concatenate(
        [head._evaluate(_Rows.of(head.by_energy, t[sl]), xb)[0].numpy() for sl, xb in _batches(x, n)]
    )
    mm, ms = _kernel_moments(tau, raws[:, None], grid, width)
    table.max_mean = f32(mm[:, 0])
    # The raw score is already in z units; a spread below 0.1 only happens with a handful of normal
    # samples and would turn float32 rounding into visible score differences.
    table.max_std = f32(np.maximum(ms[:, 0], 0.1))
    return table


@torch.no_grad()
def calibrate(
    forward: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    angles: np.ndarray,
    lattice_size: int,
    temperature: np.ndarray | None = None,
    n_grid: int = 24,
    batch: int = 256,
    holdout: float = 0.3,
    seed: int = 0,
    specs: list[tuple[str, int, int]] | None = None,
    extra_angles: np.ndarray | None = None,
    extra_temperature: np.ndarray | None = None,
) -> Calibration:
    """Fit the calibration on normal configurations `angles` [N, L, L] (and their temperatures, if known).

    `forward(theta)` returns the model's (θ̂, σ). A `holdout` fraction is kept out of the fit and
    only used to measure the normal quantiles of the final score (an honest false-alarm table).
    Without `temperature` the graph still accepts a temperature input but ignores it.
    `extra_angles` (e.g. training configurations) join the fit only, never the holdout: the tails of
    lattice maxima need many normal lattices per temperature (measured at L = 32, T = 2: a 12×12 dead
    patch 0.94 with 300 calibration lattices, 0.999 with 1200).
    """
    specs = list(specs) if specs is not None else window_specs(lattice_size)
    lr_specs = [s for s in specs if is_lr(s)]
    scan_specs = [s for s in specs if not is_lr(s)]
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(angles))
    n_hold = int(len(angles) * holdout) if len(angles) >= 20 else 0
    fit_idx, hold_idx = perm[n_hold:], perm[:n_hold]
    fit_angles = angles[fit_idx]
    t_fit = None if temperature is None else np.asarray(temperature, dtype=np.float64)[fit_idx]
    if extra_angles is not None and len(extra_angles):
        fit_angles = np.concatenate([fit_angles, np.asarray(extra_angles, dtype=fit_angles.dtype)])
        if t_fit is not None:
            if extra_temperature is None:
                raise ValueError("extra_angles need extra_temperature when temperature is given")
            t_fit = np.concatenate([t_fit, np.asarray(extra_temperature, dtype=np.float64)])

    parts: list[tuple[torch.Tensor, ...]] = []
    energies = []
    for i in range(0, len(fit_angles), batch):
        th = torch.as_tensor(np.asarray(fit_angles[i : i + batch], dtype=np.float32))
        th_hat, sig = forward(th)
        th, th_hat, sig = th.double(), th_hat.double(), sig.double()  # as the head computes
        a, b = lr_parts(th, lr_specs)
        # The per-anchor likelihood parts are kept in float32 (half the memory; the fit is not
        # precision-critical, the graph's own evaluation is float64).
        parts.append(
            (a.float(), b.float(), scan_statistics(th, th_hat, sig, scan_specs), global_statistics(th, th_hat, sig))
        )
        energies.append(physics.energy_per_site(th).numpy())
    x = _Inputs(*(torch.cat([p[j] for p in parts]) for j in range(4)))
    e = np.concatenate(energies).astype(np.float64)
    by_e = _fit_table("energy", e, t_fit, x, specs, lattice_size, n_grid)
    by_t = None if t_fit is None else _fit_table("temperature", t_fit, t_fit, x, specs, lattice_size, n_grid)
    cal = Calibration(lattice_size, by_e, by_t, int(len(fit_angles) + len(hold_idx)), specs)
    # Normal quantiles of the final score, on configurations the fit never saw.
    head = AnomalyHead(cal)
    src = hold_idx if n_hold else fit_idx
    s_e, s_t = [], []
    for i in range(0, len(src), batch):
        th = torch.as_tensor(np.asarray(angles[src[i : i + batch]], dtype=np.float32))
        th_hat, sig = forward(th)
        en = physics.energy_per_site(th)
        s_e.append(head(th, th_hat, sig, en)[0].numpy())
        if by_t is not None:
            tt = torch.as_tensor(np.asarray(temperature, dtype=np.float32)[src[i : i + batch]])
            s_t.append(head(th, th_hat, sig, en, tt)[0].numpy())

    def q(s: np.ndarray) -> dict[str, float]:
        out = {f"q{p}": float(np.quantile(s, p / 100)) for p in (50, 90, 99, 99.9)}
        out["max"] = float(s.max())
        return out

    by_e.quantiles = q(np.concatenate(s_e))
    if by_t is not None:
        by_t.quantiles = q(np.concatenate(s_t))
    return cal
