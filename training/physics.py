"""XY-model observables on a periodic L×L square lattice (J = 1), as batched torch functions.

This is the operator layer: the Monte Carlo sampler, the HG-VAE loss and the ONNX physics head all
call these functions, and none of them imports a model. Every function takes angles `theta` of shape
[..., L, L] (radians, any real value) and reduces over the last two axes; axis -1 is x, axis -2 is y.
All operations are ONNX-exportable (roll, cos, sin, remainder, round).
"""

from __future__ import annotations

import math

import torch

TWO_PI = 2.0 * math.pi
T_KT = 0.8929  # Kosterlitz–Thouless temperature of the 2D XY model (Hasenbusch 2005; Komura & Okabe 2012)


def wrap_angle(delta: torch.Tensor) -> torch.Tensor:
    """Map angle differences into (−π, π]."""
    return math.pi - torch.remainder(math.pi - delta, TWO_PI)


def bond_differences(theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """θ(x+1, y) − θ(x, y) and θ(x, y+1) − θ(x, y) at every site, periodic."""
    dx = torch.roll(theta, shifts=-1, dims=-1) - theta
    dy = torch.roll(theta, shifts=-1, dims=-2) - theta
    return dx, dy


def energy_per_site(theta: torch.Tensor) -> torch.Tensor:
    """e = −(1/N) Σ_⟨ij⟩ cos(θ_i − θ_j) over the 2N nearest-neighbour bonds."""
    dx, dy = bond_differences(theta)
    return -(torch.cos(dx) + torch.cos(dy)).mean(dim=(-2, -1))


def expected_energy_per_site(theta: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """E[e] for independent wrapped Gaussians with means θ and spreads σ per site.

    E[cos(θ_i − θ_j)] = cos(θ̂_i − θ̂_j)·exp(−(σ_i² + σ_j²)/2), so the energy of a (θ, σ) reconstruction
    is well defined and differentiable; σ → 0 gives `energy_per_site(theta)`.
    """
    dx, dy = bond_differences(theta)
    var = sigma.square()
    damp_x = torch.exp(-0.5 * (var + torch.roll(var, shifts=-1, dims=-1)))
    damp_y = torch.exp(-0.5 * (var + torch.roll(var, shifts=-1, dims=-2)))
    return -(torch.cos(dx) * damp_x + torch.cos(dy) * damp_y).mean(dim=(-2, -1))


def magnetization(theta: torch.Tensor) -> torch.Tensor:
    """|m| = |(1/N) Σ_i (cos θ_i, sin θ_i)| per configuration."""
    mx = torch.cos(theta).mean(dim=(-2, -1))
    my = torch.sin(theta).mean(dim=(-2, -1))
    return torch.sqrt(mx.square() + my.square())


def vortex_map(theta: torch.Tensor) -> torch.Tensor:
    """Winding number of every plaquette: +1 vortex, −1 antivortex, 0 otherwise.

    The plaquette at (y, x) has corners (x, y), (x+1, y), (x+1, y+1), (x, y+1), walked counter-clockwise
    in (x, y); each edge difference is wrapped into (−π, π] and the sum divided by 2π. On a torus the
    windings sum to zero.
    """
    dx, dy = bond_differences(theta)
    dx, dy = wrap_angle(dx), wrap_angle(dy)
    circulation = (
        dx
        + torch.roll(dy, shifts=-1, dims=-1)  # up the right edge
        - torch.roll(dx, shifts=-1, dims=-2)  # back along the top edge
        - dy  # down the left edge
    )
    return torch.round(circulation / TWO_PI)


def vortex_density(theta: torch.Tensor) -> torch.Tensor:
    """(#vortices + #antivortices) / N per configuration."""
    return vortex_map(theta).abs().mean(dim=(-2, -1))


def helicity_sums(theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-configuration bond sums for the helicity modulus, averaged over the x and y directions.

    Returns (C, S²) with C = ½(Σ_x-bonds cos Δθ + Σ_y-bonds cos Δθ) and
    S² = ½((Σ_x-bonds sin Δθ)² + (Σ_y-bonds sin Δθ)²), each of shape [...].
    """
    dx, dy = bond_differences(theta)
    c = 0.5 * (torch.cos(dx).sum(dim=(-2, -1)) + torch.cos(dy).sum(dim=(-2, -1)))
    s2 = 0.5 * (torch.sin(dx).sum(dim=(-2, -1)).square() + torch.sin(dy).sum(dim=(-2, -1)).square())
    return c, s2


def helicity_modulus(theta: torch.Tensor, temperature: float | torch.Tensor) -> torch.Tensor:
    """Υ = (1/N)[⟨Σ_x-bonds cos Δθ⟩ − β⟨(Σ_x-bonds sin Δθ)²⟩], x and y averaged.

    `theta` is [samples, ..., L, L]: the ensemble average runs over axis 0, so the result has shape [...].
    `temperature` broadcasts against that shape.
    """
    n_sites = theta.shape[-1] * theta.shape[-2]
    c, s2 = helicity_sums(theta)
    beta = 1.0 / torch.as_tensor(temperature, dtype=theta.dtype, device=theta.device)
    return (c.mean(dim=0) - beta * s2.mean(dim=0)) / n_sites


def spin_wave_energy(temperature: float | torch.Tensor) -> float | torch.Tensor:
    """Low-temperature expansion e(T) ≈ −2 + T/2 + T²/16 of the XY energy per site."""
    return -2.0 + temperature / 2.0 + temperature**2 / 16.0
