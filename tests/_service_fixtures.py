"""Shared helpers for the service tests: one real model in a real MLflow sqlite store per session,
and a real grpc.aio server running on its own event loop in a thread (so blocking clients, asyncio
clients and subprocess clients can all talk to it)."""

from __future__ import annotations

import asyncio
import functools
import os
import threading
from collections.abc import Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

NAME = "hgvae"
L = 8
_CACHE: dict[str, Any] = {}


@dataclass(frozen=True)
class Store:
    tracking_uri: str
    home: Path
    name: str
    version: str  # the version @champion points at
    onnx_path: Path  # local copy of that version's ONNX
    run_id: str
    lattice_size: int


def _train(home: Path, tracking_uri: str, seed: int) -> Any:
    import torch

    from training.montecarlo import simulate
    from training.train import train_model

    torch.set_num_threads(1)
    data = simulate(size=L, temperatures=[0.6, 1.0, 1.4], samples=12, seed=seed)
    return train_model(data, epochs=1, batch_size=12, seed=seed, tracking_uri=tracking_uri, registered_name=NAME)


def real_store(tmp_path_factory: Any) -> Store:
    """Train a tiny model with the real training code, register and promote it (once per session)."""
    if "store" in _CACHE:
        return _CACHE["store"]
    home = tmp_path_factory.mktemp("hgvae-home")
    tracking_uri = f"sqlite:///{home / 'mlflow.db'}"
    from training.registry import promote

    saved = os.environ.get("HGVAE_HOME")
    os.environ["HGVAE_HOME"] = str(home)  # the training code puts artifacts beside the store
    try:
        result = _train(home, tracking_uri, seed=0)
        promote(NAME, result.version, alias="champion", force=True, tracking_uri=tracking_uri)
    finally:  # do not leak into other tests of the session
        if saved is None:
            os.environ.pop("HGVAE_HOME", None)
        else:
            os.environ["HGVAE_HOME"] = saved
    store = Store(tracking_uri, home, NAME, str(result.version), Path(result.onnx_path), result.run_id, L)
    _CACHE["store"] = store
    return store


def second_version(store: Store) -> str:
    """Register a second version of the same model (same artifacts, new version number)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=store.tracking_uri, registry_uri=store.tracking_uri)
    mv = client.get_model_version(store.name, store.version)
    return str(client.create_model_version(store.name, mv.source, run_id=mv.run_id).version)


def broken_version(store: Store, tmp: Path) -> str:
    """Register a version whose artifact is a file onnxruntime cannot open."""
    import mlflow
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=store.tracking_uri, registry_uri=store.tracking_uri)
    bad = tmp / "broken" / "model.onnx"
    bad.parent.mkdir(parents=True, exist_ok=True)
    bad.write_bytes(b"this is not an onnx graph")
    exp = client.get_experiment_by_name("broken") or None
    exp_id = exp.experiment_id if exp else client.create_experiment("broken", artifact_location=(tmp / "art").as_uri())
    run = client.create_run(exp_id)
    client.log_artifact(run.info.run_id, str(bad), artifact_path="model")
    client.set_terminated(run.info.run_id)
    del mlflow
    return str(
        client.create_model_version(store.name, f"{run.info.artifact_uri}/model", run_id=run.info.run_id).version
    )


def set_alias(store: Store, version: str, alias: str = "champion") -> None:
    from mlflow.tracking import MlflowClient

    MlflowClient(tracking_uri=store.tracking_uri, registry_uri=store.tracking_uri).set_registered_model_alias(
        store.name, alias, version
    )


@functools.lru_cache(maxsize=4)
def _session(onnx_path: str) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    return ort.InferenceSession(onnx_path, so, providers=["CPUExecutionProvider"])


def reference(onnx_path: Path, x: np.ndarray) -> dict[str, np.ndarray]:
    """onnxruntime run directly on the same inputs: the numbers the service must reproduce."""
    sess = _session(str(onnx_path))
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, {"lattice": np.asarray(x, np.float32)}), strict=True))


def lattices(n: int, size: int = L, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 2 * np.pi, (n, size, size)).astype(np.float32)


class ServerThread:
    """A ScoringServer on a private event loop in a daemon thread."""

    def __init__(self, **settings: Any) -> None:
        from service.server import ScoringServer
        from service.settings import ServerSettings

        settings.setdefault("port", 0)
        settings.setdefault("intra_op_threads", 1)
        settings.setdefault("log_format", "text")
        self.settings = ServerSettings(**settings)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True, name="test-server")
        self._thread.start()
        self.server = ScoringServer(self.settings)
        try:
            self.port = self.call(self.server.start(), timeout=120)
        except BaseException:
            self.loop.call_soon_threadsafe(self.loop.stop)
            raise
        self.address = f"127.0.0.1:{self.port}"

    def call(self, coro: Coroutine, timeout: float = 60) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self, grace: float = 1.0) -> None:
        try:
            self.call(self.server.stop(grace), timeout=60)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
            self.loop.close()
