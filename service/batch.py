"""Batch scoring of .npz files (`hgvae score`), locally on onnxruntime or through a running server.

Memory stays flat on large files: `angles` is read from the .npz member chunk by chunk (works for
stored and deflated members), outputs are appended to .npy files on disk and then streamed into the final
.npz, which is renamed into place only when complete. No torch.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
import zipfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from training.dataset import DatasetError, check_writable


class LatticeReader:
    """Streams `angles` [N, L, L] out of an .npz without loading it whole; `temperature` is read fully."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise DatasetError(f"{self.path}: no such file")
        try:
            self._zip = zipfile.ZipFile(self.path)
        except (OSError, zipfile.BadZipFile) as exc:
            raise DatasetError(f"{self.path}: not a readable .npz file ({exc})") from exc
        names = self._zip.namelist()
        if "angles.npy" not in names:
            found = ", ".join(n.removesuffix(".npy") for n in names) or "none"
            raise DatasetError(f"{self.path}: no 'angles' array (found: {found})")
        with self._zip.open("angles.npy") as fh:
            try:
                shape, fortran, dtype = _read_header(fh)
            except ValueError as exc:
                raise DatasetError(f"{self.path}: 'angles' is not a valid .npy array ({exc})") from exc
        if len(shape) != 3 or shape[1] != shape[2]:
            raise DatasetError(f"{self.path}: 'angles' must have shape [N, L, L], got {list(shape)}")
        if shape[0] == 0:
            raise DatasetError(f"{self.path}: 'angles' holds no configurations")
        if dtype.kind != "f" or dtype.hasobject:
            raise DatasetError(f"{self.path}: 'angles' must be floating point, got {dtype}")
        if fortran:
            raise DatasetError(f"{self.path}: 'angles' is stored in Fortran order; re-save it in C order")
        self.shape: tuple[int, int, int] = tuple(int(d) for d in shape)  # type: ignore[assignment]
        self.dtype = dtype
        self.temperature = self._read_small("temperature")
        if self.temperature is not None:
            self.temperature = np.asarray(self.temperature, dtype=np.float32).reshape(-1)
            if len(self.temperature) != self.shape[0]:
                raise DatasetError(
                    f"{self.path}: 'temperature' has {len(self.temperature)} entries for {self.shape[0]} configurations"
                )
        meta = self._read_small("metadata")
        self.metadata: str = str(meta) if meta is not None else "{}"

    def _read_small(self, name: str) -> np.ndarray | None:
        if f"{name}.npy" not in self._zip.namelist():
            return None
        with self._zip.open(f"{name}.npy") as fh:
            return np.lib.format.read_array(fh, allow_pickle=False)

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def lattice_size(self) -> int:
        return self.shape[1]

    def chunks(self, rows: int) -> Iterator[np.ndarray]:
        """float32 [<=rows, L, L] pieces in order; raises DatasetError on non-finite values."""
        n, L, _ = self.shape
        row_bytes = L * L * self.dtype.itemsize
        with self._zip.open("angles.npy") as fh:
            _read_header(fh)
            for start in range(0, n, rows):
                take = min(rows, n - start)
                buf = fh.read(take * row_bytes)
                if len(buf) != take * row_bytes:
                    raise DatasetError(f"{self.path}: 'angles' is truncated at configuration {start}")
                x = np.frombuffer(buf, dtype=self.dtype).reshape(take, L, L).astype(np.float32)
                bad = ~np.isfinite(x)
                if bad.any():
                    first = start + int(np.argwhere(bad.reshape(take, -1).any(axis=1))[0, 0])
                    raise DatasetError(f"{self.path}: 'angles' has non-finite values (first in configuration {first})")
                yield x

    def close(self) -> None:
        self._zip.close()


def _read_header(fh: Any) -> tuple[tuple[int, ...], bool, np.dtype]:
    version = np.lib.format.read_magic(fh)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(fh)
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(fh)
    return np.lib.format._read_array_header(fh, version)  # 3.0 (utf-8 headers) has no public reader


ScoreFn = Callable[[Iterator[np.ndarray]], Iterator[dict[str, np.ndarray]]]


class _NpyAppender:
    """A .npy file written front to back: header for the final shape, then rows as they come.
    Plain buffered writes, no memmap, so resident memory does not grow with the file."""

    def __init__(self, path: Path, dtype: np.dtype, shape: tuple[int, ...]) -> None:
        self.path, self.dtype, self.shape = path, np.dtype(dtype), shape
        self.rows = 0
        self._fh = open(path, "wb")  # noqa: SIM115 - closed in close()
        header = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False, "shape": shape}
        np.lib.format.write_array_header_1_0(self._fh, header)

    def append(self, arr: np.ndarray) -> None:
        if arr.shape[1:] != self.shape[1:]:
            raise RuntimeError(f"{self.path.stem}: rows of shape {arr.shape[1:]}, expected {self.shape[1:]}")
        self._fh.write(np.ascontiguousarray(arr, dtype=self.dtype).tobytes())
        self.rows += arr.shape[0]

    def close(self) -> None:
        self._fh.close()


def _write_npz_atomically(output_path: Path, files: dict[str, Path], small: dict[str, np.ndarray]) -> None:
    """Zip finished .npy files (streamed from disk) and small arrays into output_path, then rename."""
    fd, tmp = tempfile.mkstemp(prefix=f".{output_path.name}.", suffix=".tmp", dir=output_path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            with zipfile.ZipFile(fh, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
                for name, path in files.items():
                    zf.write(path, arcname=f"{name}.npy")
                for name, arr in small.items():
                    buf = io.BytesIO()
                    np.lib.format.write_array(buf, np.asanyarray(arr), allow_pickle=False)
                    zf.writestr(f"{name}.npy", buf.getvalue())
            fh.flush()
            os.fsync(fh.fileno())
        umask = os.umask(0o022)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, output_path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def score_file(
    input_path: str | Path,
    output_path: str | Path,
    score_chunks: ScoreFn,
    chunk_rows: int = 16,  # per onnxruntime call / request: small batches are fastest on CPU
    force: bool = False,
    metadata: dict[str, Any] | None = None,
    progress: bool = True,
    expect_size: int | None = None,
) -> dict[str, Any]:
    """Score every configuration of input_path; write one array per output (+ temperature, metadata).

    Memory stays flat: input chunks are read from the zip member, output rows are appended to .npy
    files beside the target, and those are streamed into the final .npz, which appears atomically.
    """
    output_path = check_writable(output_path, force)
    reader = LatticeReader(input_path)
    if expect_size is not None and reader.lattice_size != expect_size:
        reader.close()
        raise DatasetError(
            f"{input_path}: lattices are {reader.lattice_size}x{reader.lattice_size}, the model expects "
            f"{expect_size}x{expect_size}"
        )
    from tqdm import tqdm

    n = len(reader)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output_path.name}.", dir=output_path.parent))
    outputs: dict[str, _NpyAppender] = {}
    try:
        with tqdm(total=n, unit="lattice", desc="scoring", disable=not progress, dynamic_ncols=True) as bar:
            done = 0
            for result in score_chunks(reader.chunks(chunk_rows)):
                rows = {arr.shape[0] for arr in result.values()}
                if len(rows) != 1:
                    raise RuntimeError(f"outputs disagree on the number of rows: {sorted(rows)}")
                for name, arr in result.items():
                    if name not in outputs:
                        outputs[name] = _NpyAppender(tmp / f"{name}.npy", arr.dtype, (n, *arr.shape[1:]))
                    outputs[name].append(arr)
                done += rows.pop()
                bar.update(done - bar.n)
        for w in outputs.values():
            w.close()
        short = {name: w.rows for name, w in outputs.items() if w.rows != n}
        if done != n or short:
            raise RuntimeError(f"scored {done} of {n} configurations {short or ''}".strip())
        small: dict[str, np.ndarray] = {}
        if reader.temperature is not None:
            small["temperature"] = reader.temperature
        meta = {"input": str(input_path), "configurations": n, **(metadata or {})}
        small["metadata"] = np.array(json.dumps(meta))
        _write_npz_atomically(output_path, {k: w.path for k, w in outputs.items()}, small)
    finally:
        for w in outputs.values():
            w.close()
        reader.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return {"configurations": n, "outputs": sorted([*outputs, *small]), "path": str(output_path)}


def local_scorer(model: Any, outputs: Sequence[str] | None, temperature: float | None = None) -> ScoreFn:
    """Score chunks with an in-process service.runtime.OnnxModel (`temperature`: one nominal T for all)."""
    temps = None if temperature is None else np.asarray([temperature], dtype=np.float32)

    def run(chunks: Iterator[np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
        for x in chunks:
            yield model.predict(x, outputs) if temps is None else model.predict(x, outputs, temps)

    return run


def remote_scorer(
    client: Any,
    outputs: Sequence[str] | None,
    model: str = "",
    version: str = "",
    timeout: float | None = None,
    temperature: float | None = None,
) -> ScoreFn:
    """Score chunks through one ScoreStream (pipelined: the server works while the next chunk travels)."""

    def run(chunks: Iterator[np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
        for result in client.score_stream(
            chunks, model=model, version=version, outputs=outputs, timeout=timeout, temperature=temperature
        ):
            yield result.outputs

    return run
