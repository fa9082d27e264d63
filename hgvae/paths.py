"""Where hgvae keeps its local state: the embedded MLflow store and default data sets.

`HGVAE_HOME` (default `./hgvae-data`) holds `mlflow.db` (sqlite tracking + registry store) and
`mlartifacts/`. `MLFLOW_TRACKING_URI` switches to a tracking server instead.
"""

from __future__ import annotations

import os
from pathlib import Path

REGISTERED_MODEL_NAME = "hgvae"


def data_dir() -> Path:
    path = Path(os.environ.get("HGVAE_HOME", "hgvae-data")).resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path


def tracking_uri(explicit: str | None = None) -> str:
    """--tracking-uri, else MLFLOW_TRACKING_URI, else the embedded sqlite store under data_dir()."""
    if explicit:
        return explicit
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{data_dir() / 'mlflow.db'}"


def artifact_root() -> str:
    """Artifact location for experiments created in the embedded store."""
    return (data_dir() / "mlartifacts").as_uri()
