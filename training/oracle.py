"""What is physically detectable: the Neyman–Pearson oracle for a k×k defect at a KNOWN place and T.

Any detector (ours included) sees less than an oracle that knows the temperature T, the patch
location and the defect kind: by the Neyman–Pearson lemma the likelihood ratio λ = log q(θ)/p(θ)
of the defect model q against the Boltzmann weight p ∝ exp(β Σ_⟨ij⟩ cos(θ_i − θ_j)) has the best
ROC curve of all tests, so its AUROC bounds every score's AUROC from above. Per kind, with P the
patch, ∂P its 4k boundary bonds and Δ = θ_in − θ_out each boundary difference oriented outward:

- misaligned (P rotated by a fixed φ): q(θ) = p(R_φ⁻¹θ); only the boundary bonds change, so
  λ = β Σ_∂P [cos(Δ − φ) − cos Δ]   — exact, no partition function.
- dead (P replaced by uniform angles): q(θ) = p(θ_out)·(2π)^−k², so λ = −log p(θ_P | θ_out) + const
  = −β S_P(θ) + log Z_P(θ_∂), S_P the cos-sum of the 2k² + 2k bonds touching P and Z_P the patch's
  partition function given its boundary. `dead_lower` drops log Z_P: it is a valid known-location
  test, so its AUROC is a LOWER bound of the oracle's; `log_patch_partition` computes log Z_P by
  thermodynamic integration (Metropolis on the patch with the boundary fixed) for the exact oracle.
- stuck (P set to one angle): q is singular with respect to p (k² equal angles have probability
  zero under p), so the oracle's AUROC is exactly 1 at every T.

Patch sizes whose oracle AUROC reaches 0.999 at every T are what "physically detectable" means in
the acceptance test (benchmarks/anomaly.py prints the tables).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from training.anomaly import _bonds, log_i0
from training.anomaly import window_bonds as anomaly_window_bonds
from training.defects import auroc

TWO_PI = 2.0 * math.pi


def window_bonds(theta: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For every k×k window (anchor = top-left corner) of θ [B, L, L]: (C_int, Re Z, Im Z), see
    training.anomaly.window_bonds."""
    return anomaly_window_bonds(_bonds(theta), k, k)


def _anchors(n: int, L: int, per: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    idx = np.repeat(np.arange(n), per)
    return idx, rng.integers(0, L, size=n * per), rng.integers(0, L, size=n * per)


def _inject_dead(theta: np.ndarray, ys: np.ndarray, xs: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    out = theta.copy()
    L = theta.shape[-1]
    for a in range(len(out)):
        iy, ix = np.ix_((ys[a] + np.arange(k)) % L, (xs[a] + np.arange(k)) % L)
        out[a][iy, ix] = rng.uniform(0, TWO_PI, size=(k, k))
    return out


def oracle_statistics(
    kind: str,
    angles: np.ndarray,
    temperature: float,
    k: int,
    per_config: int = 8,
    seed: int = 0,
    phi: float = math.pi / 2,
    exact_dead: bool = False,
    ti_kwargs: dict | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(λ on normal configurations, λ on defective copies), `per_config` random patch places each.

    `angles` [N, L, L] are normal configurations at one temperature.
    """
    rng = np.random.default_rng(seed)
    beta = 1.0 / temperature
    L = angles.shape[-1]
    idx, ys, xs = _anchors(len(angles), L, per_config, rng)
    th = torch.as_tensor(angles, dtype=torch.float64)
    if kind == "misaligned":
        _, re, im = window_bonds(th, k)
        re, im = re[idx, ys, xs].numpy(), im[idx, ys, xs].numpy()
        c, s = math.cos(phi), math.sin(phi)
        # normal: λ = β[Re(Z e^{−iφ}) − Re Z]; rotated inside: Z → Z e^{iφ}, so λ = β[Re Z − Re(Z e^{iφ})]
        lam_n = beta * (re * c + im * s - re)
        lam_a = beta * (re - (re * c - im * s))
        return lam_n, lam_a
    if kind == "dead":
        ci, re, _ = window_bonds(th, k)
        s_n = (ci + re)[idx, ys, xs].numpy()
        bad = torch.as_tensor(_inject_dead(angles[idx], ys, xs, k, rng), dtype=torch.float64)
        ci_b, re_b, _ = window_bonds(bad, k)
        ar = np.arange(len(idx))
        s_a = (ci_b + re_b)[ar, ys, xs].numpy()
        lam_n, lam_a = -beta * s_n, -beta * s_a
        if exact_dead:  # + log Z_P(boundary), the same for a configuration and its defective copy
            logz = log_patch_partition(angles[idx], ys, xs, k, beta, **{"seed": seed, **(ti_kwargs or {})})
            lam_n, lam_a = lam_n + logz, lam_a + logz
        return lam_n, lam_a
    if kind == "stuck":
        n = len(idx)
        return np.zeros(n), np.ones(n)  # singular: the oracle separates perfectly
    raise ValueError(f"no oracle for kind {kind!r}")


def oracle_auroc(kind: str, angles: np.ndarray, temperature: float, k: int, **kw) -> float:
    lam_n, lam_a = oracle_statistics(kind, angles, temperature, k, **kw)
    return auroc(lam_n, lam_a)


@torch.no_grad()
def log_patch_partition(
    angles: np.ndarray,
    ys: np.ndarray,
    xs: np.ndarray,
    k: int,
    beta: float,
    nodes: int = 12,
    sweeps: int = 600,
    burn: int = 150,
    seed: int = 0,
) -> np.ndarray:
    """log Z_P(θ_∂) − k² log 2π for the k×k patch at each (y, x) of each configuration, by
    thermodynamic integration: d log Z_P/dβ' = ⟨S_P⟩_β' with the boundary fixed (Gauss–Legendre in β')."""
    gen = torch.Generator().manual_seed(seed)
    L = angles.shape[-1]
    n = len(angles)
    # (k+2)×(k+2) neighbourhoods: the patch and its fixed boundary ring (corners unused).
    oy = (ys[:, None] + np.arange(-1, k + 1)[None, :]) % L
    ox = (xs[:, None] + np.arange(-1, k + 1)[None, :]) % L
    nb = torch.as_tensor(angles[np.arange(n)[:, None, None], oy[:, :, None], ox[:, None, :]], dtype=torch.float64)
    inner = torch.zeros(k + 2, k + 2, dtype=torch.bool)
    inner[1:-1, 1:-1] = True
    parity = (torch.arange(k + 2)[:, None] + torch.arange(k + 2)[None, :]) % 2
    masks = [inner & (parity == c) for c in (0, 1)]

    def local_field(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hc = torch.zeros_like(x)
        hs = torch.zeros_like(x)
        for sy, sx in ((1, 0), (-1, 0), (0, 1), (0, -1)):
            nbv = torch.roll(x, shifts=(sy, sx), dims=(-2, -1))
            hc += torch.cos(nbv)
            hs += torch.sin(nbv)
        return hc, hs  # only read at inner sites, whose four neighbours are all inside the array

    def s_patch(x: torch.Tensor) -> torch.Tensor:
        dxx = torch.cos(x[:, 1:-1, 1:] - x[:, 1:-1, :-1]).sum(dim=(-2, -1))  # rows of the patch, k+1 bonds each
        dyy = torch.cos(x[:, 1:, 1:-1] - x[:, :-1, 1:-1]).sum(dim=(-2, -1))
        return dxx + dyy

    gl_x, gl_w = np.polynomial.legendre.leggauss(nodes)
    total = torch.zeros(n, dtype=torch.float64)
    for xg, wg in zip(gl_x, gl_w, strict=True):
        b = 0.5 * beta * (xg + 1.0)
        x = nb.clone()
        x[:, inner] = torch.rand(n, k * k, generator=gen, dtype=torch.float64) * TWO_PI
        step = min(math.pi, 2.0 / math.sqrt(max(b, 1e-9)))
        acc = torch.zeros(n, dtype=torch.float64)
        for sweep in range(sweeps):
            for m in masks:
                hc, hs = local_field(x)
                prop = x + (torch.rand(x.shape, generator=gen, dtype=torch.float64) - 0.5) * 2 * step
                d_e = (torch.cos(prop) - torch.cos(x)) * hc + (torch.sin(prop) - torch.sin(x)) * hs  # Δ(Σcos)
                ok = torch.rand(x.shape, generator=gen, dtype=torch.float64) < torch.exp(b * d_e).clamp(max=1.0)
                x = torch.where(m & ok, prop, x)
            if sweep >= burn:
                acc += s_patch(x)
        total += 0.5 * beta * wg * acc / (sweeps - burn)
    return total.numpy()


def scan_oracle_statistics(
    kind: str,
    angles: np.ndarray,
    temperature: float,
    k: int,
    seed: int = 0,
    phi: float = math.pi / 2,
    copies: int = 1,
    angle_known: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """(λ normal, λ defective) of the oracle that knows T, k and the kind but NOT the place.

    With the place uniform over the L² anchors the likelihood ratio is the mixture
    λ = log (1/L²) Σ_a exp(λ_a): the best any detector can do for a defect at an unknown place, the
    realistic ceiling for a production line. For a dead patch λ_a drops log Z_P (see module doc: a
    near-exact approximation, the spread of log Z_P over boundaries is ~0.2 at T = 2 for k = 4).
    `copies` defective copies are made of each configuration (finer AUROC on a small probe).
    `angle_known=False`: the oracle of a misaligned region does not know φ either (uniform prior), so
    λ_a = log I₀(β|Z|) − β Re Z — a line knows a region may be misaligned, not by how much.
    """
    rng = np.random.default_rng(seed)
    beta = 1.0 / temperature
    L = angles.shape[-1]
    normal = angles
    angles = np.tile(angles, (copies, 1, 1)) if copies > 1 else angles
    n = len(angles)
    ys, xs = rng.integers(0, L, size=n), rng.integers(0, L, size=n)
    if kind == "misaligned":
        bad = angles.copy()
        for a in range(n):
            iy, ix = np.ix_((ys[a] + np.arange(k)) % L, (xs[a] + np.arange(k)) % L)
            bad[a][iy, ix] += phi
    elif kind == "dead":
        bad = _inject_dead(angles, ys, xs, k, rng)
    elif kind == "stuck":
        return np.zeros(len(normal)), np.ones(n)
    else:
        raise ValueError(f"no oracle for kind {kind!r}")

    def lam(x: np.ndarray) -> np.ndarray:
        ci, re, im = window_bonds(torch.as_tensor(x, dtype=torch.float64), k)
        if angle_known:
            mis = beta * (re * math.cos(phi) + im * math.sin(phi) - re)
        else:
            mis = log_i0(beta * torch.sqrt(re.square() + im.square())) - beta * re
        per = mis if kind == "misaligned" else -beta * (ci + re)
        return (torch.logsumexp(per.flatten(1), dim=1) - math.log(L * L)).numpy()

    return lam(normal), lam(bad)


def binormal_auroc(normal: np.ndarray, anomalous: np.ndarray) -> float:
    """Φ((μ_a − μ_n)/√(σ_a² + σ_n²)): a smooth AUROC estimate from means and spreads.

    On a small probe (16 normals per T) the rank AUROC of the oracle saturates at 1.000 where the truth
    is 0.996; the binormal form does not saturate and, on the oracle's right-skewed normal λ, errs low
    (measured on 256 normals per T: 0.994 where the rank AUROC is 0.998), so a cell it calls detectable
    is detectable.
    """
    from scipy.stats import norm

    d = float(np.mean(anomalous) - np.mean(normal))
    s = float(np.sqrt(np.var(normal) + np.var(anomalous)))
    if s == 0.0:
        return 1.0 if d > 0 else (0.5 if d == 0 else 0.0)
    return float(norm.cdf(d / s))
