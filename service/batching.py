"""Micro-batching: concurrent requests for one model become one onnxruntime call.

Wraps a model's `predict` from outside (the runtime knows nothing about batching). Rules, chosen
after the bugs MLServer users hit:
- the limit counts rows (lattices), not requests; a single request larger than the limit runs alone;
- the delay is counted from the oldest waiting request (never restarted per arrival);
- one numpy concatenate per batch, and outputs are split by the recorded row counts only after
  checking that every output's dimension 0 equals the batch total;
- an error fails every future in the batch; a full queue answers ResourceExhausted at once;
- requests whose caller gave up (cancelled future) are dropped before the run.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from service.errors import NotReady, ResourceExhausted

log = logging.getLogger("hgvae.service.batching")

Predict = Callable[[np.ndarray, Sequence[str] | None], dict[str, np.ndarray]]


class BatchSplitError(RuntimeError):
    """The model returned a different number of rows than it was given."""


@dataclass(eq=False)
class _Pending:
    lattice: np.ndarray
    outputs: tuple[str, ...] | None
    future: asyncio.Future
    enqueued: float

    @property
    def rows(self) -> int:
        return int(self.lattice.shape[0])


class BatchQueue:
    def __init__(
        self,
        predict: Predict,
        max_batch_size: int = 64,
        max_delay_s: float = 0.001,
        max_queue_rows: int = 16384,
        on_batch: Callable[[int], None] | None = None,
        name: str = "",
    ) -> None:
        if max_batch_size < 1 or max_delay_s < 0 or max_queue_rows < max_batch_size:
            raise ValueError("need max_batch_size >= 1, max_delay_s >= 0, max_queue_rows >= max_batch_size")
        self._predict = predict
        self.max_batch_size, self.max_delay_s, self.max_queue_rows = max_batch_size, max_delay_s, max_queue_rows
        self._on_batch = on_batch
        self.name = name
        self._queue: deque[_Pending] = deque()
        self._queued_rows = 0
        self._wakeup = asyncio.Event()
        self._closing = False
        # One runner thread per model: batches run one after another while the next one fills up.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"ort-{name}")
        self._task = asyncio.get_running_loop().create_task(self._run_forever(), name=f"batcher-{name}")
        self._task.add_done_callback(self._runner_done)

    def _runner_done(self, task: asyncio.Task) -> None:
        """If the runner ever dies, nobody may wait forever: fail what is queued and refuse new work."""
        if task.cancelled() or task.exception() is None:
            return
        log.error("batch runner died", extra={"model": self.name, "error": repr(task.exception())})
        self._closing = True
        for item in self._queue:
            if not item.future.done():
                item.future.set_exception(NotReady(f"model {self.name}: batch runner failed; retry"))
        self._queue.clear()
        self._queued_rows = 0

    @property
    def queued_rows(self) -> int:
        return self._queued_rows

    def submit(self, lattice: np.ndarray, outputs: Sequence[str] | None = None) -> asyncio.Future:
        """Enqueue without awaiting (so a caller that picked this model cannot race a swap); await the result."""
        if self._closing:
            raise NotReady(f"model {self.name} is being unloaded; retry")
        rows = int(lattice.shape[0])
        if self._queued_rows + rows > self.max_queue_rows:
            raise ResourceExhausted(
                f"model {self.name}: queue full ({self._queued_rows} lattices waiting,"
                f" limit {self.max_queue_rows}); retry later"
            )
        fut = asyncio.get_running_loop().create_future()
        self._queue.append(_Pending(lattice, tuple(outputs) if outputs else None, fut, time.perf_counter()))
        self._queued_rows += rows
        self._wakeup.set()
        return fut

    async def predict(self, lattice: np.ndarray, outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        return await self.submit(lattice, outputs)

    def _take_batch(self) -> list[_Pending]:
        batch: list[_Pending] = []
        rows = 0
        while self._queue and (not batch or rows + self._queue[0].rows <= self.max_batch_size):
            item = self._queue.popleft()
            self._queued_rows -= item.rows
            if item.future.done():  # the caller was cancelled (deadline, disconnect)
                continue
            batch.append(item)
            rows += item.rows
        return batch

    async def _run_forever(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue:
                self._wakeup.clear()
                if self._closing:
                    return
                await self._wakeup.wait()
                continue
            # Wait for more rows, but never past max_delay after the *oldest* request arrived.
            deadline = self._queue[0].enqueued + self.max_delay_s
            while self._queued_rows < self.max_batch_size and not self._closing:
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    break
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), remaining)
                except TimeoutError:
                    break
            batch = self._take_batch()
            if not batch:
                continue
            try:
                results = await loop.run_in_executor(self._executor, self._run_batch, batch)
            except BaseException as exc:  # fail every waiter in the batch, keep the loop alive
                if not isinstance(exc, Exception):
                    for item in batch:
                        if not item.future.done():
                            item.future.cancel()
                    raise
                log.error(
                    "batch failed", extra={"model": self.name, "rows": sum(i.rows for i in batch), "error": repr(exc)}
                )
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(exc)
            else:
                for item, res in zip(batch, results, strict=True):
                    if not item.future.done():
                        item.future.set_result(res)

    def _run_batch(self, batch: list[_Pending]) -> list[dict[str, np.ndarray]]:
        counts = [item.rows for item in batch]
        total = sum(counts)
        wanted: tuple[str, ...] | None
        if any(item.outputs is None for item in batch):
            wanted = None
        else:
            wanted = tuple(dict.fromkeys(name for item in batch for name in item.outputs or ()))
        x = batch[0].lattice if len(batch) == 1 else np.concatenate([item.lattice for item in batch])
        out = self._predict(x, wanted)
        for name, arr in out.items():
            if arr.ndim == 0 or arr.shape[0] != total:
                raise BatchSplitError(
                    f"model {self.name}: output {name!r} has shape {list(arr.shape)}, expected {total} rows"
                )
        if self._on_batch is not None:
            self._on_batch(total)
        results = []
        start = 0
        for item, n in zip(batch, counts, strict=True):
            keys = item.outputs or tuple(out)
            results.append({k: out[k][start : start + n] for k in keys})
            start += n
        return results

    async def close(self, timeout: float | None = None) -> None:
        """Refuse new work, let queued and running batches finish, then stop the runner thread."""
        self._closing = True
        self._wakeup.set()
        try:
            await asyncio.wait_for(asyncio.shield(self._task), timeout)
        except TimeoutError:
            self._task.cancel()
            for item in self._queue:
                if not item.future.done():
                    item.future.set_exception(NotReady(f"model {self.name} was unloaded before this request ran"))
            self._queue.clear()
        self._executor.shutdown(wait=False)
