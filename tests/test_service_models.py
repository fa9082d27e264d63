"""Model sources: parsing, and every kind (alias, pinned version, run, file) served side by side."""

from __future__ import annotations

import pytest

from service.models import parse_source
from tests._service_fixtures import ServerThread, lattices, real_store, reference


@pytest.mark.parametrize(
    ("spec", "name", "kind", "extra"),
    [
        ("models:/hgvae@champion", "hgvae", "alias", {"registered_name": "hgvae", "alias": "champion"}),
        ("models:/hgvae/3", "hgvae", "version", {"version": "3"}),
        ("l16=models:/hgvae-l16@challenger", "l16", "alias", {"registered_name": "hgvae-l16"}),
        ("runs:/0123456789abcdef", "run-01234567", "run", {"artifact_path": "model"}),
        ("runs:/abc/exported/model.onnx", "run-abc", "run", {"artifact_path": "exported/model.onnx"}),
    ],
)
def test_parse_good_sources(spec, name, kind, extra):
    src = parse_source(spec)
    assert (src.name, src.kind) == (name, kind)
    for k, v in extra.items():
        assert getattr(src, k) == v


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        ("", "empty"),
        ("models:/hgvae", "models:/NAME/VERSION"),
        ("models:/hgvae/latest", "models:/NAME/VERSION"),
        ("models:/@x", "NAME@ALIAS"),
        ("runs:/", "RUN_ID"),
        ("/no/such/model.onnx", "does not exist"),
        ("model.pt", "not a models:/"),
        ("bad name=models:/hgvae/1", "may only use"),
    ],
)
def test_parse_bad_sources(spec, fragment):
    with pytest.raises(ValueError, match=fragment):
        parse_source(spec)


def test_every_source_kind_serves_the_same_numbers(tmp_path_factory):
    from service.client import ScoringClient

    store = real_store(tmp_path_factory)
    srv = ServerThread(
        models=[
            "models:/hgvae@champion",
            f"pinned=models:/hgvae/{store.version}",
            f"fromrun=runs:/{store.run_id}/model",
            f"file={store.onnx_path}",
        ],
        tracking_uri=store.tracking_uri,
    )
    try:
        x = lattices(3, seed=31)
        ref = reference(store.onnx_path, x)["anomaly_score"]
        with ScoringClient(srv.address) as c:
            infos = {m["name"]: m for m in c.list_models()}
            assert set(infos) == {"hgvae", "pinned", "fromrun", "file"}
            assert infos["hgvae"]["alias"] == "champion" and infos["pinned"]["alias"] == ""
            assert infos["pinned"]["version"] == store.version
            for name in infos:
                r = c.score(x, model=name, outputs=["anomaly_score"])
                assert r.model == name
                assert abs(r["anomaly_score"] - ref).max() <= 1e-5
    finally:
        srv.stop()


def test_two_lattice_sizes_served_at_once(tmp_path_factory):
    """`--model` repeated with models of different L: each model takes its own size and refuses the other's."""
    import grpc

    from service.client import ScoringClient, ScoringError
    from tests.contract_model import contract_onnx

    store = real_store(tmp_path_factory)
    big_size = 2 * store.lattice_size
    big = contract_onnx(tmp_path_factory.mktemp("big") / "big.onnx", big_size)
    srv = ServerThread(models=[f"small={store.onnx_path}", f"big={big}"])
    try:
        with ScoringClient(srv.address) as c:
            sizes = {m["name"]: m["lattice_size"] for m in c.list_models()}
            assert sizes == {"small": store.lattice_size, "big": big_size}
            for name, size, path in (("small", store.lattice_size, store.onnx_path), ("big", big_size, big)):
                x = lattices(2, size, seed=size)
                r = c.score(x, model=name, outputs=["energy", "theta"])
                assert r["theta"].shape == (2, size, size)
                assert abs(r["energy"] - reference(path, x)["energy"]).max() <= 1e-5
            with pytest.raises(ScoringError) as err:
                c.score(lattices(1, big_size), model="small")
            assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and str(store.lattice_size) in str(err.value)
    finally:
        srv.stop()


def test_startup_fails_clearly_on_unknown_alias_and_duplicate_names(tmp_path_factory):
    from service.errors import ModelLoadError

    store = real_store(tmp_path_factory)
    with pytest.raises(ModelLoadError, match="challenger"):
        ServerThread(models=["models:/hgvae@challenger"], tracking_uri=store.tracking_uri)
    with pytest.raises(ValueError, match="explicit name"):
        ServerThread(models=[str(store.onnx_path), str(store.onnx_path)])


def test_provider_choice_without_a_gpu(tmp_path_factory, caplog):
    import onnxruntime as ort

    from service.errors import ModelLoadError
    from service.runtime import OnnxModel

    store = real_store(tmp_path_factory)
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime build has CUDA")
    with caplog.at_level("INFO", logger="hgvae"):
        auto = OnnxModel(store.onnx_path, "m", "1", device="auto")
        assert auto.load() and auto.provider == "CPUExecutionProvider"
    assert any("CPUExecutionProvider" in r.getMessage() for r in caplog.records)  # the choice is logged
    with pytest.raises(ModelLoadError, match="cuda"):
        OnnxModel(store.onnx_path, "m", "1", device="cuda").load()
