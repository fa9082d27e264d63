"""A small typed client for the hgvae.v1 scoring API (sync `ScoringClient`, async `AsyncScoringClient`).

Modelled on tritonclient: inputs are checked (dtype, rank) before anything is sent, unknown output
names raise at once, `timeout` becomes the gRPC deadline, every grpc.RpcError becomes one
`ScoringError` carrying the status code and the server's message.

    with ScoringClient("127.0.0.1:50051") as c:
        r = c.score(angles[:8], outputs=["anomaly_score"])
        r["anomaly_score"]          # numpy float32 [8]
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from hgvae.contract import OUTPUT_NAMES
from service.gen.hgvae.v1 import scoring_pb2 as pb
from service.gen.hgvae.v1 import scoring_pb2_grpc as pb_grpc

__all__ = ["AsyncScoringClient", "ScoreResult", "ScoringClient", "ScoringError", "OUTPUT_NAMES"]


class ScoringError(Exception):
    """A failed call: `code` is the grpc.StatusCode, `details` the server's message."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code, self.details = code, details

    @classmethod
    def from_rpc(cls, exc: grpc.RpcError) -> ScoringError:
        return cls(exc.code(), exc.details() or "")  # type: ignore[attr-defined]


@dataclass
class ScoreResult:
    model: str
    version: str
    outputs: dict[str, np.ndarray] = field(default_factory=dict)
    request_id: str = ""
    error: ScoringError | None = None  # only for stream results when raise_errors=False

    def __getitem__(self, name: str) -> np.ndarray:
        try:
            return self.outputs[name]
        except KeyError:
            raise KeyError(f"output {name!r} was not returned; have {sorted(self.outputs)}") from None


def as_lattices(lattices: Any) -> np.ndarray:
    """[n, L, L] (or one [L, L]) real numbers -> contiguous little-endian float32 [n, L, L]."""
    x = np.asarray(lattices)
    if x.dtype.kind not in "fiu":
        raise TypeError(f"lattices must be real numbers (radians), got dtype {x.dtype}")
    if x.ndim == 2:
        x = x[None]
    if x.ndim != 3 or x.shape[1] != x.shape[2]:
        raise ValueError(f"lattices must have shape [n, L, L] or [L, L], got {list(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError("no lattices to score")
    return np.ascontiguousarray(x, dtype="<f4")


def _check_outputs(outputs: Sequence[str] | None) -> list[str]:
    if isinstance(outputs, str):
        outputs = [outputs]
    outputs = list(outputs or [])
    unknown = [o for o in outputs if o not in OUTPUT_NAMES]
    if unknown:
        raise ValueError(f"unknown output(s) {unknown}; known outputs: {list(OUTPUT_NAMES)}")
    return outputs


def build_request(
    lattices: Any,
    model: str = "",
    version: str | int = "",
    outputs: Sequence[str] | None = None,
    request_id: str = "",
    temperature: Any = None,
) -> pb.ScoreRequest:
    """`temperature`: None (unknown), one nominal temperature, or one per lattice."""
    x = as_lattices(lattices)
    temps = [] if temperature is None else np.asarray(temperature, dtype=np.float32).reshape(-1).tolist()
    return pb.ScoreRequest(
        model=model,
        version=str(version),
        request_id=request_id,
        outputs=_check_outputs(outputs),
        lattices=pb.Tensor(shape=x.shape, dtype="float32", data=x.tobytes()),
        temperature=temps,
    )


def decode_tensor(t: pb.Tensor) -> np.ndarray:
    dtype = np.dtype(t.dtype or "float32").newbyteorder("<")
    return np.frombuffer(t.data, dtype=dtype).reshape(tuple(t.shape))


def parse_response(resp: pb.ScoreResponse) -> ScoreResult:
    error = None
    if resp.HasField("error") and resp.error.code:
        code = next((c for c in grpc.StatusCode if c.value[0] == resp.error.code), grpc.StatusCode.UNKNOWN)
        error = ScoringError(code, resp.error.message)
    outputs = {k: decode_tensor(v) for k, v in resp.outputs.items()}
    return ScoreResult(resp.model, resp.version, outputs, resp.request_id, error)


def info_dict(info: pb.ModelInfo) -> dict[str, Any]:
    return {
        "name": info.name,
        "version": info.version,
        "source": info.source,
        "alias": info.alias,
        "lattice_size": info.lattice_size,
        "model_kind": info.model_kind,
        "latent_dim": info.latent_dim,
        "run_id": info.run_id,
        "calibration": info.calibration,
        "outputs": [o.name for o in info.outputs],
        "ready": info.ready,
        "max_batch_size": info.max_batch_size,
        "provider": info.provider,
        "metadata": dict(info.metadata),
    }


def _channel_args(
    target: str, token: str | None, root_certificates: bytes | str | Path | None, max_message_mb: float
) -> tuple[list[tuple[str, Any]], tuple[tuple[str, str], ...], Any]:
    options = [
        ("grpc.max_receive_message_length", int(max_message_mb * 1024 * 1024)),
        ("grpc.max_send_message_length", int(max_message_mb * 1024 * 1024)),
    ]
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    creds = None
    if root_certificates is not None:
        pem = root_certificates if isinstance(root_certificates, bytes) else Path(root_certificates).read_bytes()
        creds = grpc.ssl_channel_credentials(root_certificates=pem)
    return options, metadata, creds


@contextlib.contextmanager
def _rpc_errors() -> Iterator[None]:
    """grpc.RpcError -> ScoringError (works around a blocking call and around an `await` alike)."""
    try:
        yield
    except grpc.RpcError as exc:
        raise ScoringError.from_rpc(exc) from None


class _Converter:
    """Everything the two clients share: arguments -> request message and call options, answer ->
    Python values. A client only sends what this builds (blocking or awaited) and returns what it decodes."""

    def __init__(self, metadata: tuple[tuple[str, str], ...], timeout: float | None) -> None:
        self.metadata, self.timeout = metadata, timeout

    def call(self, timeout: float | None, default: bool = True) -> dict[str, Any]:
        """gRPC call options: the deadline (the client's default unless `default` is False) and the token."""
        return {"timeout": self.timeout if timeout is None and default else timeout, "metadata": self.metadata}

    def stream_request(
        self, i: int, lattices: Any, model: str, version: str | int, outputs: list[str], temperature: Any = None
    ) -> pb.ScoreRequest:
        return build_request(lattices, model, version, outputs, str(i), temperature)

    @staticmethod
    def stream_result(resp: pb.ScoreResponse, raise_errors: bool) -> ScoreResult:
        result = parse_response(resp)
        if result.error is not None and raise_errors:
            raise result.error
        return result

    @staticmethod
    def info_request(model: str, version: str | int) -> pb.ModelInfoRequest:
        return pb.ModelInfoRequest(model=model, version=str(version))

    @staticmethod
    def health_request(service: str) -> health_pb2.HealthCheckRequest:
        return health_pb2.HealthCheckRequest(service=service)

    @staticmethod
    def health_status(resp: health_pb2.HealthCheckResponse) -> str:
        return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)


class _ClientBase:
    """What the sync and async clients share besides the converter: the default deadline."""

    _c: _Converter

    @property
    def timeout(self) -> float | None:
        """Default deadline (seconds) of every call but streams; None: no deadline."""
        return self._c.timeout

    @timeout.setter
    def timeout(self, value: float | None) -> None:
        self._c.timeout = value


class ScoringClient(_ClientBase):
    """Blocking client. `timeout` (seconds) is the default deadline of every call."""

    def __init__(
        self,
        target: str = "127.0.0.1:50051",
        token: str | None = None,
        root_certificates: bytes | str | Path | None = None,
        timeout: float | None = 30.0,
        max_message_mb: float = 64.0,
    ) -> None:
        options, metadata, creds = _channel_args(target, token, root_certificates, max_message_mb)
        self._channel = grpc.secure_channel(target, creds, options) if creds else grpc.insecure_channel(target, options)
        self._stub = pb_grpc.ScoringServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self._c = _Converter(metadata, timeout)

    def __enter__(self) -> ScoringClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def score(
        self,
        lattices: Any,
        model: str = "",
        version: str | int = "",
        outputs: Sequence[str] | None = None,
        timeout: float | None = None,
        temperature: Any = None,
    ) -> ScoreResult:
        request = build_request(lattices, model, version, outputs, temperature=temperature)
        with _rpc_errors():
            return parse_response(self._stub.Score(request, **self._c.call(timeout)))

    def score_stream(
        self,
        batches: Iterable[Any],
        model: str = "",
        version: str | int = "",
        outputs: Sequence[str] | None = None,
        timeout: float | None = None,
        raise_errors: bool = True,
        temperature: Any = None,
    ) -> Iterator[ScoreResult]:
        """One ScoreStream: every item of `batches` is a [n, L, L] batch; results come back in order.

        With raise_errors=False a bad batch yields a result whose `.error` is set and the stream goes on.
        `timeout` bounds the whole stream (default: none).
        """
        wanted = _check_outputs(outputs)
        requests = (self._c.stream_request(i, b, model, version, wanted, temperature) for i, b in enumerate(batches))
        with _rpc_errors():
            for resp in self._stub.ScoreStream(requests, **self._c.call(timeout, default=False)):
                yield self._c.stream_result(resp, raise_errors)

    def model_info(self, model: str = "", version: str | int = "", timeout: float | None = None) -> dict[str, Any]:
        with _rpc_errors():
            return info_dict(self._stub.GetModelInfo(self._c.info_request(model, version), **self._c.call(timeout)))

    def list_models(self, timeout: float | None = None) -> list[dict[str, Any]]:
        with _rpc_errors():
            resp = self._stub.ListModels(pb.ListModelsRequest(), **self._c.call(timeout))
        return [info_dict(m) for m in resp.models]

    def health(self, service: str = "", timeout: float | None = None) -> str:
        """'SERVING', 'NOT_SERVING', ... for the server ('') or one service name."""
        with _rpc_errors():
            resp = self._health.Check(self._c.health_request(service), timeout=self._c.call(timeout)["timeout"])
        return self._c.health_status(resp)


class AsyncScoringClient(_ClientBase):
    """The same calls as coroutines (grpc.aio), for asyncio programs."""

    def __init__(
        self,
        target: str = "127.0.0.1:50051",
        token: str | None = None,
        root_certificates: bytes | str | Path | None = None,
        timeout: float | None = 30.0,
        max_message_mb: float = 64.0,
    ) -> None:
        options, metadata, creds = _channel_args(target, token, root_certificates, max_message_mb)
        self._channel = (
            grpc.aio.secure_channel(target, creds, options) if creds else grpc.aio.insecure_channel(target, options)
        )
        self._stub = pb_grpc.ScoringServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self._c = _Converter(metadata, timeout)

    async def __aenter__(self) -> AsyncScoringClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def score(
        self,
        lattices: Any,
        model: str = "",
        version: str | int = "",
        outputs: Sequence[str] | None = None,
        timeout: float | None = None,
        temperature: Any = None,
    ) -> ScoreResult:
        request = build_request(lattices, model, version, outputs, temperature=temperature)
        with _rpc_errors():
            return parse_response(await self._stub.Score(request, **self._c.call(timeout)))

    async def score_stream(
        self,
        batches: Iterable[Any] | AsyncIterable[Any],
        model: str = "",
        version: str | int = "",
        outputs: Sequence[str] | None = None,
        timeout: float | None = None,
        raise_errors: bool = True,
        temperature: Any = None,
    ) -> AsyncIterator[ScoreResult]:
        wanted = _check_outputs(outputs)

        async def requests() -> AsyncIterator[pb.ScoreRequest]:
            if isinstance(batches, AsyncIterable):
                i = 0
                async for b in batches:
                    yield self._c.stream_request(i, b, model, version, wanted, temperature)
                    i += 1
            else:
                for i, b in enumerate(batches):
                    yield self._c.stream_request(i, b, model, version, wanted, temperature)

        with _rpc_errors():
            async for resp in self._stub.ScoreStream(requests(), **self._c.call(timeout, default=False)):
                yield self._c.stream_result(resp, raise_errors)

    async def model_info(
        self, model: str = "", version: str | int = "", timeout: float | None = None
    ) -> dict[str, Any]:
        with _rpc_errors():
            info = await self._stub.GetModelInfo(self._c.info_request(model, version), **self._c.call(timeout))
        return info_dict(info)

    async def list_models(self, timeout: float | None = None) -> list[dict[str, Any]]:
        with _rpc_errors():
            resp = await self._stub.ListModels(pb.ListModelsRequest(), **self._c.call(timeout))
        return [info_dict(m) for m in resp.models]

    async def health(self, service: str = "", timeout: float | None = None) -> str:
        with _rpc_errors():
            resp = await self._health.Check(self._c.health_request(service), timeout=self._c.call(timeout)["timeout"])
        return self._c.health_status(resp)
