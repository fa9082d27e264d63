"""Integration: a real grpc.aio server on 127.0.0.1 serving a model from a real MLflow store."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import textwrap
import urllib.request

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hgvae.contract import OUTPUT_NAMES as OUTPUTS
from tests._service_fixtures import ServerThread, lattices, real_store, reference


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return real_store(tmp_path_factory)


@pytest.fixture(scope="module")
def server(store):
    srv = ServerThread(
        models=["models:/hgvae@champion"],
        tracking_uri=store.tracking_uri,
        metrics_port=0,
        max_request_rows=256,
        max_message_mb=1.0,
        max_batch_size=32,
        max_delay_ms=2.0,
        poll_interval_s=3600,
    )
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    from service.client import ScoringClient

    with ScoringClient(server.address, timeout=20) as c:
        yield c


@pytest.fixture(scope="module")
def stubs(server):
    from service.gen import grpc_predict_v2_pb2_grpc as v2g
    from service.gen.hgvae.v1 import scoring_pb2_grpc as pbg

    channel = grpc.insecure_channel(server.address, options=[("grpc.max_send_message_length", 8 << 20)])
    yield pbg.ScoringServiceStub(channel), v2g.GRPCInferenceServiceStub(channel)
    channel.close()


def assert_matches(outputs: dict, ref: dict, names=OUTPUTS) -> None:
    assert set(outputs) == set(names)
    for k in names:
        assert outputs[k].shape == ref[k].shape, k
        np.testing.assert_allclose(outputs[k], ref[k], rtol=0, atol=1e-5, err_msg=k)


def test_health_serving_for_every_service(client):
    for service in ("", "hgvae.v1.ScoringService", "inference.GRPCInferenceService"):
        assert client.health(service) == "SERVING"


def test_score_matches_onnxruntime(client, store):
    x = lattices(5, seed=1)
    r = client.score(x)
    assert (r.model, r.version) == ("hgvae", store.version)
    assert_matches(r.outputs, reference(store.onnx_path, x))


def test_score_selected_outputs_and_explicit_version(client, store):
    x = lattices(3, seed=2)
    r = client.score(x, model="hgvae", version=store.version, outputs=["anomaly_score", "theta"])
    ref = reference(store.onnx_path, x)
    assert_matches(r.outputs, ref, names=("anomaly_score", "theta"))


def test_stream_matches_and_keeps_order(client, store):
    batches = [lattices(n, seed=10 + i) for i, n in enumerate([1, 4, 2, 7, 1, 3, 5, 1])]
    results = list(client.score_stream(batches))
    assert [r.request_id for r in results] == [str(i) for i in range(len(batches))]
    for x, r in zip(batches, results, strict=True):
        assert_matches(r.outputs, reference(store.onnx_path, x))


def test_concurrent_requests_are_micro_batched_and_split_correctly(server, store):
    from service.client import AsyncScoringClient

    xs = [lattices(1 + i % 3, seed=100 + i) for i in range(48)]

    async def run():
        async with AsyncScoringClient(server.address) as c:
            return await asyncio.gather(*(c.score(x, outputs=["anomaly_score", "latent_mean"]) for x in xs))

    before = _metric(server, "hgvae_batch_rows_count", model="hgvae")
    results = asyncio.run(run())
    for x, r in zip(xs, results, strict=True):
        ref = reference(store.onnx_path, x)
        assert_matches(r.outputs, ref, names=("anomaly_score", "latent_mean"))
    calls = _metric(server, "hgvae_batch_rows_count", model="hgvae") - before
    rows = sum(len(x) for x in xs)
    assert calls < len(xs), f"{len(xs)} concurrent requests ran as {calls} onnxruntime calls (no batching)"
    assert rows / calls > 1.5


def _metrics_text(server) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.server.metrics_port}/metrics", timeout=5) as resp:
        return resp.read().decode()


def _metric(server, name: str, **labels) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for fam in text_string_to_metric_families(_metrics_text(server)):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


def test_metrics_endpoint(server, client, store):
    client.score(lattices(1))
    from service.client import ScoringError

    with pytest.raises(ScoringError):
        client.score(lattices(1), model="nope")
    assert _metric(server, "hgvae_requests_total", method="Score", code="OK") >= 1
    assert (
        _metric(server, "hgvae_errors_total", method="GetModelInfo", code="NOT_FOUND")
        + _metric(server, "hgvae_errors_total", method="Score", code="NOT_FOUND")
        >= 1
    )
    assert _metric(server, "hgvae_model_loaded", model="hgvae", version=store.version) == 1
    assert _metric(server, "hgvae_request_latency_seconds_count", method="Score") >= 1


def test_model_info(client, store):
    info = client.model_info()
    assert info["name"] == "hgvae" and info["version"] == store.version and info["alias"] == "champion"
    assert info["lattice_size"] == store.lattice_size and info["ready"]
    assert sorted(info["outputs"]) == sorted(OUTPUTS)  # names are the contract, not their order
    assert info["provider"] == "CPUExecutionProvider" and info["max_batch_size"] == 32
    assert info["metadata"]["hgvae.lattice_size"] == str(store.lattice_size)
    assert [m["name"] for m in client.list_models()] == ["hgvae"]


def test_one_runner_per_core_by_default(server):
    from service.runtime import usable_cores

    served = server.server.models.current["hgvae"]
    assert served.batcher.workers == usable_cores() and served.model.intra_op_threads == 1
    assert len({t.name for t in served.batcher._threads if t.is_alive()}) == usable_cores()


def test_reflection_lists_services(server):
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    with grpc.insecure_channel(server.address) as channel:
        db = ProtoReflectionDescriptorDatabase(channel)
        services = set(db.get_services())
        assert {
            "hgvae.v1.ScoringService",
            "inference.GRPCInferenceService",
            "grpc.health.v1.Health",
            "grpc.reflection.v1alpha.ServerReflection",
        } <= services
        fd = db.FindFileContainingSymbol("hgvae.v1.ScoringService")
        assert fd.package == "hgvae.v1" and fd.service[0].method[0].name == "Score"


def test_v2_typed_contents_and_metadata(stubs, store):
    from service.gen import grpc_predict_v2_pb2 as v2

    _, v2stub = stubs
    x = lattices(2, seed=3)
    req = v2.ModelInferRequest(model_name="hgvae", id="42")
    req.inputs.add(name="lattice", datatype="FP32", shape=x.shape).contents.fp32_contents.extend(x.ravel().tolist())
    req.outputs.add(name="energy")
    resp = v2stub.ModelInfer(req)
    assert resp.id == "42" and resp.model_version == store.version and [o.name for o in resp.outputs] == ["energy"]
    energy = np.frombuffer(resp.raw_output_contents[0], "<f4").reshape(resp.outputs[0].shape)
    np.testing.assert_allclose(energy, reference(store.onnx_path, x)["energy"], atol=1e-5)
    meta = v2stub.ModelMetadata(v2.ModelMetadataRequest(name="hgvae"))
    assert meta.inputs[0].name == "lattice" and list(meta.inputs[0].shape) == [
        -1,
        store.lattice_size,
        store.lattice_size,
    ]
    assert sorted(o.name for o in meta.outputs) == sorted(OUTPUTS) and meta.platform == "onnxruntime_onnx"
    assert v2stub.ServerLive(v2.ServerLiveRequest()).live and v2stub.ServerReady(v2.ServerReadyRequest()).ready
    assert v2stub.ModelReady(v2.ModelReadyRequest(name="hgvae")).ready
    assert not v2stub.ModelReady(v2.ModelReadyRequest(name="hgvae", version="999")).ready


TRITON_SCRIPT = textwrap.dedent("""
    import sys, numpy as np
    import tritonclient.grpc as tc
    address, inp, out = sys.argv[1:4]
    x = np.load(inp)["x"]
    c = tc.InferenceServerClient(address)
    assert c.is_server_live() and c.is_server_ready() and c.is_model_ready("hgvae")
    meta = c.get_model_metadata("hgvae")
    assert meta.inputs[0].datatype == "FP32", meta
    i = tc.InferInput("lattice", list(x.shape), "FP32")
    i.set_data_from_numpy(x)
    names = [o.name for o in meta.outputs]
    res = c.infer("hgvae", [i], outputs=[tc.InferRequestedOutput(n) for n in names], client_timeout=20)
    np.savez(out, **{n: res.as_numpy(n) for n in names})
    try:
        bad = tc.InferInput("lattice", [1, 3, 3], "FP32")
        bad.set_data_from_numpy(np.zeros((1, 3, 3), np.float32))
        c.infer("hgvae", [bad])
    except Exception as e:
        print("BAD:", e)
""")


def test_tritonclient_v2_infer_returns_the_same_numbers(server, store, tmp_path):
    # tritonclient registers its own `inference` protos; a separate process keeps descriptor pools apart
    x = lattices(4, seed=4)
    np.savez(tmp_path / "in.npz", x=x)
    proc = subprocess.run(
        [sys.executable, "-c", TRITON_SCRIPT, server.address, tmp_path / "in.npz", tmp_path / "out.npz"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert "BAD:" in proc.stdout and "INVALID_ARGUMENT" in proc.stdout and "does not match" in proc.stdout
    with np.load(tmp_path / "out.npz") as out:
        assert_matches({k: out[k] for k in out.files}, reference(store.onnx_path, x))


def _tensor(shape, data: bytes, dtype: str = "float32"):
    from service.gen.hgvae.v1 import scoring_pb2 as pb

    return pb.Tensor(shape=shape, dtype=dtype, data=data)


def _ok(L: int, n: int = 1) -> bytes:
    return lattices(n, L).tobytes()


BAD_SCORE = {
    # name: (request kwargs builder(L), expected code, message fragment)
    "wrong rank": (lambda L: dict(lattices=_tensor([L, L], _ok(L))), "INVALID_ARGUMENT", "rank 3"),
    "wrong lattice size": (
        lambda L: dict(lattices=_tensor([1, L + 1, L + 1], lattices(1, L + 1).tobytes())),
        "INVALID_ARGUMENT",
        "does not match",
    ),
    "non-finite": (
        lambda L: dict(lattices=_tensor([1, L, L], np.full((1, L, L), np.nan, "<f4").tobytes())),
        "INVALID_ARGUMENT",
        "non-finite",
    ),
    "infinite": (
        lambda L: dict(lattices=_tensor([1, L, L], np.full((1, L, L), np.inf, "<f4").tobytes())),
        "INVALID_ARGUMENT",
        "non-finite",
    ),
    "empty batch": (lambda L: dict(lattices=_tensor([0, L, L], b"")), "INVALID_ARGUMENT", "empty batch"),
    "no tensor": (lambda L: dict(), "INVALID_ARGUMENT", "rank 3"),
    "wrong dtype": (
        lambda L: dict(lattices=_tensor([1, L, L], np.zeros((1, L, L)).tobytes(), "float64")),
        "INVALID_ARGUMENT",
        "float32",
    ),
    "byte length": (lambda L: dict(lattices=_tensor([1, L, L], _ok(L)[:-1])), "INVALID_ARGUMENT", "bytes"),
    "negative dim": (lambda L: dict(lattices=_tensor([-1, L, L], _ok(L))), "INVALID_ARGUMENT", "negative"),
    "unknown model": (lambda L: dict(model="nope", lattices=_tensor([1, L, L], _ok(L))), "NOT_FOUND", "nope"),
    "unknown version": (lambda L: dict(version="999", lattices=_tensor([1, L, L], _ok(L))), "NOT_FOUND", "999"),
    "unknown output": (
        lambda L: dict(outputs=["energy", "bogus"], lattices=_tensor([1, L, L], _ok(L))),
        "INVALID_ARGUMENT",
        "bogus",
    ),
    "too many rows": (lambda L: dict(lattices=_tensor([257, L, L], _ok(L, 257))), "RESOURCE_EXHAUSTED", "256"),
    "oversized message": (lambda L: dict(lattices=_tensor([1, L, L], b"\0" * (2 << 20))), "RESOURCE_EXHAUSTED", ""),
}


@pytest.mark.parametrize("case", sorted(BAD_SCORE))
def test_bad_score_requests_get_their_status(case, stubs, store, client):
    from service.gen.hgvae.v1 import scoring_pb2 as pb

    build, code, fragment = BAD_SCORE[case]
    with pytest.raises(grpc.RpcError) as err:
        stubs[0].Score(pb.ScoreRequest(**build(store.lattice_size)), timeout=20)
    assert err.value.code().name == code, err.value.details()
    assert fragment in (err.value.details() or "")
    assert client.score(lattices(1)).outputs  # the server survived


def test_bad_stream_message_answers_error_and_stream_continues(stubs, store):
    from service.gen.hgvae.v1 import scoring_pb2 as pb

    L = store.lattice_size
    reqs = [
        pb.ScoreRequest(request_id="a", lattices=_tensor([1, L, L], _ok(L))),
        pb.ScoreRequest(request_id="b", lattices=_tensor([1, L], _ok(L))),
        pb.ScoreRequest(request_id="c", model="nope", lattices=_tensor([1, L, L], _ok(L))),
        pb.ScoreRequest(request_id="d", lattices=_tensor([2, L, L], _ok(L, 2))),
    ]
    out = list(stubs[0].ScoreStream(iter(reqs), timeout=20))
    assert [r.request_id for r in out] == ["a", "b", "c", "d"]
    assert [r.error.code for r in out] == [
        0,
        grpc.StatusCode.INVALID_ARGUMENT.value[0],
        grpc.StatusCode.NOT_FOUND.value[0],
        0,
    ]
    assert out[3].outputs["energy"].shape == [2]


def test_bad_v2_requests_get_their_status(stubs, store):
    from service.gen import grpc_predict_v2_pb2 as v2

    L = store.lattice_size

    def req(name="hgvae", input_name="lattice", datatype="FP32", shape=(1, L, L), raw=None, version=""):
        r = v2.ModelInferRequest(model_name=name, model_version=version)
        r.inputs.add(name=input_name, datatype=datatype, shape=shape)
        r.raw_input_contents.extend(raw if raw is not None else (_ok(L),))
        return r

    typed_short = v2.ModelInferRequest(model_name="hgvae")
    typed_short.inputs.add(name="lattice", datatype="FP32", shape=[1, L, L]).contents.fp32_contents.extend([0.0] * 5)
    cases = [
        (req(name=""), "INVALID_ARGUMENT"),
        (req(name="nope"), "NOT_FOUND"),
        (req(version="999"), "NOT_FOUND"),
        (req(input_name="x"), "INVALID_ARGUMENT"),
        (req(datatype="FP64"), "INVALID_ARGUMENT"),
        (req(raw=(_ok(L), _ok(L))), "INVALID_ARGUMENT"),
        (req(shape=(1, L)), "INVALID_ARGUMENT"),
        (typed_short, "INVALID_ARGUMENT"),
        (v2.ModelMetadataRequest(name="nope"), "NOT_FOUND"),
    ]
    for request, code in cases:
        call = stubs[1].ModelMetadata if isinstance(request, v2.ModelMetadataRequest) else stubs[1].ModelInfer
        with pytest.raises(grpc.RpcError) as err:
            call(request, timeout=20)
        assert err.value.code().name == code, (request, err.value.details())
        assert err.value.details()


_shapes = st.lists(st.integers(-2, 12), min_size=0, max_size=4)


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    shape=_shapes,
    nbytes=st.one_of(st.none(), st.integers(0, 3000)),
    dtype=st.sampled_from(["", "float32", "float64", "int8", "FP32", "garbage"]),
    model=st.sampled_from(["", "hgvae", "other", "h\x00"]),
    version=st.sampled_from(["", "1", "999", "x"]),
    outputs=st.lists(st.sampled_from(["energy", "theta", "nope", ""]), max_size=3),
    fill=st.sampled_from([0.0, 1.0, np.nan, -np.inf, 1e30]),
)
def test_property_malformed_requests_never_break_the_server(
    stubs, store, shape, nbytes, dtype, model, version, outputs, fill
):
    from service.gen.hgvae.v1 import scoring_pb2 as pb

    size = int(np.prod([max(d, 0) for d in shape])) if shape else 0
    data = np.full(size, fill, "<f4").tobytes() if nbytes is None else bytes(nbytes)
    request = pb.ScoreRequest(model=model, version=version, outputs=outputs, lattices=_tensor(shape, data, dtype))
    try:
        resp = stubs[0].Score(request, timeout=20)
    except grpc.RpcError as err:
        assert err.code().name in {"INVALID_ARGUMENT", "NOT_FOUND", "RESOURCE_EXHAUSTED"}, err.details()
        assert err.details()
    else:  # only a fully valid request may succeed
        L = store.lattice_size
        assert len(shape) == 3 and shape[1:] == [L, L] and shape[0] >= 1 and np.isfinite(fill)
        assert all(o in ("energy", "theta") for o in outputs) and dtype in ("", "float32", "FP32")
        assert resp.outputs
    assert (
        stubs[0]
        .Score(
            pb.ScoreRequest(lattices=_tensor([1, store.lattice_size, store.lattice_size], _ok(store.lattice_size))),
            timeout=20,
        )
        .outputs
    )


def test_service_modules_do_not_import_torch():
    code = (
        "import sys, service.server, service.client, service.batch, service.models, hgvae.commands.serve, "
        "hgvae.commands.score, mlflow.artifacts, mlflow.tracking; "
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] == 'torch')))"
    )
    proc = subprocess.run([sys.executable, "-c", "import json; " + code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == []


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    shape=_shapes,
    raw=st.one_of(st.none(), st.integers(0, 2000)),
    typed=st.integers(0, 300),
    datatype=st.sampled_from(["FP32", "FP64", "INT8", "BYTES", ""]),
    input_name=st.sampled_from(["lattice", "x", ""]),
    model=st.sampled_from(["hgvae", "", "zzz"]),
    n_raw=st.integers(0, 2),
)
def test_property_malformed_v2_requests_never_break_the_server(
    stubs, store, shape, raw, typed, datatype, input_name, model, n_raw
):
    from service.gen import grpc_predict_v2_pb2 as v2

    request = v2.ModelInferRequest(model_name=model)
    tensor = request.inputs.add(name=input_name, datatype=datatype, shape=shape)
    if raw is None:
        tensor.contents.fp32_contents.extend([0.5] * typed)
    else:
        request.raw_input_contents.extend([bytes(raw)] * n_raw)
    try:
        resp = stubs[1].ModelInfer(request, timeout=20)
    except grpc.RpcError as err:
        assert err.code().name in {"INVALID_ARGUMENT", "NOT_FOUND", "RESOURCE_EXHAUSTED"}, err.details()
        assert err.details()
    else:
        L = store.lattice_size
        assert model == "hgvae" and input_name == "lattice" and datatype == "FP32"
        assert len(shape) == 3 and shape[1:] == [L, L] and shape[0] >= 1
        assert len(resp.raw_output_contents) == len(resp.outputs) == 11
    assert stubs[1].ServerReady(v2.ServerReadyRequest(), timeout=20).ready
