"""Prometheus metrics, on their own registry (several servers can live in one test process)."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

_LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)
_ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "hgvae_requests", "RPCs by method and final status code", ["method", "code"], registry=r
        )
        self.errors = Counter(
            "hgvae_errors",
            "Failed RPCs (and failed stream messages) by method and code",
            ["method", "code"],
            registry=r,
        )
        self.latency = Histogram(
            "hgvae_request_latency_seconds", "RPC handling time", ["method"], buckets=_LATENCY_BUCKETS, registry=r
        )
        self.batch_rows = Histogram(
            "hgvae_batch_rows", "Lattices per onnxruntime call", ["model"], buckets=_ROW_BUCKETS, registry=r
        )
        self.loaded = Gauge(
            "hgvae_model_loaded", "1 for each model version being served", ["model", "version", "provider"], registry=r
        )
        self.reloads = Counter(
            "hgvae_model_reloads", "Alias-following reloads by outcome", ["model", "result"], registry=r
        )
        self._http: Any = None

    def observe(self, method: str, code: str, seconds: float) -> None:
        self.requests.labels(method, code).inc()
        if code != "OK":
            self.errors.labels(method, code).inc()
        self.latency.labels(method).observe(seconds)

    def on_batch(self, model: str, rows: int) -> None:
        self.batch_rows.labels(model).observe(rows)

    def on_change(self, model: str, old: str | None, new: str | None, provider: str) -> None:
        if new is None:
            self.reloads.labels(model, "failed").inc()
            return
        if old is not None:
            for labels in list(self.loaded._metrics):  # drop every series of the previous version
                if labels[0] == model and labels[1] == old:
                    self.loaded.remove(*labels)
            self.reloads.labels(model, "swapped").inc()
        self.loaded.labels(model, new, provider).set(1)

    def serve(self, host: str, port: int) -> int:
        """Start /metrics on host:port (0 = any free port); returns the bound port."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        self._http = server
        return int(server.server_address[1])

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
