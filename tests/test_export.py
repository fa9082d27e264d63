"""ONNX export: contract names, dynamic batch, metadata, checker, torch ↔ onnxruntime parity."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from hgvae.contract import TEMPERATURE_INPUT
from training import physics
from training.anomaly import Calibration, calibrate
from training.export import (
    INPUT_NAME,
    OUTPUT_NAMES,
    ScoringGraph,
    export_onnx,
    output_differences,
    run_onnx,
    scoring_graph_from_onnx,
)
from training.model import XYVAE, ModelConfig
from training.train import Hyper, fit, tiny_dataset

torch.set_num_threads(1)

CONTRACT = [
    "latent_mean", "latent_logvar", "theta", "sigma", "energy", "energy_recon", "energy_discrepancy", "nll",
    "vortex_density", "anomaly_score", "anomaly_map",
]  # fmt: skip


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[ScoringGraph, Path]:
    ds = tiny_dataset(L=8, temperatures=4, samples=24)
    cfg = ModelConfig(lattice_size=8, latent_dim=32, width=8)
    model, _ = fit(ds.angles, cfg, Hyper(epochs=2, batch_size=32, latent_dim=32, width=8))

    def forward(th: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        _, _, a, b = model(th)
        return a, b

    graph = ScoringGraph(model, calibrate(forward, ds.angles, 8))
    path = export_onnx(graph, tmp_path_factory.mktemp("onnx") / "m.onnx", run_id="abc123")
    return graph, path


def test_contract_names_shapes_and_dynamic_batch(exported: tuple[ScoringGraph, Path]) -> None:
    _, path = exported
    assert list(OUTPUT_NAMES) == CONTRACT
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    # "temperature" is the optional second input: a graph input with an initializer (default NaN).
    assert [i.name for i in proto.graph.input] == [INPUT_NAME, TEMPERATURE_INPUT]
    assert [i.name for i in proto.graph.initializer if i.name == TEMPERATURE_INPUT] == [TEMPERATURE_INPUT]
    assert [o.name for o in proto.graph.output] == CONTRACT
    assert proto.opset_import[0].version >= 17
    dim0 = proto.graph.input[0].type.tensor_type.shape.dim[0]
    assert dim0.dim_param and not dim0.dim_value  # symbolic batch
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == [INPUT_NAME]  # callers that send only the lattice keep working
    assert [i.name for i in sess.get_overridable_initializers()] == [TEMPERATURE_INPUT]
    for b in (1, 3, 37):
        out = dict(zip(CONTRACT, sess.run(None, {INPUT_NAME: np.zeros((b, 8, 8), np.float32)}), strict=True))
        assert out["latent_mean"].shape == (b, 32) and out["latent_logvar"].shape == (b, 32)
        for n in ("theta", "sigma", "anomaly_map"):
            assert out[n].shape == (b, 8, 8)
        for n in ("energy", "energy_recon", "energy_discrepancy", "nll", "vortex_density", "anomaly_score"):
            assert out[n].shape == (b,)
        assert all(v.dtype == np.float32 and np.all(np.isfinite(v)) for v in out.values())


def test_metadata_props(exported: tuple[ScoringGraph, Path]) -> None:
    _, path = exported
    meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    for key in ("hgvae.lattice_size", "hgvae.model_kind", "hgvae.latent_dim", "hgvae.run_id", "hgvae.calibration",
                "hgvae.version"):  # fmt: skip
        assert key in meta
    assert meta["hgvae.lattice_size"] == "8" and meta["hgvae.model_kind"] == "hgvae"
    assert meta["hgvae.latent_dim"] == "32" and meta["hgvae.run_id"] == "abc123"
    cal = Calibration.from_json(meta["hgvae.calibration"])
    assert cal.lattice_size == 8 and set(cal.quantiles) >= {"q50", "q99"}
    assert "z-score" in json.loads(meta["hgvae.calibration"])["meaning"]


def test_parity_torch_vs_onnxruntime(exported: tuple[ScoringGraph, Path]) -> None:
    graph, path = exported
    rng = np.random.default_rng(0)
    ds = tiny_dataset(L=8, temperatures=4, samples=8, seed=5)
    x = np.concatenate(
        [
            ds.angles,
            rng.uniform(-50, 50, size=(16, 8, 8)).astype(np.float32),  # any real value, taken mod 2π
            np.zeros((2, 8, 8), np.float32),
        ]
    )
    diffs = output_differences(graph.score(x), run_onnx(path, x))
    assert set(diffs) == set(CONTRACT)
    bad = {k: v for k, v in diffs.items() if v > 1e-4}
    assert not bad, bad


def test_graph_rebuilt_from_the_onnx_file_scores_identically(exported: tuple[ScoringGraph, Path]) -> None:
    """A trained model can be re-exported (e.g. with a new anomaly head) from its ONNX file alone."""
    graph, path = exported
    rebuilt = scoring_graph_from_onnx(path)
    assert rebuilt.anomaly.calibration_json == graph.anomaly.calibration_json
    x = tiny_dataset(L=8, temperatures=4, samples=4, seed=9).angles
    again = rebuilt.score(x, temperature=0.7)
    for name, value in graph.score(x, temperature=0.7).items():
        np.testing.assert_array_equal(again[name], value, err_msg=name)


def test_physics_head_matches_reference_observables(exported: tuple[ScoringGraph, Path]) -> None:
    _, path = exported
    rng = np.random.default_rng(1)
    x = rng.uniform(0, 2 * math.pi, size=(6, 8, 8)).astype(np.float32)
    out = run_onnx(path, x)
    t = torch.from_numpy(x.astype(np.float64))
    np.testing.assert_allclose(out["energy"], physics.energy_per_site(t).numpy(), atol=1e-5)
    np.testing.assert_allclose(out["vortex_density"], physics.vortex_density(t).numpy(), atol=1e-6)
    np.testing.assert_allclose(out["energy_discrepancy"], out["energy_recon"] - out["energy"], atol=1e-6)
    exp = physics.expected_energy_per_site(torch.from_numpy(out["theta"]), torch.from_numpy(out["sigma"]))
    np.testing.assert_allclose(out["energy_recon"], exp.numpy(), atol=1e-5)
    # Shifting every angle by 2π changes nothing (input taken mod 2π).
    out2 = run_onnx(path, x + np.float32(2 * math.pi))
    np.testing.assert_allclose(out2["energy"], out["energy"], atol=1e-4)
    # A global rotation leaves energy and vortices unchanged.
    out3 = run_onnx(path, x + np.float32(1.234))
    np.testing.assert_allclose(out3["energy"], out["energy"], atol=1e-5)
    np.testing.assert_array_equal(out3["vortex_density"], out["vortex_density"])


def test_model_without_torch_in_the_scoring_path(exported: tuple[ScoringGraph, Path]) -> None:
    """The ONNX file alone carries everything the service needs (no external data files)."""
    _, path = exported
    assert [p.name for p in path.parent.iterdir() if p.suffix != ".onnx"] == []
    assert XYVAE  # the torch model is only needed to export
