"""Execution-provider choice: CUDA only when it actually runs, else CPU, with one log line that says why
and none of onnxruntime's own error lines (an onnxruntime-gpu install on a machine without a GPU or
without CUDA libraries must stay quiet)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from service.runtime import provider_library_error


def test_probe_names_what_is_missing(tmp_path: Path) -> None:
    assert "is missing" in (provider_library_error(tmp_path) or "")
    name = "onnxruntime_providers_cuda.dll" if sys.platform == "win32" else "libonnxruntime_providers_cuda.so"
    (tmp_path / name).write_bytes(b"not a shared library")
    reason = provider_library_error(tmp_path) or ""
    assert reason.startswith(f"{name} does not load:") and len(reason) > len(name) + 15  # the loader's own words


def tiny_model(path: Path) -> Path:
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=8), str(path))
    return path


def test_cuda_build_without_a_usable_gpu_falls_back_quietly(tmp_path: Path) -> None:
    """Runs where onnxruntime-gpu is installed (the CUDA image, a GPU workstation); skipped with the CPU build."""
    ort = pytest.importorskip("onnxruntime")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("this onnxruntime build has no CUDA provider")
    model = tiny_model(tmp_path / "m.onnx")
    script = textwrap.dedent(
        f"""
        import logging, sys
        logging.basicConfig(level=logging.INFO, format="%(message)s %(reason)s", stream=sys.stdout)
        from service.runtime import create_session
        sess = create_session({str(model)!r}, "auto")
        print("PROVIDER", sess.get_providers()[0])
        """
    )
    run = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert run.returncode == 0, run.stderr
    provider = run.stdout.split("PROVIDER ")[-1].strip()
    if provider == "CUDAExecutionProvider":
        pytest.skip("a GPU is usable here: nothing falls back")
    assert provider == "CPUExecutionProvider"
    assert "using CPUExecutionProvider" in run.stdout  # the choice and its reason, once
    assert "onnxruntime" not in run.stderr and "ERROR" not in run.stderr.upper(), run.stderr
