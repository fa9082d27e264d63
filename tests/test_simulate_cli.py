"""`hgvae simulate`: output contract, overwrite protection, and one-line errors for bad arguments."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from hgvae.cli import main
from training.dataset import load_dataset

REPO = Path(__file__).resolve().parents[1]
SMALL = ["--size", "4", "--samples", "3", "--quiet"]


def test_writes_dataset(tmp_path: Path) -> None:
    out = tmp_path / "xy.npz"
    assert main(["simulate", *SMALL, "--temperatures", "0.5,1.3", "--seed", "9", "--out", str(out)]) == 0
    ds = load_dataset(out, require_temperature=True)
    assert ds.angles.shape == (6, 4, 4) and ds.angles.dtype == np.float32
    assert np.all((ds.angles >= 0) & (ds.angles < 2 * math.pi))
    assert np.allclose(ds.temperature, [0.5] * 3 + [1.3] * 3)
    md = ds.metadata
    assert md["seed"] == 9 and md["size"] == 4 and len(md["tau"]) == 2
    assert "wolff" in md["algorithm"] and md["sweeps"]["total"] > 0
    assert not [p for p in tmp_path.iterdir() if p.name != "xy.npz"], "no temporary files left behind"


def test_grid_and_same_seed_same_file(tmp_path: Path) -> None:
    a, b = tmp_path / "a.npz", tmp_path / "b.npz"
    args = [*SMALL, "--tmin", "0.2", "--tmax", "1.0", "--ntemps", "3", "--seed", "1"]
    assert main(["simulate", *args, "--out", str(a)]) == 0
    assert main(["simulate", *args, "--out", str(b)]) == 0
    da, db = load_dataset(a), load_dataset(b)
    assert np.allclose(np.unique(da.temperature), [0.2, 0.6, 1.0])
    assert np.array_equal(da.angles, db.angles)


def test_existing_file_needs_force(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "xy.npz"
    out.write_bytes(b"precious")
    assert main(["simulate", *SMALL, "--ntemps", "2", "--out", str(out)]) == 2
    assert "--force" in capsys.readouterr().err
    assert out.read_bytes() == b"precious"
    assert main(["simulate", *SMALL, "--ntemps", "2", "--out", str(out), "--force"]) == 0
    assert load_dataset(out).angles.shape == (6, 4, 4)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--size", "7"], "even"),
        (["--size", "2"], "≥ 4"),
        (["--tmin", "0"], "--tmin"),
        (["--tmin", "-1"], "--tmin"),
        (["--tmin", "1.0", "--tmax", "0.5"], "--tmax"),
        (["--temperatures", "0.5,1", "--tmin", "0.2"], "not both"),
        (["--temperatures", "0.5,abc"], "numbers"),
        (["--temperatures", "0.5,-1"], "> 0"),
        (["--samples", "0"], "--samples"),
        (["--ntemps", "0"], "--ntemps"),
        (["--device", "tpu"], "--device"),
    ],
)
def test_bad_arguments_one_line_error(args: list[str], message: str, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "never.npz"
    assert main(["simulate", *args, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and err.startswith("hgvae simulate: error:")
    assert not out.exists()


def test_unwritable_path_fails_before_simulating(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A huge request with a bad path must fail at once: the path is checked before any Monte Carlo."""
    t0 = time.perf_counter()
    code = main(["simulate", "--size", "1024", "--ntemps", "64", "--samples", "100000",
                 "--out", str(tmp_path / "missing" / "x.npz")])
    assert code == 2 and time.perf_counter() - t0 < 5
    assert "does not exist" in capsys.readouterr().err
    if os.geteuid() != 0:  # root can write anywhere
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        try:
            assert main(["simulate", *SMALL, "--out", str(ro / "x.npz")]) == 2
            assert "not writable" in capsys.readouterr().err
        finally:
            ro.chmod(0o700)


def test_cli_subprocess_no_traceback(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-m", "hgvae", "simulate", "--size", "5", "--out", str(tmp_path / "x.npz")],
                       capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and r.stderr.strip().count("\n") == 0
    h = subprocess.run([sys.executable, "-m", "hgvae", "simulate", "--help"], capture_output=True, text=True,
                       env=env, cwd=tmp_path, timeout=120)
    assert h.returncode == 0 and "--temperatures" in h.stdout and "--force" in h.stdout
