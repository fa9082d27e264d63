"""Thin gRPC transports over the DataPlane: hgvae.v1 ScoringService and KServe V2 GRPCInferenceService.

They only convert protobuf <-> numpy and map errors to status codes (one decorator), never hold logic.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import sys
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import numpy as np

from hgvae.contract import INPUT_NAME, TEMPERATURE_INPUT
from service.dataplane import DataPlane, decode_lattices
from service.errors import InvalidInput, ModelNotFound, ServiceError
from service.gen import grpc_predict_v2_pb2 as v2
from service.gen import grpc_predict_v2_pb2_grpc as v2_grpc
from service.gen.hgvae.v1 import scoring_pb2 as pb
from service.gen.hgvae.v1 import scoring_pb2_grpc as pb_grpc
from service.metrics import Metrics
from service.models import ServedModel

log = logging.getLogger("hgvae.service.rpc")

_V2_TYPES = {"float32": "FP32", "float64": "FP64", "int64": "INT64", "int32": "INT32"}
STREAM_WINDOW = 64  # stream requests in flight per stream before reading pauses (bounds memory per stream)


def _timeout(context: grpc.aio.ServicerContext) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else float(remaining)


def rpc(method: str) -> Callable:
    """Map ServiceError to its status (with its message), anything else to INTERNAL; record metrics."""

    def deco(fn: Callable) -> Callable:
        @functools.wraps(fn)
        async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
            t0 = time.perf_counter()
            code = "OK"
            try:
                return await fn(self, request, context)
            except ServiceError as exc:
                code = exc.code.name
                await context.abort(exc.code, exc.message)
            except asyncio.CancelledError:
                code = "CANCELLED"
                raise
            except Exception as exc:
                code = "INTERNAL"
                log.exception("unhandled error", extra={"method": method})
                await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}")
            finally:
                self.metrics.observe(method, code, time.perf_counter() - t0)

        return wrapper

    return deco


_LITTLE = sys.byteorder == "little"
_DTYPE_NAMES = {"f": "float32", "d": "float64", "l": "int64", "q": "int64", "i": "int32"}


def little_endian_bytes(arr: np.ndarray) -> bytes:
    if not (_LITTLE and arr.dtype.isnative):
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    return arr.tobytes()  # C order, copies only once


def fill_tensor(t: pb.Tensor, arr: np.ndarray) -> None:
    """Write an array into a Tensor field in place (building a Tensor and copying it into the map
    costs one more copy of the bytes and ~40% more time per response)."""
    t.shape.extend(arr.shape)
    t.dtype = _DTYPE_NAMES.get(arr.dtype.char) or arr.dtype.name
    t.data = little_endian_bytes(arr)


def model_info(served: ServedModel) -> pb.ModelInfo:
    m = served.model
    meta = m.metadata
    assert meta is not None
    return pb.ModelInfo(
        name=served.source.name,
        version=served.version,
        source=served.source.uri,
        alias=served.source.alias,
        lattice_size=meta.lattice_size,
        model_kind=meta.model_kind,
        latent_dim=meta.latent_dim,
        run_id=meta.run_id,
        calibration=meta.calibration,
        inputs=[pb.TensorInfo(name=t.name, dtype=t.dtype, shape=t.shape) for t in meta.inputs],
        outputs=[pb.TensorInfo(name=t.name, dtype=t.dtype, shape=t.shape) for t in meta.outputs],
        ready=m.ready,
        max_batch_size=served.batcher.max_batch_size,
        provider=m.provider,
        metadata=meta.props,
    )


class ScoringServicer(pb_grpc.ScoringServiceServicer):
    def __init__(self, dataplane: DataPlane, metrics: Metrics) -> None:
        self.dp, self.metrics = dataplane, metrics

    async def _score(self, request: pb.ScoreRequest, timeout: float | None) -> pb.ScoreResponse:
        # Request fields -> arguments of DataPlane.infer, all parsed here (a new optional input is one more line).
        t = request.lattices
        x = decode_lattices(t.shape, t.data, t.dtype, self.dp.max_request_rows)
        temps = np.asarray(request.temperature, dtype=np.float32) if len(request.temperature) else None
        res = await self.dp.infer(request.model, request.version, x, list(request.outputs), timeout, temps)
        response = pb.ScoreResponse(model=res.model, version=res.version, request_id=request.request_id)
        for name, arr in res.outputs.items():
            fill_tensor(response.outputs[name], arr)
        return response

    @rpc("Score")
    async def Score(self, request: pb.ScoreRequest, context: grpc.aio.ServicerContext) -> pb.ScoreResponse:
        return await self._score(request, _timeout(context))

    async def _score_message(self, request: pb.ScoreRequest, context: grpc.aio.ServicerContext) -> pb.ScoreResponse:
        t0 = time.perf_counter()
        code = "OK"
        try:
            return await self._score(request, _timeout(context))
        except ServiceError as exc:  # a bad message answers with an error; the stream carries on
            code = exc.code.name
            return pb.ScoreResponse(
                request_id=request.request_id, error=pb.Error(code=exc.code.value[0], message=exc.message)
            )
        except Exception as exc:
            code = "INTERNAL"
            log.exception("unhandled error", extra={"method": "ScoreStream"})
            return pb.ScoreResponse(
                request_id=request.request_id,
                error=pb.Error(
                    code=grpc.StatusCode.INTERNAL.value[0], message=f"internal error: {type(exc).__name__}: {exc}"
                ),
            )
        finally:
            self.metrics.observe("ScoreStream.message", code, time.perf_counter() - t0)

    async def ScoreStream(
        self, request_iterator: AsyncIterator[pb.ScoreRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ScoreResponse]:
        """Read ahead (so a stream's requests batch together), answer in request order."""
        t0 = time.perf_counter()
        window: asyncio.Queue = asyncio.Queue(maxsize=STREAM_WINDOW)
        code = "OK"

        async def reader() -> None:
            try:
                async for request in request_iterator:
                    await window.put(asyncio.ensure_future(self._score_message(request, context)))
            finally:
                await window.put(None)

        read_task = asyncio.ensure_future(reader())
        try:
            while True:
                task = await window.get()
                if task is None:
                    break
                yield await task
            await read_task  # surfaces a broken request stream
        except asyncio.CancelledError:
            code = "CANCELLED"
            raise
        finally:
            read_task.cancel()
            while not window.empty():
                task = window.get_nowait()
                if task is not None:
                    task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await read_task
            self.metrics.observe("ScoreStream", code, time.perf_counter() - t0)

    @rpc("GetModelInfo")
    async def GetModelInfo(self, request: pb.ModelInfoRequest, context: grpc.aio.ServicerContext) -> pb.ModelInfo:
        return model_info(self.dp.model(request.model, request.version))

    @rpc("ListModels")
    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(models=[model_info(s) for s in self.dp.models.current.values()])


# V2 inputs this service accepts, name -> datatype. An optional input is one more entry here plus
# its use in ModelInfer.
V2_INPUTS = {INPUT_NAME: "FP32", TEMPERATURE_INPUT: "FP32"}
_V2_TYPED_FIELDS = {"FP32": ("fp32_contents", "<f4")}


def v2_inputs(request: v2.ModelInferRequest, accepted: dict[str, str]) -> dict[str, tuple[list[int], bytes]]:
    """Every input of a ModelInfer request as name -> (shape, packed little-endian bytes), from
    raw_input_contents (one entry per input, in order) or else the typed contents; names and
    datatypes checked against `accepted`. Shapes and byte lengths are checked by the caller."""
    names = [i.name for i in request.inputs]
    unknown = [n for n in names if n not in accepted]
    if unknown or len(set(names)) != len(names) or not names:
        raise InvalidInput(f"expected inputs from {list(accepted)} (each once), got {names}")
    raw = request.raw_input_contents
    if raw and len(raw) != len(names):
        raise InvalidInput(f"{len(raw)} raw_input_contents entries for {len(names)} input(s)")
    out: dict[str, tuple[list[int], bytes]] = {}
    for i, inp in enumerate(request.inputs):
        if inp.datatype != accepted[inp.name]:
            raise InvalidInput(f"input {inp.name!r} must have datatype {accepted[inp.name]}, got {inp.datatype!r}")
        if raw:
            data = raw[i]
        else:
            field, dtype = _V2_TYPED_FIELDS[inp.datatype]
            others = [f.name for f, _ in inp.contents.ListFields() if f.name != field]
            if others:
                raise InvalidInput(
                    f"{inp.datatype} input {inp.name!r} carries {others}; use {field} or raw_input_contents"
                )
            data = np.asarray(getattr(inp.contents, field), dtype=dtype).tobytes()
        out[inp.name] = (list(inp.shape), data)
    return out


class InferenceServicer(v2_grpc.GRPCInferenceServiceServicer):
    """KServe V2 / Open Inference Protocol (what tritonclient.grpc speaks)."""

    def __init__(self, dataplane: DataPlane, metrics: Metrics) -> None:
        self.dp, self.metrics = dataplane, metrics

    @rpc("ServerLive")
    async def ServerLive(
        self, request: v2.ServerLiveRequest, context: grpc.aio.ServicerContext
    ) -> v2.ServerLiveResponse:
        return v2.ServerLiveResponse(live=self.dp.live())

    @rpc("ServerReady")
    async def ServerReady(
        self, request: v2.ServerReadyRequest, context: grpc.aio.ServicerContext
    ) -> v2.ServerReadyResponse:
        return v2.ServerReadyResponse(ready=self.dp.ready())

    @rpc("ModelReady")
    async def ModelReady(
        self, request: v2.ModelReadyRequest, context: grpc.aio.ServicerContext
    ) -> v2.ModelReadyResponse:
        return v2.ModelReadyResponse(ready=self.dp.model_ready(request.name, request.version))

    @rpc("ServerMetadata")
    async def ServerMetadata(
        self, request: v2.ServerMetadataRequest, context: grpc.aio.ServicerContext
    ) -> v2.ServerMetadataResponse:
        return v2.ServerMetadataResponse(**self.dp.server_metadata())

    @rpc("ModelMetadata")
    async def ModelMetadata(
        self, request: v2.ModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> v2.ModelMetadataResponse:
        if not request.name:
            raise InvalidInput("model name is required")
        served = self.dp.model(request.name, request.version)
        meta = served.model.metadata
        assert meta is not None

        def spec(t: Any) -> v2.ModelMetadataResponse.TensorMetadata:
            return v2.ModelMetadataResponse.TensorMetadata(
                name=t.name, datatype=_V2_TYPES.get(t.dtype, t.dtype), shape=t.shape
            )

        return v2.ModelMetadataResponse(
            name=served.source.name,
            versions=[served.version],
            platform="onnxruntime_onnx",
            inputs=[spec(t) for t in meta.inputs],
            outputs=[spec(t) for t in meta.outputs],
        )

    @rpc("ModelInfer")
    async def ModelInfer(
        self, request: v2.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> v2.ModelInferResponse:
        if not request.model_name:
            raise InvalidInput("model_name is required")
        if request.model_name not in self.dp.models.sources:
            raise ModelNotFound(
                f"model {request.model_name!r} is not served; served models: {sorted(self.dp.models.sources)}"
            )
        inputs = v2_inputs(request, V2_INPUTS)
        if INPUT_NAME not in inputs:
            raise InvalidInput(f"input {INPUT_NAME!r} is required, got {sorted(inputs)}")
        shape, data = inputs[INPUT_NAME]
        x = decode_lattices(shape, data, "float32", self.dp.max_request_rows)
        temps = None
        if TEMPERATURE_INPUT in inputs:  # the nominal temperature, FP32 [batch] or [1]
            t_shape, t_data = inputs[TEMPERATURE_INPUT]
            if len(t_data) % 4 or len(t_data) // 4 != int(np.prod(t_shape)):
                raise InvalidInput(f"input {TEMPERATURE_INPUT!r}: {len(t_data)} bytes do not hold FP32 shape {t_shape}")
            temps = np.frombuffer(t_data, dtype="<f4").astype(np.float32)
        outputs = [o.name for o in request.outputs]
        res = await self.dp.infer(request.model_name, request.model_version, x, outputs, _timeout(context), temps)
        response = v2.ModelInferResponse(model_name=res.model, model_version=res.version, id=request.id)
        for name, arr in res.outputs.items():
            dtype = _DTYPE_NAMES.get(arr.dtype.char) or arr.dtype.name
            response.outputs.add(name=name, datatype=_V2_TYPES.get(dtype, dtype), shape=arr.shape)
            response.raw_output_contents.append(little_endian_bytes(arr))
        return response
