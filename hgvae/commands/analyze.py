"""`hgvae analyze`: the physics evidence report (report.md, summary.json, PNG figures)."""

from __future__ import annotations

import argparse

from hgvae.cli import UsageError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "analyze",
        help="physics evidence report: transition temperature, energy faithfulness, vortices vs spin waves",
        description=(
            "Run models (exported ONNX graphs) over Monte Carlo data sets and write report.md, summary.json and "
            "PNG figures: per-temperature tables, the transition temperature from the helicity modulus, from "
            "the latent space and by finite-size extrapolation, and the spin-wave/vortex separation test. The "
            "report is also logged to each model's MLflow run when its tracking store is reachable."
        ),
    )
    p.add_argument(
        "--data",
        action="append",
        required=True,
        metavar="PATH",
        help="data set (.npz with temperatures); repeat for several files / lattice sizes",
    )
    p.add_argument(
        "--model",
        action="append",
        default=[],
        metavar="URI",
        help="model: a .onnx path, models:/hgvae@champion, models:/hgvae/3 or runs:/<id>; repeat "
        "(e.g. the HG-VAE and the plain VAE). Without models only the Monte Carlo part runs",
    )
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (created)")
    p.add_argument(
        "--tracking-uri", default=None, help="MLflow tracking URI (default: MLFLOW_TRACKING_URI or the local store)"
    )
    p.add_argument(
        "--per-temperature",
        type=int,
        default=400,
        help="model evaluation uses at most this many samples per temperature (default 400; 0 = all)",
    )
    p.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples for the errors (default 200)")
    p.add_argument("--seed", type=int, default=0, help="seed for subsampling, bootstrap and sampled reconstructions")
    p.add_argument(
        "--quench-steps",
        type=int,
        default=None,
        help="gradient-descent steps of the quench (default 15: pairs closer than ~3 plaquettes annihilate)",
    )
    p.add_argument(
        "--vortex-tolerance",
        type=float,
        default=None,
        help="vortex position tolerance in plaquettes for precision/recall (default 1.5)",
    )
    p.add_argument("--vortex-tmax", type=float, default=1.0, help="vortex comparison at T ≤ this (default 1.0)")
    p.add_argument("--sigma-fit-tmax", type=float, default=0.8, help="fit σ²(T) at T ≤ this (default 0.8)")
    p.add_argument("--no-mlflow", action="store_true", help="do not log the report to the models' MLflow runs")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar or summary")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from training.analysis import AnalysisError, analyze

    torch.set_num_threads(1)  # the analysis is light; leave the cores to others
    if args.per_temperature < 0:
        raise UsageError("--per-temperature must be ≥ 0")
    if args.bootstrap < 2:
        raise UsageError("--bootstrap must be ≥ 2")
    if args.quench_steps is not None and args.quench_steps < 0:
        raise UsageError("--quench-steps must be ≥ 0")
    if args.vortex_tolerance is not None and args.vortex_tolerance < 0:
        raise UsageError("--vortex-tolerance must be ≥ 0")
    try:
        summary = analyze(
            args.data,
            args.model,
            args.out,
            tracking_uri=args.tracking_uri,
            per_temperature=args.per_temperature or None,
            n_boot=args.bootstrap,
            seed=args.seed,
            quench_steps=args.quench_steps,
            vortex_tolerance=args.vortex_tolerance,
            vortex_tmax=args.vortex_tmax,
            sigma_fit_tmax=args.sigma_fit_tmax,
            log_to_mlflow=not args.no_mlflow,
            progress=not args.quiet,
        )
    except AnalysisError as exc:
        raise UsageError(str(exc)) from exc
    except OSError as exc:
        raise UsageError(f"cannot write the report: {exc}") from exc
    if not args.quiet:
        print(headline(summary, args.out))
    return 0


def headline(summary: dict, out: str) -> str:
    lines = [f"report: {out}/report.md  (summary.json, {len(summary.get('figures', []))} figures)"]
    for key, h in summary["transition_temperature"]["helicity_crossing"].items():
        lines.append(
            f"  Υ crossing {key}: {h['value']:.4f} ± {h['error']:.4f}"
            if h["value"] is not None
            else f"  Υ crossing {key}: none in the temperature range"
        )
    for name, lat in summary["transition_temperature"]["latent"].items():
        if lat["value"] is not None:
            lines.append(f"  latent estimate {name}: {lat['value']:.4f} ± {(lat['error'] or float('nan')):.4f}")
    for label, fit in summary["transition_temperature"]["finite_size_extrapolation"].items():
        lines.append(f"  T_KT from {label}: {fit['T_KT']:.4f} ± {(fit['T_KT_error'] or float('nan')):.4f} (ref 0.8929)")
    for name, m in summary["models"].items():
        rec = m["vortex_separation"].get("theta_vs_quenched", {}).get("recall")
        lines.append(
            f"  {name}: ⟨|Δe|/|e|⟩ = {100 * m['energy_discrepancy']['mean_relative_abs_discrepancy']:.3f}%, "
            f"vortex recall {'–' if rec is None else f'{rec:.3f}'}"
        )
    return "\n".join(lines)
