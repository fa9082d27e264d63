"""Monte Carlo generator: kernels against exact distributions, and the sampler against known XY physics.

Tolerances are k × τ-corrected errors (training.stats) with fixed seeds; the long, high-precision versions are
marked slow. Known results: e(T) → −2 + T/2 + T²/16 (spin waves), e ≈ −2·I₁(β)/I₀(β) at high T, Υ(T, L=16)
crosses 2T/π between 0.90 and 1.05 (Komura & Okabe 2012; Hasenbusch 2005), vortex density tiny at T = 0.5 and
large at T = 1.5, and a single spin in a fixed field h follows von Mises with κ = β|h|.
"""

from __future__ import annotations

import math

import numba
import numpy as np
import pytest
import torch
from numba import njit
from scipy import special, stats

from training import montecarlo as mc
from training import physics
from training.stats import autocorrelation, statistics

torch.set_num_threads(1)
numba.set_num_threads(1)  # a shared 2-core box: the tests need correctness, not speed


# ---------------------------------------------------------------------------------------------- statistics


def ar1(rho: float, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    noise = rng.normal(size=n)
    x = np.empty(n)
    x[0] = noise[0] / math.sqrt(1 - rho**2)
    for t in range(1, n):
        x[t] = rho * x[t - 1] + noise[t]
    return x


@pytest.mark.parametrize("rho", [0.0, 0.5, 0.9])
def test_tau_of_ar1_series(rho: float) -> None:
    """AR(1) has ρ(t) = ρ^t, so τ_int = ½ + ρ/(1−ρ) exactly."""
    x = ar1(rho, 200_000, seed=int(rho * 10))
    s = statistics(x)
    exact = 0.5 + rho / (1 - rho)
    assert s.tau == pytest.approx(exact, rel=0.08)
    assert s.n_eff == pytest.approx(len(x) / (2 * s.tau))
    rho_hat = autocorrelation(x)[:4]
    assert np.allclose(rho_hat, rho ** np.arange(4), atol=0.02)


def test_error_of_mean_is_calibrated() -> None:
    """Across independent correlated series, |mean − 0| / error_of_mean behaves like |N(0, 1)|."""
    z = [statistics(ar1(0.8, 4000, seed=100 + k)).mean / statistics(ar1(0.8, 4000, seed=100 + k)).error_of_mean
         for k in range(200)]
    assert 0.8 < np.std(z) < 1.25  # a naive (τ-ignoring) error would give std ≈ 3


# ---------------------------------------------------------------------------------------------- kernels


def test_exp_neg_accuracy() -> None:
    x = np.linspace(-2.0, 120.0, 200_001).astype(np.float32)

    @njit
    def apply(v):
        out = np.empty_like(v)
        for i in range(v.shape[0]):
            out[i] = mc.exp_neg(v[i])
        return out

    got = apply(x).astype(np.float64)
    ref = np.exp(-np.maximum(x.astype(np.float64), 0.0))
    assert np.max(np.abs(got - ref)) < 1e-7  # below the 2^-24 resolution of the uniform it is compared with
    assert np.all(got[x <= 0] == 1.0)


@njit(cache=True)
def _single_site_chain(hx, hy, beta, width, n, thin, overrelax, seed0, seed1):
    """A lone spin in fixed field (hx, hy): Metropolis (+ optional reflections), the lattice kernels' exact code."""
    sx, sy = np.float32(1.0), np.float32(0.0)
    s0, s1 = seed0, seed1
    out = np.empty(n)
    for k in range(n):
        for _ in range(thin):
            v, s0, s1 = mc._next(s0, s1)
            sx, sy, _acc = mc.metropolis_site(sx, sy, hx, hy, v, width, beta)
            if overrelax:
                sx, sy = mc.overrelax_site(sx, sy, hx, hy)
        out[k] = math.atan2(sy, sx)
    return out


@pytest.mark.parametrize(("beta", "overrelax"), [(2.0, False), (2.0, True), (0.4, False)])
def test_single_spin_follows_von_mises(beta: float, overrelax: bool) -> None:
    """κ = β|h| = 2.6 is a peaked target (where a biased acceptance would show); chi-square on 40 bins."""
    h = np.array([1.2, -0.5], dtype=np.float32)
    kappa = beta * float(np.hypot(*h))
    mu = math.atan2(h[1], h[0])
    s0, s1 = mc.seed_streams(11, (1,))
    angles = _single_site_chain(h[0], h[1], np.float32(beta), np.float32(1.0), 100_000, 8, overrelax, s0[0], s1[0])
    tau = statistics(np.cos(angles - mu)).tau
    assert tau < 1.5, "thinning by 8 should leave nearly independent draws"
    edges = np.linspace(-math.pi, math.pi, 41)
    observed, _ = np.histogram(angles, bins=edges)
    cdf = stats.vonmises.cdf(edges, kappa, loc=mu)
    expected = len(angles) * np.diff(cdf)
    chi2 = float(np.sum((observed - expected) ** 2 / expected) / max(1.0, 2 * tau))  # τ-corrected
    p = stats.chi2.sf(chi2, df=len(expected) - 1)
    assert p > 1e-3, f"chi2={chi2:.1f}"
    # and the first moment exactly: ⟨cos(θ − μ)⟩ = I₁(κ)/I₀(κ)
    m = statistics(np.cos(angles - mu))
    assert abs(m.mean - special.i1(kappa) / special.i0(kappa)) < 5 * m.error_of_mean


def test_split_layout_and_neighbour_table() -> None:
    size = 6
    full = np.arange(size * size, dtype=np.float64).reshape(size, size)
    split = mc.split_lattice(full)
    assert np.array_equal(mc.join_lattice(split), full)
    flat = split.reshape(-1)  # flat split index -> full-lattice site id
    nbr = mc.neighbour_table(size)
    for k in range(flat.size):
        y, x = divmod(int(flat[k]), size)
        want = {((y + 1) % size) * size + x, ((y - 1) % size) * size + x,
                y * size + (x - 1) % size, y * size + (x + 1) % size}
        assert {int(flat[j]) for j in nbr[k]} == want
    for c in range(2):  # colour c holds exactly the sites with (x + y) % 2 == c
        ids = split[c].reshape(-1).astype(int)
        assert np.all((ids // size + ids % size) % 2 == c)


def test_sampler_energy_matches_physics_and_spins_stay_unit() -> None:
    temps = np.array([0.4, 0.9, 1.6])
    s = mc.tuned_sampler(8, temps, seed=5, tune_sweeps=20)
    e = s.sweep(30)
    theta = torch.from_numpy(s.angles().astype(np.float64))
    assert np.allclose(e[:, -1], physics.energy_per_site(theta).numpy(), atol=2e-5)
    norm = s.x.astype(np.float64) ** 2 + s.y.astype(np.float64) ** 2
    assert np.max(np.abs(norm - 1.0)) < 1e-5


def test_odd_and_tiny_sizes_rejected() -> None:
    with pytest.raises(ValueError, match="even"):
        mc.simulate(7, [1.0], 2)
    with pytest.raises(ValueError, match="≥ 4"):
        mc.simulate(2, [1.0], 2)
    with pytest.raises(ValueError, match="> 0"):
        mc.simulate(8, [0.0, 1.0], 2)
    with pytest.raises(TypeError, match="unknown"):
        mc.simulate(8, [1.0], 2, bogus=1)


# ---------------------------------------------------------------------------------------------- simulate()


def test_reproducible_from_seed_and_contract() -> None:
    kw = dict(tune_sweeps=20, therm_min=50)
    a = mc.simulate(8, [0.5, 1.2], 5, seed=3, **kw)
    b = mc.simulate(8, [0.5, 1.2], 5, seed=3, **kw)
    c = mc.simulate(8, [0.5, 1.2], 5, seed=4, **kw)
    assert np.array_equal(a.angles, b.angles) and np.array_equal(a.temperature, b.temperature)
    assert not np.array_equal(a.angles, c.angles)
    assert a.angles.dtype == np.float32 and a.angles.shape == (10, 8, 8)
    assert a.angles.min() >= 0.0 and a.angles.max() < 2 * math.pi
    assert a.temperature.dtype == np.float32 and np.allclose(a.temperature, [0.5] * 5 + [1.2] * 5)
    md = a.metadata
    for key in ("algorithm", "sweeps", "tau", "seed", "hgvae_version", "backend"):
        assert key in md
    assert md["seed"] == 3 and len(md["tau"]) == 2
    assert md["sweeps"]["spacing"] >= 2 * max(md["tau_pilot"])
    assert md["sweeps"]["thermalization"] >= 50


def test_same_arrays_whatever_the_thread_count() -> None:
    """One RNG stream per site and replica: the result cannot depend on how replicas are spread over threads."""
    kw = dict(tune_sweeps=20, therm_min=50)
    one = mc.simulate(8, [0.5, 0.9, 1.2], 4, seed=6, **kw)
    numba.set_num_threads(min(2, numba.config.NUMBA_NUM_THREADS))
    try:
        two = mc.simulate(8, [0.5, 0.9, 1.2], 4, seed=6, **kw)
    finally:
        numba.set_num_threads(1)
    assert np.array_equal(one.angles, two.angles)


def test_replicas_split_samples() -> None:
    ds = mc.simulate(8, [0.7], 7, seed=1, replicas=3, tune_sweeps=20, therm_min=50)
    assert ds.angles.shape == (7, 8, 8)
    assert ds.metadata["replicas"] == 3


def simulate_energy(size: int, temps: list[float], samples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    ds = mc.simulate(size, temps, samples, seed=seed)
    return np.array(ds.metadata["energy_mean"]), np.array(ds.metadata["energy_error"])


def test_low_temperature_energy_spin_waves() -> None:
    temps = [0.1, 0.2, 0.3]
    e, err = simulate_energy(16, temps, 200, seed=1)
    for t, ei, erri in zip(temps, e, err, strict=True):
        ref = physics.spin_wave_energy(t)
        assert abs(ei - ref) < 0.005 * abs(ref), (t, ei, ref)
        assert erri < 0.001 * abs(ref)  # the run is precise enough for the 0.5 % test to mean something
        assert abs(ei - ref) < 5 * erri + 2e-3 * t**3 / 0.027, (t, ei, ref, erri)  # + O(T³) allowance


def test_high_temperature_energy() -> None:
    """To leading orders in β, e = −2·I₁(β)/I₀(β) (independent bonds; loops enter at O(β⁵))."""
    temps = [4.0, 8.0]
    e, err = simulate_energy(16, temps, 400, seed=2)
    for t, ei, erri in zip(temps, e, err, strict=True):
        b = 1 / t
        ref = -2 * special.i1(b) / special.i0(b)
        assert abs(ei - ref) < 5 * erri + 2 * b**5, (t, ei, ref, erri)


def test_vortex_density_low_and_high_temperature() -> None:
    ds = mc.simulate(16, [0.5, 1.5], 100, seed=5)
    theta = torch.from_numpy(ds.angles.astype(np.float64)).reshape(2, 100, 16, 16)
    rho = physics.vortex_density(theta).mean(dim=1).numpy()
    assert rho[0] < 1e-3
    assert rho[1] > 0.1


def helicity_crossing(size: int, temps: np.ndarray, samples: int, seed: int, n_boot: int = 200):
    """Υ(T) per temperature and the 2T/π crossing (linear interpolation) with a bootstrap error bar."""
    ds = mc.simulate(size, temps, samples, seed=seed)
    theta = torch.from_numpy(ds.angles.astype(np.float64)).reshape(len(temps), samples, size, size)
    c, s2 = physics.helicity_sums(theta)  # [T, samples]
    c, s2 = c.numpy(), s2.numpy()
    nsite = size * size
    betas = 1.0 / temps

    def crossing(cm: np.ndarray, s2m: np.ndarray) -> float:
        ups = (cm - betas * s2m) / nsite
        d = ups - 2 * temps / math.pi
        k = np.nonzero((d[:-1] > 0) & (d[1:] <= 0))[0]
        if len(k) == 0:
            return float("nan")
        k = k[0]
        return float(temps[k] + (temps[k + 1] - temps[k]) * d[k] / (d[k] - d[k + 1]))

    ups = (c.mean(1) - betas * s2.mean(1)) / nsite
    t_cross = crossing(c.mean(1), s2.mean(1))
    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(n_boot):  # samples are ≥ 2τ apart, so resampling them independently is fair
        idx = rng.integers(0, samples, size=(len(temps), samples))
        boots.append(crossing(np.take_along_axis(c, idx, 1).mean(1), np.take_along_axis(s2, idx, 1).mean(1)))
    return ups, t_cross, float(np.nanstd(boots))


def test_helicity_modulus_crosses_2t_over_pi() -> None:
    temps = np.array([0.80, 0.88, 0.96, 1.04, 1.12])
    ups, t_cross, err = helicity_crossing(16, temps, 600, seed=7)
    assert np.all(np.diff(ups) < 0), ups  # Υ falls with T
    assert 0.90 < t_cross < 1.05, (t_cross, err)
    assert err < 0.03


@pytest.mark.slow
def test_helicity_crossing_precise() -> None:
    temps = np.linspace(0.86, 1.10, 13)
    ups, t_cross, err = helicity_crossing(16, temps, 4000, seed=8)
    print(f"Υ(L=16) crosses 2T/π at T = {t_cross:.4f} ± {err:.4f}")
    assert 0.90 < t_cross < 1.05
    assert err < 0.01


@pytest.mark.slow
def test_low_temperature_energy_precise() -> None:
    temps = [0.05, 0.1, 0.15, 0.2, 0.25, 0.3]
    e, err = simulate_energy(32, temps, 2000, seed=11)
    for t, ei, erri in zip(temps, e, err, strict=True):
        ref = physics.spin_wave_energy(t)
        assert abs(ei - ref) < 0.005 * abs(ref)
        assert abs(ei - ref) < 5 * erri + 2e-3 * t**3 / 0.027


@pytest.mark.slow
def test_single_spin_von_mises_many_kappas() -> None:
    for beta in (0.1, 1.0, 4.0, 10.0):
        h = np.array([0.3, 0.9], dtype=np.float32)
        kappa = beta * float(np.hypot(*h))
        s0, s1 = mc.seed_streams(int(beta * 10), (1,))
        angles = _single_site_chain(h[0], h[1], np.float32(beta), np.float32(1.0), 400_000, 8, True, s0[0], s1[0])
        m = statistics(np.cos(angles - math.atan2(h[1], h[0])))
        assert abs(m.mean - special.i1(kappa) / special.i0(kappa)) < 5 * m.error_of_mean


# ---------------------------------------------------------------------------------------------- torch backend
# (the CUDA path; its moves are checked here on the CPU, small)


def test_torch_cluster_labels_match_connected_components() -> None:
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    from training.montecarlo_torch import TorchSampler

    size, nrep = 9, 4
    gen = torch.Generator().manual_seed(2)
    bx = torch.rand((nrep, size, size), generator=gen) < 0.55
    by = torch.rand((nrep, size, size), generator=gen) < 0.55
    labels = TorchSampler.label_clusters(bx, by).numpy()
    idx = np.arange(size * size).reshape(size, size)
    for r in range(nrep):
        src = np.concatenate([idx[bx[r].numpy()], idx[by[r].numpy()]])
        dst = np.concatenate([np.roll(idx, -1, 1)[bx[r].numpy()], np.roll(idx, -1, 0)[by[r].numpy()]])
        graph = coo_matrix((np.ones(len(src)), (src, dst)), shape=(size * size,) * 2)
        ncomp, comp = connected_components(graph, directed=False)
        assert len(np.unique(labels[r])) == ncomp
        for k in range(ncomp):  # same partition, labelled by the smallest member
            members = np.nonzero(comp == k)[0]
            assert np.all(labels[r].reshape(-1)[members] == members.min())


def test_torch_backend_reproducible_and_agrees_with_numba() -> None:
    kw = dict(tune_sweeps=50, therm_min=200)
    a = mc.simulate(8, [0.3, 1.0], 300, seed=4, backend="torch", **kw)
    b = mc.simulate(8, [0.3, 1.0], 6, seed=4, backend="torch", **kw)
    assert np.array_equal(a.angles[:6], b.angles[:6]) and a.metadata["backend"] == "torch"
    n = mc.simulate(8, [0.3, 1.0], 300, seed=4, **kw)
    ea, erra = np.array(a.metadata["energy_mean"]), np.array(a.metadata["energy_error"])
    en, errn = np.array(n.metadata["energy_mean"]), np.array(n.metadata["energy_error"])
    assert np.all(np.abs(ea - en) < 5 * np.hypot(erra, errn)), (ea, en, erra, errn)
    assert abs(ea[0] - physics.spin_wave_energy(0.3)) < 0.005 * 2
