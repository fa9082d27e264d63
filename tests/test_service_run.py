"""`hgvae run`, the main job: reuse an existing champion and serve it (fast), or build one from
nothing on a fresh store (slow: simulation + training)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

import pytest

from tests._service_fixtures import lattices, real_store, reference


def _env(home) -> dict:
    env = {**os.environ, "PYTHONPATH": os.getcwd(), "HGVAE_HOME": str(home)}
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return real_store(tmp_path_factory)  # a real champion in HGVAE_HOME/mlflow.db


def test_second_start_reuses_the_champion_and_prints_a_client_command(store, tmp_path):
    import numpy as np

    from service.client import ScoringClient

    proc = subprocess.Popen(
        [sys.executable, "-m", "hgvae", "run", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(store.home),
    )
    try:
        out = []
        for line in proc.stdout:
            out.append(line)
            if "Ctrl-C" in line:
                break
        text = "".join(out)
        m = re.search(r"on (127\.0\.0\.1:\d+)", text)
        assert m, text
        assert f"version {store.version}" in text and "hgvae score --server" in text and "ScoringClient" in text
        x = lattices(2)
        with ScoringClient(m.group(1)) as c:
            r = c.score(x, outputs=["anomaly_score"])
        assert abs(r["anomaly_score"] - reference(store.onnx_path, x)["anomaly_score"]).max() <= 1e-5
        # The printed commands are pasted as they are into another shell (its own directory).
        pasted = [line.strip() for line in out if " score --server " in line or " -c " in line]
        assert len(pasted) == 2, text
        for command in pasted:
            env = _env(store.home)
            done = subprocess.run(command, shell=True, capture_output=True, text=True, env=env, cwd=tmp_path)
            assert done.returncode == 0, (command, done.stderr)
        with np.load(tmp_path / "scores.npz") as scores:
            n = len(scores["anomaly_score"])
            assert n > 0 and scores["theta"].shape == (n, store.lattice_size, store.lattice_size)
            assert np.isfinite(scores["energy"]).all()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        err = proc.stderr.read()
        assert "reusing hgvae@champion" in err and "Traceback" not in err and "simulating" not in err
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.slow
def test_fresh_store_trains_and_promotes_a_default_model(tmp_path):
    from hgvae.commands.run import champion_version

    args = ["--size", "8", "--samples", "16", "--epochs", "1", "--no-serve"]
    proc = subprocess.run(
        [sys.executable, "-m", "hgvae", "run", *args], capture_output=True, text=True, env=_env(tmp_path), timeout=600
    )
    assert proc.returncode == 0, proc.stderr
    assert champion_version(f"sqlite:///{tmp_path / 'mlflow.db'}") is not None
    assert (tmp_path / "default-L8.npz").is_file()
    again = subprocess.run(
        [sys.executable, "-m", "hgvae", "run", *args], capture_output=True, text=True, env=_env(tmp_path), timeout=120
    )
    assert again.returncode == 0 and "reusing hgvae@champion" in again.stderr
