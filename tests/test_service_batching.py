"""BatchQueue paths one by one: full batch, delay from the oldest request, errors, row mismatch,
bounded queue, cancelled callers, oversized requests, drain on close. The predict function is a
real numpy computation with a call log, not a mock of the queue."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from service.batching import BatchQueue, BatchSplitError
from service.errors import NotReady, ResourceExhausted


class Model:
    def __init__(self, delay: float = 0.0, fail: bool = False, drop_row: bool = False) -> None:
        self.calls: list[int] = []
        self.delay, self.fail, self.drop_row = delay, fail, drop_row
        self.entered: list[int] = []  # in the order runs started (calls: in the order they passed the gate)
        self.gate = threading.Event()
        self.gate.set()

    def __call__(self, x: np.ndarray, outputs):
        self.entered.append(len(x))
        self.gate.wait(5)
        self.calls.append(len(x))
        if self.delay:
            time.sleep(self.delay)
        if self.fail:
            raise RuntimeError("boom")
        out = {"sum": x.sum(axis=(1, 2)), "first": x[:, 0, :].copy()}
        if self.drop_row:
            out["sum"] = out["sum"][:-1]
        return {k: v for k, v in out.items() if outputs is None or k in outputs}


def x_of(n: int, value: float) -> np.ndarray:
    return np.full((n, 2, 2), value, np.float32)


def run(coro):
    return asyncio.run(coro)


def test_full_batch_runs_without_waiting_for_the_delay():
    async def main():
        m = Model()
        q = BatchQueue(m, max_batch_size=8, max_delay_s=5.0)
        t0 = time.perf_counter()
        res = await asyncio.gather(*(q.predict(x_of(2, i)) for i in range(4)))
        elapsed = time.perf_counter() - t0
        await q.close()
        return m, res, elapsed

    m, res, elapsed = run(main())
    assert m.calls == [8] and elapsed < 1.0
    for i, r in enumerate(res):  # each caller gets exactly its own rows back
        np.testing.assert_array_equal(r["sum"], np.full(2, 4.0 * i))
        assert r["first"].shape == (2, 2)


def test_a_batch_that_fills_up_during_the_delay_runs_at_once():
    async def main():
        m = Model()
        q = BatchQueue(m, max_batch_size=4, max_delay_s=5.0)
        t0 = time.perf_counter()
        first = q.submit(x_of(1, 1))
        await asyncio.sleep(0.1)  # the runner now holds one row, waiting up to 5 s for more
        rest = q.submit(x_of(3, 2))
        await asyncio.gather(first, rest)
        elapsed = time.perf_counter() - t0
        await q.close()
        return m, elapsed

    m, elapsed = run(main())
    assert m.calls == [4] and elapsed < 1.0, (m.calls, elapsed)


def test_delay_counts_from_the_oldest_request():
    async def main():
        m = Model()
        q = BatchQueue(m, max_batch_size=100, max_delay_s=0.3)
        t0 = time.perf_counter()
        first = asyncio.ensure_future(q.predict(x_of(1, 1)))
        await asyncio.sleep(0.2)
        second = asyncio.ensure_future(q.predict(x_of(1, 2)))  # must not restart the clock
        await asyncio.gather(first, second)
        elapsed = time.perf_counter() - t0
        await q.close()
        return m, elapsed

    m, elapsed = run(main())
    assert m.calls == [2]
    assert 0.28 < elapsed < 0.45, elapsed  # ~0.3 s from the first request, not 0.2 + 0.3


def test_rows_not_requests_are_capped_and_large_requests_run_alone():
    async def main():
        m = Model()
        m.gate.clear()  # hold the runner so everything queues up first
        q = BatchQueue(m, max_batch_size=4, max_delay_s=0.0)
        futs = [asyncio.ensure_future(q.predict(x_of(n, 1))) for n in (1, 10, 3, 3, 1)]
        await asyncio.sleep(0.05)
        m.gate.set()
        res = await asyncio.gather(*futs)
        await q.close()
        return m, res

    m, res = run(main())
    assert m.calls[0] == 1  # the first request started alone while the others were still arriving
    assert sorted(m.calls[1:]) == sorted([10, 3, 4]) and m.calls[1:] == [10, 3, 4]
    assert [len(r["sum"]) for r in res] == [1, 10, 3, 3, 1]


def test_error_fails_every_future_in_the_batch_and_queue_keeps_working():
    async def main():
        m = Model(fail=True)
        q = BatchQueue(m, max_batch_size=8, max_delay_s=0.05)
        res = await asyncio.gather(*(q.predict(x_of(1, i)) for i in range(3)), return_exceptions=True)
        m.fail = False
        after = await q.predict(x_of(1, 1))
        await q.close()
        return m, res, after

    m, res, after = run(main())
    assert m.calls[0] == 3 and all(isinstance(r, RuntimeError) and "boom" in str(r) for r in res)
    assert after["sum"][0] == 4.0


def test_row_count_mismatch_fails_the_batch_instead_of_misaligning():
    async def main():
        q = BatchQueue(Model(drop_row=True), max_batch_size=8, max_delay_s=0.05)
        res = await asyncio.gather(*(q.predict(x_of(2, i)) for i in range(2)), return_exceptions=True)
        await q.close()
        return res

    res = run(main())
    assert all(isinstance(r, BatchSplitError) and "expected 4 rows" in str(r) for r in res)


def test_bounded_queue_rejects_at_once():
    async def main():
        m = Model()
        m.gate.clear()
        q = BatchQueue(m, max_batch_size=4, max_delay_s=0.0, max_queue_rows=8)
        running = asyncio.ensure_future(q.predict(x_of(4, 0)))
        await asyncio.sleep(0.05)  # taken by the runner, which is blocked on the gate
        waiting = [asyncio.ensure_future(q.predict(x_of(4, 1))) for _ in range(2)]
        await asyncio.sleep(0)
        with pytest.raises(ResourceExhausted, match="queue full"):
            q.submit(x_of(1, 2))
        m.gate.set()
        await asyncio.gather(running, *waiting)
        ok = await q.predict(x_of(1, 2))  # room again
        await q.close()
        return ok

    assert run(main())["sum"][0] == 8.0


def test_cancelled_callers_are_dropped_before_the_run():
    async def main():
        m = Model()
        m.gate.clear()
        q = BatchQueue(m, max_batch_size=100, max_delay_s=0.0)
        first = asyncio.ensure_future(q.predict(x_of(1, 0)))
        await asyncio.sleep(0.05)
        gone = q.submit(x_of(5, 1))
        kept = q.submit(x_of(2, 2))
        gone.cancel()
        m.gate.set()
        await asyncio.gather(first, kept)
        await q.close()
        return m, q

    m, q = run(main())
    assert m.calls == [1, 2] and q.queued_rows == 0


def test_outputs_subset_and_union():
    async def main():
        q = BatchQueue(Model(), max_batch_size=8, max_delay_s=0.05)
        a, b = await asyncio.gather(q.predict(x_of(1, 1), ["sum"]), q.predict(x_of(1, 2), ["first"]))
        await q.close()
        return a, b

    a, b = run(main())
    assert set(a) == {"sum"} and set(b) == {"first"}


def test_close_drains_queued_work_then_refuses():
    async def main():
        m = Model(delay=0.02)
        q = BatchQueue(m, max_batch_size=1, max_delay_s=0.0)
        futs = [q.submit(x_of(1, i)) for i in range(5)]
        await q.close()
        with pytest.raises(NotReady):
            q.submit(x_of(1, 0))
        return [f.result()["sum"][0] for f in futs]

    assert run(main()) == [0.0, 4.0, 8.0, 12.0, 16.0]


def test_inconsistent_settings_are_rejected():
    from pydantic import ValidationError

    from service.settings import ServerSettings

    with pytest.raises(ValidationError, match="max_batch_size"):
        ServerSettings(max_batch_size=100, max_queue_rows=10, max_request_rows=5)
    with pytest.raises(ValidationError, match="tls_cert and tls_key"):
        ServerSettings(tls_cert="/etc/hostname")

    async def bad():
        BatchQueue(Model(), max_batch_size=10, max_queue_rows=5)

    with pytest.raises(ValueError):
        run(bad())


def test_settings_come_from_hgvae_environment(monkeypatch):
    from service.settings import ServerSettings

    monkeypatch.setenv("HGVAE_PORT", "50999")
    monkeypatch.setenv("HGVAE_MODELS", '["a=models:/x@champion", "/tmp/m.onnx"]')
    monkeypatch.setenv("HGVAE_MAX_DELAY_MS", "2.5")
    s = ServerSettings()
    assert (s.port, s.max_delay_ms, s.host) == (50999, 2.5, "127.0.0.1")
    assert s.models == ["a=models:/x@champion", "/tmp/m.onnx"]
    assert ServerSettings(port=1).port == 1  # explicit values (CLI flags) win


def test_workers_run_batches_in_parallel():
    """Two runners: two batches are inside predict at the same time (the service uses both cores)."""

    class Barrier(Model):
        def __init__(self) -> None:
            super().__init__()
            self.inside = threading.Barrier(2, timeout=5)

        def __call__(self, x, outputs):
            self.inside.wait()  # raises BrokenBarrierError unless a second run is in flight at once
            return super().__call__(x, outputs)

    async def main():
        m = Barrier()
        q = BatchQueue(m, max_batch_size=4, max_delay_s=0.0, workers=2)
        res = await asyncio.gather(*(q.predict(x_of(4, i)) for i in range(2)))
        await q.close()
        return m, res

    m, res = run(main())
    assert sorted(m.calls) == [4, 4]
    assert [r["sum"][0] for r in res] == [0.0, 4.0]


def test_idle_workers_share_the_queue_and_a_busy_queue_gives_full_batches():
    async def main():
        m = Model()
        m.gate.clear()
        q = BatchQueue(m, max_batch_size=8, max_delay_s=0.0, workers=2)
        futs = [q.submit(x_of(1, i)) for i in range(4)]  # both runners idle: they share the 4 rows
        await asyncio.sleep(0.05)
        more = [q.submit(x_of(1, i)) for i in range(20)]  # both runners busy: full batches of 8 wait
        m.gate.set()
        res = await asyncio.gather(*futs, *more)
        await q.close()
        return m, res, q

    m, res, q = run(main())
    # 2 + 2 usually; 1 + 3 (or 1 + 1, the rest later) when a runner wakes before all four are queued
    assert max(m.entered[:2]) < 4, m.entered
    assert m.entered[2:4] == [8, 8] and sum(m.entered) == 24, m.entered
    assert [r["sum"][0] for r in res] == [4.0 * i for i in range(4)] + [4.0 * i for i in range(20)]
    assert q.queued_rows == 0


def test_a_dead_runner_fails_the_queue_instead_of_hanging():
    async def main():
        m = Model()
        q = BatchQueue(m, max_batch_size=4, max_delay_s=0.0)
        q._run_batch = lambda batch: (_ for _ in ()).throw(SystemExit("runner killed"))  # escapes `except Exception`
        first = q.submit(x_of(1, 0))
        with pytest.raises(NotReady, match="runner failed"):
            await asyncio.wait_for(first, 2)
        await asyncio.sleep(0.05)
        with pytest.raises(NotReady):
            q.submit(x_of(1, 0))
        await asyncio.wait_for(q.close(), 2)

    run(main())


def test_runner_and_thread_plan(monkeypatch):
    """Auto: one single-threaded run per core on CPU, one run on CUDA; explicit values split the cores."""
    from service import runtime

    monkeypatch.setattr(runtime, "usable_cores", lambda: 8)
    cpu, gpu = "CPUExecutionProvider", "CUDAExecutionProvider"
    assert (runtime.serving_workers(0, 0, cpu), runtime.serving_threads(0, 0)) == (8, 1)
    assert (runtime.serving_workers(0, 0, gpu), runtime.serving_threads(0, 0)) == (1, 1)
    assert (runtime.serving_workers(2, 0, cpu), runtime.serving_threads(2, 0)) == (2, 4)
    assert (runtime.serving_workers(0, 4, cpu), runtime.serving_threads(0, 4)) == (2, 4)
    assert (runtime.serving_workers(3, 3, cpu), runtime.serving_threads(3, 3)) == (3, 3)


def test_container_cpu_limit_caps_the_cores(tmp_path):
    from service.runtime import cgroup_cpu_limit

    assert cgroup_cpu_limit(tmp_path) is None  # no cgroup files: unlimited
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_limit(tmp_path) is None
    (tmp_path / "cpu.max").write_text("150000 100000\n")  # 1.5 CPUs -> 2 runners
    assert cgroup_cpu_limit(tmp_path) == 2
    (tmp_path / "cpu.max").unlink()
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cgroup_cpu_limit(tmp_path) is None
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("400000\n")
    assert cgroup_cpu_limit(tmp_path) == 4
