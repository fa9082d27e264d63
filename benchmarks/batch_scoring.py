"""Batch scoring throughput: local (`hgvae score`, in-process onnxruntime) vs Spark local[2], same input.

    python benchmarks/batch_scoring.py [--n 100000] [--size 32] [--model URI|.onnx] [--outputs scalars|all|a,b]
    python benchmarks/batch_scoring.py --n 20000 --batch-size 16,64,256 --outputs all --threads 1,2   # the sweep
                                                                          behind `hgvae score --batch-size`

Both engines score the same N random L x L lattices (the local engine from .npz, Spark from Parquet) with
the same model and outputs, writing their output files; times include reading and writing. Local runs
with 2 onnxruntime threads (--threads 1,2 adds one); Spark local[2] runs two tasks of one thread each.
The Spark JVM start is reported apart (paid once per application, not per job); the first job is
"cold" (JIT, Python workers starting), --warm times a second job on the same session.

Spark overhead ratio = local lattices/s (2 threads) / Spark lattices/s on the same two cores: 1.0 means
Spark costs nothing; above 1 is what Arrow transfer, Python workers and Parquet cost on one machine.
On a cluster Spark's rate scales with executors, which the local engine cannot.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SCALARS = ["latent_mean", "latent_logvar", "energy", "energy_recon", "energy_discrepancy", "nll",
           "vortex_density", "anomaly_score"]


def resolve_model(spec: str | None, size: int, tmp: Path) -> tuple[Path, str]:
    """A local .onnx for `spec`; by default the real HG-VAE architecture, trained for one epoch on a small
    simulated L x L set (throughput does not depend on how well it is trained)."""
    if spec:
        from service.spark_scoring import load_model_bytes

        data, source = load_model_bytes(spec)
        path = tmp / "model.onnx"
        path.write_bytes(data)
        return path, source
    import torch

    from training.montecarlo import simulate
    from training.train import train_model

    torch.set_num_threads(2)
    t0 = time.perf_counter()
    data = simulate(size=size, temperatures=[0.5, 0.9, 1.3], samples=32, seed=0)
    result = train_model(data, epochs=1, batch_size=32, tracking_uri=f"sqlite:///{tmp / 'mlflow.db'}",
                         registered_name="hgvae-bench")
    return Path(result.onnx_path), (f"HG-VAE, L={size}, 1 epoch on {len(data.angles)} simulated lattices "
                                    f"(built in {time.perf_counter() - t0:.0f} s)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000, help="lattices (default 100000)")
    parser.add_argument("--size", type=int, default=32, help="lattice size L (default 32)")
    parser.add_argument("--model", help="models:/..., runs:/... or .onnx (default: see resolve_model)")
    parser.add_argument("--outputs", default="scalars",
                        help="'scalars' (per-lattice numbers + latents, default), 'all' (adds the three L x L "
                             "maps: ~12 KB per lattice more output) or a comma list")
    parser.add_argument("--batch-size", default="16",
                        help="lattices per onnxruntime call, both engines; a comma list (e.g. 16,64,256) sweeps them")
    parser.add_argument("--master", default="local[2]")
    parser.add_argument("--workdir", help="where the data goes (default: a temp dir, removed after)")
    parser.add_argument("--threads", default="2", help="local engine onnxruntime thread counts, e.g. 1,2 (default 2)")
    parser.add_argument("--warm", action="store_true", help="also time a second Spark job on the warm session")
    parser.add_argument("--no-spark", action="store_true", help="local engine only")
    args = parser.parse_args()
    sizes = [int(b) for b in args.batch_size.split(",")]
    warm = args.warm or len(sizes) > 1  # a sweep compares warm jobs (the cold one pays JVM/worker start-up)
    outputs = None if args.outputs == "all" else SCALARS if args.outputs == "scalars" else args.outputs.split(",")

    import pyarrow.parquet as pq

    from service.batch import local_scorer, score_file
    from service.runtime import OnnxModel
    from service.spark_scoring import score_parquet, spark_session, write_lattices_parquet

    tmp = Path(args.workdir or tempfile.mkdtemp(prefix="hgvae-bench-"))
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        model_path, model_desc = resolve_model(args.model, args.size, tmp)
        rng = np.random.default_rng(0)
        t0 = time.perf_counter()
        angles = rng.uniform(0, 2 * np.pi, size=(args.n, args.size, args.size)).astype(np.float32)
        temperature = rng.uniform(0.5, 1.5, size=args.n).astype(np.float32)
        np.savez(tmp / "lattices.npz", angles=angles, temperature=temperature)
        write_lattices_parquet(tmp / "lattices.parquet", angles, temperature)
        print(f"data: {args.n} lattices L={args.size} ({angles.nbytes / 2**20:.0f} MiB of angles), "
              f"written in {time.perf_counter() - t0:.1f} s")
        print(f"model: {model_desc}; outputs: {args.outputs}; cores: {os.cpu_count()}")
        del angles

        rates: dict[str, float] = {}
        for batch in sizes:
            for threads in sorted({int(t) for t in args.threads.split(",")} | {2}):
                model = OnnxModel(model_path, "hgvae", "1", intra_op_threads=threads, device="cpu")
                model.load()
                t0 = time.perf_counter()
                score_file(tmp / "lattices.npz", tmp / f"scores-{threads}.npz", local_scorer(model, outputs),
                           batch, True, {}, False)
                seconds = time.perf_counter() - t0
                rates[f"local {threads} thread{'s' if threads > 1 else ''} b{batch}"] = args.n / seconds
                print(f"local, batch {batch}, {threads} onnxruntime thread(s): {seconds:7.1f} s  "
                      f"{args.n / seconds:9.0f} lattices/s  (load {os.getloadavg()[0]:.1f})")
        if args.no_spark:
            return 0

        t0 = time.perf_counter()
        spark = spark_session(args.master, {"spark.ui.showConsoleProgress": "false",
                                            "spark.driver.memory": "2g"})
        start_s = time.perf_counter() - t0
        # first job: cold JVM code paths and Python workers (what one `hgvae score --engine spark` pays);
        # later jobs: warm, the steady state of a long job or a session that scores many inputs
        jobs = [("cold", sizes[0])] + ([("warm", b) for b in sizes] if warm else [])
        for run, batch in jobs:
            result = score_parquet(tmp / "lattices.parquet", tmp / "scores.parquet", str(model_path), spark=spark,
                                   outputs=outputs, batch_size=batch, overwrite=True)
            assert result.rows == args.n, result.rows
            rates[f"spark {run} b{batch}"] = result.rows_per_second
            note = f" (JVM start {start_s:.1f} s not counted)" if run == "cold" else ""
            print(f"spark {args.master}, batch {batch}, {run} job{note}: {result.seconds:7.1f} s  "
                  f"{result.rows_per_second:9.0f} lattices/s  (load {os.getloadavg()[0]:.1f})")
        spark.stop()

        # same numbers from both engines (first rows; ids are the input row numbers)
        local = np.load(tmp / "scores-2.npz")
        table = pq.read_table(tmp / "scores.parquet", columns=["id", "energy"]).to_pandas().sort_values("id")
        np.testing.assert_allclose(table["energy"].to_numpy()[:1000], local["energy"][:1000], atol=1e-5)

        b = sizes[0]
        ratios = ", ".join(f"{rates[f'local 2 threads b{b}'] / rates[f'spark {run} b{b}']:.2f} {run}"
                           for run in ("cold", "warm") if f"spark {run} b{b}" in rates)
        print(f"\nSpark overhead ratio (batch {b}) = local 2 threads / spark {args.master} lattices/s: {ratios} "
              f"(cold = first job of a new session)")
        print(f"load average during the run: {os.getloadavg()[0]:.1f} (other processes share these cores)")
    finally:
        if not args.workdir:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
