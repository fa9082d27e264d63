"""A small ONNX graph with the hgvae contract's input, output names/ranks and metadata, built from
plain ONNX ops (no torch, builds in milliseconds).

For tests and benchmarks of code that is generic over the graph (Spark scoring, manifests): it runs
through exactly the code path of the exported HG-VAE. Tests that need the trained model use it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from hgvae.contract import OUTPUT_NAMES

CONTRACT_OUTPUTS = list(OUTPUT_NAMES)


def contract_onnx(path: Path, size: int, latent: int = 4) -> Path:
    """An ONNX graph with the hgvae input/outputs (names, ranks, metadata) built from plain ops.

    The outputs are cheap functions of the input (no physics meaning) with the contract's shapes.
    """
    import onnx
    from onnx import TensorProto, numpy_helper
    from onnx import helper as h

    weights = np.random.default_rng(0).normal(size=(size * size, 2 * latent)).astype(np.float32) / size
    inits = [numpy_helper.from_array(np.array([1, 2], np.int64), "axes"),
             numpy_helper.from_array(np.array([0, -1], np.int64), "flat"),
             numpy_helper.from_array(weights, "w")]
    nodes = [
        h.make_node("Cos", ["lattice"], ["c"]), h.make_node("Sin", ["lattice"], ["s"]),
        h.make_node("Reshape", ["c", "flat"], ["cf"]), h.make_node("MatMul", ["cf", "w"], ["z"]),
        h.make_node("Split", ["z"], ["latent_mean", "latent_logvar"], axis=1, num_outputs=2),
        h.make_node("Add", ["s", "c"], ["theta"]), h.make_node("Abs", ["s"], ["a"]),
        h.make_node("Neg", ["a"], ["na"]), h.make_node("Exp", ["na"], ["sigma"]),
        h.make_node("ReduceMean", ["c", "axes"], ["energy"], keepdims=0),
        h.make_node("ReduceMean", ["s", "axes"], ["energy_recon"], keepdims=0),
        h.make_node("Sub", ["energy_recon", "energy"], ["energy_discrepancy"]),
        h.make_node("ReduceMean", ["sigma", "axes"], ["nll"], keepdims=0),
        h.make_node("ReduceMax", ["s", "axes"], ["vortex_density"], keepdims=0),
        h.make_node("Mul", ["energy_discrepancy", "energy_discrepancy"], ["anomaly_score"]),
        h.make_node("Mul", ["c", "s"], ["anomaly_map"]),
    ]
    b = "batch"
    shapes = {"latent_mean": [b, latent], "latent_logvar": [b, latent], "theta": [b, size, size],
              "sigma": [b, size, size], "anomaly_map": [b, size, size]}
    outputs = [h.make_tensor_value_info(n, TensorProto.FLOAT, shapes.get(n, [b])) for n in CONTRACT_OUTPUTS]
    graph = h.make_graph(nodes, "contract", [h.make_tensor_value_info("lattice", TensorProto.FLOAT, [b, size, size])],
                         outputs, inits)
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.helper.set_model_props(model, {"hgvae.lattice_size": str(size), "hgvae.latent_dim": str(latent),
                                        "hgvae.model_kind": "contract-stand-in", "hgvae.run_id": "",
                                        "hgvae.calibration": "{}", "hgvae.version": "0"})
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path
