"""End to end against a real MLflow sqlite store in tmp_path: train → run + version → promote gates."""

from __future__ import annotations

import os
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from hgvae.cli import main
from training.dataset import save_dataset
from training.registry import promote
from training.train import TrainResult, tiny_dataset, train_model

torch.set_num_threads(1)

LOOSE = {"energy_rel_mean": 10.0, "energy_rel_max": 10.0, "auroc_min": 0.0}


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture(scope="module")
def trained(store: str) -> TrainResult:
    return train_model(tiny_dataset(L=8), epochs=1, tracking_uri=store, width=8)


def test_run_logged_with_params_metrics_plots_and_model(store: str, trained: TrainResult) -> None:
    client = MlflowClient(tracking_uri=store)
    run = client.get_run(trained.run_id)
    assert run.info.status == "FINISHED"
    p, m = run.data.params, run.data.metrics
    assert p["kind"] == "hgvae" and p["lattice_size"] == "8" and len(p["dataset_digest"]) == 64
    for key in ("val_abs_energy_discrepancy", "val_rel_energy_discrepancy_mean", "val_vortex_density_input",
                "val_vortex_density_sampled", "auroc_dead_min", "auroc_stuck_min", "auroc_misaligned_min",
                "onnx_parity_max_abs", "train_nll", "train_kl", "train_energy_term"):  # fmt: skip
        assert key in m, key
    assert m["onnx_parity_max_abs"] < 1e-4
    assert len(client.get_metric_history(trained.run_id, "val_rel_de_by_T")) == 4  # one per temperature
    arts = {a.path for a in client.list_artifacts(trained.run_id)}
    assert {"model", "plots", "validation_per_temperature.json"} <= arts
    plots = {Path(a.path).name for a in client.list_artifacts(trained.run_id, "plots")}
    assert plots == {"loss_curves.png", "discrepancy_vs_T.png", "latent_by_T.png"}
    model_files = [Path(a.path).name for a in client.list_artifacts(trained.run_id, "model")]
    assert sum(f.endswith(".onnx") for f in model_files) == 1 and "MLmodel" in model_files


def test_version_registered_with_tags(store: str, trained: TrainResult) -> None:
    client = MlflowClient(tracking_uri=store, registry_uri=store)
    mv = client.get_model_version("hgvae", trained.version)
    assert mv.run_id == trained.run_id
    assert mv.tags["hgvae.lattice_size"] == "8" and mv.tags["hgvae.model_kind"] == "hgvae"
    assert trained.onnx_path is not None and trained.onnx_path.is_file()


def test_failing_gates_refuse_and_name_the_gate(store: str, trained: TrainResult) -> None:
    res = promote("hgvae", trained.version, "champion", tracking_uri=store)  # default (strict) thresholds
    assert not res.passed and not res.moved
    failed = {g.name for g in res.failed}
    assert "energy_discrepancy" in failed  # a 1-epoch tiny model is nowhere near 1 %
    assert "over by" in res.summary() and "refused" in res.summary()
    client = MlflowClient(tracking_uri=store, registry_uri=store)
    assert "champion" not in client.get_registered_model("hgvae").aliases


def test_promote_moves_alias_and_model_resolves(store: str, trained: TrainResult, tmp_path: Path) -> None:
    res = promote("hgvae", trained.version, "champion", tracking_uri=store, thresholds=LOOSE)
    assert res.passed and res.moved, res.summary()
    assert {g.name for g in res.gates} == {"onnx_parity", "energy_discrepancy", "anomaly_auroc"}
    client = MlflowClient(tracking_uri=store, registry_uri=store)
    assert str(client.get_model_version_by_alias("hgvae", "champion").version) == str(trained.version)
    mlflow.set_tracking_uri(store)
    try:
        local = Path(mlflow.artifacts.download_artifacts("models:/hgvae@champion", dst_path=str(tmp_path)))
    finally:
        mlflow.set_tracking_uri(None)
    assert len(list(local.glob("*.onnx"))) == 1


def test_force_moves_alias_and_says_what_failed(store: str, trained: TrainResult) -> None:
    res = promote("hgvae", trained.version, "challenger", force=True, tracking_uri=store)
    assert res.moved and not res.passed
    assert "forced" in res.summary()
    client = MlflowClient(tracking_uri=store, registry_uri=store)
    assert str(client.get_model_version_by_alias("hgvae", "challenger").version) == str(trained.version)
    assert "energy_discrepancy" in client.get_model_version("hgvae", trained.version).tags["hgvae.forced"]


def test_cli_train_and_promote(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ds = tiny_dataset(L=8, seed=4)
    data = save_dataset(tmp_path / "d.npz", ds.angles, ds.temperature, ds.metadata)
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    rc = main(["train", "--data", str(data), "--epochs", "1", "--width", "8", "--tracking-uri", uri, "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0 and "run id:" in out and "registered: hgvae version 1" in out
    rc = main(["promote", "--version", "1", "--tracking-uri", uri])
    out = capsys.readouterr().out
    assert rc == 1 and "[FAIL] energy_discrepancy" in out and "refused" in out
    rc = main(["promote", "--version", "1", "--tracking-uri", uri, "--max-energy-discrepancy", "10",
               "--max-energy-discrepancy-per-t", "10", "--min-auroc", "0"])  # fmt: skip
    assert rc == 0 and "alias @champion -> hgvae version 1" in capsys.readouterr().out
    rc = main(["promote", "--version", "7", "--tracking-uri", uri])
    assert rc == 2 and "not found" in capsys.readouterr().err


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: None, "no such file"),
        (lambda p: p.write_bytes(b"not a zip"), "not a readable .npz"),
        (lambda p: np.savez(p, angles=np.zeros((4, 8), np.float32)), "shape"),
        (lambda p: np.savez(p, angles=np.full((9, 8, 8), np.nan, np.float32)), "non-finite"),
        (lambda p: np.savez(p, angles=np.zeros((9, 10, 10), np.float32)), "multiple of 4"),
        (lambda p: np.savez(p, angles=np.zeros((3, 8, 8), np.float32)), "at least 8"),
    ],
)
def test_cli_bad_data_is_a_clear_error_before_training(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], make, message: str
) -> None:
    path = tmp_path / "bad.npz"
    make(path)
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    rc = main(["train", "--data", str(path), "--tracking-uri", uri, "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and "Traceback" not in err
    assert not os.path.exists(tmp_path / "m.db")  # nothing logged


def test_cli_bad_hyper_parameters(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ds = tiny_dataset(L=8)
    data = save_dataset(tmp_path / "d.npz", ds.angles, ds.temperature, ds.metadata)
    rc = main(["train", "--data", str(data), "--epochs", "0", "--tracking-uri", f"sqlite:///{tmp_path}/m.db"])
    assert rc == 2 and "epochs" in capsys.readouterr().err
    rc = main(["train", "--data", str(data), "--latent-dim", "0", "--tracking-uri", f"sqlite:///{tmp_path}/m.db"])
    assert rc == 2 and "latent" in capsys.readouterr().err
    rc = main(["train", "--data", str(data), "--latent-dim", "20", "--tracking-uri", f"sqlite:///{tmp_path}/m.db"])
    err = capsys.readouterr().err
    assert rc == 2 and "multiple of (L/2)² = 16" in err and "Traceback" not in err
    assert not os.path.exists(tmp_path / "m.db")  # refused before anything was logged
