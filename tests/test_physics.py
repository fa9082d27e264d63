"""XY observables (training/physics.py) on hand-built states with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from training import physics

torch.set_num_threads(1)


def pair_state(size: int, vortex: tuple[int, int], antivortex: tuple[int, int]) -> torch.Tensor:
    """θ = arg(z − z₊) − arg(z − z₋) with the cores at the centres of plaquettes (y, x) = vortex / antivortex.

    The plaquette at (y, x) has corners (x, y) … (x+1, y+1), so its centre is (x + ½, y + ½).
    """
    y, x = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    z = x + 1j * y
    zp = (vortex[1] + 0.5) + 1j * (vortex[0] + 0.5)
    zm = (antivortex[1] + 0.5) + 1j * (antivortex[0] + 0.5)
    return torch.from_numpy(np.angle(z - zp) - np.angle(z - zm))


def test_uniform_state() -> None:
    theta = torch.full((3, 8, 8), 1.234, dtype=torch.float64)
    assert torch.allclose(physics.energy_per_site(theta), torch.tensor(-2.0, dtype=torch.float64))
    assert torch.allclose(physics.magnetization(theta), torch.tensor(1.0, dtype=torch.float64))
    assert torch.count_nonzero(physics.vortex_map(theta)) == 0
    assert torch.all(physics.vortex_density(theta) == 0)
    ups = physics.helicity_modulus(theta, 0.7)  # ensemble of identical ground states: Υ = 1 at any T
    assert ups.shape == () and abs(float(ups) - 1.0) < 1e-12
    sigma = torch.zeros_like(theta)
    assert torch.allclose(physics.expected_energy_per_site(theta, sigma), physics.energy_per_site(theta))


def test_vortex_antivortex_pair_on_torus() -> None:
    size = 16
    theta = pair_state(size, vortex=(7, 5), antivortex=(7, 10))
    vm = physics.vortex_map(theta)
    assert vm[7, 5] == 1.0, "counter-clockwise winding of arg(z − z₊) must be +1"
    assert vm[7, 10] == -1.0
    assert torch.count_nonzero(vm) == 2, "no vortices anywhere else, the periodic edges included"
    assert vm.sum() == 0, "a torus has zero net winding"
    assert float(physics.vortex_density(theta)) == pytest.approx(2 / size**2)
    # the pair costs energy above the ground state but remains far below disorder
    e = float(physics.energy_per_site(theta))
    assert -2.0 < e < -1.8


def test_pair_across_periodic_edges() -> None:
    """Translating the lattice periodically moves the cores across the edges; the map must follow exactly."""
    size = 16
    theta = pair_state(size, vortex=(7, 5), antivortex=(7, 10))
    shifted = torch.roll(theta, shifts=(9, 8), dims=(-2, -1))  # cores end up at x = 13 and x = 18 − 16 = 2
    vm = physics.vortex_map(shifted)
    assert torch.equal(vm, torch.roll(physics.vortex_map(theta), shifts=(9, 8), dims=(-2, -1)))
    assert vm[0, 13] == 1.0 and vm[0, 2] == -1.0  # row 7 + 9 = 16 ≡ 0: the cores sit on the wrapped row
    for f in (physics.energy_per_site, physics.magnetization, physics.vortex_density):
        assert torch.allclose(f(shifted), f(theta), atol=1e-12)


def test_twisted_state_uses_the_wrap_bond() -> None:
    """θ = 2πx/L winds once around the torus: every x-bond (the wrap bond too) has Δθ ≡ 2π/L, no vortices."""
    size = 8
    x = torch.arange(size, dtype=torch.float64)
    theta = (2 * math.pi * x / size).expand(size, size).clone()
    expected = -(1.0 + math.cos(2 * math.pi / size))
    assert float(physics.energy_per_site(theta)) == pytest.approx(expected, abs=1e-12)
    assert torch.count_nonzero(physics.vortex_map(theta)) == 0
    c, s2 = physics.helicity_sums(theta)
    n = size * size
    assert float(c) == pytest.approx(0.5 * (n * math.cos(2 * math.pi / size) + n), abs=1e-9)
    assert float(s2) == pytest.approx(0.5 * (n * math.sin(2 * math.pi / size)) ** 2, abs=1e-9)
    # without the periodic wrap one x-bond per row would have Δθ = −2π(L−1)/L: the energy would differ
    assert float(physics.energy_per_site(theta[..., :, :-1])) != pytest.approx(expected, abs=1e-3)


@pytest.mark.parametrize("alpha", [0.3, -2.0, 5 * math.pi, 1e3])
def test_global_rotation_invariance(alpha: float) -> None:
    gen = torch.Generator().manual_seed(4)
    theta = 2 * math.pi * torch.rand((5, 12, 12), generator=gen, dtype=torch.float64)
    rotated = theta + alpha
    for f in (physics.energy_per_site, physics.magnetization, physics.vortex_density):
        assert torch.allclose(f(rotated), f(theta), atol=1e-9), f.__name__
    assert torch.equal(physics.vortex_map(rotated), physics.vortex_map(theta))
    for a, b in zip(physics.helicity_sums(rotated), physics.helicity_sums(theta), strict=True):
        assert torch.allclose(a, b, atol=1e-8)
    assert torch.allclose(physics.helicity_modulus(rotated, 0.9), physics.helicity_modulus(theta, 0.9), atol=1e-9)
    sigma = 0.3 * torch.rand((5, 12, 12), generator=gen, dtype=torch.float64)
    assert torch.allclose(physics.expected_energy_per_site(rotated, sigma),
                          physics.expected_energy_per_site(theta, sigma), atol=1e-9)


def test_random_state_vortices_sum_to_zero_and_are_unit() -> None:
    gen = torch.Generator().manual_seed(0)
    theta = 2 * math.pi * torch.rand((20, 10, 10), generator=gen, dtype=torch.float64)
    vm = physics.vortex_map(theta)
    assert set(torch.unique(vm).tolist()) <= {-1.0, 0.0, 1.0}
    assert torch.all(vm.sum(dim=(-2, -1)) == 0)
    # random angles: each plaquette is a vortex or antivortex with probability 1/3 (known result)
    assert abs(float(physics.vortex_density(theta).mean()) - 1 / 3) < 0.03


def test_energy_matches_explicit_bond_sum() -> None:
    gen = torch.Generator().manual_seed(1)
    theta = 2 * math.pi * torch.rand((6, 6), generator=gen, dtype=torch.float64)
    t = theta.numpy()
    size = t.shape[0]
    total = 0.0
    for y in range(size):
        for x in range(size):
            total += math.cos(t[y, x] - t[y, (x + 1) % size]) + math.cos(t[y, x] - t[(y + 1) % size, x])
    assert float(physics.energy_per_site(theta)) == pytest.approx(-total / size**2, abs=1e-12)


def test_spin_wave_formula() -> None:
    assert physics.spin_wave_energy(0.2) == pytest.approx(-2 + 0.1 + 0.04 / 16)
    assert abs(physics.T_KT - 0.893) < 1e-3
