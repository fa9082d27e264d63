"""`hgvae analyze`: estimators on hand-built input with known answers, and the whole report on a small real run.

The end-to-end tests run real Monte Carlo data (training.montecarlo), a real ONNX graph through onnxruntime
(tests/analysis_standin.py: the contract's outputs with the real physics head) and a real sqlite MLflow
store, then check the report's numbers against direct computations.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from training import analysis as A
from training import physics
from training import quench as Q

sys.path.insert(0, str(Path(__file__).parent))
from analysis_standin import export_standin  # noqa: E402

torch.set_num_threads(1)


# ------------------------------------------------------------------------------------------------------
# quench and vortex matching


def _vortices(theta) -> list[tuple[int, int, int]]:
    v = physics.vortex_map(torch.as_tensor(theta)).numpy()
    return sorted((int(y), int(x), int(v[y, x])) for y, x in np.argwhere(v != 0))


def test_vortex_pair_is_built_where_asked():
    assert _vortices(Q.vortex_pair(32, (8.5, 8.5), (20.5, 24.5))) == [(8, 8, 1), (20, 24, -1)]


def test_quench_keeps_a_separated_pair_and_removes_its_spin_waves():
    rng = np.random.default_rng(1)
    clean = Q.vortex_pair(32, (16.5, 8.5), (16.5, 16.5))  # distance 8
    noisy = clean + rng.normal(0, 0.7, clean.shape).astype(np.float32)
    assert len(_vortices(noisy)) > 4  # noise adds tightly bound pairs
    quenched = Q.quench(noisy)
    assert len(_vortices(quenched)) == 2  # only the hand-built pair survives, where it was built:
    score = Q.match_vortices(physics.vortex_map(quenched)[None].numpy(), physics.vortex_map(torch.tensor(clean))[None])
    assert score.recall == 1.0 and score.precision == 1.0
    # the spin waves are gone: the quenched energy is that of the clean vortex pair, not of the noisy input
    e_clean = physics.energy_per_site(Q.quench(clean)).item()
    e_noisy = physics.energy_per_site(torch.tensor(noisy)).item()
    assert abs(physics.energy_per_site(quenched).item() - e_clean) < 0.05 * abs(e_noisy - e_clean)


def test_quench_removes_spin_waves_and_close_pairs():
    rng = np.random.default_rng(1)
    y, x = np.mgrid[:32, :32]
    waves = 0.4 * np.sin(2 * np.pi * 3 * x / 32) + rng.normal(0, 0.5, (32, 32))
    q = Q.quench(waves)
    assert _vortices(q) == []
    excess_before = physics.energy_per_site(torch.tensor(waves)).item() + 2
    assert physics.energy_per_site(q).item() + 2 < 0.1 * excess_before
    close = Q.vortex_pair(32, (16.5, 8.5), (16.5, 10.5))  # distance 2: annihilates
    assert len(_vortices(close)) == 2 and _vortices(Q.quench(close)) == []


def test_quench_rejects_unstable_step():
    with pytest.raises(ValueError, match="stable"):
        Q.quench(np.zeros((4, 4)), step_size=0.3)


def _map(size: int, entries: dict[tuple[int, int], int]) -> np.ndarray:
    m = np.zeros((size, size))
    for (y, x), s in entries.items():
        m[y, x] = s
    return m


def test_match_vortices_tolerance_sign_periodicity_and_one_to_one():
    ref = _map(16, {(3, 3): 1, (10, 10): -1, (0, 0): 1})
    assert Q.match_vortices(ref[None], ref[None]).as_dict()["f1"] == 1.0
    shifted = _map(16, {(4, 4): 1, (10, 11): -1, (15, 15): 1})  # diagonal, side, and across the periodic corner
    s = Q.match_vortices(shifted[None], ref[None], tolerance=1.5)
    assert (s.matched, s.precision, s.recall) == (3, 1.0, 1.0)
    assert Q.match_vortices(shifted[None], ref[None], tolerance=1.0).matched == 1  # only the side neighbour
    wrong_sign = _map(16, {(3, 3): -1})
    assert Q.match_vortices(wrong_sign[None], ref[None]).matched == 0
    twice = _map(16, {(3, 3): 1, (3, 4): 1})  # two predictions, one reference: one match
    s = Q.match_vortices(twice[None], _map(16, {(3, 3): 1})[None])
    assert (s.matched, s.precision, s.recall) == (1, 0.5, 1.0)
    empty = Q.match_vortices(np.zeros((1, 16, 16)), np.zeros((1, 16, 16)))
    assert math.isnan(empty.recall) and math.isnan(empty.precision)


# ------------------------------------------------------------------------------------------------------
# estimators with known answers


def test_crossing_and_peak_helpers():
    assert A.downward_crossing([0, 1, 2], [1.0, 0.5, -0.5]) == pytest.approx(1.5)
    assert math.isnan(A.downward_crossing([0, 1], [1.0, 0.5]))
    x = np.linspace(0, 2, 21)
    assert A.parabolic_peak(x, -((x - 1.23) ** 2)) == pytest.approx(1.23, abs=1e-9)
    assert A.parabolic_peak(x, x) == 2.0  # unbracketed: the grid end


def test_helicity_sums_match_physics():
    theta = np.random.default_rng(2).uniform(0, 2 * np.pi, (5, 8, 8)).astype(np.float32)
    c, s2 = A.helicity_sums_np(theta)
    ct, s2t = physics.helicity_sums(torch.tensor(theta, dtype=torch.float64))
    np.testing.assert_allclose(c, ct.numpy(), rtol=1e-10)
    np.testing.assert_allclose(s2, s2t.numpy(), rtol=1e-10)


def test_helicity_crossing_of_twisted_states_is_exact():
    # A uniform twist θ = q·x has C = N(1 + cos q)/2 and S² = (N sin q)²/2, so Υ(T) is known exactly;
    # Υ − 2T/π is then a + b/T, and with q = 0 (Υ = 1) it crosses at T = π/2 exactly between grid points.
    L = 8
    temps = np.array([1.4, 1.5, 1.6, 1.7])
    angles = np.zeros((len(temps) * 3, L, L), np.float32)
    h = A.helicity_crossing(angles, np.repeat(temps, 3), n_boot=20)
    np.testing.assert_allclose(h.upsilon, 1.0)
    assert h.crossing.value == pytest.approx(math.pi / 2, abs=1e-12)
    assert h.crossing.error < 1e-12  # identical configurations: no bootstrap spread
    q = 2 * np.pi / L
    twisted = np.broadcast_to((q * np.arange(L))[None, None, :], (4, L, L)).astype(np.float32)
    h2 = A.helicity_crossing(twisted, np.repeat([0.5, 2.0], 2), n_boot=5)
    n = L * L
    expect = ((1 + np.cos(q)) / 2 * n - (n * np.sin(q)) ** 2 / 2 / np.array([0.5, 2.0])) / n
    np.testing.assert_allclose(h2.upsilon, expect, rtol=1e-6)


def test_latent_transition_finds_the_fluctuation_peak():
    rng = np.random.default_rng(3)
    temps = np.round(np.arange(0.6, 1.41, 0.05), 3)
    t0 = 0.97
    mu, tt = [], []
    for t in temps:
        radius = 2.0 / (1 + np.exp((t - t0) / 0.05))  # ring radius melts at t0
        spread = 0.05 + 0.4 * np.exp(-((t - t0) ** 2) / (2 * 0.06**2))  # fluctuations largest there
        r = np.abs(radius + spread * rng.standard_normal(400))
        phi = rng.uniform(0, 2 * np.pi, 400)
        mu.append(np.stack([r * np.cos(phi), r * np.sin(phi), 0.01 * rng.standard_normal(400)], axis=1))
        tt.append(np.full(400, t))
    mu, tt = np.concatenate(mu), np.concatenate(tt)
    lt = A.latent_transition(mu, tt, size=16, n_boot=50)
    assert lt.estimate == lt.susceptibility_peak  # no decoded codes: the χ_z peak is the estimate
    assert lt.estimate.value == pytest.approx(t0, abs=0.02)
    assert 0 < lt.estimate.error < 0.05
    assert lt.steepest.value == pytest.approx(t0, abs=0.03)
    # rotation and scale of the latent space do not move the estimate
    rot, _ = np.linalg.qr(np.random.default_rng(4).standard_normal((3, 3)))
    assert A.latent_transition(5 * mu @ rot, tt, size=16, n_boot=2).estimate.value == pytest.approx(lt.estimate.value)


def test_kt_magnetization_is_the_spin_wave_value_at_eta_one_quarter():
    # ⟨M⟩ = (2N)^(-T/(8πΥ)) with Υ = 2T/π: exponent 1/16, i.e. M ∝ L^(-η/2) with η = 1/4
    for size in (8, 16, 32, 64):
        t = 0.9
        upsilon = 2 * t / np.pi
        assert A.kt_magnetization(size) == pytest.approx((2 * size * size) ** (-t / (8 * np.pi * upsilon)))
    assert A.kt_magnetization(32) / A.kt_magnetization(16) == pytest.approx(2 ** (-1 / 8))


def test_bramwell_holdsworth_crossing_of_decoded_codes():
    """Codes whose decoded magnetization follows a known curve: the crossing with (2N)^(-1/16) is found."""
    rng = np.random.default_rng(5)
    size, temps = 16, np.round(np.arange(0.6, 1.41, 0.05), 3)
    target = A.kt_magnetization(size)
    theta, sigma, tt = [], [], []
    for t in temps:
        m = target + 0.5 * (0.95 - t)  # the mean field's magnetization: crosses the target at T = 0.95
        # a uniform mean field of magnetization m/e^{-σ²/2}: M_z = m exactly (σ constant per sample)
        sg = np.full((40, size, size), 0.3)
        amp = np.clip(m / np.exp(-0.045), 0, 1)
        phase = np.arccos(amp)  # a ±phase stripe pattern has |⟨e^{iθ}⟩| = cos(phase)
        th = np.where(np.arange(size)[None, None, :] % 2 == 0, phase, -phase) + rng.uniform(0, 6.28, (40, 1, 1))
        theta.append(th * np.ones((40, size, size)))
        sigma.append(sg)
        tt.append(np.full(40, t))
    theta, sigma, tt = np.concatenate(theta), np.concatenate(sigma), np.concatenate(tt)
    mz = A.code_magnetization(theta, sigma)
    assert mz[tt == 0.6].mean() == pytest.approx(target + 0.5 * 0.35, abs=1e-6)
    mu = rng.standard_normal((len(tt), 3))
    lt = A.latent_transition(mu, tt, size, n_boot=20, code_mag=mz)
    assert lt.estimate.value == pytest.approx(0.95, abs=1e-6)
    assert "Bramwell" in lt.estimate.method and lt.estimate.details["target_magnetization"] == target
    assert lt.code_magnetization[0] == pytest.approx(mz[tt == 0.6].mean())


def test_spatial_latent_is_cell_averaged():
    meta = {"hgvae.model_config": '{"latent": "spatial", "lattice_size": 8}'}
    field = np.random.default_rng(0).standard_normal((5, 2, 4, 4))
    pooled = A.latent_magnetization(field.reshape(5, -1), meta, 8)
    np.testing.assert_allclose(pooled, field.mean(axis=(2, 3)))
    flat = np.ones((5, 32))
    assert A.latent_magnetization(flat, {"hgvae.model_config": '{"latent": "global"}'}, 8) is flat
    assert A.latent_field(flat, {}, 8) is None


def test_reference_crossovers_lie_above_the_helicity_crossing(small_run):
    d = small_run["d8"]
    cross = A.reference_crossovers(d.angles, d.temperature, n_boot=20)
    tc = A.helicity_crossing(d.angles, d.temperature, n_boot=5).crossing.value
    for est in cross.values():
        assert tc < est["value"] < 1.35 and est["error"] > 0


def test_finite_size_fit_recovers_known_parameters():
    sizes = [16, 32, 64]
    t = [0.8929 + 0.4 / math.log(s) ** 2 for s in sizes]
    fit = A.finite_size_fit(sizes, t, [0.002, 0.002, 0.002])
    assert fit["T_KT"] == pytest.approx(0.8929, abs=1e-9) and fit["c"] == pytest.approx(0.4, abs=1e-8)
    assert fit["chi2"] == pytest.approx(0, abs=1e-9) and fit["dof"] == 1
    assert 0 < fit["T_KT_error"] < 0.05
    with pytest.raises(A.AnalysisError, match="2 lattice sizes"):
        A.finite_size_fit([16], [0.9], [0.01])


def test_linear_fit():
    x = np.array([0.2, 0.4, 0.6, 0.8])
    fit = A.linear_fit(x, 0.5 * x)
    assert fit["slope"] == pytest.approx(0.5) and fit["intercept"] == pytest.approx(0, abs=1e-12)
    assert fit["r_squared"] == pytest.approx(1.0)


# ------------------------------------------------------------------------------------------------------
# the whole report on a small real run


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    """Monte Carlo L=8 around the transition + L=16 at three temperatures, and stand-in ONNX models."""
    from training.dataset import save_dataset
    from training.montecarlo import simulate

    root = tmp_path_factory.mktemp("analysis")
    d8 = simulate(8, list(np.round(np.arange(0.6, 1.31, 0.05), 3)), 120, seed=5)
    d16 = simulate(16, [0.6, 0.9, 1.2], 60, seed=6)
    p8, p16 = root / "L8.npz", root / "L16.npz"
    save_dataset(p8, d8.angles, d8.temperature, d8.metadata)
    save_dataset(p16, d16.angles, d16.temperature, d16.metadata)
    m_h = export_standin(root / "hgvae8.onnx", 8, kind="hgvae", smooth=1)
    m_v = export_standin(root / "vae8.onnx", 8, kind="vae", smooth=2)
    return {"root": root, "data": [p8, p16], "d8": d8, "models": [m_h, m_v]}


def _run_cli(argv: list[str]) -> int:
    from hgvae.cli import main

    return main(argv)


def test_analyze_report_numbers(small_run, capsys):
    out = small_run["root"] / "report"
    args = ["analyze", "--out", str(out), "--per-temperature", "0", "--bootstrap", "50", "--no-mlflow", "-q"]
    for p in small_run["data"]:
        args += ["--data", str(p)]
    for m in small_run["models"]:
        args += ["--model", str(m)]
    assert _run_cli(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    report = (out / "report.md").read_text()
    assert {"transition_temperature", "models", "acceptance", "data", "figures"} <= set(summary)
    for f in summary["figures"]:
        assert (out / f).stat().st_size > 5000, f  # a real PNG, not an empty file
    assert {
        "helicity_modulus.png",
        "energy_vs_temperature.png",
        "finite_size.png",
        "maps_hgvae-L8.png",
        "latent_order_parameter_hgvae-L8.png",
        "helicity_reconstructions_vae-L8.png",
        "latent_means_vae-L8.png",
    } <= set(summary["figures"])

    # (a) Υ crossing of real Monte Carlo data at L=8 and 16: physical range (slightly above T_KT), and
    # the same number as a direct computation with training.physics
    tt = summary["transition_temperature"]
    c8 = tt["helicity_crossing"]["L8"]
    assert 0.9 < c8["value"] < 1.1 and 0 < c8["error"] < 0.05
    d8 = small_run["d8"]
    for k, t in enumerate(c8["temperatures"]):
        sel = d8.temperature == np.float32(t)
        ups = physics.helicity_modulus(torch.tensor(d8.angles[sel], dtype=torch.float64), t).item()
        assert c8["upsilon"][k] == pytest.approx(ups, abs=1e-9)
    assert f"{c8['value']:.4g}" in report
    # (c) two sizes → a finite-size fit exists and is in a sane range
    fs = tt["finite_size_extrapolation"]["helicity_crossing"]
    assert fs["sizes"] == [8, 16] and 0.7 < fs["T_KT"] < 1.05

    # per-model numbers against a direct onnxruntime + physics computation
    import onnxruntime as ort

    sess = ort.InferenceSession(str(small_run["models"][0]))
    theta, sigma, disc = sess.run(["theta", "sigma", "energy_discrepancy"], {"lattice": d8.angles})
    direct_disc = (
        physics.expected_energy_per_site(torch.tensor(theta), torch.tensor(sigma))
        - physics.energy_per_site(torch.tensor(d8.angles))
    ).numpy()
    np.testing.assert_allclose(disc, direct_disc, atol=1e-5)
    m = summary["models"]["hgvae-L8"]
    for row in m["per_temperature"]:
        sel = d8.temperature == np.float32(row["temperature"])
        assert row["samples"] == int(sel.sum())
        assert row["energy_discrepancy_mean"] == pytest.approx(float(direct_disc[sel].mean()), abs=1e-5)
        e_in = physics.energy_per_site(torch.tensor(d8.angles[sel])).numpy()
        assert row["energy_input"] == pytest.approx(float(e_in.mean()), abs=1e-5)
        rel = np.abs(direct_disc[sel]) / np.abs(e_in)
        assert row["relative_abs_discrepancy"] == pytest.approx(float(rel.mean()), rel=1e-4)
        vd = physics.vortex_density(torch.tensor(theta[sel])).numpy().mean()
        assert row["vortex_density_theta"] == pytest.approx(float(vd), abs=1e-7)
    assert m["onnx_vs_physics"]["max_abs_discrepancy_vs_physics"] < 1e-5
    rel_all = np.abs(direct_disc) / np.abs(physics.energy_per_site(torch.tensor(d8.angles)).numpy())
    assert m["energy_discrepancy"]["mean_relative_abs_discrepancy"] == pytest.approx(float(rel_all.mean()), rel=1e-4)

    # (b) the stand-in's latent is 3·magnetization: its χ_z peak must agree with the same estimator on m
    # (the estimator is scale invariant), and match the Monte Carlo magnetic susceptibility peak
    lat = m["latent_transition"]
    mag = np.stack([np.cos(d8.angles).mean((1, 2)), np.sin(d8.angles).mean((1, 2))], axis=1)
    ref = A.latent_transition(mag, d8.temperature, 8, n_boot=10)
    assert lat["susceptibility_peak_estimate"]["value"] == pytest.approx(ref.estimate.value, abs=1e-4)
    chi_mc = tt["monte_carlo_crossovers"]["L8"]["magnetic_susceptibility_peak"]
    assert lat["susceptibility_peak_estimate"]["value"] == pytest.approx(chi_mc["value"], abs=0.1)
    # the primary estimate is the Bramwell–Holdsworth crossing of the decoded codes' magnetization,
    # recomputed here from the ONNX θ, σ with numpy; and the same criterion on the Monte Carlo |m|
    mz = A.code_magnetization(theta, sigma)
    bh = A.bramwell_holdsworth_crossing(mz, d8.temperature, 8, n_boot=2)
    assert lat["estimate"]["value"] == pytest.approx(bh.value, abs=1e-6)
    assert lat["kt_magnetization"] == pytest.approx(128 ** (-1 / 16))
    bh_mc = tt["monte_carlo_crossovers"]["L8"]["bramwell_holdsworth_magnetization"]["value"]
    assert bh_mc == pytest.approx(A.bramwell_holdsworth_crossing(np.hypot(*mag.T), d8.temperature, 8, n_boot=2).value)
    assert 0.85 < bh_mc < 1.15  # L = 8: the criterion sits a few % above the Υ crossing, like at larger L
    # decoded configurations have a helicity modulus too: its crossing is reported and physical
    rh = m["helicity_crossing_of_reconstructions"]
    assert 0.8 < rh["sampled"]["value"] < 1.3 and 0.8 < rh["mean_field"]["value"] < 1.5
    assert lat["relative_difference_to_helicity_crossing"] == pytest.approx(
        (lat["estimate"]["value"] - c8["value"]) / c8["value"]
    )

    # separation: recall/precision are fractions, and the counts add up
    sep = m["vortex_separation"]
    tot = sep["theta_vs_quenched"]
    assert tot["matched"] <= min(tot["n_pred"], tot["n_ref"])
    assert sum(r["configurations"] for r in sep["per_temperature"]) == int((d8.temperature <= 1.0 + 1e-6).sum())
    for r in sep["per_temperature"]:
        for key in ("recall", "precision"):
            v = r["theta_vs_quenched"][key]
            assert v is None or 0.0 <= v <= 1.0
    assert m["decoder_sigma2_vs_temperature_fit"]["points"] >= 3

    # acceptance block reports measured numbers for each criterion
    acc = summary["acceptance"]
    kinds = {r["model"]: r["criterion_applies"] for r in acc["hgvae_discrepancy_at_most_1_percent_of_abs_energy"]}
    assert kinds == {"hgvae-L8": True, "vae-L8": False}
    assert len(acc["latent_transition_within_5_percent_of_helicity_crossing"]) == 2


def test_vortex_recall_is_high_for_a_model_that_keeps_vortices(small_run):
    """Hand-built data: separated pairs plus thermal-like noise; the stand-in's θ (a local average) keeps them."""
    rng = np.random.default_rng(7)
    configs, temps = [], []
    for k in range(12):
        a, b = rng.integers(0, 16, 2), rng.integers(0, 16, 2)
        first = (a[0] + 0.5, a[1] + 0.5)
        second = ((a[0] + 8 + b[0] % 3) % 16 + 0.5, (a[1] + 8) % 16 + 0.5)  # ≥ 8 apart
        clean = Q.vortex_pair(16, first, second)
        configs.append(clean + rng.normal(0, 0.25, clean.shape).astype(np.float32))
        temps.append(0.5 + 0.1 * (k % 3))
    model = A.load_model(str(export_standin(small_run["root"] / "keep16.onnx", 16)))
    ev = A.evaluate_model(model, np.mod(np.stack(configs), 2 * np.pi).astype(np.float32), np.array(temps), n_boot=5)
    tot = ev.separation["theta_vs_quenched"]
    assert tot["n_ref"] == 24  # every hand-built vortex survives the quench
    assert tot["recall"] >= 0.95 and tot["precision"] >= 0.9


def test_report_is_logged_to_the_models_mlflow_run(small_run, tmp_path):
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("hgvae", artifact_location=(tmp_path / "art").as_uri())
    run_id = client.create_run(exp).info.run_id
    model = export_standin(tmp_path / "m.onnx", 8, run_id=run_id)
    client.log_artifact(run_id, str(model), artifact_path="model")
    client.create_registered_model("hgvae-test")
    client.create_model_version("hgvae-test", f"runs:/{run_id}/model", run_id=run_id)
    client.set_registered_model_alias("hgvae-test", "champion", "1")
    out = tmp_path / "report"
    # resolve the model through the run URI and through the registry; log the report back to the run
    argv = ["analyze", "--data", str(small_run["data"][0]), "--model", f"runs:/{run_id}",
            "--model", "models:/hgvae-test@champion", "--out", str(out), "--tracking-uri", uri, "--bootstrap", "10",
            "-q"]  # fmt: skip
    assert _run_cli(argv) == 0
    assert mlflow.get_registry_uri() != uri and mlflow.get_tracking_uri() != uri  # no global state changed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mlflow"]["logged"] == [run_id]
    assert set(summary["models"]) == {"hgvae-L8", "hgvae-L8-2"}
    assert summary["models"]["hgvae-L8-2"]["uri"] == "models:/hgvae-test@champion"
    names = {f.path for f in client.list_artifacts(run_id, "analysis")}
    assert {"analysis/report.md", "analysis/summary.json", "analysis/helicity_modulus.png"} <= names
    metric = client.get_run(run_id).data.metrics["analysis_mean_relative_abs_discrepancy"]
    assert metric == pytest.approx(summary["models"]["hgvae-L8"]["energy_discrepancy"]["mean_relative_abs_discrepancy"])


def test_cli_errors_are_one_line(small_run, tmp_path, capsys):
    assert _run_cli(["analyze", "--data", str(tmp_path / "nope.npz"), "--out", str(tmp_path / "o")]) == 2
    assert "no such file" in capsys.readouterr().err
    m16 = export_standin(tmp_path / "m16.onnx", 16)
    assert (
        _run_cli(
            ["analyze", "--data", str(small_run["data"][0]), "--model", str(m16), "--out", str(tmp_path / "o"), "-q"]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "L=16" in err and "Traceback" not in err
    assert (
        _run_cli(
            [
                "analyze",
                "--data",
                str(small_run["data"][0]),
                "--model",
                str(tmp_path / "x.onnx"),
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    assert "no such file" in capsys.readouterr().err


def test_analyze_runs_on_a_really_exported_model(small_run, tmp_path):
    """The real exporter's graph (training.train → training.export), not only the stand-in, fits the analysis."""
    from training.dataset import LatticeDataset
    from training.train import train_model

    d8 = small_run["d8"]
    few = np.flatnonzero(np.isin(d8.temperature, d8.temperature[::240]))[::3]  # a small training set
    res = train_model(
        LatticeDataset(d8.angles[few], d8.temperature[few], d8.metadata), kind="hgvae", epochs=1, register=False,
        out_dir=tmp_path / "train", seed=0, threads=1,
    )  # fmt: skip
    ev = A.evaluate_model(A.load_model(str(res.onnx_path)), d8.angles, d8.temperature.astype(np.float64), n_boot=5)
    assert ev.model.kind == "hgvae" and ev.model.size == 8
    assert ev.contract_check["max_abs_discrepancy_vs_physics"] < 1e-4
    assert ev.contract_check["max_abs_vortex_density_vs_physics"] == 0.0
    assert len(ev.table) == len(np.unique(d8.temperature)) and ev.latent is not None
    assert math.isfinite(ev.latent.susceptibility_peak.value)
    # a one-epoch model need not reach the KT magnetization: then the estimate says so instead of guessing
    est = ev.latent.estimate
    assert math.isfinite(est.value) == est.details["inside_grid"]
    mz = ev.latent.code_magnetization
    crossed = mz is not None and mz.max() > est.details["target_magnetization"] > mz.min()
    assert crossed or not math.isfinite(est.value)
