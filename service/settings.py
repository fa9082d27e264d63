"""Service settings: pydantic-settings, environment prefix `HGVAE_` (e.g. HGVAE_PORT=50052), `.env` read.

CLI flags of `hgvae serve` override the environment. Inconsistent values are rejected when the
settings are built, not discovered under load.
"""

from __future__ import annotations

import os

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class ServerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="HGVAE_", env_file=".env", extra="ignore")

    models: list[str] = Field(default_factory=lambda: ["models:/hgvae@champion"])
    """Model sources, each `[name=]URI`: models:/NAME@ALIAS (followed for promotion), models:/NAME/N,
    runs:/RUN_ID[/PATH], or a local .onnx file. Env: HGVAE_MODELS='["models:/hgvae@champion"]'."""

    host: str = "127.0.0.1"
    """Interface to bind. Loopback by default: exposing the service is an explicit decision."""

    port: int = Field(50051, ge=0, le=65535)
    """gRPC port; 0 picks a free port (tests)."""

    max_batch_size: int | None = Field(None, ge=1)
    """Most lattices (rows, not requests) concatenated into one onnxruntime call. None (default):
    16 on the CPU provider (measured: per-lattice throughput of the L=32 HG-VAE peaks at batch 4-16
    on CPU and drops ~30% at 64, out of cache), 256 on CUDA."""

    max_delay_ms: float = Field(0.0, ge=0.0)
    """Longest time the oldest waiting request is held back to fill a batch. 0 (default, as in Triton):
    never wait; batches still form from whatever queued while the previous batch ran. Raise it only
    after measuring, until the latency budget is used up."""

    max_queue_rows: int = Field(16384, ge=1)
    """Rows allowed to wait per model; beyond that requests get RESOURCE_EXHAUSTED instead of queueing."""

    max_request_rows: int = Field(4096, ge=1)
    """Most lattices in one request (RESOURCE_EXHAUSTED above)."""

    max_message_mb: float = Field(64.0, gt=0)
    """gRPC message size limit in MiB, both directions."""

    grace_s: float = Field(10.0, ge=0.0)
    """On SIGTERM: time in-flight requests get to finish before the server stops."""

    poll_interval_s: float = Field(10.0, gt=0.0)
    """How often the registry is asked where each followed alias points."""

    tracking_uri: str | None = None
    """MLflow tracking URI; default: MLFLOW_TRACKING_URI, else the embedded store under HGVAE_HOME."""

    device: str = Field("auto", pattern="^(auto|cpu|cuda)$")
    """auto: the CUDA provider when it can actually load, else CPU. cuda: fail if it cannot."""

    workers: int = Field(0, ge=0)
    """Concurrent onnxruntime runs per model (runner threads sharing one session, like Triton's instance
    count). 0 = auto: one per CPU core (divided by intra_op_threads) on the CPU provider, 1 on CUDA."""

    intra_op_threads: int = Field(0, ge=0)
    """onnxruntime intra-op threads per run. 0 = auto: 1 when workers is auto (one single-threaded run per
    core gives the most lattices/s), else the cores divided among the workers."""

    auth_token: str | None = None
    """If set, every RPC except health must carry `authorization: Bearer <token>` (UNAUTHENTICATED otherwise)."""

    tls_cert: str | None = None
    """PEM certificate chain file; with tls_key the port is TLS-only."""

    tls_key: str | None = None
    """PEM private key file."""

    metrics_port: int | None = Field(None, ge=0, le=65535)
    """Prometheus /metrics on this port (same host); None: no metrics endpoint."""

    log_format: str = Field("json", pattern="^(json|text)$")
    """Structured JSON log lines (default) or plain text."""

    @model_validator(mode="after")
    def _consistent(self) -> ServerSettings:
        if not self.models:
            raise ValueError("at least one model source is required")
        if self.max_batch_size is not None and self.max_batch_size > self.max_queue_rows:
            raise ValueError(f"max_batch_size ({self.max_batch_size}) exceeds max_queue_rows ({self.max_queue_rows})")
        if self.max_request_rows > self.max_queue_rows:
            raise ValueError(
                f"max_request_rows ({self.max_request_rows}) exceeds max_queue_rows ({self.max_queue_rows}):"
                " such a request could never be queued"
            )
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("tls_cert and tls_key must be given together")
        for f in (self.tls_cert, self.tls_key):
            if f and not os.path.isfile(f):
                raise ValueError(f"TLS file {f} does not exist")
        return self

    @property
    def max_message_bytes(self) -> int:
        return int(self.max_message_mb * 1024 * 1024)
