"""onnxruntime wrapper shaped like MLServer's MLModel: load (with warm-up), predict, unload, metadata.

No protobuf and no torch here: numpy arrays in, dicts of numpy arrays out. Metadata comes from the
ONNX graph itself (input/output specs and `metadata_props`), so a model file is self-describing.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import io
import json
import logging
import math
import os
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hgvae.contract import INPUT_NAME, TEMPERATURE_INPUT
from service.errors import InvalidInput, ModelLoadError

log = logging.getLogger("hgvae.service.runtime")

_ORT_TYPES = {"tensor(float)": "float32", "tensor(double)": "float64", "tensor(int64)": "int64"}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy name, e.g. "float32"
    shape: tuple[int, ...]  # -1 for a variable dimension


@dataclass(frozen=True)
class ModelMetadata:
    lattice_size: int
    model_kind: str
    latent_dim: int
    run_id: str
    calibration: str  # JSON text, "" when absent
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    props: dict[str, str] = field(default_factory=dict)

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(o.name for o in self.outputs)


def _dims(shape: Sequence[Any]) -> tuple[int, ...]:
    return tuple(d if isinstance(d, int) and d >= 0 else -1 for d in shape)


def cgroup_cpu_limit(root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """A container's CPU quota rounded up (cgroup v2 cpu.max or v1 cfs quota), None when unlimited."""
    try:
        v2 = root / "cpu.max"
        if v2.is_file():
            quota, period = v2.read_text().split()[:2]
            return None if quota == "max" else max(1, math.ceil(int(quota) / int(period)))
        v1 = root / "cpu" / "cpu.cfs_quota_us"
        if v1.is_file():
            quota_us = int(v1.read_text())
            period_us = int((root / "cpu" / "cpu.cfs_period_us").read_text())
            return None if quota_us <= 0 else max(1, math.ceil(quota_us / period_us))
    except (OSError, ValueError):
        pass
    return None


def usable_cores() -> int:
    """CPU cores this process may use: its CPU set, capped by a container CPU limit (a pod limited to
    2 CPUs on a 64-core node must not start 64 runners)."""
    try:
        cores = max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        cores = max(1, os.cpu_count() or 1)
    limit = cgroup_cpu_limit()
    return min(cores, limit) if limit else cores


def default_threads() -> int:
    """Intra-op threads for a model that runs one call at a time (batch scoring, notebooks): half the
    cores, the rest for reading and writing data."""
    return max(1, usable_cores() // 2)


def serving_threads(workers: int, intra_op_threads: int) -> int:
    """Intra-op threads per session in the server. Auto (0): 1 when the worker count is auto too (one
    single-threaded run per core: concurrent runs need no synchronisation inside an op and leave no pool
    threads to wake; the in-process limit on 2 cores is two such runs), else the cores split among workers."""
    if intra_op_threads:
        return intra_op_threads
    return max(1, usable_cores() // workers) if workers else 1


def serving_workers(workers: int, intra_op_threads: int, provider: str) -> int:
    """Concurrent onnxruntime runs per model in the server. Auto (0): one per core on the CPU (divided by
    the intra-op threads each run uses), 1 on CUDA (the GPU runs one batch at a time anyway)."""
    if workers:
        return workers
    if provider == "CUDAExecutionProvider":
        return 1
    return max(1, usable_cores() // serving_threads(0, intra_op_threads))


def _session_options(intra_op_threads: int, quiet: bool = False) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL  # nodes in order; parallelism inside ops and across runs
    so.intra_op_num_threads = intra_op_threads or default_threads()
    so.inter_op_num_threads = 1
    # Spinning workers burn the cores that the gRPC event loop needs between runs.
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    # Errors only: onnxruntime's C++ warnings are not structured log lines, and every hgvae graph since the
    # optional `temperature` input triggers one at load ("Initializer temperature appears in graph inputs").
    # Fatal only (quiet) for the CUDA attempt, whose failure is expected and logged by us as one line.
    so.log_severity_level = 4 if quiet else 3
    return so


def provider_library_error(capi: Path) -> str | None:
    """The dynamic loader's message when onnxruntime's CUDA provider library, or one it needs (CUDA,
    cuDNN, the driver's libcuda), cannot be loaded from the folder `capi`; None when it loads."""
    lib = capi / ("onnxruntime_providers_cuda.dll" if sys.platform == "win32" else "libonnxruntime_providers_cuda.so")
    if not lib.is_file():
        return f"{lib.name} is missing from this onnxruntime build"
    try:
        ctypes.CDLL(str(lib))
    except OSError as exc:
        return f"{lib.name} does not load: {exc}"
    return None


@functools.cache
def _preload_cuda_libraries(ort: Any) -> None:
    """Once per process (every model load and registry promotion asks): `pip install
    onnxruntime-gpu[cuda,cudnn]` brings CUDA and cuDNN as nvidia-* wheels, which must be loaded before the
    provider; preload_dlls prints (never raises) what it cannot find, and the provider probe says it."""
    if hasattr(ort, "preload_dlls"):
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings(), contextlib.suppress(Exception):
            warnings.simplefilter("ignore")
            ort.preload_dlls()


def cuda_unusable_reason(ort: Any) -> str | None:
    """Why the CUDA provider cannot run in this process, found without onnxruntime's own error lines (it
    logs a red multi-line ERROR for every failed provider load); None when it may run."""
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return "this onnxruntime build has no CUDA provider"
    _preload_cuda_libraries(ort)
    return provider_library_error(Path(ort.__file__).parent / "capi")


def create_session(path: str | Path, device: str = "auto", intra_op_threads: int = 0) -> Any:
    """An InferenceSession on CUDA when that provider actually runs, else on CPU; one log line says which
    and why, and onnxruntime's own error lines about the failed CUDA attempt stay out of the log."""
    import onnxruntime as ort

    ort.set_default_logger_severity(3)  # no warnings about node placement
    if device in ("auto", "cuda"):
        reason = cuda_unusable_reason(ort)
        if reason is None:  # the libraries load; a missing or busy GPU still fails inside the session
            ort.set_default_logger_severity(4)
            try:
                sess = ort.InferenceSession(
                    str(path),
                    _session_options(intra_op_threads, quiet=True),
                    providers=["CUDAExecutionProvider", "CPUExecutionProvider"],
                )
                if sess.get_providers()[0] == "CUDAExecutionProvider":
                    log.info("using CUDAExecutionProvider")
                    return sess
                reason = "the CUDA provider did not initialise (no usable GPU)"
            except Exception as exc:  # a broken CUDA install must not stop a CPU server
                reason = f"the CUDA provider failed: {exc}"
            finally:
                ort.set_default_logger_severity(3)
        if device == "cuda":
            raise ModelLoadError(f"--device cuda requested but {reason}")
        log.info("using CPUExecutionProvider", extra={"reason": reason})
    try:
        return ort.InferenceSession(str(path), _session_options(intra_op_threads), providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise ModelLoadError(f"onnxruntime cannot open {path}: {exc}") from exc


def read_metadata(sess: Any, path: str | Path) -> ModelMetadata:
    inputs = tuple(TensorSpec(i.name, _ORT_TYPES.get(i.type, i.type), _dims(i.shape)) for i in sess.get_inputs())
    outputs = tuple(TensorSpec(o.name, _ORT_TYPES.get(o.type, o.type), _dims(o.shape)) for o in sess.get_outputs())
    if len(inputs) != 1 or inputs[0].name != INPUT_NAME or len(inputs[0].shape) != 3 or inputs[0].dtype != "float32":
        raise ModelLoadError(f"{path}: expected one float32 input '{INPUT_NAME}' [batch, L, L], got {inputs}")
    props = dict(sess.get_modelmeta().custom_metadata_map)
    size = inputs[0].shape[1]
    try:
        size = int(props.get("hgvae.lattice_size", size))
        latent = int(props.get("hgvae.latent_dim", outputs[0].shape[-1] if outputs else -1))
    except ValueError as exc:
        raise ModelLoadError(f"{path}: bad hgvae metadata ({exc})") from exc
    if size <= 0:
        raise ModelLoadError(f"{path}: lattice size unknown (no hgvae.lattice_size and a dynamic input shape)")
    calibration = props.get("hgvae.calibration", "")
    if calibration:
        try:
            json.loads(calibration)
        except json.JSONDecodeError:
            log.warning("hgvae.calibration is not valid JSON", extra={"path": str(path)})
    # The input's spatial dims may be exported as dynamic; the metadata pins them.
    inputs = (TensorSpec(INPUT_NAME, "float32", (-1, size, size)),)
    return ModelMetadata(
        lattice_size=size,
        model_kind=props.get("hgvae.model_kind", ""),
        latent_dim=latent,
        run_id=props.get("hgvae.run_id", ""),
        calibration=calibration,
        inputs=inputs,
        outputs=outputs,
        props=props,
    )


class OnnxModel:
    """One loaded model version. `predict` is thread-safe: onnxruntime runs concurrent calls on one session
    (with 1 intra-op thread each call computes on its caller's thread, so N callers use N cores)."""

    def __init__(
        self,
        path: str | Path,
        name: str,
        version: str,
        source: str = "",
        device: str = "auto",
        intra_op_threads: int = 0,
        warmup_rows: int = 8,
    ) -> None:
        self.path = Path(path)
        self.name, self.version, self.source = name, version, source or str(path)
        self.device, self.intra_op_threads, self.warmup_rows = device, intra_op_threads, warmup_rows
        self.ready = False
        self.takes_temperature = False
        self._session: Any = None
        self.metadata: ModelMetadata | None = None
        self.provider = ""

    def load(self) -> bool:
        """Open the session, read metadata, run warm-up batches; True when ready to serve."""
        t0 = time.perf_counter()
        if not self.path.is_file():
            raise ModelLoadError(f"model file {self.path} does not exist")
        self._session = create_session(self.path, self.device, self.intra_op_threads)
        self.provider = self._session.get_providers()[0]
        self.metadata = read_metadata(self._session, self.path)
        # The optional nominal-temperature input is an overridable initializer (absent in older graphs).
        self.takes_temperature = TEMPERATURE_INPUT in {i.name for i in self._session.get_overridable_initializers()}
        names = self.metadata.output_names
        # Warm-up: first runs allocate arenas and pick kernels; do it before health says SERVING.
        L = self.metadata.lattice_size
        rng = np.random.default_rng(0)
        for rows in sorted({1, max(1, self.warmup_rows)}):
            out = self._session.run(
                list(names), {INPUT_NAME: rng.uniform(0, 2 * np.pi, (rows, L, L)).astype(np.float32)}
            )
            if any(o.shape[0] != rows for o in out):
                raise ModelLoadError(f"{self.path}: outputs do not keep the batch dimension during warm-up")
        self.ready = True
        log.info(
            "model loaded",
            extra={
                "model": self.name,
                "version": self.version,
                "provider": self.provider,
                "lattice_size": L,
                "seconds": round(time.perf_counter() - t0, 3),
            },
        )
        return True

    def check_outputs(self, outputs: Sequence[str] | None) -> tuple[str, ...]:
        assert self.metadata is not None
        if not outputs:
            return self.metadata.output_names
        unknown = [o for o in outputs if o not in self.metadata.output_names]
        if unknown:
            raise InvalidInput(f"unknown output(s) {unknown}; this model has {list(self.metadata.output_names)}")
        return tuple(dict.fromkeys(outputs))  # de-duplicated, order kept

    def predict(
        self, lattice: np.ndarray, outputs: Sequence[str] | None = None, temperature: np.ndarray | None = None
    ) -> dict[str, np.ndarray]:
        """Run the graph on float32 [n, L, L]; returns the requested outputs (all when None).

        `temperature` float32 [1] or [n] feeds the graph's optional input; a graph without it (older
        models) ignores it."""
        if self._session is None:
            raise ModelLoadError(f"model {self.name} version {self.version} is not loaded")
        names = self.check_outputs(outputs)
        feed = {INPUT_NAME: lattice}
        if temperature is not None and self.takes_temperature:
            feed[TEMPERATURE_INPUT] = np.ascontiguousarray(temperature, dtype=np.float32)
        result = self._session.run(list(names), feed)
        return dict(zip(names, result, strict=True))

    def unload(self) -> None:
        self.ready = False
        self._session = None
