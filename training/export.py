"""Export one self-contained ONNX graph: the VAE plus the physics head and the calibrated anomaly score.

Input `lattice` float32 [batch, L, L] (radians, any real value, taken mod 2π) and the OPTIONAL input
`temperature` float32 [batch] or [1] (nominal temperature; an initializer with default NaN, so it may
be omitted; NaN or ≤ 0 = unknown). Only the anomaly score and map depend on it. Outputs, in order,
are OUTPUT_NAMES (the contract in design.md). The physics head is computed in-graph from
training.physics, so the service needs no physics code and gets identical numbers everywhere.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import hgvae
from hgvae.contract import INPUT_NAME, OUTPUT_NAMES, TEMPERATURE_INPUT
from training import physics
from training.anomaly import AnomalyHead, Calibration
from training.model import XYVAE, ModelConfig, wrapped_normal_nll

TWO_PI = 2.0 * math.pi

OPSET = 18
ANGLE_OUTPUTS = ("theta",)  # compare these on the circle (a value at the 2π cut may come back as 0)


class ScoringGraph(nn.Module):
    """lattice [B, L, L] → the eleven contract outputs (deterministic: z = μ)."""

    def __init__(self, model: XYVAE, calibration: Calibration) -> None:
        super().__init__()
        self.model = model.eval()
        self.anomaly = AnomalyHead(calibration)

    def forward(self, lattice: torch.Tensor, temperature: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        theta = torch.remainder(lattice, TWO_PI)
        mu, logvar = self.model.encode(theta)
        theta_hat, sigma = self.model.decoder(mu)
        energy = physics.energy_per_site(theta)
        energy_recon = physics.expected_energy_per_site(theta_hat, sigma)
        nll = wrapped_normal_nll(theta, theta_hat, sigma).mean(dim=(-2, -1))
        vortex = physics.vortex_density(theta)
        score, amap = self.anomaly(theta, theta_hat, sigma, energy, temperature)
        return (mu, logvar, theta_hat, sigma, energy, energy_recon, energy_recon - energy, nll, vortex, score, amap)

    @torch.no_grad()
    def score(
        self, angles: np.ndarray, batch: int = 512, temperature: np.ndarray | float | None = None
    ) -> dict[str, np.ndarray]:
        """Run the torch graph on numpy angles (and nominal temperatures); returns {output name: array}."""
        parts: list[tuple[torch.Tensor, ...]] = []
        temps = _temperature_array(temperature, len(angles))
        for i in range(0, len(angles), batch):
            t = None if temps is None else torch.as_tensor(temps if len(temps) == 1 else temps[i : i + batch])
            parts.append(self(torch.as_tensor(np.asarray(angles[i : i + batch], dtype=np.float32)), t))
        return {name: torch.cat([p[k] for p in parts]).numpy() for k, name in enumerate(OUTPUT_NAMES)}


def _temperature_array(temperature: np.ndarray | float | None, n: int) -> np.ndarray | None:
    """None, a scalar (one nominal T for all) or one value per configuration → float32 [1] or [n]."""
    if temperature is None:
        return None
    t = np.asarray(temperature, dtype=np.float32).reshape(-1)
    if len(t) not in (1, n):
        raise ValueError(f"temperature has {len(t)} values for {n} configurations (give 1 or {n})")
    return t


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
        "hgvae.inputs": f"{INPUT_NAME},{TEMPERATURE_INPUT}?",
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
    example_t = torch.tensor([0.5, float("nan")])  # one known, one unknown: both branches stay in the graph
    graph = graph.eval()
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw.onnx"
        with warnings.catch_warnings():
            # The tracer warns where window counts and lattice sizes become Python floats (log n):
            # those are fixed for a given model, so baking them in as constants is what we want.
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            _export(graph, example, example_t, raw)
        proto = onnx.load(str(raw))
    _make_temperature_optional(proto)
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


def _make_temperature_optional(proto: Any) -> None:
    """Give the `temperature` input an initializer (NaN = unknown): an ONNX graph input that also has
    an initializer is optional, its value the default (onnxruntime: an "overridable initializer")."""
    import onnx
    from onnx import numpy_helper

    names = [i.name for i in proto.graph.input]
    if TEMPERATURE_INPUT not in names:
        # A calibration without temperatures does not read the input, and the exporter drops an unused
        # input; declare it anyway so every graph accepts the same feeds (it is then ignored).
        proto.graph.input.append(
            onnx.helper.make_tensor_value_info(TEMPERATURE_INPUT, onnx.TensorProto.FLOAT, ["temperature_batch"])
        )
    init = numpy_helper.from_array(np.array([np.nan], dtype=np.float32), TEMPERATURE_INPUT)
    proto.graph.initializer.append(init)
    # Keep the graph inputs in contract order (lattice first), IR ≥ 4 allows an input with an initializer.
    proto.ir_version = max(proto.ir_version, onnx.IR_VERSION_2017_11_3)


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return dict(sess.get_modelmeta().custom_metadata_map)


def scoring_graph_from_onnx(path: str | os.PathLike, calibration: Calibration | None = None) -> ScoringGraph:
    """Rebuild the torch ScoringGraph of an exported graph: the network's weights are the ONNX initializers
    named model.*, its config and calibration are in the metadata. Lets a trained model be re-exported
    with a changed anomaly head (or a new `calibration`) without training it again."""
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(path))
    meta = {p.key: p.value for p in proto.metadata_props}
    model = XYVAE(ModelConfig(**json.loads(meta["hgvae.model_config"])))
    weights = {
        init.name.removeprefix("model."): torch.as_tensor(numpy_helper.to_array(init).copy())
        for init in proto.graph.initializer
        if init.name.startswith("model.")
    }
    model.load_state_dict(weights, strict=True)
    return ScoringGraph(model, calibration or Calibration.from_json(meta["hgvae.calibration"]))


def run_onnx(
    path: str | os.PathLike,
    angles: np.ndarray,
    batch: int = 512,
    temperature: np.ndarray | float | None = None,
) -> dict[str, np.ndarray]:
    """Score angles with onnxruntime only (no torch needed); `temperature` (scalar or per configuration)
    is fed to the optional input, None leaves it out."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3  # the optional `temperature` input makes onnxruntime warn at every load
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    temps = _temperature_array(temperature, len(angles))
    parts = []
    for i in range(0, len(angles), batch):
        feed = {INPUT_NAME: np.ascontiguousarray(angles[i : i + batch], dtype=np.float32)}
        if temps is not None:
            feed[TEMPERATURE_INPUT] = temps if len(temps) == 1 else temps[i : i + batch]
        parts.append(sess.run(list(OUTPUT_NAMES), feed))
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


def _export(graph: nn.Module, example: torch.Tensor, example_t: torch.Tensor, raw: Path) -> None:
    # The TorchScript exporter gives a compact graph with a symbolic batch dimension here; the
    # dynamo exporter also works on torch 2.13 but emits far more nodes for the same model.
    torch.onnx.export(
        graph,
        (example, example_t),
        str(raw),
        input_names=[INPUT_NAME, TEMPERATURE_INPUT],
        output_names=list(OUTPUT_NAMES),
        dynamic_axes={
            INPUT_NAME: {0: "batch"},
            TEMPERATURE_INPUT: {0: "temperature_batch"},  # [batch] or [1]
            **{n: {0: "batch"} for n in OUTPUT_NAMES},
        },
        opset_version=OPSET,
        dynamo=False,
        do_constant_folding=True,
    )
