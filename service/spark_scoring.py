"""Batch scoring on Apache Spark: the exported ONNX graph run by onnxruntime inside the executors.

    from service.spark_scoring import score_parquet
    score_parquet("lattices.parquet", "scores.parquet", "models:/hgvae@champion")

or `hgvae score --engine spark --input lattices.parquet --output scores.parquet`.

Input rows carry `angles`, a list<float32> of L*L angles in row-major order, plus optional `id` and
`temperature` columns that are copied beside the scores. The output has one column per ONNX output:
per-lattice scalars as float, vectors and maps as list<float> (maps flattened row-major like `angles`).

How it runs: the driver resolves the model (local .onnx, models:/ or runs:/ URI) and broadcasts its
bytes, so each executor fetches them once; each Python worker process builds one onnxruntime session
per model and keeps it for every task it runs (Spark reuses Python workers). Partitions stream through
`mapInArrow` as Arrow record batches: angles become a float32 array without per-row Python objects.
Executors need numpy, pyarrow and onnxruntime (the `spark` extra) and this module; never torch.
Output goes through Spark's file committer, so a retried task leaves no duplicate rows.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # driver-only types; executors import this module without needing pyspark objects
    import pyarrow as pa
    from pyspark.sql import DataFrame, SparkSession

ANGLES = "angles"
DEFAULT_PASSTHROUGH = ("id", "temperature")
# Cluster-wide retry budget in local mode: local[N] never retries a task, local[N,F] tries F times.
DEFAULT_MASTER = "local[*,2]"
# Lattices per onnxruntime call. Small on purpose: for the L = 32 HG-VAE on one CPU thread, 8-16
# lattices per call score ~870/s, 256 ~420/s, 1024 ~210/s (activations fall out of cache).
DEFAULT_BATCH = 16
# Rows per Arrow record batch sent back to the JVM.
EMIT_ROWS = 2048


class SparkScoringError(Exception):
    """Bad input, model or Spark setup, with a one-line message (the CLI prints it without a traceback)."""


class _InputError(ValueError):
    """Raised inside executors; the driver finds the `hgvae-input-error:` tag in Spark's failure text."""

    def __init__(self, message: str) -> None:
        super().__init__(f"hgvae-input-error: {message}")


@dataclass
class SparkScoreResult:
    output: str
    rows: int
    columns: list[str]
    seconds: float
    model: str
    model_info: dict[str, str] = field(default_factory=dict)

    @property
    def rows_per_second(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else float("nan")


# ----------------------------------------------------------------------------------------- driver side
def spark_session(master: str | None = None, conf: Mapping[str, str] | None = None,
                  app_name: str = "hgvae-score") -> SparkSession:
    """The active session if there is one (spark-submit, notebooks), else a new one on `master`.

    Local sessions bind to 127.0.0.1, run without the web UI, and use this interpreter for the Python
    workers (otherwise Spark starts whatever `python3` is on PATH, which may lack onnxruntime).
    """
    try:
        from pyspark.sql import SparkSession
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise SparkScoringError("pyspark is not installed: pip install 'hgvae[spark]' (needs Java 17+)") from exc
    active = SparkSession.getActiveSession()
    if active is not None and master is None and not conf:
        return active
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    builder = SparkSession.builder.appName(app_name)
    master = master or os.environ.get("HGVAE_SPARK_MASTER") or DEFAULT_MASTER
    builder = builder.master(master)
    if master.startswith("local"):
        builder = (builder.config("spark.driver.host", "127.0.0.1")
                   .config("spark.driver.bindAddress", "127.0.0.1")
                   .config("spark.ui.enabled", "false")
                   .config("spark.sql.shuffle.partitions", "4"))
    builder = builder.config("spark.python.worker.reuse", "true")
    for key, value in (conf or {}).items():
        builder = builder.config(key, value)
    try:
        return builder.getOrCreate()
    except Exception as exc:  # JVM missing or refusing to start
        raise SparkScoringError(f"could not start Spark on {master}: {_first_line(exc)}") from exc


def load_model_bytes(model: str, tracking_uri: str | None = None) -> tuple[bytes, str]:
    """ONNX bytes of a local .onnx file, a directory holding one, or an MLflow models:/ or runs:/ URI.

    Returns (bytes, what was resolved, e.g. "models:/hgvae@champion (version 3)"). Resolution uses the
    service's resolver and happens once, on the driver: executors never talk to the registry, so an
    alias that moves mid-job cannot mix two versions in one output.
    """
    path = Path(model)
    if not model.startswith(("models:/", "runs:/")):
        if not path.exists():
            raise SparkScoringError(f"model {model} does not exist")
        return _read_onnx(path), str(path.resolve())
    from service.errors import ModelLoadError
    from service.models import Resolver, parse_source

    try:
        src = parse_source(model)
    except ValueError as exc:
        raise SparkScoringError(str(exc)) from None
    resolver = Resolver(tracking_uri)
    try:
        version = resolver.current_version(src)
        data = _read_onnx(resolver.fetch(src, version))
    except ModelLoadError as exc:
        raise SparkScoringError(str(exc)) from None
    finally:
        resolver.close()
    return data, f"{model} (version {version})" if src.kind in ("alias", "version") else model


def _read_onnx(path: Path) -> bytes:
    if path.is_dir():
        found = sorted(path.rglob("*.onnx"))
        if len(found) != 1:
            raise SparkScoringError(f"{path} holds {len(found)} .onnx files, expected exactly one")
        path = found[0]
    data = path.read_bytes()
    try:
        _session(data, threads=1)
    except Exception as exc:
        raise SparkScoringError(f"{path} is not a loadable ONNX model: {_first_line(exc)}") from exc
    return data


@dataclass(frozen=True)
class _ModelSpec:
    lattice_size: int | None
    outputs: tuple[tuple[str, int], ...]  # (name, rank)
    metadata: dict[str, str]


def _model_spec(model_bytes: bytes) -> _ModelSpec:
    sess = _session(model_bytes, threads=1)
    (inp,) = [i for i in sess.get_inputs() if i.name == "lattice"] or [None]
    if inp is None:
        raise SparkScoringError("model has no input named 'lattice'")
    meta = dict(sess.get_modelmeta().custom_metadata_map)
    dims = [d for d in inp.shape[1:] if isinstance(d, int)]
    size = int(meta["hgvae.lattice_size"]) if "hgvae.lattice_size" in meta else (dims[0] if dims else None)
    outputs = tuple((o.name, len(o.shape)) for o in sess.get_outputs())
    return _ModelSpec(size, outputs, meta)


def score_dataframe(df: DataFrame, model_bytes: bytes, *, outputs: Sequence[str] | None = None,
                    passthrough: Sequence[str] = DEFAULT_PASSTHROUGH, batch_size: int = DEFAULT_BATCH,
                    threads: int | None = None, session_loads: Any = None, emit_rows: int = EMIT_ROWS,
                    _fail_once_marker: str | None = None) -> DataFrame:
    """Lazily scored DataFrame: `passthrough` columns present in `df`, then one column per output.

    `outputs` selects ONNX outputs (default all, in graph order). `batch_size` lattices go into each
    onnxruntime call, `emit_rows` rows into each Arrow batch handed back to Spark. `threads` is onnxruntime's intra-op
    thread count per task (default spark.task.cpus, so concurrent tasks don't oversubscribe a core).
    `session_loads` is an optional Spark accumulator counting onnxruntime sessions built on executors.
    `_fail_once_marker` (fault-injection for tests) makes the first task to create that file fail
    after it has emitted output, to show that the retry leaves no duplicates.
    """
    from pyspark.sql.types import ArrayType, DoubleType, FloatType, StructField, StructType

    if ANGLES not in df.columns:
        raise SparkScoringError(f"input has no '{ANGLES}' column (columns: {', '.join(df.columns) or 'none'})")
    angles_type = df.schema[ANGLES].dataType
    if not (isinstance(angles_type, ArrayType) and isinstance(angles_type.elementType, FloatType | DoubleType)):
        raise SparkScoringError(f"'{ANGLES}' must be list<float32>, got {angles_type.simpleString()}")
    if batch_size < 1 or emit_rows < 1:
        raise SparkScoringError("batch size and emitted rows must be at least 1")
    spec = _model_spec(model_bytes)
    available = dict(spec.outputs)
    selected = list(outputs) if outputs else list(available)
    unknown = [o for o in selected if o not in available]
    if unknown:
        raise SparkScoringError(f"unknown output(s) {', '.join(unknown)}; the model has {', '.join(available)}")
    keep = [c for c in passthrough if c in df.columns]
    clash = [c for c in keep if c in selected]
    if clash:
        raise SparkScoringError(f"pass-through column(s) {', '.join(clash)} clash with output names")
    fields = [df.schema[c] for c in keep]
    for name in selected:  # rank 1: one number per lattice; higher ranks flatten row-major into a list
        fields.append(StructField(name, FloatType() if available[name] <= 1 else ArrayType(FloatType()), True))
    spark = df.sparkSession
    if threads is None:
        threads = int(spark.conf.get("spark.task.cpus", "1") or 1)
    ctx = _ExecutorContext(
        model=spark.sparkContext.broadcast(model_bytes), model_key=hashlib.sha256(model_bytes).hexdigest(),
        outputs=tuple(selected),
        ranks=tuple(available[o] for o in selected), passthrough=tuple(keep), lattice_size=spec.lattice_size,
        batch_size=batch_size, emit_rows=emit_rows, threads=threads, session_loads=session_loads,
        fail_once_marker=_fail_once_marker)
    import warnings
    from functools import partial

    with warnings.catch_warnings():  # pyspark 4 warns about pandas 3 even for mapInArrow, which skips pandas
        warnings.filterwarnings("ignore", message=".*pandas >= 3", category=FutureWarning)
        return df.select(*keep, ANGLES).mapInArrow(partial(_score_batches, ctx=ctx), StructType(fields))


def score_parquet(input_path: str | Path, output_path: str | Path, model: str, *, spark: SparkSession | None = None,
                  master: str | None = None, conf: Mapping[str, str] | None = None,
                  outputs: Sequence[str] | None = None, passthrough: Sequence[str] = DEFAULT_PASSTHROUGH,
                  batch_size: int = DEFAULT_BATCH, overwrite: bool = False, tracking_uri: str | None = None,
                  partitions: int | None = None) -> SparkScoreResult:
    """Score a Parquet file or directory of lattices into a Parquet directory (see module doc)."""
    started = time.perf_counter()
    model_bytes, source = load_model_bytes(model, tracking_uri)
    spark = spark or spark_session(master, conf)
    input_path, output_path = str(input_path), str(output_path)
    if "://" not in output_path and Path(output_path).exists() and not overwrite:
        raise SparkScoringError(f"{output_path} exists (pass overwrite=True / --overwrite to replace it)")
    if "://" not in input_path and not Path(input_path).exists():
        raise SparkScoringError(f"input {input_path} does not exist")
    if input_path.endswith(".npz"):
        raise SparkScoringError(f"{input_path}: Spark reads Parquet; score .npz files with the local engine or "
                                "convert them with service.spark_scoring.write_lattices_parquet")
    try:
        df = spark.read.parquet(input_path)
    except Exception as exc:
        raise SparkScoringError(f"cannot read {input_path} as Parquet: {_first_line(exc)}") from exc
    if partitions:
        df = df.repartition(partitions)
    scored = score_dataframe(df, model_bytes, outputs=outputs, passthrough=passthrough, batch_size=batch_size)
    try:
        scored.write.mode("overwrite" if overwrite else "errorifexists").parquet(output_path)
    except Exception as exc:
        raise _driver_error(exc) from exc
    rows = spark.read.parquet(output_path).count()  # from the parquet footers: cheap
    return SparkScoreResult(output=output_path, rows=rows, columns=scored.columns,
                            seconds=time.perf_counter() - started, model=source,
                            model_info=_model_spec(model_bytes).metadata)


def _driver_error(exc: Exception) -> SparkScoringError:
    match = re.search(r"hgvae-input-error: ([^\n]*)", str(exc))
    if match:
        return SparkScoringError(match.group(1))
    return SparkScoringError(f"Spark job failed: {_first_line(exc)}")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def write_lattices_parquet(path: str | Path, angles: np.ndarray, temperature: np.ndarray | None = None,
                           ids: np.ndarray | None = None, row_group_size: int = 8192) -> None:
    """Write [N, L, L] angles (and optional per-lattice temperature, ids) in the Spark input layout."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    angles = np.ascontiguousarray(angles, dtype=np.float32)
    if angles.ndim != 3 or angles.shape[1] != angles.shape[2]:
        raise ValueError(f"angles must be [N, L, L], got shape {angles.shape}")
    n, size, _ = angles.shape
    k = size * size
    columns = {"id": pa.array(np.arange(n, dtype=np.int64) if ids is None else ids)}
    if temperature is not None:
        columns["temperature"] = pa.array(np.asarray(temperature, dtype=np.float32))
    columns[ANGLES] = _list_column(angles.reshape(n, k))
    tmp = Path(f"{path}.tmp-{os.getpid()}")
    pq.write_table(pa.table(columns), tmp, row_group_size=row_group_size)
    os.replace(tmp, path)  # atomic: a reader never sees half a file


# --------------------------------------------------------------------------------------- executor side
@dataclass(frozen=True)
class _ExecutorContext:
    model: Any  # pyspark Broadcast[bytes]
    model_key: str  # sha256 of the bytes: the executor-side cache key
    outputs: tuple[str, ...]
    ranks: tuple[int, ...]
    passthrough: tuple[str, ...]
    lattice_size: int | None
    batch_size: int
    emit_rows: int
    threads: int
    session_loads: Any = None
    fail_once_marker: str | None = None


# One onnxruntime session per model per Python worker process, reused across the tasks it runs.
_SESSIONS: dict[tuple[Any, int], Any] = {}


def _session(model_bytes: bytes, threads: int) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    return ort.InferenceSession(model_bytes, sess_options=opts, providers=["CPUExecutionProvider"])


def _executor_session(ctx: _ExecutorContext) -> Any:
    key = (ctx.model_key, ctx.threads)
    sess = _SESSIONS.get(key)
    if sess is None:
        sess = _SESSIONS[key] = _session(ctx.model.value, ctx.threads)
        if ctx.session_loads is not None:
            ctx.session_loads.add(1)
    return sess


def _list_column(flat: np.ndarray) -> pa.Array:
    """[n, k] float32 -> Arrow list<float> sharing the numpy buffer (no per-row objects)."""
    import pyarrow as pa

    n, k = flat.shape
    offsets = pa.array(np.arange(0, (n + 1) * k, k, dtype=np.int32) if k else np.zeros(n + 1, np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(np.ascontiguousarray(flat, np.float32).ravel()))


def _angles(batch: pa.RecordBatch, ctx: _ExecutorContext) -> np.ndarray:
    import pyarrow.compute as pc

    column = batch.column(ANGLES)
    n = batch.num_rows
    ids = batch.column("id") if "id" in batch.schema.names else None

    def where(mask: np.ndarray) -> str:
        rows = np.flatnonzero(mask)[:3]
        return ", ".join(f"id={ids[int(i)].as_py()}" if ids is not None else f"row {int(i)}" for i in rows)

    if column.null_count:
        raise _InputError(f"'{ANGLES}' is null at {where(column.is_null().to_numpy(zero_copy_only=False))}")
    lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False)
    size = ctx.lattice_size
    if size is None:  # a model with a free lattice size: take it from the data, which must be square
        size = int(round(float(np.sqrt(lengths[0])))) if n else 0
    bad = lengths != size * size
    if bad.any():
        raise _InputError(f"'{ANGLES}' must hold L*L = {size * size} values (L = {size}); "
                          f"got {int(lengths[bad][0])} at {where(bad)}")
    values = column.flatten()
    if values.null_count:
        raise _InputError(f"'{ANGLES}' contains null values")
    arr = values.to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(n, size, size)
    finite = np.isfinite(arr).reshape(n, -1).all(axis=1)
    if not finite.all():
        raise _InputError(f"'{ANGLES}' has non-finite values at {where(~finite)}")
    return arr


def _score_batches(batches: Iterator[pa.RecordBatch], ctx: _ExecutorContext) -> Iterator[pa.RecordBatch]:
    import pyarrow as pa

    sess = _executor_session(ctx)
    for batch in batches:
        angles = _angles(batch, ctx)
        # onnxruntime runs small batches (fast: the activations stay in cache); the rows are emitted in
        # larger record batches (each one a JVM round trip)
        for lo in range(0, batch.num_rows, ctx.emit_rows):
            hi = min(lo + ctx.emit_rows, batch.num_rows)
            parts = [sess.run(list(ctx.outputs), {"lattice": angles[i : min(i + ctx.batch_size, hi)]})
                     for i in range(lo, hi, ctx.batch_size)]
            columns = [batch.column(c).slice(lo, hi - lo) for c in ctx.passthrough]
            for k, (name, rank) in enumerate(zip(ctx.outputs, ctx.ranks, strict=True)):
                value = np.concatenate([p[k] for p in parts]) if len(parts) > 1 else parts[0][k]
                if value.shape[0] != hi - lo:
                    raise RuntimeError(f"output {name} has {value.shape[0]} rows for {hi - lo} lattices")
                if rank <= 1:
                    columns.append(pa.array(value.astype(np.float32, copy=False).reshape(-1)))
                else:
                    columns.append(_list_column(value.reshape(value.shape[0], -1)))
            yield pa.RecordBatch.from_arrays(columns, names=[*ctx.passthrough, *ctx.outputs])
            if ctx.fail_once_marker and _claim(ctx.fail_once_marker):  # after output went out: test hook
                raise RuntimeError("injected one-time task failure (test)")


def _claim(marker: str) -> bool:
    """True for exactly one caller across processes: whoever creates the marker file."""
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


# ------------------------------------------------------------------------------------------------- CLI
def run_cli(args: Any) -> int:
    """`hgvae score --engine spark`: the argparse namespace of hgvae/commands/score.py."""
    from hgvae.cli import UsageError

    if args.server:
        raise UsageError("--server scores through a running service; --engine spark runs the model itself")
    conf: dict[str, str] = {}
    for item in args.spark_conf or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--spark-conf expects KEY=VALUE, got {item!r}")
        conf[key.strip()] = value.strip()
    if args.no_progress:
        conf.setdefault("spark.ui.showConsoleProgress", "false")
    outputs = [o.strip() for o in args.outputs.split(",") if o.strip()] if args.outputs else None
    try:
        spark = spark_session(args.spark_master, conf) if (args.spark_master or conf) else spark_session()
        result = score_parquet(args.input, args.output, args.model or "models:/hgvae@champion", spark=spark,
                               outputs=outputs, batch_size=args.batch_size, overwrite=args.force,
                               tracking_uri=args.tracking_uri)
    except SparkScoringError as exc:
        raise UsageError(str(exc)) from None
    print(f"scored {result.rows} configurations with {result.model} on Spark {spark.sparkContext.master} "
          f"in {result.seconds:.1f} s ({result.rows_per_second:.0f}/s) -> {result.output}")
    return 0
