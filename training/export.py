"""Export one self-contained ONNX graph: the VAE plus the physics head and the calibrated anomaly score.

Input `lattice` float32 [batch, L, L] (radians, any real value, taken mod 2π). Outputs, in order,
are OUTPUT_NAMES (the contract in design.md). The physics head is computed in-graph from
training.physics, so the service needs no physics code and gets identical numbers everywhere.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import hgvae
from hgvae.contract import INPUT_NAME, OUTPUT_NAMES
from training import physics
from training.anomaly import AnomalyHead, Calibration
from training.model import XYVAE, wrapped_normal_nll

TWO_PI = 2.0 * math.pi

OPSET = 18
ANGLE_OUTPUTS = ("theta",)  # compare these on the circle (a value at the 2π cut may come back as 0)


class ScoringGraph(nn.Module):
    """lattice [B, L, L] → the eleven contract outputs (deterministic: z = μ)."""

    def __init__(self, model: XYVAE, calibration: Calibration) -> None:
        super().__init__()
        self.model = model.eval()
        self.anomaly = AnomalyHead(calibration)

    def forward(self, lattice: torch.Tensor) -> tuple[torch.Tensor, ...]:
        theta = torch.remainder(lattice, TWO_PI)
        mu, logvar = self.model.encode(theta)
        theta_hat, sigma = self.model.decoder(mu)
        energy = physics.energy_per_site(theta)
        energy_recon = physics.expected_energy_per_site(theta_hat, sigma)
        nll = wrapped_normal_nll(theta, theta_hat, sigma).mean(dim=(-2, -1))
        vortex = physics.vortex_density(theta)
        score, amap = self.anomaly(theta, theta_hat, sigma, energy)
        return (mu, logvar, theta_hat, sigma, energy, energy_recon, energy_recon - energy, nll, vortex, score, amap)

    @torch.no_grad()
    def score(self, angles: np.ndarray, batch: int = 512) -> dict[str, np.ndarray]:
        """Run the torch graph on numpy angles; returns {output name: array}."""
        parts: list[tuple[torch.Tensor, ...]] = []
        for i in range(0, len(angles), batch):
            parts.append(self(torch.as_tensor(np.asarray(angles[i : i + batch], dtype=np.float32))))
        return {name: torch.cat([p[k] for p in parts]).numpy() for k, name in enumerate(OUTPUT_NAMES)}


def metadata(graph: ScoringGraph, run_id: str | None, extra: dict[str, str] | None = None) -> dict[str, str]:
    cfg = graph.model.cfg
    cal = graph.anomaly
    meta = {
        "hgvae.lattice_size": str(cfg.lattice_size),
        "hgvae.model_kind": cfg.kind,
        "hgvae.latent_dim": str(cfg.latent_dim),
        "hgvae.run_id": run_id or "",
        "hgvae.calibration": cal.calibration_json,
        "hgvae.version": hgvae.__version__,
        "hgvae.outputs": ",".join(OUTPUT_NAMES),
        "hgvae.model_config": json.dumps(cfg.to_dict()),
    }
    meta.update(extra or {})
    return meta


def export_onnx(
    graph: ScoringGraph,
    path: str | os.PathLike,
    run_id: str | None = None,
    extra_metadata: dict[str, str] | None = None,
) -> Path:
    """Write the ONNX graph (dynamic batch, opset 18, checked) with hgvae.* metadata_props; atomic."""
    import onnx

    path = Path(path)
    L = graph.model.cfg.lattice_size
    example = torch.rand(2, L, L) * TWO_PI
    graph = graph.eval()
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw.onnx"
        # The TorchScript exporter gives a compact graph with a symbolic batch dimension here; the
        # dynamo exporter also works on torch 2.13 but emits far more nodes for the same model.
        torch.onnx.export(
            graph,
            (example,),
            str(raw),
            input_names=[INPUT_NAME],
            output_names=list(OUTPUT_NAMES),
            dynamic_axes={INPUT_NAME: {0: "batch"}, **{n: {0: "batch"} for n in OUTPUT_NAMES}},
            opset_version=OPSET,
            dynamo=False,
            do_constant_folding=True,
        )
        proto = onnx.load(str(raw))
    del proto.metadata_props[:]
    for k, v in metadata(graph, run_id, extra_metadata).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, v
    proto.doc_string = "hgvae scoring graph: VAE + XY physics head + calibrated anomaly score"
    onnx.checker.check_model(proto, full_check=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_path = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        onnx.save(proto, tmp_path)
        os.replace(tmp_path, path)
    except BaseException:
        Path(tmp_path).unlink(missing_ok=True)
        raise
    return path


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return dict(sess.get_modelmeta().custom_metadata_map)


def run_onnx(path: str | os.PathLike, angles: np.ndarray, batch: int = 512) -> dict[str, np.ndarray]:
    """Score angles with onnxruntime only (no torch needed)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    parts = []
    for i in range(0, len(angles), batch):
        x = np.ascontiguousarray(angles[i : i + batch], dtype=np.float32)
        parts.append(sess.run(list(OUTPUT_NAMES), {INPUT_NAME: x}))
    return {name: np.concatenate([p[k] for p in parts]) for k, name in enumerate(OUTPUT_NAMES)}


def output_differences(
    a: dict[str, np.ndarray], b: dict[str, np.ndarray], names: Sequence[str] = OUTPUT_NAMES
) -> dict[str, float]:
    """Max |a − b| / max(1, |b|) per output: absolute for values up to 1, relative above (a z-score of a
    gross defect can reach hundreds, where float32 carries ~1e-5 relative); angles compared on the circle."""
    out = {}
    for n in names:
        ref = b[n].astype(np.float64)
        d = np.abs(a[n].astype(np.float64) - ref)
        if n in ANGLE_OUTPUTS:
            d = np.minimum(d, TWO_PI - d)
        d = d / np.maximum(1.0, np.abs(ref))
        out[n] = float(d.max()) if d.size else 0.0
    return out


def signature_inputs(L: int) -> Any:
    """MLflow model signature for the graph (tensor spec, dynamic batch)."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    shapes = {
        "latent_mean": (-1, -1),
        "latent_logvar": (-1, -1),
        "theta": (-1, L, L),
        "sigma": (-1, L, L),
        "anomaly_map": (-1, L, L),
    }
    outputs = [TensorSpec(np.dtype(np.float32), shapes.get(n, (-1,)), n) for n in OUTPUT_NAMES]
    return ModelSignature(Schema([TensorSpec(np.dtype(np.float32), (-1, L, L), INPUT_NAME)]), Schema(outputs))
