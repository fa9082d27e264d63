"""`hgvae train`: fit an HG-VAE (or the plain-VAE baseline), log it to MLflow, register a version."""

from __future__ import annotations

import argparse

from hgvae.cli import UsageError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train an HG-VAE or plain VAE on a data set (MLflow-tracked, registers an ONNX model)",
        description="Train on an .npz data set (from `hgvae simulate`), export the ONNX scoring graph, "
        "log the run to MLflow and register a new model version. Prints the run id and the version.",
    )
    p.add_argument("--data", required=True, help="data set .npz (angles [N, L, L], temperature [N])")
    p.add_argument("--kind", choices=("hgvae", "vae"), default="hgvae", help="hgvae (with energy term) or vae")
    p.add_argument("--epochs", type=int, default=20, help="training epochs (default 20)")
    p.add_argument(
        "--latent-dim", type=int, default=None,
        help="latent size: a multiple of (L/2)² for the spatial latent (default 2·(L/2)²: 128 at L=16, 512 at "
        "L=32); any size ≥ 1 for --latent global (default 64)",
    )  # fmt: skip
    p.add_argument(
        "--latent", choices=("spatial", "global"), default=None,
        help="spatial: channels on an (L/2)² grid, so θ̂ can carry vortices (default); global: one vector",
    )  # fmt: skip
    p.add_argument("--batch-size", type=int, default=32, help="minibatch size (default 32)")
    p.add_argument("--seed", type=int, default=0, help="seed for split, init and sampling (default 0)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default 2e-3)")
    p.add_argument("--lam", type=float, default=None, help="energy-term weight λ (default 3000; the term is relative)")
    p.add_argument("--beta", type=float, default=None, help="KL weight β (default 0.1)")
    p.add_argument(
        "--vortex-weight", type=float, default=None,
        help="weight of the sampled-vortex-density term (HG-VAE; default 2; 0 = off)",
    )  # fmt: skip
    p.add_argument("--width", type=int, default=None, help="convolution channels (default 24)")
    p.add_argument(
        "--tracking-uri", default=None, help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or embedded sqlite)"
    )
    p.add_argument("--threads", type=int, default=None, help="torch threads (default 1; 0 = torch's default)")
    p.add_argument("--name", default="hgvae", help="registered model name (default hgvae)")
    p.add_argument("--out", default=None, help="also keep the exported files (ONNX, plots) in this directory")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from training.dataset import DatasetError
    from training.train import TrainingDiverged, train_model

    keys = ("lr", "lam", "beta", "width", "threads", "latent", "vortex_weight")
    hyper = {k: getattr(args, k) for k in keys if getattr(args, k) is not None}
    try:
        res = train_model(
            args.data,
            kind=args.kind,
            epochs=args.epochs,
            latent_dim=args.latent_dim,
            batch_size=args.batch_size,
            seed=args.seed,
            tracking_uri=args.tracking_uri,
            registered_name=args.name,
            progress=not args.no_progress,
            out_dir=args.out,
            **hyper,
        )
    except DatasetError as exc:
        raise UsageError(str(exc)) from exc
    except (ValueError, TrainingDiverged) as exc:
        raise UsageError(str(exc)) from exc
    m = res.metrics
    print(
        f"energy discrepancy |Δe|/|e|: mean {m['val_rel_energy_discrepancy_mean']:.4f}, "
        f"worst T {m['val_rel_energy_discrepancy_max']:.4f}; anomaly AUROC (worst named kind × T) "
        f"{m['auroc_named_min']:.4f}; {m['train_seconds']:.0f} s"
    )
    print(f"run id: {res.run_id}")
    print(f"registered: {args.name} version {res.version}")
    return 0
