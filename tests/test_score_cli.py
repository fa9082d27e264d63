"""`hgvae score`: local onnxruntime and through a server, chunked, atomic, with clear errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from hgvae.cli import main
from hgvae.contract import OUTPUT_NAMES as OUTPUTS
from tests._service_fixtures import ServerThread, lattices, real_store, reference


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return real_store(tmp_path_factory)


@pytest.fixture(scope="module")
def data(store, tmp_path_factory):
    d = tmp_path_factory.mktemp("score")
    x = lattices(37, store.lattice_size, seed=5)
    t = np.linspace(0.5, 1.5, 37).astype(np.float32)
    path = d / "data.npz"
    np.savez(path, angles=x, temperature=t, metadata=np.array(json.dumps({"algorithm": "test"})))
    return path, x, t


def check_scores(path, x, t, onnx_path, names=OUTPUTS):
    ref = reference(onnx_path, x)
    with np.load(path) as z:
        assert set(z.files) == {*names, "temperature", "metadata"}
        for k in names:
            np.testing.assert_allclose(z[k], ref[k], atol=1e-5, err_msg=k)
        np.testing.assert_array_equal(z["temperature"], t)
        return json.loads(str(z["metadata"]))


def test_local_model_file_chunked(store, data, tmp_path):
    path, x, t = data
    out = tmp_path / "scores.npz"
    rc = main(
        [
            "score",
            "--input",
            str(path),
            "--output",
            str(out),
            "--model",
            str(store.onnx_path),
            "--batch-size",
            "5",
            "--no-progress",
        ]
    )
    assert rc == 0
    meta = check_scores(out, x, t, store.onnx_path)
    assert meta["configurations"] == 37
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # temporaries cleaned up


def test_default_champion_from_the_registry(store, data, tmp_path, monkeypatch):
    path, x, t = data
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.tracking_uri)
    out = tmp_path / "scores.npz"
    assert (
        main(
            ["score", "--input", str(path), "--output", str(out), "--outputs", "anomaly_score,energy", "--no-progress"]
        )
        == 0
    )
    meta = check_scores(out, x, t, store.onnx_path, names=("anomaly_score", "energy"))
    assert meta["version"] == store.version and meta["model"] == "models:/hgvae@champion"


def test_through_the_server(store, data, tmp_path):
    path, x, t = data
    srv = ServerThread(models=[f"hgvae={store.onnx_path}"])
    try:
        out = tmp_path / "scores.npz"
        assert (
            main(
                [
                    "score",
                    "--input",
                    str(path),
                    "--output",
                    str(out),
                    "--server",
                    srv.address,
                    "--batch-size",
                    "8",
                    "--no-progress",
                ]
            )
            == 0
        )
        check_scores(out, x, t, store.onnx_path)
    finally:
        srv.stop()


def test_compressed_float64_input_without_temperature(store, tmp_path):
    x = lattices(6, store.lattice_size, seed=6).astype(np.float64)
    np.savez_compressed(tmp_path / "in.npz", angles=x)
    out = tmp_path / "out.npz"
    assert (
        main(
            [
                "score",
                "--input",
                str(tmp_path / "in.npz"),
                "--output",
                str(out),
                "--model",
                str(store.onnx_path),
                "--batch-size",
                "4",
                "--no-progress",
            ]
        )
        == 0
    )
    with np.load(out) as z:
        assert "temperature" not in z.files
        np.testing.assert_allclose(z["energy"], reference(store.onnx_path, x)["energy"], atol=1e-5)


def test_bad_inputs_exit_2_with_a_message_and_write_nothing(store, data, tmp_path, capsys):
    path, x, _ = data
    nan = x.copy()
    nan[30, 1, 1] = np.nan
    np.savez(tmp_path / "nan.npz", angles=nan)
    np.savez(tmp_path / "wrong_l.npz", angles=lattices(2, store.lattice_size + 2))
    np.savez(tmp_path / "noangles.npz", other=np.zeros(3))
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    (tmp_path / "exists.npz").write_bytes(b"keep me")
    onnx = str(store.onnx_path)
    cases = [
        (["--input", str(tmp_path / "missing.npz"), "--model", onnx], "no such file"),
        (["--input", str(tmp_path / "nan.npz"), "--model", onnx, "--batch-size", "8"], "configuration 30"),
        (["--input", str(tmp_path / "wrong_l.npz"), "--model", onnx], "model expects"),
        (["--input", str(tmp_path / "noangles.npz"), "--model", onnx], "no 'angles'"),
        (["--input", str(tmp_path / "junk.npz"), "--model", onnx], "not a readable"),
        (["--input", str(path), "--model", onnx, "--outputs", "energy,bogus"], "bogus"),
        (["--input", str(path), "--model", str(tmp_path / "nope.onnx")], "does not exist"),
        (["--input", str(path), "--server", "127.0.0.1:1", "--timeout", "2"], "server 127.0.0.1:1"),
    ]
    for args, fragment in cases:
        out = tmp_path / "out.npz"
        assert main(["score", *args, "--output", str(out), "--no-progress"]) == 2, args
        err = capsys.readouterr().err
        assert fragment in err and "Traceback" not in err, (args, err)
        assert not out.exists()
    assert main(["score", "--input", str(path), "--output", str(tmp_path / "exists.npz"), "--model", onnx]) == 2
    assert "--force" in capsys.readouterr().err
    assert (tmp_path / "exists.npz").read_bytes() == b"keep me"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_memory_stays_flat_while_scoring(store, tmp_path):
    """Python-side allocations are bounded by the chunk, not by the file (outputs go to disk)."""
    import tracemalloc

    from service.batch import local_scorer, score_file
    from service.runtime import OnnxModel

    n, L = 3000, store.lattice_size
    np.savez(tmp_path / "big.npz", angles=lattices(n, L, seed=8))
    model = OnnxModel(store.onnx_path, "hgvae", "1")
    model.load()
    tracemalloc.start()
    try:
        score_file(tmp_path / "big.npz", tmp_path / "out.npz", local_scorer(model, None), chunk_rows=50, progress=False)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    out_bytes = (tmp_path / "out.npz").stat().st_size
    assert out_bytes > 2_000_000
    print(f"peak traced {peak} B for an output of {out_bytes} B")
    assert peak < out_bytes / 4, (peak, out_bytes)
    with np.load(tmp_path / "out.npz") as z:
        assert z["anomaly_map"].shape == (n, L, L)
