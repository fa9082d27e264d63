"""`hgvae simulate`: equilibrated XY-model configurations into one .npz data set."""

from __future__ import annotations

import argparse
import math

from hgvae.cli import UsageError

DEFAULT_SIZE = 16
DEFAULT_TMIN, DEFAULT_TMAX, DEFAULT_NTEMPS = 0.1, 2.0, 32
DEFAULT_SAMPLES = 64


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "simulate",
        help="generate equilibrated XY-model configurations (Monte Carlo) into a .npz data set",
        description=(
            "Monte Carlo for the 2D XY model (Wolff clusters + checkerboard Metropolis + over-relaxation), "
            "all temperatures advancing together. Samples are spaced by at least 2 integrated autocorrelation "
            "times of the energy; algorithm, sweeps, τ and seed are stored in the file's metadata."
        ),
    )
    p.add_argument(
        "--size", "-L", type=int, default=DEFAULT_SIZE, help=f"lattice size L, even, ≥ 4 (default {DEFAULT_SIZE})"
    )
    p.add_argument("--temperatures", type=str, default=None, help="comma-separated temperatures, e.g. 0.5,0.9,1.3")
    p.add_argument("--tmin", type=float, default=None, help=f"lowest temperature of a grid (default {DEFAULT_TMIN})")
    p.add_argument("--tmax", type=float, default=None, help=f"highest temperature of a grid (default {DEFAULT_TMAX})")
    p.add_argument("--ntemps", type=int, default=None, help=f"number of grid temperatures (default {DEFAULT_NTEMPS})")
    p.add_argument(
        "--samples",
        "-n",
        type=int,
        default=DEFAULT_SAMPLES,
        help=f"configurations per temperature (default {DEFAULT_SAMPLES})",
    )
    p.add_argument("--seed", type=int, default=0, help="random seed: same seed, same arrays (default 0)")
    p.add_argument("--device", type=str, default="cpu", help="cpu (numba kernels) or cuda[:k] (torch) (default cpu)")
    p.add_argument("--out", "-o", type=str, default="xy.npz", help="output .npz path (default xy.npz)")
    p.add_argument("--force", action="store_true", help="overwrite an existing output file")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar or summary")
    p.set_defaults(func=run)


def parse_temperatures(args: argparse.Namespace) -> list[float]:
    """Either an explicit list or a tmin/tmax/ntemps grid, never both."""
    grid_given = any(v is not None for v in (args.tmin, args.tmax, args.ntemps))
    if args.temperatures is not None:
        if grid_given:
            raise UsageError("give either --temperatures or --tmin/--tmax/--ntemps, not both")
        try:
            temps = [float(t) for t in args.temperatures.split(",") if t.strip()]
        except ValueError:
            raise UsageError(f"--temperatures must be comma-separated numbers, got {args.temperatures!r}") from None
        if not temps:
            raise UsageError("--temperatures is empty")
        if any(not math.isfinite(t) or t <= 0 for t in temps):
            raise UsageError(f"temperatures must be finite and > 0, got {args.temperatures}")
        return temps
    tmin = DEFAULT_TMIN if args.tmin is None else args.tmin
    tmax = DEFAULT_TMAX if args.tmax is None else args.tmax
    ntemps = DEFAULT_NTEMPS if args.ntemps is None else args.ntemps
    if not math.isfinite(tmin) or tmin <= 0:
        raise UsageError(f"--tmin must be > 0, got {tmin}")
    if not math.isfinite(tmax) or tmax < tmin:
        raise UsageError(f"--tmax must be ≥ --tmin ({tmin}), got {tmax}")
    if ntemps < 1:
        raise UsageError(f"--ntemps must be ≥ 1, got {ntemps}")
    if ntemps == 1:
        return [tmin]
    return [tmin + (tmax - tmin) * k / (ntemps - 1) for k in range(ntemps)]


def run(args: argparse.Namespace) -> int:
    if args.size < 4:
        raise UsageError(f"--size must be ≥ 4, got {args.size}")
    if args.size % 2:
        raise UsageError(f"--size must be even (checkerboard updates), got {args.size}")
    if args.samples < 1:
        raise UsageError(f"--samples must be ≥ 1, got {args.samples}")
    temps = parse_temperatures(args)
    if not (args.device == "cpu" or args.device.startswith("cuda")):
        raise UsageError(f"--device must be cpu or cuda[:k], got {args.device!r}")

    from training.dataset import DatasetError, check_writable, save_dataset

    try:  # before hours of simulation, not after
        out = check_writable(args.out, force=args.force)
    except DatasetError as exc:
        raise UsageError(str(exc)) from None
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise UsageError(f"--device {args.device}: CUDA is not available on this machine")

    from training.montecarlo import simulate

    ds = simulate(args.size, temps, args.samples, seed=args.seed, device=args.device, progress=not args.quiet)
    try:
        save_dataset(out, ds.angles, ds.temperature, ds.metadata, force=args.force)
    except (DatasetError, OSError) as exc:
        raise UsageError(f"cannot write {out}: {exc}") from None
    if not args.quiet:
        md = ds.metadata
        print(
            f"wrote {out}: {len(ds)} configurations, L={args.size}, {len(temps)} temperatures, "
            f"{md['sweeps']['total']} sweeps ({md['algorithm']}), spacing {md['sweeps']['spacing']} sweeps, "
            f"max τ {max(md['tau']):.2f}, {md['seconds']:.1f} s"
        )
    return 0
