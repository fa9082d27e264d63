"""`hgvae promote`: check the promotion gates of a registered version and move an alias."""

from __future__ import annotations

import argparse

from hgvae.cli import UsageError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "promote",
        help="gate a registered model version (ONNX parity, energy, anomaly AUROC) and move an alias",
        description="Re-score the registered ONNX graph with onnxruntime and check the gates; move the alias "
        "(MlflowClient.set_registered_model_alias) only if all pass, or with --force. Exit 1 on refusal.",
    )
    p.add_argument("--name", default="hgvae", help="registered model name (default hgvae)")
    p.add_argument("--version", required=True, help="model version to promote")
    p.add_argument("--alias", default="champion", help="alias to move (default champion)")
    p.add_argument("--force", action="store_true", help="move the alias even if gates fail (and say which)")
    p.add_argument(
        "--tracking-uri", default=None, help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or embedded)"
    )
    p.add_argument("--max-energy-discrepancy", type=float, default=None, help="gate: mean |Δe|/|e| (default 0.01)")
    p.add_argument("--max-energy-discrepancy-per-t", type=float, default=None, help="gate: worst T (default 0.03)")
    p.add_argument("--min-auroc", type=float, default=None, help="gate: worst anomaly AUROC (default 0.99)")
    p.add_argument("--max-parity", type=float, default=None, help="gate: ONNX vs training outputs (default 1e-4)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from training.registry import PromotionError, promote

    th = {
        k: v
        for k, v in {
            "energy_rel_mean": args.max_energy_discrepancy,
            "energy_rel_max": args.max_energy_discrepancy_per_t,
            "auroc_min": args.min_auroc,
            "parity_max_abs": args.max_parity,
        }.items()
        if v is not None
    }
    try:
        res = promote(
            args.name, args.version, args.alias, force=args.force, tracking_uri=args.tracking_uri, thresholds=th
        )
    except PromotionError as exc:
        raise UsageError(str(exc)) from exc
    print(res.summary())
    return 0 if res.moved else 1
