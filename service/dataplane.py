"""Protocol-agnostic core (like MLServer's DataPlane): validation, model lookup, batched inference.

The transports (hgvae.v1 and KServe V2 servicers) only convert protobuf <-> numpy and delegate here.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from hgvae import __version__
from service.errors import DeadlineExceeded, InvalidInput, ResourceExhausted
from service.models import ModelManager, ServedModel

FLOAT32_NAMES = ("", "float32", "FP32", "<f4")


def decode_lattices(
    shape: Sequence[int], data: bytes, dtype: str = "float32", max_rows: int | None = None
) -> np.ndarray:
    """Packed little-endian float32 bytes + shape -> a read-only [n, L, L] view (no copy, no Python lists)."""
    if dtype not in FLOAT32_NAMES:
        raise InvalidInput(f"lattices must be float32 (little-endian), got dtype {dtype!r}")
    shape = [int(d) for d in shape]
    if len(shape) != 3:
        raise InvalidInput(f"lattices must have shape [batch, L, L] (rank 3), got rank {len(shape)} shape {shape}")
    if any(d < 0 for d in shape):
        raise InvalidInput(f"negative dimension in shape {shape}")
    if max_rows is not None and shape[0] > max_rows:
        raise ResourceExhausted(f"batch of {shape[0]} lattices exceeds the per-request limit of {max_rows}")
    expected = math.prod(shape) * 4
    if len(data) != expected:
        raise InvalidInput(f"shape {shape} needs {expected} bytes of float32, got {len(data)} bytes")
    return np.frombuffer(data, dtype="<f4").reshape(shape)


def check_lattices(x: np.ndarray, lattice_size: int, max_rows: int) -> None:
    if x.ndim != 3:
        raise InvalidInput(f"lattices must have shape [batch, L, L], got shape {list(x.shape)}")
    if x.shape[0] == 0:
        raise InvalidInput("empty batch: shape has 0 lattices")
    if x.shape[1:] != (lattice_size, lattice_size):
        raise InvalidInput(
            f"lattice size {list(x.shape[1:])} does not match the model's [{lattice_size}, {lattice_size}]"
        )
    if x.shape[0] > max_rows:
        raise ResourceExhausted(f"batch of {x.shape[0]} lattices exceeds the per-request limit of {max_rows}")
    finite = np.isfinite(x)
    if not finite.all():
        bad = np.flatnonzero(~finite.reshape(len(x), -1).all(axis=1))
        raise InvalidInput(
            f"{int((~finite).sum())} non-finite values (NaN/inf) in lattice(s) {bad[:10].tolist()}"
            + (" ..." if len(bad) > 10 else "")
        )


@dataclass
class InferResult:
    model: str
    version: str
    outputs: dict[str, np.ndarray]


class DataPlane:
    def __init__(self, models: ModelManager, max_request_rows: int = 4096) -> None:
        self.models = models
        self.max_request_rows = max_request_rows

    def live(self) -> bool:
        return True

    def ready(self) -> bool:
        return self.models.ready

    def model_ready(self, name: str, version: str = "") -> bool:
        try:
            served = self.models.get(name, version)
        except Exception:
            return False
        return served.model.ready

    def server_metadata(self) -> dict:
        return {"name": "hgvae", "version": __version__, "extensions": []}

    def model(self, name: str = "", version: str = "") -> ServedModel:
        return self.models.get(name, version)

    async def infer(
        self,
        name: str,
        version: str,
        lattices: np.ndarray,
        outputs: Sequence[str] | None = None,
        timeout: float | None = None,
        temperature: np.ndarray | None = None,
    ) -> InferResult:
        """Validate, enqueue into the model's micro-batch queue, await the slice of the batch result.

        `temperature`: None, or float32 [1] / [n] nominal temperatures (NaN or ≤ 0 = unknown)."""
        lattice_size = int(lattices.shape[-1]) if lattices.ndim == 3 else None
        served = self.models.get(name, version, lattice_size=lattice_size)
        meta = served.model.metadata
        assert meta is not None
        check_lattices(lattices, meta.lattice_size, self.max_request_rows)
        names = served.model.check_outputs(outputs)
        if timeout is not None and timeout <= 0:
            raise DeadlineExceeded("deadline expired before the request was queued")
        # No await between `get` and `submit`: a concurrent swap cannot strand this request.
        temperature = check_temperature(temperature, int(lattices.shape[0]))
        future = served.batcher.submit(lattices, names, temperature)
        try:
            result = await (asyncio.wait_for(future, timeout) if timeout is not None else future)
        except TimeoutError:
            raise DeadlineExceeded(f"deadline expired after {timeout:.3f} s while queued or running") from None
        return InferResult(served.source.name, served.version, result)


def check_temperature(temperature: Any, rows: int) -> np.ndarray | None:
    """None, or a float32 array of 1 or `rows` values (NaN / ≤ 0 mean unknown); InvalidInput otherwise."""
    if temperature is None:
        return None
    t = np.asarray(temperature, dtype=np.float32).reshape(-1)
    if t.size == 0:
        return None
    if t.size not in (1, rows):
        raise InvalidInput(f"temperature has {t.size} values for {rows} lattices (give 1 or {rows})")
    if np.any(np.isinf(t)):
        raise InvalidInput("temperature must be finite (NaN or <= 0 mean unknown)")
    return t

