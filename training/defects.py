"""Synthetic sensor defects and AUROC, numpy only (used by training, promotion gates and tests).

Named kinds (the acceptance set): a patch of dead sensors (random angles), a patch of stuck sensors
(one constant angle), a misaligned patch (rotated by π/2). Extra kinds probe what the score was not
designed around: a flipped patch (θ → −θ), one dead line, a global noise increase, a smooth twist.
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
    elif kind == "twist":  # a smooth phase gradient (one winding across the lattice)
        x = np.arange(L)
        out = out + TWO_PI * x[None, :] / L
    else:
        raise ValueError(f"unknown anomaly kind {kind!r}")
    return np.mod(out, TWO_PI).astype(np.float32)


NAMED_KINDS = ("dead", "stuck", "misaligned")
EXTRA_KINDS = ("flipped", "line", "noise", "twist")


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
