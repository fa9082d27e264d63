"""Spark batch scoring in local mode: same numbers as onnxruntime in-process, retries without duplicates.

One Spark session (local[2,2]: two task slots, each task tried at most twice) serves the module; the
JVM start dominates (~5 s here). Inputs are a few hundred small lattices.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pyspark", reason="pyspark (spark extra) not installed")
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
ort = pytest.importorskip("onnxruntime")

if shutil.which("java") is None:
    pytest.skip("no Java runtime for Spark", allow_module_level=True)

from service.spark_scoring import (  # noqa: E402
    SparkScoringError,
    load_model_bytes,
    score_dataframe,
    score_parquet,
    spark_session,
    write_lattices_parquet,
)
from tests.contract_model import CONTRACT_OUTPUTS, contract_onnx  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:PySpark does not yet fully support pandas")

L = 8
N = 400
@pytest.fixture(scope="module")
def spark():
    session = spark_session("local[2,2]", conf={"spark.sql.shuffle.partitions": "2",
                                                "spark.sql.files.maxPartitionBytes": "64k"})
    yield session
    session.stop()


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("spark")
    rng = np.random.default_rng(1)
    # real-valued angles beyond [0, 2pi): the graph takes them mod 2pi
    angles = rng.uniform(-7, 7, size=(N, L, L)).astype(np.float32)
    temperature = rng.uniform(0.5, 1.5, size=N).astype(np.float32)
    ids = np.arange(1000, 1000 + N, dtype=np.int64)
    inp = tmp / "lattices"  # a directory of parquet files, as archives usually are
    inp.mkdir()
    for part, rows in enumerate(np.array_split(np.arange(N), 4)):
        write_lattices_parquet(inp / f"part-{part}.parquet", angles[rows], temperature[rows], ids[rows],
                               row_group_size=50)
    model = contract_onnx(tmp / "model.onnx", L)
    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    reference = dict(zip(CONTRACT_OUTPUTS, sess.run(CONTRACT_OUTPUTS, {"lattice": angles}), strict=True))
    return {"tmp": tmp, "input": inp, "model": model, "angles": angles, "temperature": temperature, "ids": ids,
            "reference": reference}


def read_sorted(path: Path) -> dict[str, np.ndarray]:
    table = pq.read_table(path)
    order = np.argsort(table.column("id").to_numpy())
    out = {}
    for name in table.column_names:
        col = table.column(name).combine_chunks()
        if pa.types.is_list(col.type):
            lengths = {len(v) for v in col.to_pylist()[:5]}
            assert len(lengths) == 1
            out[name] = col.flatten().to_numpy().reshape(len(col), -1)[order]
        else:
            out[name] = col.to_numpy()[order]
    return out


def assert_matches_reference(out: dict[str, np.ndarray], data: dict, outputs=CONTRACT_OUTPUTS) -> None:
    np.testing.assert_array_equal(out["id"], data["ids"])  # every row once, none twice
    np.testing.assert_array_equal(out["temperature"], data["temperature"])
    for name in outputs:
        ref = data["reference"][name].reshape(N, -1).squeeze(-1) if data["reference"][name].ndim == 1 else \
            data["reference"][name].reshape(N, -1)
        assert out[name].dtype == np.float32
        np.testing.assert_allclose(out[name], ref, rtol=0, atol=1e-6, err_msg=name)


def test_spark_output_equals_local_scoring_row_by_row(spark, data) -> None:
    out_path = data["tmp"] / "scores-all"
    loads = spark.sparkContext.accumulator(0)
    model_bytes, _ = load_model_bytes(str(data["model"]))
    scored = score_dataframe(spark.read.parquet(str(data["input"])), model_bytes, batch_size=64,
                             session_loads=loads)
    partitions = scored.rdd.getNumPartitions()
    scored.write.parquet(str(out_path))
    assert partitions >= 4  # several tasks, so the per-worker session cache is exercised
    # one onnxruntime session per Python worker (two task slots), not one per task or batch
    assert 1 <= loads.value <= 2, (loads.value, partitions)
    out = read_sorted(out_path)
    assert list(out) == ["id", "temperature", *CONTRACT_OUTPUTS]
    assert out["theta"].shape == (N, L * L) and out["latent_mean"].shape == (N, 4)
    assert_matches_reference(out, data)


def test_failed_task_is_retried_without_duplicates(spark, data) -> None:
    marker = data["tmp"] / "failed-once"
    out_path = data["tmp"] / "scores-retry"
    model_bytes, _ = load_model_bytes(str(data["model"]))
    # small emitted batches: the failing task has sent some rows of its partition, not all, when it dies
    scored = score_dataframe(spark.read.parquet(str(data["input"])), model_bytes, batch_size=8, emit_rows=16,
                             outputs=["energy", "anomaly_score", "anomaly_map"], _fail_once_marker=str(marker))
    scored.write.parquet(str(out_path))
    assert marker.exists()  # a task really failed after emitting rows, and was retried
    out = read_sorted(out_path)
    assert len(out["id"]) == N
    assert_matches_reference(out, data, outputs=["energy", "anomaly_score", "anomaly_map"])


def test_score_parquet_library_call_selects_outputs(spark, data) -> None:
    result = score_parquet(data["input"], data["tmp"] / "scores-lib", str(data["model"]), spark=spark,
                           outputs=["energy", "latent_mean"])
    assert result.rows == N and result.columns == ["id", "temperature", "energy", "latent_mean"]
    assert_matches_reference(read_sorted(Path(result.output)), data, outputs=["energy", "latent_mean"])
    with pytest.raises(SparkScoringError, match="exists"):
        score_parquet(data["input"], result.output, str(data["model"]), spark=spark)
    score_parquet(data["input"], result.output, str(data["model"]), spark=spark, outputs=["nll"], overwrite=True)
    assert pq.read_table(result.output).column_names == ["id", "temperature", "nll"]


def test_bad_input_gets_a_clear_error(spark, data) -> None:
    tmp = data["tmp"]
    short = tmp / "short.parquet"
    table = pa.table({"id": pa.array([7, 8], pa.int64()),
                      "angles": pa.array([[0.0] * (L * L), [0.0] * (L * L - 1)], pa.list_(pa.float32()))})
    pq.write_table(table, short)
    with pytest.raises(SparkScoringError, match=r"must hold L\*L = 64 values \(L = 8\); got 63 at id=8"):
        score_parquet(short, tmp / "o1", str(data["model"]), spark=spark)
    nan = tmp / "nan.parquet"
    pq.write_table(pa.table({"angles": pa.array([[float("nan")] * (L * L)], pa.list_(pa.float32()))}), nan)
    with pytest.raises(SparkScoringError, match="non-finite values at row 0"):
        score_parquet(nan, tmp / "o2", str(data["model"]), spark=spark)
    no_angles = tmp / "noangles.parquet"
    pq.write_table(pa.table({"id": pa.array([1])}), no_angles)
    with pytest.raises(SparkScoringError, match="no 'angles' column"):
        score_parquet(no_angles, tmp / "o3", str(data["model"]), spark=spark)
    with pytest.raises(SparkScoringError, match="unknown output"):
        score_parquet(data["input"], tmp / "o4", str(data["model"]), spark=spark, outputs=["energy", "nope"])
    npz = tmp / "lattices.npz"
    np.savez(npz, angles=data["angles"][:2])
    with pytest.raises(SparkScoringError, match="Spark reads Parquet"):
        score_parquet(npz, tmp / "o7", str(data["model"]), spark=spark)
    with pytest.raises(SparkScoringError, match="does not exist"):
        score_parquet(tmp / "missing.parquet", tmp / "o5", str(data["model"]), spark=spark)
    with pytest.raises(SparkScoringError, match="does not exist"):
        score_parquet(data["input"], tmp / "o6", str(tmp / "missing.onnx"), spark=spark)


def test_hgvae_score_engine_spark_cli(spark, data, capsys) -> None:
    from hgvae.cli import main

    out = data["tmp"] / "scores-cli"
    # in-process: the CLI picks up this module's active session instead of starting another JVM
    code = main(["score", "--engine", "spark", "--input", str(data["input"]), "--output", str(out),
                 "--model", str(data["model"]), "--outputs", "energy,anomaly_score"])
    assert code == 0, capsys.readouterr().err
    assert f"scored {N} configurations" in capsys.readouterr().out
    assert_matches_reference(read_sorted(out), data, outputs=["energy", "anomaly_score"])
    code = main(["score", "--engine", "spark", "--input", str(data["input"]), "--output", str(out),
                 "--model", str(data["model"])])
    err = capsys.readouterr().err
    assert code == 2 and "exists" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_executor_code_never_imports_torch() -> None:
    """What an executor imports to score: this module, onnxruntime, pyarrow, numpy; no torch."""
    import subprocess
    import sys

    code = ("import sys, numpy as np; import service.spark_scoring as s; import onnxruntime, pyarrow; "
            "s._list_column(np.zeros((2, 3), np.float32)); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.strip() == "False", out.stderr


def test_real_model_from_the_registry_equals_hgvae_score_local(spark, tmp_path_factory) -> None:
    """The trained, exported HG-VAE resolved from an MLflow registry (models:/NAME@champion): Spark's
    output equals the local engine of `hgvae score` row by row. The model is the service tests'
    session-wide tiny model (trained once per test session)."""
    from service.batch import local_scorer, score_file
    from service.runtime import OnnxModel
    from tests._service_fixtures import real_store

    store = real_store(tmp_path_factory)
    tmp = tmp_path_factory.mktemp("spark-real")
    rng = np.random.default_rng(3)
    n = 150
    angles = rng.uniform(0, 2 * np.pi, (n, store.lattice_size, store.lattice_size)).astype(np.float32)
    temperature = rng.uniform(0.5, 1.5, n).astype(np.float32)
    write_lattices_parquet(tmp / "in.parquet", angles, temperature, row_group_size=40)
    np.savez(tmp / "in.npz", angles=angles, temperature=temperature)

    result = score_parquet(tmp / "in.parquet", tmp / "spark-out", f"models:/{store.name}@champion", spark=spark,
                           tracking_uri=store.tracking_uri, partitions=3)
    assert f"version {store.version}" in result.model and result.rows == n

    local = OnnxModel(store.onnx_path, store.name, store.version, intra_op_threads=1, device="cpu")
    local.load()
    score_file(tmp / "in.npz", tmp / "local.npz", local_scorer(local, None), 64, False, {}, False)
    expected = np.load(tmp / "local.npz")
    out = read_sorted(tmp / "spark-out")
    np.testing.assert_array_equal(out["id"], np.arange(n))
    np.testing.assert_array_equal(out["temperature"], expected["temperature"])
    assert set(CONTRACT_OUTPUTS) <= set(out)
    for name in CONTRACT_OUTPUTS:
        np.testing.assert_allclose(out[name], expected[name].reshape(n, -1).squeeze(-1) if expected[name].ndim == 1
                                   else expected[name].reshape(n, -1), rtol=1e-5, atol=1e-5, err_msg=name)
