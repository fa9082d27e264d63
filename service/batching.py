"""Micro-batching: concurrent requests for one model become one onnxruntime call.

Wraps a model's `predict` from outside (the runtime knows nothing about batching). Rules, chosen
after the bugs MLServer users hit:
- the limit counts rows (lattices), not requests; a single request larger than the limit runs alone;
- the delay is counted from the oldest waiting request (never restarted per arrival);
- one numpy concatenate per batch, and outputs are split by the recorded row counts only after
  checking that every output's dimension 0 equals the batch total;
- an error fails every future in the batch; a full queue answers ResourceExhausted at once;
- requests whose caller gave up (cancelled future) are dropped before the run.

Threads: `workers` runner threads (Triton's instance count) share one queue and take batches from it
themselves, so a runner that finishes a batch starts the next at once instead of waiting for the
event loop to hand it one (measured: with the loop busy parsing requests, that hand-off left the
onnxruntime thread idle ~40% of the time). The event loop only enqueues and, once per batch, sets
the callers' futures. When several runners are idle, queued rows are shared among them (lower latency
on a CPU, where per-lattice cost hardly depends on batch size); a busy queue still gives full batches.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from service.errors import NotReady, ResourceExhausted

log = logging.getLogger("hgvae.service.batching")

# predict(lattice, outputs) or, when some request in the batch carries one, predict(lattice, outputs,
# temperature) with temperature float32 [rows] (NaN for the requests that gave none).
Predict = Callable[..., dict[str, np.ndarray]]


class BatchSplitError(RuntimeError):
    """The model returned a different number of rows than it was given."""


@dataclass(eq=False)
class _Pending:
    lattice: np.ndarray
    outputs: tuple[str, ...] | None
    future: asyncio.Future
    enqueued: float
    temperature: np.ndarray | None = None  # float32 [1] or [rows]; None = unknown

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
        workers: int = 1,
    ) -> None:
        if max_batch_size < 1 or max_delay_s < 0 or max_queue_rows < max_batch_size or workers < 1:
            raise ValueError(
                "need max_batch_size >= 1, max_delay_s >= 0, max_queue_rows >= max_batch_size, workers >= 1"
            )
        self._predict = predict
        self.max_batch_size, self.max_delay_s, self.max_queue_rows = max_batch_size, max_delay_s, max_queue_rows
        self.workers = workers
        self._on_batch = on_batch
        self.name = name
        self._loop = asyncio.get_running_loop()
        # Everything below is shared with the runner threads and guarded by the condition's lock.
        self._cond = threading.Condition(threading.Lock())
        self._queue: deque[_Pending] = deque()
        self._queued_rows = 0
        self._idle = 0  # runners blocked waiting for work
        self._filling = 0  # runners holding a partial batch until max_delay
        self._closing = False
        self._alive = workers
        self._stopped: asyncio.Future = self._loop.create_future()
        self._threads = [
            threading.Thread(target=self._runner, name=f"ort-{name}-{i}", daemon=True) for i in range(workers)
        ]
        for t in self._threads:
            t.start()

    @property
    def queued_rows(self) -> int:
        return self._queued_rows

    # ---- event loop side -----------------------------------------------------------------------
    def submit(
        self, lattice: np.ndarray, outputs: Sequence[str] | None = None, temperature: np.ndarray | None = None
    ) -> asyncio.Future:
        """Enqueue without awaiting (so a caller that picked this model cannot race a swap); await the result."""
        rows = int(lattice.shape[0])
        fut = self._loop.create_future()
        item = _Pending(lattice, tuple(outputs) if outputs else None, fut, time.perf_counter(), temperature)
        with self._cond:
            if self._closing:
                raise NotReady(f"model {self.name} is being unloaded; retry")
            if self._queued_rows + rows > self.max_queue_rows:
                raise ResourceExhausted(
                    f"model {self.name}: queue full ({self._queued_rows} lattices waiting,"
                    f" limit {self.max_queue_rows}); retry later"
                )
            self._queue.append(item)
            self._queued_rows += rows
            if self._filling and self._queued_rows >= self.max_batch_size:
                self._cond.notify_all()  # a runner waiting out max_delay has a full batch now
            elif self._idle:
                self._cond.notify()
        return fut

    async def predict(
        self, lattice: np.ndarray, outputs: Sequence[str] | None = None, temperature: np.ndarray | None = None
    ) -> dict[str, np.ndarray]:
        return await self.submit(lattice, outputs, temperature)

    def _deliver(
        self, batch: list[_Pending], results: list[dict[str, np.ndarray]] | None, exc: BaseException | None
    ) -> None:
        if exc is not None:
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(exc)
            return
        assert results is not None
        for item, res in zip(batch, results, strict=True):
            if not item.future.done():
                item.future.set_result(res)

    def _fail_queued(self, message: str) -> None:
        with self._cond:
            items = list(self._queue)
            self._queue.clear()
            self._queued_rows = 0
        for item in items:
            if not item.future.done():
                item.future.set_exception(NotReady(message))

    def _runner_exited(self) -> None:
        self._alive -= 1
        if self._alive == 0 and not self._stopped.done():
            self._stopped.set_result(None)

    # ---- runner threads ------------------------------------------------------------------------
    def _post(self, callback: Callable, *args: object) -> None:
        with contextlib.suppress(RuntimeError):  # RuntimeError: the loop is closed, nobody is waiting any more
            self._loop.call_soon_threadsafe(callback, *args)

    def _take_batch(self) -> list[_Pending] | None:
        """Block until there is work (None: closing and drained); called with the lock held."""
        while True:
            while not self._queue:
                if self._closing:
                    return None
                self._idle += 1
                try:
                    self._cond.wait()
                finally:
                    self._idle -= 1
            # Wait for more rows, but never past max_delay after the *oldest* request arrived.
            if self.max_delay_s > 0:
                deadline = self._queue[0].enqueued + self.max_delay_s
                self._filling += 1
                try:
                    while self._queue and self._queued_rows < self.max_batch_size and not self._closing:
                        remaining = deadline - time.perf_counter()
                        if remaining <= 0:
                            break
                        self._cond.wait(remaining)
                finally:
                    self._filling -= 1
            # Share the queued rows with the other idle runners (all of them when the queue is busy).
            limit = min(self.max_batch_size, max(1, math.ceil(self._queued_rows / (self._idle + 1))))
            batch: list[_Pending] = []
            rows = 0
            while self._queue and (not batch or rows + self._queue[0].rows <= limit):
                item = self._queue.popleft()
                self._queued_rows -= item.rows
                if item.future.done():  # the caller was cancelled (deadline, disconnect)
                    continue
                batch.append(item)
                rows += item.rows
            if self._queue and self._idle:
                self._cond.notify()  # what is left is for another idle runner
            if batch:
                return batch

    def _runner(self) -> None:
        batch: list[_Pending] | None = None
        try:
            while True:
                with self._cond:
                    batch = self._take_batch()
                if batch is None:
                    return
                try:
                    results = self._run_batch(batch)
                except Exception as exc:  # fail every waiter in the batch, keep the runner alive
                    log.error(
                        "batch failed",
                        extra={"model": self.name, "rows": sum(i.rows for i in batch), "error": repr(exc)},
                    )
                    self._post(self._deliver, batch, None, exc)
                else:
                    self._post(self._deliver, batch, results, None)
                batch = None
        except BaseException as exc:  # nobody may wait forever: fail this batch and the queue, refuse new work
            log.error("batch runner died", extra={"model": self.name, "error": repr(exc)})
            with self._cond:
                self._closing = True
                self._cond.notify_all()
            message = f"model {self.name}: batch runner failed; retry"
            if batch:
                self._post(self._deliver, batch, None, NotReady(message))
            self._post(self._fail_queued, message)
        finally:
            self._post(self._runner_exited)

    def _run_batch(self, batch: list[_Pending]) -> list[dict[str, np.ndarray]]:
        counts = [item.rows for item in batch]
        total = sum(counts)
        wanted: tuple[str, ...] | None
        if any(item.outputs is None for item in batch):
            wanted = None
        else:
            wanted = tuple(dict.fromkeys(name for item in batch for name in item.outputs or ()))
        x = batch[0].lattice if len(batch) == 1 else np.concatenate([item.lattice for item in batch])
        if any(item.temperature is not None for item in batch):
            temps = np.concatenate(
                [
                    np.broadcast_to(
                        item.temperature if item.temperature is not None else np.float32(np.nan), (item.rows,)
                    ).astype(np.float32)
                    for item in batch
                ]
            )
            out = self._predict(x, wanted, temps)
        else:
            out = self._predict(x, wanted)
        for name, arr in out.items():
            if arr.ndim == 0 or arr.shape[0] != total:
                raise BatchSplitError(
                    f"model {self.name}: output {name!r} has shape {list(arr.shape)}, expected {total} rows"
                )
        if self._on_batch is not None:
            self._on_batch(total)
        if len(batch) == 1:
            keys = batch[0].outputs or tuple(out)
            return [{k: out[k] for k in keys}]
        results = []
        start = 0
        for item, n in zip(batch, counts, strict=True):
            keys = item.outputs or tuple(out)
            results.append({k: out[k][start : start + n] for k in keys})
            start += n
        return results

    async def close(self, timeout: float | None = None) -> None:
        """Refuse new work, let queued and running batches finish, then let the runner threads end."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        try:
            await asyncio.wait_for(asyncio.shield(self._stopped), timeout)
        except TimeoutError:
            self._fail_queued(f"model {self.name} was unloaded before this request ran")
