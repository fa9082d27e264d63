"""Acceptance table of trained models (issue 3/5 model criteria) on an independent test set, per temperature.

For each ONNX scoring graph (a local .onnx, e.g. the `model/model.onnx` kept by `hgvae train --out`),
runs the test set through onnxruntime (the artifact the service scores with) and prints per T:
|Δe|/|e|, vortex density of the input, of one sampled reconstruction θ + σ·ε at the latent mean and of
θ itself, the mean σ, and for T ≤ 1 the vortex recall/precision of θ against the energy-quenched input.
Definitions are `training.train.quality_table`'s, which follow `training.analysis` (`hgvae analyze`).

    PYTHONPATH=. python benchmarks/model_quality.py --data test.npz model_a.onnx [model_b.onnx ...] [--json out.json]

Criteria: (1) mean |Δe|/|e| over T ≤ 1% and ≤ 3% at every T (HG-VAE); (2) sampled vortex density within
20% of the input's at every T ≥ 0.9; (3) recall ≥ 0.8 for T ≤ 1.0 (L = 32). Exit code 0 either way.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from training.dataset import load_dataset  # noqa: E402
from training.export import read_metadata, run_onnx  # noqa: E402
from training.train import format_quality, quality_table  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+", help="ONNX scoring graphs (.onnx)")
    ap.add_argument("--data", required=True, help="test set .npz (angles, temperature), not used in training")
    ap.add_argument("--seed", type=int, default=0, help="seed of the sampled reconstructions (default 0)")
    ap.add_argument(
        "--seeds", type=int, default=1, help="also repeat criterion (2) over this many sampling seeds (default 1)"
    )
    ap.add_argument("--json", default=None, help="also write the tables as JSON here")
    args = ap.parse_args()
    torch.set_num_threads(1)
    ds = load_dataset(args.data)
    if ds.temperature is None:
        print("the test set has no temperatures", file=sys.stderr)
        return 2
    out = {}
    for path in args.models:
        meta = read_metadata(path)
        if int(meta.get("hgvae.lattice_size", ds.size)) != ds.size:
            print(f"skip {path}: L = {meta.get('hgvae.lattice_size')} vs data L = {ds.size}")
            continue
        outputs = run_onnx(path, ds.angles)
        q = quality_table(outputs, ds.angles, ds.temperature, seed=args.seed)
        cfg = json.loads(meta.get("hgvae.model_config", "{}"))
        title = (
            f"== {path}\n   kind {meta.get('hgvae.model_kind')}, L = {ds.size}, latent {cfg.get('latent', '?')} "
            f"{meta.get('hgvae.latent_dim')}, test set {args.data} ({len(ds)} configurations, "
            f"{len(np.unique(ds.temperature))} temperatures)"
        )
        print(format_quality(q, title), flush=True)
        if args.seeds > 1:
            gaps = [
                quality_table(outputs, ds.angles, ds.temperature, seed=args.seed + k)["vortex_max_gap_T_ge_0.9"]
                for k in range(args.seeds)
            ]
            q["vortex_max_gap_over_seeds"] = gaps
            print(f"(2) over {args.seeds} sampling seeds: worst |ratio − 1| at T ≥ 0.9 = "
                  + ", ".join(f"{g:.3f}" for g in gaps))  # fmt: skip
        print()
        out[path] = {"model_kind": meta.get("hgvae.model_kind"), "lattice_size": ds.size, **q}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1, default=float)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
