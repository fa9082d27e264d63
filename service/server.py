"""The gRPC server: hgvae.v1 + KServe V2 + health + reflection on one grpc.aio port.

Start order: bind (live, health NOT_SERVING) -> load and warm every model -> health SERVING ->
registry watcher. Stop order (SIGTERM): health frozen at NOT_SERVING -> watcher off -> server.stop(grace)
(new RPCs refused, in-flight ones finish) -> batch queues drained -> models unloaded.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from service.dataplane import DataPlane
from service.gen import grpc_predict_v2_pb2 as v2
from service.gen import grpc_predict_v2_pb2_grpc as v2_grpc
from service.gen.hgvae.v1 import scoring_pb2 as pb
from service.gen.hgvae.v1 import scoring_pb2_grpc as pb_grpc
from service.metrics import Metrics
from service.models import BatchConfig, ModelManager, Resolver, parse_source
from service.servicers import InferenceServicer, ScoringServicer
from service.settings import ServerSettings

log = logging.getLogger("hgvae.service.server")

SCORING_SERVICE = pb.DESCRIPTOR.services_by_name["ScoringService"].full_name
V2_SERVICE = v2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
HEALTH_PREFIX = "/grpc.health.v1.Health/"


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Every RPC except health checks needs `authorization: Bearer <token>`; others get UNAUTHENTICATED."""

    def __init__(self, token: str, metrics: Metrics | None = None) -> None:
        self._expected = f"Bearer {token}".encode()
        self._metrics = metrics

    async def intercept_service(self, continuation: Any, details: grpc.HandlerCallDetails) -> Any:
        if details.method.startswith(HEALTH_PREFIX):
            return await continuation(details)
        sent = ""
        for key, value in details.invocation_metadata or ():
            if key == "authorization":
                sent = value if isinstance(value, str) else value.decode(errors="replace")
        if hmac.compare_digest(sent.encode(), self._expected):
            return await continuation(details)
        handler = await continuation(details)
        if handler is None:
            return None
        if self._metrics is not None:
            self._metrics.observe(details.method.rsplit("/", 1)[-1], "UNAUTHENTICATED", 0.0)
        message = "missing or invalid bearer token" if sent else "this server requires 'authorization: Bearer <token>'"

        async def deny(request: Any, context: grpc.aio.ServicerContext) -> None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

        kind = {
            (False, False): grpc.unary_unary_rpc_method_handler,
            (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler,
            (True, True): grpc.stream_stream_rpc_method_handler,
        }
        make = kind[(bool(handler.request_streaming), bool(handler.response_streaming))]
        return make(
            deny, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer
        )


class ScoringServer:
    """One server instance; `await start()` returns once models are loaded (health SERVING)."""

    def __init__(self, settings: ServerSettings, metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics or Metrics()
        try:
            sources = [parse_source(s) for s in settings.models]
        except ValueError as exc:
            raise ValueError(f"model source: {exc}") from exc
        config = BatchConfig(
            settings.max_batch_size,
            settings.max_delay_ms / 1000.0,
            settings.max_queue_rows,
            settings.device,
            settings.intra_op_threads,
            settings.workers,
        )
        self.models = ModelManager(
            sources,
            Resolver(settings.tracking_uri),
            config,
            on_batch=self.metrics.on_batch,
            on_change=self.metrics.on_change,
        )
        self.dataplane = DataPlane(self.models, settings.max_request_rows)
        self.health = health.aio.HealthServicer()
        self.port: int | None = None
        self.metrics_port: int | None = None
        self._server: grpc.aio.Server | None = None
        self._stopped = asyncio.Event()

    def _build(self) -> grpc.aio.Server:
        s = self.settings
        interceptors = [BearerTokenInterceptor(s.auth_token, self.metrics)] if s.auth_token else []
        options = [
            ("grpc.max_receive_message_length", s.max_message_bytes),
            ("grpc.max_send_message_length", s.max_message_bytes),
            ("grpc.so_reuseport", 0),  # a second server on the same port must fail, not share it
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ]
        server = grpc.aio.server(interceptors=interceptors, options=options)
        pb_grpc.add_ScoringServiceServicer_to_server(ScoringServicer(self.dataplane, self.metrics), server)
        v2_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceServicer(self.dataplane, self.metrics), server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (SCORING_SERVICE, V2_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )
        address = f"{s.host}:{s.port}"
        if s.tls_cert and s.tls_key:
            creds = grpc.ssl_server_credentials([(Path(s.tls_key).read_bytes(), Path(s.tls_cert).read_bytes())])
            self.port = server.add_secure_port(address, creds)
        else:
            self.port = server.add_insecure_port(address)
        if not self.port:
            raise OSError(f"cannot bind {address}")
        return server

    async def _set_health(self, status: int) -> None:
        for name in ("", SCORING_SERVICE, V2_SERVICE):
            await self.health.set(name, status)

    async def start(self) -> int:
        """Bind, load and warm every model, then report SERVING. Returns the bound port."""
        t0 = time.perf_counter()
        self._server = self._build()
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        await self._server.start()
        if self.settings.metrics_port is not None:
            self.metrics_port = self.metrics.serve(self.settings.host, self.settings.metrics_port)
        log.info(
            "listening",
            extra={
                "address": f"{self.settings.host}:{self.port}",
                "tls": bool(self.settings.tls_cert),
                "auth": bool(self.settings.auth_token),
                "metrics_port": self.metrics_port,
            },
        )
        try:
            await self.models.load_all()
        except BaseException:
            await self.stop(grace=0)
            raise
        self.models.start_watching(self.settings.poll_interval_s)
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        log.info(
            "serving",
            extra={
                "models": {n: m.version for n, m in self.models.current.items()},
                "seconds": round(time.perf_counter() - t0, 3),
            },
        )
        return self.port  # type: ignore[return-value]

    async def stop(self, grace: float | None = None) -> None:
        """Graceful stop: NOT_SERVING, refuse new RPCs, let in-flight ones finish within `grace`."""
        if self._stopped.is_set():
            return
        grace = self.settings.grace_s if grace is None else grace
        log.info("shutting down", extra={"grace_s": grace})
        await self.health.enter_graceful_shutdown()
        await self.models.stop_watching()
        if self._server is not None:
            await self._server.stop(grace)
        await self.models.close()
        self.metrics.close()
        self._stopped.set()
        log.info("stopped")

    async def wait(self) -> None:
        await self._stopped.wait()


async def serve(settings: ServerSettings, on_ready: Callable[[ScoringServer], None] | None = None) -> int:
    """Run until SIGTERM/SIGINT; returns an exit code. `on_ready` runs once health is SERVING."""
    server = ScoringServer(settings)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    try:
        await server.start()
    except Exception as exc:
        log.error("startup failed", extra={"error": str(exc)})
        return 1
    if on_ready is not None:
        on_ready(server)
    await stop.wait()
    await server.stop()
    return 0
