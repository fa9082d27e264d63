"""Model sources, resolution from MLflow, and hot promotion (load, warm, swap, keep old on failure).

A source is `[name=]URI`:
- `models:/NAME@ALIAS`  followed: the watcher polls where the alias points and swaps when it moves;
- `models:/NAME/N`      a pinned registry version;
- `runs:/RUN_ID[/PATH]` the ONNX logged by a run (PATH defaults to `model`);
- `/path/model.onnx`    a local file (version "1").
The served name defaults to the registered model name (or the file stem, or `run-<id>`).
mlflow is imported only for registry/run sources, and it never pulls in torch.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from service.batching import BatchQueue
from service.errors import ModelLoadError, ModelNotFound, NotReady
from service.runtime import OnnxModel, serving_threads, serving_workers

log = logging.getLogger("hgvae.service.models")

_NAME_RE = re.compile(r"^[A-Za-z0-9_.\-]+$")


@dataclass(frozen=True)
class ModelSource:
    name: str  # served name
    uri: str
    kind: str  # "alias" | "version" | "run" | "file"
    registered_name: str = ""
    alias: str = ""
    version: str = ""
    run_id: str = ""
    artifact_path: str = "model"


def parse_source(spec: str) -> ModelSource:
    """Parse `[name=]URI`; raises ValueError with a message that says what is wrong."""
    spec = spec.strip()
    name = ""
    head, sep, rest = spec.partition("=")
    if sep and "/" not in head and ":" not in head:  # "name=uri"; a path or URI never has '=' before '/' or ':'
        name, spec = head, rest
    if not spec:
        raise ValueError("empty model source")
    if spec.startswith("models:/"):
        body = spec[len("models:/") :].strip("/")
        if "@" in body:
            reg, alias = body.split("@", 1)
            if not reg or not alias or "/" in alias:
                raise ValueError(f"bad model URI {spec!r}; expected models:/NAME@ALIAS")
            src = ModelSource(name or reg, spec, "alias", registered_name=reg, alias=alias)
        else:
            reg, _, ver = body.rpartition("/")
            if not reg or not ver.isdigit():
                raise ValueError(f"bad model URI {spec!r}; expected models:/NAME/VERSION or models:/NAME@ALIAS")
            src = ModelSource(name or reg, spec, "version", registered_name=reg, version=ver)
    elif spec.startswith("runs:/"):
        run_id, _, path = spec[len("runs:/") :].strip("/").partition("/")
        if not run_id:
            raise ValueError(f"bad run URI {spec!r}; expected runs:/RUN_ID[/PATH]")
        src = ModelSource(name or f"run-{run_id[:8]}", spec, "run", run_id=run_id, artifact_path=path or "model")
    else:
        path = Path(spec).expanduser()
        if path.suffix != ".onnx":
            raise ValueError(f"model source {spec!r} is not a models:/ or runs:/ URI nor a .onnx file")
        if not path.is_file():
            raise ValueError(f"model file {spec} does not exist")
        src = ModelSource(name or path.stem, str(path.resolve()), "file", version="1")
    if not _NAME_RE.match(src.name):
        raise ValueError(f"model name {src.name!r} may only use letters, digits, '_', '-', '.'")
    return src


def find_onnx(folder: Path, what: str) -> Path:
    files = sorted(folder.rglob("*.onnx"))
    if len(files) != 1:
        raise ModelLoadError(f"{what}: expected exactly one .onnx file, found {len(files)} in {folder}")
    return files[0]


class Resolver:
    """Turns sources into (version, local .onnx path); talks to MLflow for registry and run sources."""

    def __init__(self, tracking_uri: str | None = None) -> None:
        if tracking_uri is None:
            from hgvae.paths import tracking_uri as default_uri

            tracking_uri = default_uri()
        self.tracking_uri = tracking_uri
        self._client: Any = None
        self._tmp = Path(tempfile.mkdtemp(prefix="hgvae-models-"))

    @property
    def client(self) -> Any:
        if self._client is None:
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)
        return self._client

    def current_version(self, src: ModelSource) -> str:
        """Where the source points now (a registry call for aliases; constant otherwise)."""
        if src.kind != "alias":
            return src.version or src.run_id[:8]
        try:
            return str(self.client.get_model_version_by_alias(src.registered_name, src.alias).version)
        except Exception as exc:  # MlflowException: unknown model/alias; connection errors
            raise ModelLoadError(f"cannot resolve {src.uri} at {self.tracking_uri}: {_short(exc)}") from exc

    def fetch(self, src: ModelSource, version: str) -> Path:
        """Local .onnx for this source at this version (downloaded once into a private temp dir)."""
        if src.kind == "file":
            return Path(src.uri)
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # no tqdm bars in server logs
        import mlflow.artifacts

        if src.kind == "run":
            uri = f"runs:/{src.run_id}/{src.artifact_path}"
        else:
            # Ask this registry (not the process-global one) where the version's files live.
            try:
                uri = self.client.get_model_version_download_uri(src.registered_name, version)
            except Exception as exc:
                raise ModelLoadError(
                    f"cannot find models:/{src.registered_name}/{version} at {self.tracking_uri}: {_short(exc)}"
                ) from exc
        dst = self._tmp / re.sub(r"[^A-Za-z0-9_.-]", "_", f"{src.name}-{version}-{src.kind}")
        if dst.exists():
            shutil.rmtree(dst)
        dst.mkdir(parents=True)
        try:
            local = mlflow.artifacts.download_artifacts(
                artifact_uri=uri, dst_path=str(dst), tracking_uri=self.tracking_uri
            )
        except Exception as exc:
            raise ModelLoadError(f"cannot download {uri} from {self.tracking_uri}: {_short(exc)}") from exc
        local_path = Path(local)
        return local_path if local_path.suffix == ".onnx" else find_onnx(local_path, uri)

    def close(self) -> None:
        shutil.rmtree(self._tmp, ignore_errors=True)


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


@dataclass(eq=False)
class ServedModel:
    """One loaded version with its batching queue; requests hold on to it until they finish."""

    model: OnnxModel
    batcher: BatchQueue
    source: ModelSource

    @property
    def version(self) -> str:
        return self.model.version

    async def close(self, timeout: float | None = None) -> None:
        await self.batcher.close(timeout)
        self.model.unload()


CPU_BATCH, GPU_BATCH = 16, 256


@dataclass
class BatchConfig:
    max_batch_size: int | None = None  # None: by provider (CPU_BATCH / GPU_BATCH)
    max_delay_s: float = 0.001
    max_queue_rows: int = 16384
    device: str = "auto"
    intra_op_threads: int = 0  # 0: auto (runtime.serving_threads)
    workers: int = 0  # 0: auto (runtime.serving_workers)


class ModelManager:
    """All served models; `get` is synchronous so that pick-and-enqueue cannot interleave with a swap."""

    def __init__(
        self,
        sources: list[ModelSource],
        resolver: Resolver,
        config: BatchConfig,
        on_batch: Callable[[str, int], None] | None = None,
        on_change: Callable[[str, str | None, str | None, str], None] | None = None,
    ) -> None:
        names = [s.name for s in sources]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"two model sources serve the name(s) {dupes}; give one an explicit name (NAME=URI)")
        self.sources = {s.name: s for s in sources}
        self.resolver, self.config = resolver, config
        self.current: dict[str, ServedModel] = {}
        self._on_batch, self._on_change = on_batch, on_change
        self._watcher: asyncio.Task | None = None
        self._draining: set[asyncio.Task] = set()
        self._reload_lock = asyncio.Lock()

    # ---- loading -------------------------------------------------------------------------------
    def _load_sync(self, src: ModelSource, version: str | None) -> OnnxModel:
        version = version or self.resolver.current_version(src)
        path = self.resolver.fetch(src, version)
        threads = serving_threads(self.config.workers, self.config.intra_op_threads)
        model = OnnxModel(
            path,
            src.name,
            version,
            src.uri,
            device=self.config.device,
            intra_op_threads=threads,
            warmup_rows=min(self.config.max_batch_size or CPU_BATCH, 64),
        )
        model.load()
        return model

    async def _load(self, src: ModelSource, version: str | None = None) -> ServedModel:
        model = await asyncio.get_running_loop().run_in_executor(None, self._load_sync, src, version)
        on_batch = (lambda rows, n=src.name: self._on_batch(n, rows)) if self._on_batch else None
        rows = self.config.max_batch_size or (GPU_BATCH if model.provider == "CUDAExecutionProvider" else CPU_BATCH)
        batcher = BatchQueue(
            model.predict,
            min(rows, self.config.max_queue_rows),
            self.config.max_delay_s,
            self.config.max_queue_rows,
            on_batch=on_batch,
            name=src.name,
            workers=serving_workers(self.config.workers, self.config.intra_op_threads, model.provider),
        )
        log.info(
            "batching",
            extra={
                "model": src.name,
                "version": model.version,
                "max_batch": batcher.max_batch_size,
                "max_delay_ms": self.config.max_delay_s * 1000,
                "workers": batcher.workers,
                "intra_op_threads": model.intra_op_threads,
            },
        )
        return ServedModel(model, batcher, src)

    def _swap(self, name: str, new: ServedModel) -> None:
        old = self.current.get(name)
        self.current[name] = new  # atomic for every request picked after this line
        if self._on_change:
            self._on_change(name, old.version if old else None, new.version, new.model.provider)
        if old is not None:
            # In-flight requests hold `old` and finish on it; unload once its queue has drained.
            task = asyncio.get_running_loop().create_task(old.close())
            self._draining.add(task)
            task.add_done_callback(self._draining.discard)

    async def load_all(self) -> None:
        """Initial load of every source, concurrently; raises ModelLoadError naming the first failure."""
        served = await asyncio.gather(*(self._load(s) for s in self.sources.values()), return_exceptions=True)
        errors = [r for r in served if isinstance(r, BaseException)]
        for s in served:
            if isinstance(s, ServedModel):
                self._swap(s.source.name, s)
        if errors:
            raise errors[0]

    async def reload(self, name: str) -> bool:
        """Follow the alias once: True if a new version was loaded and swapped in. Keeps the old one on failure."""
        src = self.sources[name]
        if src.kind != "alias":
            return False
        async with self._reload_lock:
            loop = asyncio.get_running_loop()
            old = self.current.get(name)
            try:
                version = await loop.run_in_executor(None, self.resolver.current_version, src)
            except ModelLoadError as exc:
                log.warning(
                    "registry poll failed; keeping the served version", extra={"model": name, "error": str(exc)}
                )
                return False
            if old is not None and old.version == version:
                return False
            log.info(
                "alias moved; loading",
                extra={"model": name, "alias": src.alias, "version": version, "previous": old.version if old else None},
            )
            try:
                new = await self._load(src, version)
            except Exception as exc:  # Triton #2162: a bad new version never takes the old one down
                log.error(
                    "new version failed to load; keeping the served version",
                    extra={
                        "model": name,
                        "version": version,
                        "served": old.version if old else None,
                        "error": str(exc),
                    },
                )
                if self._on_change:
                    self._on_change(name, None, None, "failed")
                return False
            self._swap(name, new)
            log.info("model swapped", extra={"model": name, "version": version})
            return True

    async def _watch(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            for name, src in self.sources.items():
                if src.kind == "alias":
                    try:
                        await self.reload(name)
                    except Exception:  # the watcher must outlive any single failure
                        log.exception("watcher error", extra={"model": name})

    def start_watching(self, interval: float) -> None:
        if self._watcher is None and any(s.kind == "alias" for s in self.sources.values()):
            self._watcher = asyncio.get_running_loop().create_task(self._watch(interval), name="registry-watcher")

    async def stop_watching(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
            self._watcher = None

    async def close(self) -> None:
        await self.stop_watching()
        await asyncio.gather(
            *(m.close(timeout=10.0) for m in self.current.values()), *self._draining, return_exceptions=True
        )
        self.current.clear()
        self.resolver.close()

    # ---- lookup --------------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return bool(self.sources) and all(n in self.current for n in self.sources)

    def get(self, name: str = "", version: str = "", lattice_size: int | None = None) -> ServedModel:
        if not name:
            candidates = list(self.current.values())
            if not candidates:
                raise NotReady("no model is loaded yet")
            if lattice_size is not None and len(candidates) > 1:
                matching = [c for c in candidates if c.model.metadata and c.model.metadata.lattice_size == lattice_size]
                if len(matching) == 1:
                    candidates = matching
            served = candidates[0]
        else:
            if name not in self.sources:
                raise ModelNotFound(f"model {name!r} is not served; served models: {sorted(self.sources)}")
            served = self.current.get(name)
            if served is None:
                raise NotReady(f"model {name!r} is still loading")
        if version and version != served.version:
            raise ModelNotFound(
                f"model {served.source.name!r} version {version!r} is not served; serving version {served.version}"
            )
        return served
