"""Experiment tracking behind a small logger interface; the MLflow sink imports mlflow lazily.

Everything goes through an explicit MlflowClient bound to one tracking URI (no global
`mlflow.set_tracking_uri`), so tests and services in one process can use different stores.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlparse

from hgvae import paths

EXPERIMENT_NAME = "hgvae-training"


class Logger(Protocol):
    def log_params(self, params: dict[str, Any]) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None: ...
    def log_artifact(self, local_path: str | os.PathLike, artifact_path: str | None = None) -> None: ...
    def set_tags(self, tags: dict[str, str]) -> None: ...
    def flush(self) -> None: ...


class NullLogger:
    """Keeps metrics in memory (for fit-only use and for tests that need no store)."""

    def __init__(self) -> None:
        self.params: dict[str, Any] = {}
        self.metrics: list[tuple[int | None, dict[str, float]]] = []
        self.tags: dict[str, str] = {}

    def log_params(self, params: dict[str, Any]) -> None:
        self.params.update(params)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.metrics.append((step, dict(metrics)))

    def log_artifact(self, local_path: str | os.PathLike, artifact_path: str | None = None) -> None:
        pass

    def set_tags(self, tags: dict[str, str]) -> None:
        self.tags.update(tags)

    def flush(self) -> None:
        pass


def artifact_location_for(uri: str) -> str | None:
    """Where a new experiment keeps artifacts: beside an embedded sqlite store, else the server's choice."""
    parsed = urlparse(uri)
    if parsed.scheme == "sqlite":
        db = Path(uri[len("sqlite:///") :]) if uri.startswith("sqlite:///") else None
        if db is None or str(db) in ("", ":memory:"):
            return paths.artifact_root()
        if uri == paths.tracking_uri():
            return paths.artifact_root()
        return (db.resolve().parent / "mlartifacts").as_uri()
    if parsed.scheme in ("", "file"):
        return None
    return None


def client_for(tracking_uri: str | None = None) -> Any:
    from mlflow.tracking import MlflowClient

    uri = paths.tracking_uri(tracking_uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def ensure_experiment(client: Any, name: str = EXPERIMENT_NAME) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    return client.create_experiment(name, artifact_location=artifact_location_for(client.tracking_uri))


class MlflowSink:
    """One MLflow run; created on construction, ended by `close(status)`."""

    def __init__(self, tracking_uri: str | None = None, experiment: str = EXPERIMENT_NAME, run_name: str | None = None):
        self.client = client_for(tracking_uri)
        self.tracking_uri = self.client.tracking_uri
        self.experiment_id = ensure_experiment(self.client, experiment)
        self.run = self.client.create_run(self.experiment_id, run_name=run_name)
        self.run_id: str = self.run.info.run_id

    @property
    def artifact_uri(self) -> str:
        return self.client.get_run(self.run_id).info.artifact_uri

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        import time

        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        items = [Metric(k, float(v), ts, step or 0) for k, v in metrics.items()]
        for i in range(0, len(items), 500):
            self.client.log_batch(self.run_id, metrics=items[i : i + 500])

    def log_artifact(self, local_path: str | os.PathLike, artifact_path: str | None = None) -> None:
        p = Path(local_path)
        if p.is_dir():
            self.client.log_artifacts(self.run_id, str(p), artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(p), artifact_path)

    def set_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def flush(self) -> None:
        pass

    def close(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)
