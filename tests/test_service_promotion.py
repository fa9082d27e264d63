"""Hot promotion under load, a broken new version, and graceful shutdown (in-process and SIGTERM)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest

from tests._service_fixtures import (
    ServerThread,
    broken_version,
    lattices,
    real_store,
    reference,
    second_version,
    set_alias,
)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return real_store(tmp_path_factory)


@pytest.fixture(scope="module")
def server(store):
    srv = ServerThread(
        models=["models:/hgvae@champion"], tracking_uri=store.tracking_uri, poll_interval_s=0.2, max_delay_ms=1.0
    )
    yield srv
    srv.stop()
    set_alias(store, store.version)


def _wait_for(predicate, timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError("condition not reached in time")


def test_alias_move_is_served_with_zero_failed_requests(server, store):
    from service.client import AsyncScoringClient, ScoringClient

    x = lattices(2, seed=7)
    ref = reference(store.onnx_path, x)
    new_version = second_version(store)
    stop = threading.Event()
    seen: list[str] = []
    failures: list[BaseException] = []

    async def load():
        async with AsyncScoringClient(server.address, timeout=20) as c:

            async def worker():
                while not stop.is_set():
                    try:
                        r = await c.score(x, outputs=["anomaly_score", "energy"])
                        np.testing.assert_allclose(r["anomaly_score"], ref["anomaly_score"], atol=1e-5)
                        seen.append(r.version)
                    except BaseException as exc:  # noqa: BLE001 - every failure counts
                        failures.append(exc)

            await asyncio.gather(*(worker() for _ in range(8)))

    loader = threading.Thread(target=asyncio.run, args=(load(),))
    loader.start()
    try:
        _wait_for(lambda: len(seen) > 50)
        set_alias(store, new_version)
        with ScoringClient(server.address) as c:
            _wait_for(lambda: c.model_info()["version"] == new_version)
        n_at_swap = len(seen)
        _wait_for(lambda: len(seen) > n_at_swap + 50)
    finally:
        stop.set()
        loader.join(30)
    assert not failures, failures[:3]
    assert seen.count(store.version) > 0 and seen.count(new_version) > 0
    assert len(seen) > 100
    # once the new version answered, the old one never did again (atomic swap)
    first_new = seen.index(new_version)
    assert store.version not in seen[first_new + 16 :]  # allow the 8 workers' in-flight requests to land


def test_broken_new_version_keeps_the_old_one(server, store, tmp_path):
    from service.client import ScoringClient

    with ScoringClient(server.address) as c:
        served = c.model_info()["version"]
        failed_before = server.server.metrics.reloads.labels("hgvae", "failed")._value.get()
        set_alias(store, broken_version(store, tmp_path))
        _wait_for(lambda: server.server.metrics.reloads.labels("hgvae", "failed")._value.get() > failed_before)
        assert c.model_info()["version"] == served
        assert c.health() == "SERVING"
        assert c.score(lattices(1)).version == served
    set_alias(store, store.version)


def test_graceful_stop_finishes_in_flight_and_refuses_new(store):
    from service.client import ScoringClient, ScoringError

    # a long batching delay keeps requests in flight when stop() begins
    srv = ServerThread(models=[str(store.onnx_path)], max_delay_ms=400.0, max_batch_size=1024)
    x = lattices(1, seed=9)
    with ScoringClient(srv.address, timeout=20) as c, ThreadPoolExecutor(4) as pool:
        # a deadline shorter than the batching delay expires while queued; the server keeps going
        with pytest.raises(ScoringError) as err:
            c.score(x, timeout=0.1)
        assert err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        futures = [pool.submit(c.score, x) for _ in range(4)]
        time.sleep(0.15)
        t0 = time.perf_counter()
        srv.stop(grace=5.0)
        stop_s = time.perf_counter() - t0
        results = [f.result(timeout=10) for f in futures]
        assert all(r.outputs["energy"].shape == (1,) for r in results)
        assert stop_s < 5.0  # it waited for the in-flight work, not for the whole grace period
        with pytest.raises(ScoringError) as err:
            c.score(x, timeout=2)
        assert err.value.code == grpc.StatusCode.UNAVAILABLE


def test_sigterm_stops_the_cli_server_cleanly(store, tmp_path):
    from service.client import ScoringClient

    env = {**os.environ, "PYTHONPATH": os.getcwd(), "HGVAE_HOME": str(tmp_path)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "hgvae", "serve", "--model", str(store.onnx_path), "--port", "0", "--threads", "1"],
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        address = None
        lines = []
        for line in proc.stderr:
            lines.append(line)
            entry = json.loads(line)
            if entry["msg"] == "listening":
                address = entry["address"]
            if entry["msg"] == "serving":
                break
        assert address, lines
        with ScoringClient(address) as c:
            assert c.health() == "SERVING"
            assert c.score(lattices(1)).outputs
        proc.send_signal(signal.SIGTERM)
        rest = proc.stderr.read()
        assert proc.wait(20) == 0
        assert '"msg": "stopped"' in rest and "Traceback" not in rest
    finally:
        if proc.poll() is None:
            proc.kill()
