"""Batched Monte Carlo for the 2D XY model: every temperature (and replica) advances together.

Moves (each satisfies detailed balance on its own, so their composition leaves the Boltzmann
distribution invariant):

* **Checkerboard Metropolis.** A site is rotated by δ = 2·atan(a), a ~ U[−w, w]: the density of δ is
  symmetric, so the proposal is symmetric, and cos δ = (1−a²)/(1+a²), sin δ = 2a/(1+a²) need no
  transcendental function. Acceptance min(1, e^{−βΔE}) uses a branch-free float32 exp (absolute error < 6e-8).
  The window w is tuned per temperature during thermalization only, then frozen.
* **Over-relaxation.** s → 2(s·h)h/|h|² − s: a reflection about the local field, energy conserving and
  its own inverse (microcanonical); it moves spin waves fast at no rejection cost.
* **Wolff clusters** (Wolff 1989, embedded Ising spins along a random axis r): bonds activate with
  p = 1 − exp(−2β (r·s_i)(r·s_j)); flipping the cluster beats critical slowing down near and below T_KT.
  Per temperature, the number of clusters per sweep is set from the mean cluster size measured during
  thermalization (so a sweep flips about `wolff`·N spins in clusters, at least one cluster), then frozen.

One "sweep" = Wolff clusters + one Metropolis sweep + `overrelax` over-relaxation sweeps (the default mix).

Spins live as unit vectors (cos θ, sin θ) in float32, split by checkerboard colour into arrays of shape
[R, 2, L, L/2] so the per-row loops are contiguous and SIMD-vectorised by numba/LLVM, with one
xoroshiro128++ stream per row lane and replica (reproducible from one seed, independent of threading).
On CUDA (`device="cuda"`) a batched torch implementation runs the same Metropolis and over-relaxation
moves, and Swendsen–Wang clusters with the same embedding in place of single Wolff clusters.
Even L is required: the two checkerboard colours must not touch across the periodic edge.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from llvmlite import ir
from numba import njit, prange
from numba.core import types
from numba.extending import intrinsic

from training.dataset import LatticeDataset
from training.stats import Stats, statistics

# ----------------------------------------------------------------------------------------------------------
# Random numbers: xoroshiro128++ (Blackman & Vigna), all 64 output bits of good quality.
_U8 = np.uint64(8)
_U11 = np.uint64(11)
_U17 = np.uint64(17)
_U21 = np.uint64(21)
_U28 = np.uint64(28)
_U36 = np.uint64(36)
_U40 = np.uint64(40)
_U47 = np.uint64(47)
_U49 = np.uint64(49)
_U15 = np.uint64(15)
_MASK24 = np.uint64(0xFFFFFF)
_INV24 = np.float32(1.0 / 16777216.0)
_HALF24 = np.float32(0.5 / 16777216.0)
_INV53 = 1.0 / 9007199254740992.0

_LOG2E = np.float32(1.0 / math.log(2.0))
_LN2 = np.float32(math.log(2.0))

_FASTMATH = {"contract", "reassoc", "nsz", "arcp"}  # no 'afn'/'nnan': keep exact functions and NaN semantics


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """Vectorised splitmix64 finaliser: seeds independent xoroshiro streams from one integer seed."""
    x = (x + np.uint64(0x9E3779B97F4A7C15)) & np.uint64(0xFFFFFFFFFFFFFFFF)
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def seed_streams(seed: int, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Two uint64 state words for each of prod(shape) xoroshiro128++ streams, derived from `seed`."""
    key = _splitmix64(np.array([seed & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64))[0]
    n = int(np.prod(shape))
    with np.errstate(over="ignore"):
        idx = key + np.arange(2 * n, dtype=np.uint64) * np.uint64(0xD1B54A32D192ED03)
    words = _splitmix64(idx)
    s0, s1 = words[0::2].reshape(shape).copy(), words[1::2].reshape(shape).copy()
    s0[(s0 == 0) & (s1 == 0)] = np.uint64(1)  # the all-zero state is the one fixed point
    return s0, s1


@njit(inline="always", cache=True, error_model="numpy")
def _rotl(x, k, kc):
    return (x << k) | (x >> kc)


@njit(inline="always", cache=True, error_model="numpy")
def _next(s0, s1):
    """One xoroshiro128++ step: (output, new s0, new s1)."""
    out = _rotl(s0 + s1, _U17, _U47) + s0
    s1 = s1 ^ s0
    n0 = _rotl(s0, _U49, _U15) ^ s1 ^ (s1 << _U21)
    n1 = _rotl(s1, _U28, _U36)
    return out, n0, n1


@intrinsic
def _f32_from_bits(typingctx, i):
    """Reinterpret int32 bits as float32 (builds 2^k exactly; free, and keeps the loop vectorisable)."""
    sig = types.float32(types.int32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return sig, codegen


@njit(inline="always", cache=True, error_model="numpy")
def exp_neg(x):
    """e^{-x} for x ≥ 0 (x ≤ 0 gives 1) in float32, branch-free so the calling loop SIMD-vectorises.

    e^{-x} = 2^{-t}, t = x·log2 e = k − z/ln2 with k = round(t): 2^{-k} from the exponent bits, e^{z} for
    |z| ≤ ln2/2 from a degree-7 Taylor polynomial. Absolute error < 6e-8 (the resolution of the 24-bit
    uniform it is compared with); x is clamped at 87 (e^{-87} < 2e-38).
    """
    t = min(max(x, np.float32(0.0)), np.float32(87.0)) * _LOG2E
    k = np.int32(t + np.float32(0.5))
    z = (np.float32(k) - t) * _LN2
    p = np.float32(1.0) + z * (np.float32(1.0) + z * (np.float32(1 / 2) + z * (np.float32(1 / 6) + z * (
        np.float32(1 / 24) + z * (np.float32(1 / 120) + z * (np.float32(1 / 720) + z * np.float32(1 / 5040)))))))
    return p * _f32_from_bits((np.int32(127) - k) << np.int32(23))


@njit(inline="always", cache=True, error_model="numpy")
def metropolis_site(sx, sy, hx, hy, v, w, beta):
    """One Metropolis update of spin (sx, sy) in local field (hx, hy), using 64 random bits `v`.

    Returns (new sx, new sy, accepted). Shared by the lattice kernel and the single-site test.
    """
    u1 = np.float32(v >> _U40) * _INV24 + _HALF24  # two 24-bit uniforms in (0, 1) from one draw
    u2 = np.float32((v >> _U8) & _MASK24) * _INV24 + _HALF24
    a = (np.float32(2.0) * u1 - np.float32(1.0)) * w
    d = np.float32(1.0) / (np.float32(1.0) + a * a)
    c = (np.float32(1.0) - a * a) * d
    s = np.float32(2.0) * a * d
    nx = c * sx - s * sy
    ny = s * sx + c * sy
    # renormalise (one Newton step): stops float32 rounding from drifting |s| away from 1
    g = np.float32(1.5) - np.float32(0.5) * (nx * nx + ny * ny)
    nx *= g
    ny *= g
    de = hx * (sx - nx) + hy * (sy - ny)  # ΔE = −h·(s' − s)
    acc = u2 < exp_neg(beta * de)
    return (nx if acc else sx), (ny if acc else sy), acc


@njit(inline="always", cache=True, error_model="numpy")
def overrelax_site(sx, sy, hx, hy):
    """Reflect s about h: s' = 2(s·h)h/|h|² − s (energy conserving, its own inverse)."""
    hh = hx * hx + hy * hy
    ok = hh > np.float32(1e-12)
    t = np.float32(2.0) * (sx * hx + sy * hy) / (hh if ok else np.float32(1.0))
    nx = t * hx - sx
    ny = t * hy - sy
    g = np.float32(1.5) - np.float32(0.5) * (nx * nx + ny * ny)
    return (nx * g if ok else sx), (ny * g if ok else sy)


@njit(fastmath=_FASTMATH, cache=True, error_model="numpy")
def _local_field(x, y, c, hx, hy, ex, ey):
    """Field h = Σ neighbours at every colour-c site, into flat [L·H] buffers hx, hy.

    Up/down neighbours of half-row site i are site i of the other colour in rows y±1; the horizontal ones are
    ext[i+p], ext[i+p+1] with p = (y + c) % 2 and ext the other colour's row padded periodically.
    """
    size = x.shape[1]
    half = x.shape[2]
    o = 1 - c
    for row in range(size):
        p = (row + c) & 1
        up = row + 1 if row + 1 < size else 0
        dn = row - 1 if row > 0 else size - 1
        xo = x[o, row]
        yo = y[o, row]
        ex[0] = xo[half - 1]
        ey[0] = yo[half - 1]
        for i in range(half):
            ex[i + 1] = xo[i]
            ey[i + 1] = yo[i]
        ex[half + 1] = xo[0]
        ey[half + 1] = yo[0]
        xu = x[o, up]
        yu = y[o, up]
        xd = x[o, dn]
        yd = y[o, dn]
        base = row * half
        for i in range(half):
            hx[base + i] = xu[i] + xd[i] + ex[i + p] + ex[i + p + 1]
            hy[base + i] = yu[i] + yd[i] + ey[i + p] + ey[i + p + 1]


@njit(fastmath=_FASTMATH, cache=True, error_model="numpy")
def _metropolis_flat(xs, ys, hx, hy, r0, r1, w, beta):
    """Metropolis on one colour (flat arrays, one RNG lane per site): a long SIMD loop."""
    nacc = 0
    for k in range(xs.shape[0]):
        v, a, b = _next(r0[k], r1[k])
        r0[k] = a
        r1[k] = b
        nx, ny, acc = metropolis_site(xs[k], ys[k], hx[k], hy[k], v, w, beta)
        xs[k] = nx
        ys[k] = ny
        nacc += np.int32(acc)
    return nacc


@njit(fastmath=_FASTMATH, cache=True, error_model="numpy")
def _overrelax_flat(xs, ys, hx, hy):
    for k in range(xs.shape[0]):
        nx, ny = overrelax_site(xs[k], ys[k], hx[k], hy[k])
        xs[k] = nx
        ys[k] = ny


@njit(fastmath=_FASTMATH, cache=True, error_model="numpy")
def _dot_flat(xs, ys, hx, hy):
    acc = 0.0
    for k in range(xs.shape[0]):
        acc += np.float64(xs[k] * hx[k] + ys[k] * hy[k])
    return acc


@njit(fastmath=_FASTMATH, cache=True, error_model="numpy")
def _m2(xf, yf):
    """|m|² = |(1/N) Σ_i s_i|²."""
    mx = 0.0
    my = 0.0
    for k in range(xf.shape[0]):
        mx += np.float64(xf[k])
        my += np.float64(yf[k])
    n = xf.shape[0]
    return (mx * mx + my * my) / (n * n)


@njit(fastmath=_FASTMATH, cache=True, error_model="numpy")
def _lattice_pass(x, y, kind, r0, r1, w, beta, hx, hy, ex, ey):
    """One pass over both colours of one replica. kind 0: Metropolis, 1: over-relaxation, 2: energy.

    x, y: [2, L, H]; r0, r1: [≥ L·H] RNG lanes. Returns accepted moves (kind 0) or −Σ_bonds s_i·s_j (kind 2).
    """
    nflat = x.shape[1] * x.shape[2]
    total = 0.0
    for c in range(2 if kind != 2 else 1):  # energy: colour-0 sites touch every bond exactly once
        _local_field(x, y, c, hx, hy, ex, ey)
        xs = x[c].reshape(nflat)
        ys = y[c].reshape(nflat)
        if kind == 0:
            total += _metropolis_flat(xs, ys, hx, hy, r0, r1, w, beta)
        elif kind == 1:
            _overrelax_flat(xs, ys, hx, hy)
        else:
            total -= _dot_flat(xs, ys, hx, hy)
    return total


def neighbour_table(size: int) -> np.ndarray:
    """int32 [N, 4]: flat split-layout indices of the up, down, left, right neighbours of every site."""
    half = size // 2
    nb = np.empty((2, size, half, 4), dtype=np.int32)
    c, row, i = np.meshgrid(np.arange(2), np.arange(size), np.arange(half), indexing="ij")
    o = 1 - c
    p = (row + c) & 1
    flat = lambda cc, rr, ii: (cc * size + rr) * half + ii  # noqa: E731
    nb[..., 0] = flat(o, (row + 1) % size, i)
    nb[..., 1] = flat(o, (row - 1) % size, i)
    nb[..., 2] = flat(o, row, (i + p - 1) % half)
    nb[..., 3] = flat(o, row, (i + p) % half)
    return nb.reshape(-1, 4)


@njit(cache=True, error_model="numpy")
def _wolff_cluster(xf, yf, beta, r0, r1, lane, nbr, mark, stamp, stack, stackp):
    """Grow and flip one Wolff cluster in one replica's flat spin arrays; returns its size.

    A random axis r embeds Ising variables σ_i = sign(r·s_i); a bond joins the cluster with probability
    1 − exp(−2β (r·s_i)(r·s_j)) when (r·s_i)(r·s_j) > 0, and the cluster is reflected about r's normal.
    """
    nsite = xf.shape[0]
    s0 = r0[lane]  # the stream lives in registers during the cluster, written back at the end
    s1 = r1[lane]
    v, s0, s1 = _next(s0, s1)
    phi = 2.0 * math.pi * (np.float64(v >> _U11) * _INV53)
    rx = np.float32(math.cos(phi))
    ry = np.float32(math.sin(phi))
    v, s0, s1 = _next(s0, s1)
    k0 = np.int64(v % np.uint64(nsite))
    pk = rx * xf[k0] + ry * yf[k0]
    xf[k0] = xf[k0] - np.float32(2.0) * pk * rx
    yf[k0] = yf[k0] - np.float32(2.0) * pk * ry
    mark[k0] = stamp
    stack[0] = k0
    stackp[0] = pk
    top = 1
    n = 1
    b2 = np.float32(2.0 * beta)
    while top > 0:
        top -= 1
        k = stack[top]
        pk = stackp[top]
        for nb in range(4):
            j = nbr[k, nb]
            if mark[j] == stamp:
                continue
            pj = rx * xf[j] + ry * yf[j]
            t = pk * pj
            if t <= np.float32(0.0):
                continue
            v, s0, s1 = _next(s0, s1)
            # join with probability 1 − e^{−2βt}: a uniform u ∈ (0, 1) exceeds e^{−2βt} with exactly that chance
            if np.float32(v >> _U40) * _INV24 + _HALF24 > exp_neg(b2 * t):
                mark[j] = stamp
                nx = xf[j] - np.float32(2.0) * pj * rx
                ny = yf[j] - np.float32(2.0) * pj * ry
                g = np.float32(1.5) - np.float32(0.5) * (nx * nx + ny * ny)
                xf[j] = nx * g
                yf[j] = ny * g
                stack[top] = j
                stackp[top] = pj
                top += 1
                n += 1
    r0[lane] = s0
    r1[lane] = s1
    return n


@njit(parallel=True, fastmath=_FASTMATH, cache=True, error_model="numpy")
def run_sweeps(x, y, r0, r1, beta, width, n_over, n_wolff, n_sweeps, metropolis, energy, mag2, accepted, clusters,
               nbr, mark, stamps, stack, stackp):
    """Advance every replica by `n_sweeps` sweeps (parallel over replicas), recording e per sweep.

    x, y: float32 [R, 2, L, H]; r0, r1: uint64 [R, L·H+1] (lane L·H drives the Wolff clusters);
    energy, mag2: float64 [R, ≥n_sweeps] (per site; |m|²); accepted, clusters: int64 [R, 2] accumulators
    (Metropolis accepted/proposed, Wolff flipped sites/clusters).
    """
    nrep = x.shape[0]
    size = x.shape[2]
    half = x.shape[3]
    nsite = size * size
    for r in prange(nrep):
        ex = np.empty(half + 2, dtype=np.float32)
        ey = np.empty(half + 2, dtype=np.float32)
        hx = np.empty(size * half, dtype=np.float32)
        hy = np.empty(size * half, dtype=np.float32)
        b = np.float32(beta[r])
        w = np.float32(width[r])
        xr = x[r]
        yr = y[r]
        xf = xr.reshape(nsite)
        yf = yr.reshape(nsite)
        rr0 = r0[r]
        rr1 = r1[r]
        for t in range(n_sweeps):
            for _ in range(n_wolff[r]):
                stamps[r] += 1
                clusters[r, 0] += _wolff_cluster(xf, yf, beta[r], rr0, rr1, size * half, nbr, mark[r], stamps[r],
                                                 stack[r],
                                                 stackp[r])
                clusters[r, 1] += 1
            if metropolis:
                accepted[r, 0] += np.int64(_lattice_pass(xr, yr, 0, rr0, rr1, w, b, hx, hy, ex, ey))
                accepted[r, 1] += nsite
            for _ in range(n_over):
                _lattice_pass(xr, yr, 1, rr0, rr1, w, b, hx, hy, ex, ey)
            energy[r, t] = _lattice_pass(xr, yr, 2, rr0, rr1, w, b, hx, hy, ex, ey) / nsite
            mag2[r, t] = _m2(xf, yf)


# ----------------------------------------------------------------------------------------------------------
# Layout conversion: full [.., L, L] angles <-> checkerboard-split unit vectors [.., 2, L, L/2].


def split_lattice(full: np.ndarray) -> np.ndarray:
    """[..., L, L] → [..., 2, L, L/2]; colour c holds sites with (x + y) % 2 == c."""
    size = full.shape[-1]
    out = np.empty((*full.shape[:-2], 2, size, size // 2), dtype=full.dtype)
    for c in range(2):
        for p in range(2):
            y0 = (p - c) % 2  # rows whose colour-c sites start at x = p
            out[..., c, y0::2, :] = full[..., y0::2, p::2]
    return out


def join_lattice(split: np.ndarray) -> np.ndarray:
    """Inverse of `split_lattice`."""
    size = split.shape[-2]
    out = np.empty((*split.shape[:-3], size, size), dtype=split.dtype)
    for c in range(2):
        for p in range(2):
            y0 = (p - c) % 2
            out[..., y0::2, p::2] = split[..., c, y0::2, :]
    return out


# ----------------------------------------------------------------------------------------------------------
# Samplers: one object per backend with the same small interface, driven by `simulate`.


@dataclass
class MoveSet:
    metropolis: bool = True
    overrelax: int = 2  # over-relaxation sweeps per sweep
    wolff: float = 0.25  # Wolff-flipped sites per sweep as a fraction of N (≥ 1 cluster; 0 disables clusters)

    def describe(self) -> str:
        parts = []
        if self.wolff > 0:
            parts.append(f"wolff(~{self.wolff:g}N sites)")
        if self.metropolis:
            parts.append("checkerboard-metropolis")
        if self.overrelax:
            parts.append(f"{self.overrelax}x overrelaxation")
        return " + ".join(parts) or "none"


class NumbaSampler:
    """CPU sampler: fused numba kernels, parallel over replicas."""

    backend = "numba"

    def __init__(self, size: int, betas: np.ndarray, moves: MoveSet, seed: int, start: np.ndarray) -> None:
        self.size = size
        self.betas = np.asarray(betas, dtype=np.float64)
        self.moves = moves
        nrep = len(self.betas)
        half = size // 2
        theta = split_lattice(start.astype(np.float64))
        self.x = np.ascontiguousarray(np.cos(theta), dtype=np.float32)
        self.y = np.ascontiguousarray(np.sin(theta), dtype=np.float32)
        self.r0, self.r1 = seed_streams(seed, (nrep, size * half + 1))
        self.width = np.full(nrep, 1.0, dtype=np.float32)
        self.n_wolff = np.full(nrep, 1 if moves.wolff > 0 else 0, dtype=np.int64)
        nsite = size * size
        self.nbr = neighbour_table(size)
        self.mark = np.zeros((nrep, nsite), dtype=np.int64)
        self.stamps = np.zeros(nrep, dtype=np.int64)
        self.stack = np.zeros((nrep, nsite), dtype=np.int64)
        self.stackp = np.zeros((nrep, nsite), dtype=np.float32)
        self.accepted = np.zeros((nrep, 2), dtype=np.int64)
        self.clusters = np.zeros((nrep, 2), dtype=np.int64)

    def sweep(self, n: int) -> np.ndarray:
        energy = np.empty((len(self.betas), n), dtype=np.float64)
        self.mag2 = np.empty((len(self.betas), n), dtype=np.float64)  # |m|² per sweep, for τ of a slow mode
        run_sweeps(self.x, self.y, self.r0, self.r1, self.betas, self.width, self.moves.overrelax, self.n_wolff, n,
                   self.moves.metropolis, energy, self.mag2, self.accepted, self.clusters, self.nbr, self.mark,
                   self.stamps, self.stack, self.stackp)
        return energy

    def reset_counters(self) -> None:
        self.accepted[:] = 0
        self.clusters[:] = 0

    def acceptance(self) -> np.ndarray:
        return self.accepted[:, 0] / np.maximum(self.accepted[:, 1], 1)

    def mean_cluster(self) -> np.ndarray:
        return self.clusters[:, 0] / np.maximum(self.clusters[:, 1], 1)

    def angles(self) -> np.ndarray:
        """Current configurations as float32 angles [R, L, L] in [0, 2π)."""
        theta = np.arctan2(join_lattice(self.y), join_lattice(self.x)).astype(np.float32)
        theta = np.mod(theta, np.float32(2 * math.pi))
        theta[theta >= np.float32(2 * math.pi)] = 0.0
        return theta


# ----------------------------------------------------------------------------------------------------------

_TUNING_DEFAULTS: dict[str, Any] = {
    "replicas": 1,  # independent chains per temperature; samples are split between them
    "overrelax": 2,
    "wolff": 0.25,
    "wolff_min_cluster": 16.0,  # cap on clusters per sweep: wolff·N / wolff_min_cluster
    "metropolis": True,
    "tune_sweeps": 200,  # window / cluster-count tuning (discarded)
    "therm_min": 500,  # minimum equilibration sweeps after tuning
    "therm_tau": 200.0,  # equilibrate for at least this many τ (the last half is the pilot τ estimate)
    "therm_max": 200_000,
    "spacing_factor": 2.0,  # saved samples are ≥ spacing_factor × τ sweeps apart
    "min_spacing": 1,
    "start": "mixed",  # ordered start below T_KT, random above; or "hot" / "cold"
    "target_acceptance": 0.5,
}


@dataclass(frozen=True)
class TemperatureSummary:
    temperature: float
    energy: Stats
    acceptance: float
    mean_cluster: float
    wolff_per_sweep: int
    width: float


def _check_args(size: int, temperatures: Sequence[float], samples: int) -> np.ndarray:
    if not isinstance(size, int | np.integer) or size < 4:
        raise ValueError(f"lattice size must be an integer ≥ 4, got {size!r}")
    if size % 2:
        raise ValueError(f"lattice size must be even (checkerboard updates), got {size}")
    temps = np.asarray(list(temperatures), dtype=np.float64).reshape(-1)
    if temps.size == 0:
        raise ValueError("no temperatures given")
    if not np.all(np.isfinite(temps)) or np.any(temps <= 0):
        raise ValueError(f"temperatures must be finite and > 0, got {temps.tolist()}")
    if not isinstance(samples, int | np.integer) or samples < 1:
        raise ValueError(f"samples must be an integer ≥ 1, got {samples!r}")
    return temps


def _initial_state(temps: np.ndarray, replicas: int, size: int, start: str, seed: int) -> np.ndarray:
    rng = np.random.default_rng([seed, 0x5EED])
    nrep = len(temps) * replicas
    hot = rng.uniform(0.0, 2 * math.pi, size=(nrep, size, size))
    cold = np.broadcast_to(rng.uniform(0.0, 2 * math.pi, size=(nrep, 1, 1)), hot.shape)
    if start == "hot":
        return hot
    if start == "cold":
        return np.array(cold)
    if start != "mixed":
        raise ValueError(f"start must be 'mixed', 'hot' or 'cold', got {start!r}")
    ordered = np.repeat(temps < 0.8929, replicas)[:, None, None]
    return np.where(ordered, cold, hot)


def _make_sampler(device: str, size: int, betas: np.ndarray, moves: MoveSet, seed: int, start: np.ndarray,
                  backend: str):
    if backend == "auto":
        backend = "numba" if device == "cpu" else "torch"
    if backend == "numba":
        if device != "cpu":
            raise ValueError(f"the numba backend runs on the CPU only (device={device!r})")
        return NumbaSampler(size, betas, moves, seed, start)
    if backend == "torch":
        from training.montecarlo_torch import TorchSampler

        return TorchSampler(size, betas, moves, seed, start, device=device)
    raise ValueError(f"backend must be 'auto', 'numba' or 'torch', got {backend!r}")


def _tune(sampler, temps_rep: np.ndarray, opts: dict[str, Any], nsite: int, pbar) -> None:
    """Tune the Metropolis window and the Wolff cluster count per replica; frozen afterwards."""
    moves: MoveSet = sampler.moves
    block = 10
    n_blocks = max(1, opts["tune_sweeps"] // block)
    flipped = np.zeros(len(temps_rep))
    clusters = np.zeros(len(temps_rep))
    for k in range(n_blocks):
        sampler.reset_counters()
        sampler.sweep(block)
        if pbar is not None:
            pbar.update(block)
        if moves.metropolis:
            acc = sampler.acceptance()
            factor = np.clip((acc + 0.02) / opts["target_acceptance"], 0.5, 2.0)
            sampler.width = np.clip(sampler.width * factor, 0.02, 30.0).astype(np.float32)
        if moves.wolff > 0 and getattr(sampler, "tunes_clusters", True):
            if k >= n_blocks // 2:  # cluster sizes averaged over the second half (the state has relaxed by then)
                flipped += sampler.clusters[:, 0]
                clusters += sampler.clusters[:, 1]
                mean_c = np.maximum(flipped / np.maximum(clusters, 1), 1.0)
            else:
                mean_c = np.maximum(sampler.mean_cluster(), 1.0)
            # ~wolff·N flipped sites per sweep; at most wolff·N/16 clusters, because at high T clusters are tiny
            # (there local moves decorrelate fast and a cluster costs ~10 Metropolis updates per site)
            cap = max(1, round(moves.wolff * nsite / opts["wolff_min_cluster"]))
            sampler.n_wolff = np.clip(np.rint(moves.wolff * nsite / mean_c), 1, cap).astype(np.int64)


def tuned_sampler(size: int, temperatures: Sequence[float], seed: int = 0, device: str = "cpu",
                  backend: str = "auto", **tuning: Any):
    """A sampler for `temperatures` (× replicas) whose Metropolis window and Wolff count are tuned (benchmarks)."""
    temps = _check_args(size, temperatures, 1)
    opts = {**_TUNING_DEFAULTS, **tuning}
    moves = MoveSet(metropolis=bool(opts["metropolis"]), overrelax=int(opts["overrelax"]), wolff=float(opts["wolff"]))
    replicas = int(opts["replicas"])
    temps_rep = np.repeat(temps, replicas)
    start = _initial_state(temps, replicas, size, opts["start"], seed)
    sampler = _make_sampler(device, size, 1.0 / temps_rep, moves, seed, start, backend)
    _tune(sampler, temps_rep, opts, size * size, None)
    return sampler


def simulate(
    size: int,
    temperatures: Sequence[float],
    samples: int,
    seed: int = 0,
    device: str = "cpu",
    progress: bool = False,
    **tuning: Any,
) -> LatticeDataset:
    """Equilibrated XY configurations: `samples` per temperature, spaced by ≥ 2τ_int sweeps.

    Returns a LatticeDataset with angles float32 [len(temperatures)·samples, L, L] in [0, 2π) (grouped by
    temperature, in the given order), temperature float32 and metadata (algorithm, sweeps, τ per temperature,
    energy statistics, seed, version). Tuning keywords: see `_TUNING_DEFAULTS` and `backend`.
    """
    from hgvae import __version__

    t_start = time.perf_counter()
    temps = _check_args(size, temperatures, samples)
    backend = tuning.pop("backend", "auto")
    unknown = set(tuning) - set(_TUNING_DEFAULTS)
    if unknown:
        raise TypeError(f"unknown tuning options: {sorted(unknown)}")
    opts = {**_TUNING_DEFAULTS, **tuning}
    replicas = int(opts["replicas"])
    if replicas < 1:
        raise ValueError("replicas must be ≥ 1")
    moves = MoveSet(metropolis=bool(opts["metropolis"]), overrelax=int(opts["overrelax"]), wolff=float(opts["wolff"]))
    if not moves.metropolis and moves.wolff <= 0:
        raise ValueError("over-relaxation alone is not ergodic: enable Metropolis or Wolff moves")
    nsite = size * size
    temps_rep = np.repeat(temps, replicas)
    start = _initial_state(temps, replicas, size, opts["start"], seed)
    sampler = _make_sampler(device, size, 1.0 / temps_rep, moves, seed, start, backend)
    per_replica = -(-samples // replicas)

    pbar = None
    if progress:
        from tqdm import tqdm

        pbar = tqdm(total=opts["tune_sweeps"] + opts["therm_min"], unit="sweep", desc=f"simulate L={size}")

    # 1. tune proposal width and cluster counts (these sweeps are discarded)
    _tune(sampler, temps_rep, opts, nsite, pbar)

    # 2. equilibrate until the run is long against τ: at least therm_tau·τ_max sweeps (and therm_min)
    series: list[np.ndarray] = []
    series_m: list[np.ndarray] = []
    done = 0
    block = int(opts["therm_min"])
    hit_max = False
    while True:
        series.append(sampler.sweep(block))
        series_m.append(sampler.mag2)
        done += block
        if pbar is not None:
            pbar.update(block)
        pilot = np.concatenate(series, axis=1)[:, done // 2 :]
        pilot_m = np.concatenate(series_m, axis=1)[:, done // 2 :]
        # τ of the energy and of |m|², a slow mode near T_KT: both must be short against the run and the spacing
        taus_e = np.array([statistics(e).tau for e in pilot])
        taus = np.maximum(taus_e, [statistics(m).tau for m in pilot_m])
        need = max(int(opts["therm_min"]), int(math.ceil(opts["therm_tau"] * taus.max())))
        if done >= need:
            break
        if done >= opts["therm_max"]:
            hit_max = True
            warnings.warn(f"equilibration stopped at therm_max={done} sweeps with τ_max={taus.max():.1f}",
                          stacklevel=2)
            break
        block = min(need - done, int(opts["therm_max"]) - done)
        if pbar is not None:
            pbar.total += block
            pbar.refresh()
    spacing = max(int(opts["min_spacing"]), int(math.ceil(opts["spacing_factor"] * taus.max())))

    # 3. production: one snapshot every `spacing` sweeps, energy recorded every sweep
    if pbar is not None:
        pbar.total += per_replica * spacing
        pbar.refresh()
    snaps = np.empty((per_replica, len(temps_rep), size, size), dtype=np.float32)
    sampler.reset_counters()
    prod, prod_m = [], []
    for s in range(per_replica):
        prod.append(sampler.sweep(spacing))
        prod_m.append(sampler.mag2)
        snaps[s] = sampler.angles()
        if pbar is not None:
            pbar.update(spacing)
    if pbar is not None:
        pbar.close()
    energy = np.concatenate([pilot, *prod], axis=1)  # pilot half + production: one contiguous equilibrium series
    mag2 = np.concatenate([pilot_m, *prod_m], axis=1)
    tau_m2 = np.array([statistics(m).tau for m in mag2]).reshape(len(temps), replicas).max(axis=1)

    # 4. assemble: temperature-major, replicas interleaved so any prefix of a temperature mixes chains
    snaps = snaps.reshape(per_replica, len(temps), replicas, size, size).transpose(1, 0, 2, 3, 4)
    angles = snaps.reshape(len(temps), per_replica * replicas, size, size)[:, :samples].reshape(-1, size, size)
    temperature = np.repeat(temps.astype(np.float32), samples)

    acc = sampler.acceptance().reshape(len(temps), replicas)
    mean_c = sampler.mean_cluster().reshape(len(temps), replicas)
    stats_t = []
    for ti in range(len(temps)):
        per = [statistics(energy[ti * replicas + k]) for k in range(replicas)]
        mean = float(np.mean([s.mean for s in per]))
        err = float(np.sqrt(np.sum([s.error_of_mean**2 for s in per])) / replicas)
        stats_t.append(Stats(mean=mean, error_of_mean=err, variance=float(np.mean([s.variance for s in per])),
                             tau=float(np.max([s.tau for s in per])), n=int(sum(s.n for s in per)),
                             n_eff=float(sum(s.n_eff for s in per))))
    tau_final = np.array([s.tau for s in stats_t])
    metadata = {
        "generator": "hgvae simulate",
        "hgvae_version": __version__,
        "algorithm": moves.describe(),
        "sweep_definition": "one sweep = Wolff clusters + 1 checkerboard Metropolis sweep + over-relaxation sweeps",
        "backend": sampler.backend,
        "device": device,
        "seed": int(seed),
        "size": int(size),
        "temperatures": temps.tolist(),
        "samples_per_temperature": int(samples),
        "replicas": replicas,
        "start": opts["start"],
        "sweeps": {
            "tune": int(opts["tune_sweeps"]),
            "thermalization": int(done),
            "spacing": int(spacing),
            "production": int(per_replica * spacing),
            "total": int(opts["tune_sweeps"] + done + per_replica * spacing),
        },
        "tau_definition": "integrated autocorrelation time tau_int = 1/2 + sum_t rho(t) in sweeps (FFT, Sokal "
                          "window c=5) of the energy ('tau') and of |m|^2 ('tau_m2'); samples are spaced by >= "
                          "spacing_factor * the largest pilot tau of either",
        "tau": tau_final.round(4).tolist(),
        "tau_m2": tau_m2.round(4).tolist(),
        "tau_pilot": taus.reshape(len(temps), replicas).max(axis=1).round(4).tolist(),
        "spacing_factor": float(opts["spacing_factor"]),
        "spacing_ok": bool(spacing >= opts["spacing_factor"] * max(tau_final.max(), tau_m2.max()) * 0.999),
        "equilibration_capped": hit_max,
        "energy_mean": [s.mean for s in stats_t],
        "energy_error": [s.error_of_mean for s in stats_t],
        "energy_n_eff": [round(s.n_eff, 1) for s in stats_t],
        "acceptance": acc.mean(axis=1).round(4).tolist(),
        "metropolis_width": sampler.width.reshape(len(temps), replicas).mean(axis=1).round(4).tolist(),
        "wolff_clusters_per_sweep": np.asarray(sampler.n_wolff).reshape(len(temps), replicas)[:, 0].tolist(),
        "wolff_mean_cluster": mean_c.mean(axis=1).round(3).tolist(),
        "overrelax": moves.overrelax,
        "seconds": round(time.perf_counter() - t_start, 3),
    }
    return LatticeDataset(angles=angles, temperature=temperature, metadata=metadata)


def summarize(dataset: LatticeDataset) -> list[TemperatureSummary]:
    """Per-temperature energy statistics recorded in a simulated data set's metadata."""
    md = dataset.metadata
    out = []
    for k, t in enumerate(md["temperatures"]):
        e = Stats(mean=md["energy_mean"][k], error_of_mean=md["energy_error"][k], variance=float("nan"),
                  tau=md["tau"][k], n=0, n_eff=md["energy_n_eff"][k])
        out.append(TemperatureSummary(t, e, md["acceptance"][k], md["wolff_mean_cluster"][k],
                                      md["wolff_clusters_per_sweep"][k], md["metropolis_width"][k]))
    return out
