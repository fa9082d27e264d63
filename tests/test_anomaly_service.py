"""The optional nominal temperature through the service: domain API, micro-batching of mixed requests,
KServe V2 and `hgvae score --temperature` give what onnxruntime gives on the graph directly."""

from __future__ import annotations

import json
import threading

import grpc
import numpy as np
import pytest

from hgvae.cli import main
from service.client import ScoringClient, ScoringError
from service.gen import grpc_predict_v2_pb2 as v2
from service.gen import grpc_predict_v2_pb2_grpc as v2_grpc
from tests._service_fixtures import ServerThread, lattices, real_store
from training.export import run_onnx

T0 = 0.6


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return real_store(tmp_path_factory)


@pytest.fixture(scope="module")
def server(store):
    srv = ServerThread(models=[f"hgvae={store.onnx_path}"], max_delay_ms=20.0)
    yield srv
    srv.stop()


def test_domain_api_with_and_without_temperature(store, server) -> None:
    x = lattices(6, store.lattice_size, seed=1)
    per_row = np.linspace(0.5, 1.4, 6).astype(np.float32)
    with ScoringClient(server.address, timeout=30) as c:
        none = c.score(x, outputs=["anomaly_score", "energy"])
        one = c.score(x, outputs=["anomaly_score"], temperature=T0)
        rows = c.score(x, outputs=["anomaly_score", "anomaly_map"], temperature=per_row)
        nan = c.score(x, outputs=["anomaly_score"], temperature=float("nan"))
        with pytest.raises(ScoringError, match="temperature has 2 values for 6 lattices"):
            c.score(x, temperature=[0.5, 0.6])
    ref_none, ref_one = run_onnx(store.onnx_path, x), run_onnx(store.onnx_path, x, temperature=T0)
    ref_rows = run_onnx(store.onnx_path, x, temperature=per_row)
    np.testing.assert_allclose(none.outputs["anomaly_score"], ref_none["anomaly_score"], atol=1e-5)
    np.testing.assert_allclose(nan.outputs["anomaly_score"], ref_none["anomaly_score"], atol=1e-5)
    np.testing.assert_allclose(one.outputs["anomaly_score"], ref_one["anomaly_score"], atol=1e-5)
    np.testing.assert_allclose(rows.outputs["anomaly_score"], ref_rows["anomaly_score"], atol=1e-5)
    np.testing.assert_allclose(rows.outputs["anomaly_map"], ref_rows["anomaly_map"], atol=1e-5)
    assert not np.allclose(one.outputs["anomaly_score"], none.outputs["anomaly_score"])  # the model has a T table


def test_micro_batch_mixing_requests_with_and_without_temperature(store, server) -> None:
    """Concurrent requests land in one onnxruntime call (20 ms batching window); each keeps its own T."""
    xs = [lattices(3, store.lattice_size, seed=10 + i) for i in range(6)]
    temps = [None, T0, None, 1.2, np.array([0.5, 0.7, 0.9], np.float32), None]
    got: dict[int, np.ndarray] = {}

    def call(i: int) -> None:
        with ScoringClient(server.address, timeout=30) as c:
            got[i] = c.score(xs[i], outputs=["anomaly_score"], temperature=temps[i]).outputs["anomaly_score"]

    threads = [threading.Thread(target=call, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for i in range(6):
        ref = run_onnx(store.onnx_path, xs[i], temperature=temps[i])["anomaly_score"]
        np.testing.assert_allclose(got[i], ref, atol=1e-5, err_msg=str(i))


def test_kserve_v2_optional_temperature_input(store, server) -> None:
    x = lattices(4, store.lattice_size, seed=3)
    t = np.full(4, T0, np.float32)
    with grpc.insecure_channel(server.address) as ch:
        stub = v2_grpc.GRPCInferenceServiceStub(ch)
        req = v2.ModelInferRequest(model_name="hgvae")
        req.inputs.add(name="lattice", datatype="FP32", shape=list(x.shape))
        req.inputs.add(name="temperature", datatype="FP32", shape=[4])
        req.raw_input_contents.extend([x.tobytes(), t.tobytes()])
        req.outputs.add(name="anomaly_score")
        resp = stub.ModelInfer(req, timeout=30)
        score = np.frombuffer(resp.raw_output_contents[0], "<f4")
        np.testing.assert_allclose(score, run_onnx(store.onnx_path, x, temperature=t)["anomaly_score"], atol=1e-5)
        bad = v2.ModelInferRequest(model_name="hgvae")
        bad.inputs.add(name="lattice", datatype="FP32", shape=list(x.shape))
        bad.inputs.add(name="pressure", datatype="FP32", shape=[4])
        bad.raw_input_contents.extend([x.tobytes(), t.tobytes()])
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelInfer(bad, timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "temperature" in err.value.details()


def test_score_cli_nominal_temperature_local_and_remote(store, server, tmp_path, capsys) -> None:
    x = lattices(10, store.lattice_size, seed=4)
    data = tmp_path / "d.npz"
    np.savez(data, angles=x)
    ref = run_onnx(store.onnx_path, x, temperature=T0)["anomaly_score"]
    for where in (["--model", str(store.onnx_path)], ["--server", server.address]):
        out = tmp_path / f"s{len(where[1])}.npz"
        rc = main(["score", "--input", str(data), "--output", str(out), "--temperature", str(T0), "--no-progress",
                   "--batch-size", "4", *where])  # fmt: skip
        assert rc == 0
        with np.load(out) as z:
            np.testing.assert_allclose(z["anomaly_score"], ref, atol=1e-5)
            assert json.loads(str(z["metadata"]))["nominal_temperature"] == T0
    rc = main(["score", "--input", str(data), "--output", str(tmp_path / "x.npz"), "--temperature", "-1",
               "--model", str(store.onnx_path)])  # fmt: skip
    assert rc == 2 and "positive" in capsys.readouterr().err
