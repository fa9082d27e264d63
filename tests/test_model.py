"""Model, loss and anomaly-score building blocks (small, CPU, seconds)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from training import defects, physics
from training.anomaly import AnomalyHead, calibrate, hat_weights
from training.model import (
    XYVAE,
    ModelConfig,
    default_latent_dim,
    sample_reconstruction,
    sampled_vortex_surrogate,
    vae_loss,
    wrapped_normal_nll,
)
from training.train import Hyper, TrainingDiverged, evaluate, fit, split_indices, tiny_dataset

torch.set_num_threads(1)


@pytest.mark.parametrize("latent", ["spatial", "global"])
def test_shapes_and_sigma_bounds(latent: str) -> None:
    cfg = ModelConfig(lattice_size=8, latent_dim=32 if latent == "spatial" else 6, width=8, latent=latent)
    m = XYVAE(cfg)
    x = torch.rand(5, 8, 8) * 40 - 20  # any real angle
    with torch.no_grad():
        mu, logvar, th, sg = m(x)
    assert mu.shape == logvar.shape == (5, cfg.latent_dim)
    assert th.shape == sg.shape == (5, 8, 8)
    assert float(th.min()) >= 0 and float(th.max()) < 2 * math.pi + 1e-6
    assert float(sg.min()) >= cfg.sigma_min and float(sg.max()) <= cfg.sigma_max
    # Input is taken mod 2π: shifting by 2π changes nothing.
    with torch.no_grad():
        mu2, _, th2, _ = m(x + 2 * math.pi)
    assert torch.allclose(mu, mu2, atol=1e-4)


def test_bad_config_rejected() -> None:
    with pytest.raises(ValueError, match="multiple of 4"):
        ModelConfig(lattice_size=10)
    with pytest.raises(ValueError, match="kind"):
        ModelConfig(kind="gan")
    with pytest.raises(ValueError, match=r"multiple of \(L/2\)² = 16 for the spatial latent at L = 8"):
        ModelConfig(lattice_size=8, latent_dim=5, latent="spatial")
    with pytest.raises(ValueError, match="latent must be one of"):
        ModelConfig(latent="hybrid")


def test_default_latent_sizes() -> None:
    """Spatial by default: 2 channels on the (L/2)² grid at every L; the global latent keeps 64."""
    assert ModelConfig(lattice_size=16).latent_dim == 128 == default_latent_dim(16)
    assert ModelConfig(lattice_size=32).latent_dim == 512
    assert ModelConfig(lattice_size=16, latent="global").latent_dim == 64
    assert ModelConfig(lattice_size=16, latent_dim=192).latent_channels == 3


def test_vortex_surrogate_gradient_is_unbiased() -> None:
    """d E[vortex density of θ̂ + σε] / dσ (uniform σ change): score surrogate vs a finite difference."""
    g = torch.Generator().manual_seed(0)
    th = torch.rand(64, 8, 8, generator=g, dtype=torch.float64) * 0.8
    sg = torch.full((64, 8, 8), 0.8, dtype=torch.float64, requires_grad=True)
    dens, grads = [], []
    for _ in range(25):
        d, s = sampled_vortex_surrogate(th, sg, g)
        (grad,) = torch.autograd.grad(s.mean(), sg)
        dens.append(float(d.mean()))
        grads.append(float(grad.sum()))
    with torch.no_grad():
        lo, hi = (
            np.mean([float(physics.vortex_density(th + s0 * torch.randn(th.shape, generator=g, dtype=th.dtype)).mean())
                     for _ in range(100)])
            for s0 in (0.75, 0.85)
        )  # fmt: skip
    fd = (hi - lo) / 0.1
    assert fd > 0.1  # more noise, more vortices
    assert np.mean(grads) == pytest.approx(fd, rel=0.15)
    assert np.mean(dens) == pytest.approx((lo + hi) / 2, rel=0.15)


@pytest.mark.parametrize("sigma", [0.05, 0.3, 1.0, 1.6])
def test_wrapped_normal_is_a_density(sigma: float) -> None:
    """∫ p(x) dx over the circle = 1, and it matches the exact wrapped sum (100 windings)."""
    x = torch.linspace(0, 2 * math.pi, 20001, dtype=torch.float64)[:-1]
    mean = torch.tensor(1.3, dtype=torch.float64)
    s = torch.tensor(sigma, dtype=torch.float64)
    p = torch.exp(-wrapped_normal_nll(x, mean, s))
    assert float(p.mean() * 2 * math.pi) == pytest.approx(1.0, abs=1e-6)
    k = torch.arange(-100, 101, dtype=torch.float64)
    exact = torch.exp(-0.5 * ((x[:, None] - mean + 2 * math.pi * k) / s) ** 2).sum(1) / (s * math.sqrt(2 * math.pi))
    assert torch.allclose(p, exact, rtol=1e-6, atol=1e-12)  # 2π·k held in float32


def test_expected_energy_matches_sampled_reconstructions() -> None:
    """The closed-form energy of a (θ̂, σ) reconstruction equals the mean energy of its samples."""
    g = torch.Generator().manual_seed(0)
    th = torch.rand(1, 8, 8, generator=g, dtype=torch.float64) * 2 * math.pi
    th = th.cumsum(-1) * 0.1  # smooth-ish mean field
    sg = 0.2 + 0.8 * torch.rand(1, 8, 8, generator=g, dtype=torch.float64)
    samples = sample_reconstruction(th.expand(20000, 8, 8), sg.expand(20000, 8, 8), generator=g)
    e_mc = physics.energy_per_site(samples)
    err = float(e_mc.std() / math.sqrt(len(e_mc)))
    assert float(e_mc.mean()) == pytest.approx(float(physics.expected_energy_per_site(th, sg)[0]), abs=5 * err)


def test_loss_terms_and_lambda_zero_for_vae() -> None:
    ds = tiny_dataset(L=8, samples=4)
    x = torch.from_numpy(ds.angles)
    m = XYVAE(ModelConfig(lattice_size=8, latent_dim=32, width=8))
    terms = vae_loss(m, x, beta=1.0, lam=0.0, generator=torch.Generator().manual_seed(0))
    assert all(torch.isfinite(t) for t in (terms.total, terms.nll, terms.kl, terms.energy))
    n = 64
    assert terms.total.item() == pytest.approx((terms.nll + terms.kl / n).item(), rel=1e-5)
    with_e = vae_loss(m, x, beta=1.0, lam=10.0, generator=torch.Generator().manual_seed(0))
    assert with_e.total.item() == pytest.approx((with_e.nll + with_e.kl / n + 10 * with_e.energy).item(), rel=1e-5)
    with_v = vae_loss(m, x, beta=1.0, lam=10.0, generator=torch.Generator().manual_seed(0), vortex_weight=2.0)
    expected = (with_v.nll + with_v.kl / n + 10 * with_v.energy + 2 * with_v.vortex).item()
    assert with_v.vortex.item() > 0 and with_v.total.item() == pytest.approx(expected, rel=1e-5)
    # the vortex term reaches σ only, never the mean angles: θ̂'s head gets the same gradient without it
    grads = []
    for vw in (0.0, 2.0):
        m.zero_grad()
        vae_loss(m, x, beta=1.0, lam=0.0, generator=torch.Generator().manual_seed(0), vortex_weight=vw).total.backward()
        grads.append(m.decoder.heads.theta.weight.grad.clone())
    assert torch.allclose(grads[0], grads[1])


def test_fit_is_reproducible_and_lowers_the_loss() -> None:
    ds = tiny_dataset(L=8, samples=16)
    cfg = ModelConfig(lattice_size=8, latent_dim=32, width=8, kind="vae")  # NLL only: it must go down
    hp = Hyper(epochs=6, batch_size=16, latent_dim=32, width=8, seed=3)
    m1, h1 = fit(ds.angles, cfg, hp)
    m2, h2 = fit(ds.angles, cfg, hp)
    torch.manual_seed(hp.seed)
    untrained = XYVAE(cfg).eval()
    nll_trained = evaluate(m1, ds.angles, ds.temperature)["val_nll"]
    assert nll_trained < evaluate(untrained, ds.angles, ds.temperature)["val_nll"]
    assert [h["loss"] for h in h1] == [h["loss"] for h in h2]
    for a, b in zip(m1.state_dict().values(), m2.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_divergence_aborts_with_a_clear_message() -> None:
    ds = tiny_dataset(L=8, samples=8)
    cfg = ModelConfig(lattice_size=8, latent_dim=32, width=8)
    hp = Hyper(epochs=30, batch_size=8, latent_dim=32, width=8, lr=1e30, grad_clip=1e30)
    with pytest.raises(TrainingDiverged, match="not finite at epoch"):
        fit(ds.angles, cfg, hp)


def test_split_is_by_configuration_and_stratified() -> None:
    ds = tiny_dataset(L=8, temperatures=4, samples=20)
    tr, va = split_indices(ds, 0.25, seed=0)
    assert len(np.intersect1d(tr, va)) == 0 and len(tr) + len(va) == len(ds)
    for t in np.unique(ds.temperature):
        assert (ds.temperature[va] == t).sum() == 5


def test_hat_weights_interpolate_linearly() -> None:
    e = torch.tensor([-3.0, -2.0, -1.75, -1.0, 0.5])
    w = hat_weights(e, -2.0, 0.5, 3)  # grid -2, -1.5, -1
    assert torch.allclose(w.sum(1), torch.ones(5))
    vals = torch.tensor([1.0, 3.0, 7.0])
    assert torch.allclose(w @ vals, torch.tensor([1.0, 1.0, 2.0, 7.0, 7.0]))


def test_auroc_matches_pairwise_definition() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=40).round(1), rng.normal(0.7, 1, size=30).round(1)
    pairs = (b[None, :] > a[:, None]).mean() + 0.5 * (b[None, :] == a[:, None]).mean()
    assert defects.auroc(a, b) == pytest.approx(pairs)


@pytest.mark.parametrize("kind", defects.NAMED_KINDS + defects.EXTRA_KINDS)
def test_injected_defects_change_the_lattice(kind: str) -> None:
    rng = np.random.default_rng(1)
    theta = np.full((16, 16), 1.0, np.float32)
    bad = defects.inject(kind, theta, rng)
    assert bad.shape == theta.shape and bad.dtype == np.float32
    changed = np.abs(np.angle(np.exp(1j * (bad - theta)))) > 1e-3
    if kind in ("dead", "stuck", "misaligned", "flipped"):
        assert 0 < changed.sum() <= 16  # a 4×4 patch (stuck may match by chance on some sites)
    elif kind == "line":
        assert changed.sum() > 8
    else:
        assert changed.mean() > 0.5


def test_calibrated_score_is_a_z_score_on_normal_data_and_flags_a_dead_patch() -> None:
    """Identity 'model' (θ̂ = θ), spin-wave data: normal scores ~ 0 ± 1, dead patches stand out."""
    ds = tiny_dataset(L=16, temperatures=3, samples=120, seed=2)

    def forward(th: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return th, torch.full_like(th, 0.3)

    cal = calibrate(forward, ds.angles, 16)
    head = AnomalyHead(cal)
    fresh = tiny_dataset(L=16, temperatures=3, samples=60, seed=9)
    th = torch.from_numpy(fresh.angles)
    score, amap = head(th, th, torch.full_like(th, 0.3), physics.energy_per_site(th))
    assert amap.shape == th.shape
    assert abs(float(score.mean())) < 0.5 and 0.5 < float(score.std()) < 2.0
    rng = np.random.default_rng(0)
    bad = torch.from_numpy(np.stack([defects.inject("dead", a, rng) for a in fresh.angles]))
    s_bad, map_bad = head(bad, bad, torch.full_like(bad, 0.3), physics.energy_per_site(bad))
    assert defects.auroc(score.numpy(), s_bad.numpy()) > 0.95
    # The map localises: the hottest site lies on or next to the changed sites.
    changed = torch.from_numpy(np.abs(np.angle(np.exp(1j * (bad.numpy() - fresh.angles)))) > 1e-6)
    near = torch.nn.functional.max_pool2d(changed.float()[:, None], 5, 1, 2)[:, 0] > 0
    hottest = map_bad.flatten(1).argmax(1)
    assert near.flatten(1)[torch.arange(len(bad)), hottest].float().mean() > 0.8


def test_quality_table_on_a_perfect_reconstruction() -> None:
    """θ = input, σ at the floor: no energy discrepancy, sampled vortices = input's, recall 1 vs the quench."""
    from training.quench import vortex_pair
    from training.train import format_quality, quality_table

    rng = np.random.default_rng(0)
    pairs = np.stack([vortex_pair(16, (3.5, 3.5), (3.5, 10.5)) for _ in range(4)])  # d = 7 survives the quench
    hot = np.mod(pairs + rng.normal(0, 0.3, pairs.shape), 2 * math.pi).astype(np.float32)
    angles = np.concatenate([pairs, hot])
    temps = np.array([0.5] * 4 + [1.2] * 4, np.float32)
    x = torch.from_numpy(angles)
    e = physics.energy_per_site(x).numpy()
    sigma = np.full(angles.shape, 1e-4, np.float32)
    e_rec = physics.expected_energy_per_site(x, torch.from_numpy(sigma)).numpy()
    out = {"theta": angles, "sigma": sigma, "energy": e, "energy_discrepancy": e_rec - e}
    q = quality_table(out, angles, temps)
    assert q["rel_de_max"] < 1e-5
    assert q["recall_T_le_1"] == 1.0 and q["n_ref_T_le_1"] == 8
    row = q["rows"][1]
    assert row["T"] == pytest.approx(1.2) and row["vortex_ratio"] == pytest.approx(1.0)
    assert q["vortex_max_gap_T_ge_0.9"] == pytest.approx(0.0)
    # a smooth mean field with noise that carries no vortices fails criterion (2)
    bad = quality_table({**out, "theta": np.zeros_like(angles)}, angles, temps)
    assert bad["vortex_max_gap_T_ge_0.9"] > 0.9 and bad["recall_T_le_1"] == 0.0
    assert "(2) vortex density" in format_quality(q)
