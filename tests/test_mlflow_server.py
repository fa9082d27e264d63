"""End to end on a real MLflow tracking server backed by PostgreSQL (started by .ci/services.sh).

Train a tiny model against the server, promote it to @champion, start `hgvae serve` on
models:/NAME@champion, train and promote a second version, and watch the running service follow the
alias with no restart and no failed request, serving the new version's numbers.

Needs the server at HGVAE_TEST_MLFLOW_URI (default http://127.0.0.1:5055, as .ci/services.sh starts it)
and its PostgreSQL at HGVAE_TEST_PG (default 127.0.0.1:55432, database/role mlflow). Skipped with the
reason when they are not running locally; under CI (CI=true) that is a failure instead.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
MLFLOW_URI = os.environ.get("HGVAE_TEST_MLFLOW_URI", "http://127.0.0.1:5055")
PG = os.environ.get("HGVAE_TEST_PG", "127.0.0.1:55432")
L = 8


def _reachable() -> str | None:
    try:
        with urllib.request.urlopen(f"{MLFLOW_URI}/health", timeout=3) as resp:
            if resp.status != 200:
                return f"{MLFLOW_URI}/health answered {resp.status}"
    except OSError as exc:
        return f"MLflow tracking server not reachable at {MLFLOW_URI} ({exc}); start it with `bash .ci/services.sh`"
    host, port = PG.split(":")
    try:
        socket.create_connection((host, int(port)), timeout=3).close()
    except OSError as exc:
        return f"PostgreSQL not reachable at {PG} ({exc}); start it with `bash .ci/services.sh`"
    return None


_why = _reachable()
if _why:
    if os.environ.get("CI"):
        pytest.fail(f"CI must start the services first: {_why}", pytrace=False)
    pytest.skip(_why, allow_module_level=True)

grpc = pytest.importorskip("grpc")
ort = pytest.importorskip("onnxruntime")
psycopg2 = pytest.importorskip("psycopg2")

from service.client import ScoringClient, ScoringError  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pg_versions(name: str) -> dict[int, str]:
    """Straight from PostgreSQL: the registry rows MLflow wrote (proves the server really uses it)."""
    host, port = PG.split(":")
    with psycopg2.connect(host=host, port=int(port), user="mlflow", dbname="mlflow") as conn, conn.cursor() as cur:
        cur.execute("SELECT version, run_id FROM model_versions WHERE name = %s", (name,))
        versions = dict(cur.fetchall())
        cur.execute("SELECT alias, version FROM registered_model_aliases WHERE name = %s", (name,))
        aliases = dict(cur.fetchall())
    return {v: ("champion" if aliases.get("champion") == v else run) for v, run in versions.items()}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    from training.dataset import save_dataset

    rng = np.random.default_rng(0)
    temps = np.repeat(np.array([0.4, 0.9, 1.6], np.float32), 32)
    # ordered (low T) to disordered (high T) lattices: enough structure for a 1-epoch model to differ by seed
    angles = (rng.normal(0, 1, (len(temps), L, L)) * temps[:, None, None] + rng.uniform(0, 6.28, (len(temps), 1, 1)))
    path = tmp_path_factory.mktemp("e2e") / "train.npz"
    save_dataset(path, angles, temps, {"source": "tests/test_mlflow_server.py"})
    return path


def train_and_promote(data: Path, name: str, seed: int) -> tuple[str, Path]:
    """A tiny real training run logged to the server, registered and promoted to @champion."""
    import torch

    from training.registry import promote
    from training.train import train_model

    torch.set_num_threads(1)
    result = train_model(data, epochs=1, batch_size=32, seed=seed, tracking_uri=MLFLOW_URI, registered_name=name)
    # a 1-epoch model fails the quality gates by design: force past them (the gates have their own tests)
    promoted = promote(name, result.version, alias="champion", force=True, tracking_uri=MLFLOW_URI)
    assert promoted.moved and any(g.name == "onnx_parity" and g.passed for g in promoted.gates), promoted.summary()
    return str(result.version), Path(result.onnx_path)


def reference(onnx_path: Path, lattices: np.ndarray) -> dict[str, np.ndarray]:
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, {"lattice": lattices}), strict=True))


def test_service_follows_champion_on_postgres_backed_mlflow(dataset: Path, tmp_path: Path) -> None:
    name = f"hgvae-e2e-{uuid.uuid4().hex[:8]}"  # the CI database outlives runs: a fresh name per run
    v1, onnx1 = train_and_promote(dataset, name, seed=1)
    assert pg_versions(name) == {int(v1): "champion"}

    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": MLFLOW_URI, "HGVAE_HOME": str(tmp_path)}
    cmd = [sys.executable, "-m", "hgvae", "serve", "--model", f"models:/{name}@champion", "--host", "127.0.0.1",
           "--port", str(port), "--poll-interval", "0.5", "--threads", "1", "--log-format", "text"]
    log = open(tmp_path / "serve.log", "w+")  # noqa: SIM115 - read back on failure
    server = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
    sys.path.insert(0, str(ROOT / "deploy"))
    from healthcheck import check  # the container health check, against the real service

    try:
        deadline = time.monotonic() + 60
        while not check(f"127.0.0.1:{port}", timeout=1.0):
            assert server.poll() is None, "hgvae serve exited: " + (tmp_path / "serve.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "not SERVING after 60 s: " + (tmp_path / "serve.log").read_text()
            time.sleep(0.3)

        rng = np.random.default_rng(5)
        lattices = rng.uniform(0, 2 * np.pi, (4, L, L)).astype(np.float32)
        with ScoringClient(f"127.0.0.1:{port}", timeout=10) as client:
            info = client.model_info(name)
            assert info["version"] == v1 and info["lattice_size"] == L
            got = client.score(lattices, model=name)
            ref1 = reference(onnx1, lattices)
            for out in ("energy", "anomaly_score", "theta", "latent_mean"):
                np.testing.assert_allclose(got[out], ref1[out], rtol=1e-5, atol=1e-5, err_msg=out)

            # keep scoring while the alias moves: no request may fail
            failures: list[str] = []
            served: set[str] = set()
            stop = threading.Event()

            def load() -> None:
                with ScoringClient(f"127.0.0.1:{port}", timeout=10) as c:
                    while not stop.is_set():
                        try:
                            served.add(c.score(lattices[:1], model=name).version)
                        except ScoringError as exc:
                            failures.append(str(exc))

            worker = threading.Thread(target=load, daemon=True)
            worker.start()
            try:
                v2, onnx2 = train_and_promote(dataset, name, seed=2)
                assert v2 != v1
                assert pg_versions(name)[int(v2)] == "champion"
                deadline = time.monotonic() + 30
                while client.model_info(name)["version"] != v2:
                    assert time.monotonic() < deadline, "service did not follow the alias within 30 s"
                    time.sleep(0.2)
                time.sleep(0.3)
            finally:
                stop.set()
                worker.join(timeout=15)
            assert not failures, failures[:3]
            assert {v1, v2} <= served

            got = client.score(lattices, model=name)
            assert got.version == v2
            ref2 = reference(onnx2, lattices)
            for out in ("energy", "anomaly_score", "theta", "latent_mean"):
                np.testing.assert_allclose(got[out], ref2[out], rtol=1e-5, atol=1e-5, err_msg=out)
            # really another model
            assert ref1["latent_mean"].shape != ref2["latent_mean"].shape or not np.allclose(
                ref1["latent_mean"], ref2["latent_mean"])
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            code = server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            code = server.wait()
        log.close()
    assert code == 0, (tmp_path / "serve.log").read_text()[-3000:]
