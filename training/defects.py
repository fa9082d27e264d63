"""Synthetic sensor defects and AUROC, numpy only (used by training, promotion gates and tests).

Named kinds (the acceptance set): a patch of dead sensors (random angles), a patch of stuck sensors
(one constant angle), a misaligned patch (rotated by π/2). Extra kinds probe what the score was not
designed around: a flipped patch (θ → −θ), one dead line, a global noise increase, a smooth twist,
one hot site (a single random angle), a checkerboard π-flip patch, a frozen (T → 0) lattice. The
invariant kinds are NOT anomalies (the XY model is invariant under a global rotation and under the
reflection θ → −θ): a sound score leaves their AUROC at ~0.5.

How large a patch must be to be detectable at all is physics, not modelling: training/oracle.py
gives the Neyman–Pearson bound; `detectable_patch` is the side where it reaches 0.999 at every
T in 0.1–2.0 (measured on the L = 16 and 32 Monte Carlo sets; see benchmarks/anomaly.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

TWO_PI = 2.0 * math.pi


def _patch(L: int, size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    y0, x0 = rng.integers(0, L, size=2)
    ys = (y0 + np.arange(size)) % L
    xs = (x0 + np.arange(size)) % L
    return np.ix_(ys, xs)


def default_patch(L: int) -> int:
    return max(4, L // 4)


def inject(kind: str, theta: np.ndarray, rng: np.random.Generator, patch: int | None = None) -> np.ndarray:
    """A copy of one configuration [L, L] with a synthetic defect of the given kind."""
    L = theta.shape[-1]
    p = patch or default_patch(L)
    out = theta.copy()
    if kind == "dead":  # sensors returning random angles
        idx = _patch(L, p, rng)
        out[idx] = rng.uniform(0, TWO_PI, size=(p, p))
    elif kind == "stuck":  # sensors frozen at one angle
        idx = _patch(L, p, rng)
        out[idx] = rng.uniform(0, TWO_PI)
    elif kind == "misaligned":  # a region mounted rotated by a fixed angle
        idx = _patch(L, p, rng)
        out[idx] = out[idx] + math.pi / 2
    elif kind == "flipped":  # a region mirrored (θ → −θ)
        idx = _patch(L, p, rng)
        out[idx] = -out[idx]
    elif kind == "line":  # one dead row (or column) of sensors
        r = rng.integers(0, L)
        if rng.random() < 0.5:
            out[r, :] = rng.uniform(0, TWO_PI, size=L)
        else:
            out[:, r] = rng.uniform(0, TWO_PI, size=L)
    elif kind == "noise":  # every sensor noisier
        out = out + rng.normal(0.0, 0.5, size=out.shape)
    elif kind == "hot":  # one sensor returning a random angle
        y, x = rng.integers(0, L, size=2)
        out[y, x] = rng.uniform(0, TWO_PI)
    elif kind == "checker":  # a patch where every other sensor reads θ + π (a wiring fault)
        idx = _patch(L, p, rng)
        cb = (np.add.outer(np.arange(p), np.arange(p)) % 2) * math.pi
        out[idx] = out[idx] + cb
    elif kind == "frozen":  # a T → 0 lattice (aligned, tiny spin waves) whatever the nominal T
        out = rng.uniform(0, TWO_PI) + rng.normal(0.0, 0.05, size=out.shape)
    elif kind == "rotation":  # NOT an anomaly: a global rotation
        out = out + rng.uniform(0, TWO_PI)
    elif kind == "reflection":  # NOT an anomaly: θ → −θ everywhere
        out = -out
    elif kind == "twist":  # a smooth phase gradient (one winding across the lattice)
        x = np.arange(L)
        out = out + TWO_PI * x[None, :] / L
    else:
        raise ValueError(f"unknown anomaly kind {kind!r}")
    return np.mod(out, TWO_PI).astype(np.float32)


NAMED_KINDS = ("dead", "stuck", "misaligned")
EXTRA_KINDS = ("flipped", "line", "noise", "twist")
PROBE_KINDS = ("hot", "checker", "frozen")  # more unnamed kinds, measured by benchmarks/anomaly.py
INVARIANT_KINDS = ("rotation", "reflection")


def detectable_patch(kind: str, L: int) -> int:
    """Patch side where the oracle (known T and place) reaches AUROC 0.999 at every T in 0.1–2.0.

    Measured (benchmarks/anomaly.py): dead needs k = 10 at L = 16 (0.9999; the oracle that does not
    know the place: 0.9998) and k = 12 at L = 32 (1.0); a stuck patch is detectable at any size
    (oracle 1). A region rotated by π/2 never reaches 0.999 at T = 2 on L = 16 (k = 14: 0.997) and
    needs k = 20 at L = 32 with a known place (0.9995; 0.97 without): the largest side ≤ L − 4 is used.
    """
    # The needed side barely depends on L (it is set by the bonds at T = 2), only the lattice caps it.
    if kind == "dead":
        return max(2, min(L - 2, 10 if L <= 16 else 12))
    if kind == "misaligned":
        return max(2, min(L - 4, 12 if L <= 16 else 20))
    return default_patch(L)


def auroc(normal: np.ndarray, anomalous: np.ndarray) -> float:
    """Probability that an anomalous score exceeds a normal one (ties count half)."""
    normal, anomalous = np.asarray(normal, float), np.asarray(anomalous, float)
    both = np.concatenate([normal, anomalous])
    order = both.argsort(kind="mergesort")
    ranks = np.empty(len(both))
    ranks[order] = np.arange(1, len(both) + 1)
    # average ranks for ties
    _, inv, counts = np.unique(both, return_inverse=True, return_counts=True)
    sums = np.bincount(inv, weights=ranks)
    ranks = (sums / counts)[inv]
    r_anom = ranks[len(normal) :].sum()
    n1, n0 = len(anomalous), len(normal)
    return float((r_anom - n1 * (n1 + 1) / 2) / (n0 * n1))


def evaluate(
    score_fn: Callable[[np.ndarray], np.ndarray],
    angles: np.ndarray,
    temperature: np.ndarray | None,
    kinds: Sequence[str] = NAMED_KINDS,
    seed: int = 0,
    patch: int | None = None,
) -> dict[str, dict[float, float]]:
    """AUROC per kind and per temperature: each normal configuration against a defective copy of it."""
    rng = np.random.default_rng(seed)
    temps = temperature if temperature is not None else np.zeros(len(angles), np.float32)
    normal = score_fn(angles)
    out: dict[str, dict[float, float]] = {}
    for kind in kinds:
        bad = np.stack([inject(kind, a, rng, patch) for a in angles])
        s_bad = score_fn(bad)
        out[kind] = {round(float(t), 4): auroc(normal[temps == t], s_bad[temps == t]) for t in np.unique(temps)}
    return out
