"""Training throughput of the HG-VAE and its plain-VAE baseline (samples per second, per epoch).

The plain VAE measured in the same run is the baseline: the ratio says what the energy term costs.
Also prints the projected wall time of the default small run (L = 16, 32 temperatures × 64 samples,
default epochs), the "≤ 3 minutes on a 2-core CPU" budget.

    PYTHONPATH=. python benchmarks/training.py [--data PATH] [--epochs 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from training.dataset import load_dataset  # noqa: E402
from training.train import DEFAULTS, Hyper, fit, model_config, tiny_dataset  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=None, help="data set .npz (default: synthetic spin waves, L=16, 2048 configs)")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ds = load_dataset(args.data) if args.data else tiny_dataset(L=16, temperatures=32, samples=64)
    L = ds.size
    load = os.getloadavg()[0]
    print(f"L={L}, {len(ds)} configurations, {args.epochs} epochs, torch threads={args.threads}, "
          f"CPUs={os.cpu_count()}, load average at start {load:.2f}")  # fmt: skip
    rates: dict[str, list[float]] = {}
    for kind in ("vae", "hgvae"):
        hp = Hyper(epochs=args.epochs)
        cfg = model_config(L, kind, hp)
        t0 = time.perf_counter()
        _, hist = fit(ds.angles, cfg, hp)
        rates[kind] = [h["samples_per_s"] for h in hist]
        per_epoch = ", ".join(f"{r:.0f}" for r in rates[kind])
        print(f"{kind:6s} samples/s per epoch: {per_epoch}  (total {time.perf_counter() - t0:.1f} s)")
    base, hg = np.median(rates["vae"]), np.median(rates["hgvae"])
    print(f"ratio hgvae/vae (median samples/s): {hg / base:.3f}")
    default_samples = 32 * 64 * (1 - Hyper().val_fraction) * DEFAULTS["epochs"]
    print(f"projected default run (32×64 configs, {DEFAULTS['epochs']} epochs, hgvae): "
          f"{default_samples / hg:.0f} s of training at the median rate")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
