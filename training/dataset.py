"""The `.npz` data set contract shared by `hgvae simulate`, `train`, `score` and `analyze`.

Layout: `angles` float32 [N, L, L] in [0, 2π); `temperature` float32 [N]; `metadata` a 0-d unicode
array holding a JSON object (algorithm, sweeps, τ per temperature, seed, package version, ...).
Writes are atomic (temporary file in the same directory, then rename).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


class DatasetError(ValueError):
    """A data set that cannot be used; the message says why."""


@dataclass(frozen=True)
class LatticeDataset:
    angles: np.ndarray  # float32 [N, L, L], radians in [0, 2π)
    temperature: np.ndarray | None  # float32 [N], or None when unknown (e.g. sensor data)
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return int(self.angles.shape[-1])

    def __len__(self) -> int:
        return int(self.angles.shape[0])

    def digest(self) -> str:
        """sha256 of the arrays, identifying the data a model was trained on."""
        h = hashlib.sha256()
        h.update(np.ascontiguousarray(self.angles).tobytes())
        if self.temperature is not None:
            h.update(np.ascontiguousarray(self.temperature).tobytes())
        return h.hexdigest()


def check_writable(path: str | os.PathLike, force: bool = False) -> Path:
    """Fail early (before hours of simulation) if `path` cannot be written."""
    path = Path(path)
    if path.exists() and not force:
        raise DatasetError(f"{path} exists; pass --force to overwrite it")
    if path.is_dir():
        raise DatasetError(f"{path} is a directory")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise DatasetError(f"directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise DatasetError(f"directory {parent} is not writable")
    return path


def atomic_savez(path: str | os.PathLike, force: bool = False, **arrays: np.ndarray) -> Path:
    """np.savez to a temporary file beside `path`, then rename: readers never see a partial file."""
    path = check_writable(path, force)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, **arrays)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def save_dataset(
    path: str | os.PathLike,
    angles: np.ndarray,
    temperature: np.ndarray | None,
    metadata: dict[str, Any],
    force: bool = False,
) -> Path:
    angles = np.mod(np.asarray(angles, dtype=np.float32), np.float32(2 * math.pi))
    angles[angles >= np.float32(2 * math.pi)] = 0.0  # float32 rounding of values just below 2π
    arrays: dict[str, np.ndarray] = {"angles": angles, "metadata": np.array(json.dumps(metadata))}
    if temperature is not None:
        arrays["temperature"] = np.asarray(temperature, dtype=np.float32)
    return atomic_savez(path, force=force, **arrays)


def load_dataset(path: str | os.PathLike, require_temperature: bool = False) -> LatticeDataset:
    """Load and validate a data set; every problem becomes a DatasetError with a clear message."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: no such file")
    try:
        with np.load(path, allow_pickle=False) as npz:
            if "angles" not in npz.files:
                raise DatasetError(f"{path}: no 'angles' array (found: {', '.join(npz.files) or 'none'})")
            angles = npz["angles"]
            temperature = npz["temperature"] if "temperature" in npz.files else None
            metadata_raw = str(npz["metadata"]) if "metadata" in npz.files else "{}"
    except DatasetError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise DatasetError(f"{path}: not a readable .npz file ({exc})") from exc

    if angles.ndim != 3 or angles.shape[1] != angles.shape[2]:
        raise DatasetError(f"{path}: 'angles' must have shape [N, L, L], got {list(angles.shape)}")
    if angles.shape[0] == 0:
        raise DatasetError(f"{path}: 'angles' holds no configurations")
    if not np.issubdtype(angles.dtype, np.floating):
        raise DatasetError(f"{path}: 'angles' must be floating point, got {angles.dtype}")
    angles = angles.astype(np.float32, copy=False)
    bad = ~np.isfinite(angles)
    if bad.any():
        first = int(np.argwhere(bad.reshape(len(angles), -1).any(axis=1))[0, 0])
        raise DatasetError(
            f"{path}: 'angles' has {int(bad.sum())} non-finite values (first in configuration {first})"
        )
    if temperature is not None:
        temperature = np.asarray(temperature, dtype=np.float32).reshape(-1)
        if temperature.shape[0] != angles.shape[0]:
            raise DatasetError(
                f"{path}: 'temperature' has {temperature.shape[0]} entries for {angles.shape[0]} configurations"
            )
        if not np.all(np.isfinite(temperature)) or np.any(temperature <= 0):
            raise DatasetError(f"{path}: 'temperature' must be finite and positive")
    elif require_temperature:
        raise DatasetError(f"{path}: no 'temperature' array")
    try:
        metadata = json.loads(metadata_raw)
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{path}: 'metadata' is not valid JSON ({exc})") from exc
    return LatticeDataset(np.mod(angles, np.float32(2 * math.pi)), temperature, metadata)
