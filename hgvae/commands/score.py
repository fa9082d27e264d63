"""`hgvae score`: batch-score an .npz of lattices, locally on onnxruntime or through a running server."""

from __future__ import annotations

import argparse

from hgvae.cli import UsageError

HELP = "score lattice configurations from an .npz (one output array per ONNX output)"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "score", help=HELP, description=HELP + ".", formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument(
        "--input",
        required=True,
        help="data set .npz with 'angles' [N, L, L] (optional 'temperature'); with --engine spark: Parquet "
        "file/directory, rows with 'angles' list<float32> of L*L values (optional 'id', 'temperature')",
    )
    p.add_argument("--output", required=True, help="scores .npz to write (atomically); Parquet directory with spark")
    p.add_argument(
        "--engine",
        choices=("local", "spark"),
        default="local",
        help="local: this process or --server; spark: score Parquet partitions on Apache Spark executors",
    )
    p.add_argument("--spark-master", help="with --engine spark: master URL (default HGVAE_SPARK_MASTER or local[*,2])")
    p.add_argument(
        "--spark-conf", action="append", metavar="KEY=VALUE", help="with --engine spark: a Spark setting, repeatable"
    )
    where = p.add_mutually_exclusive_group()
    where.add_argument("--server", metavar="HOST:PORT", help="score through a running `hgvae serve`")
    where.add_argument(
        "--model",
        metavar="URI",
        help="score in-process: models:/NAME@ALIAS, models:/NAME/N, runs:/RUN_ID or a .onnx "
        "(default when --server is absent: models:/hgvae@champion)",
    )
    p.add_argument("--served-model", default="", help="with --server: the served model name (default: by lattice size)")
    p.add_argument("--outputs", help="comma-separated subset of output names (default: all)")
    p.add_argument(
        "--temperature",
        type=float,
        default=None,
        help="nominal temperature of the lattices (the line's set point): the anomaly score is calibrated at "
        "this T instead of the input's own energy (default: unknown)",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=16,
        help="lattices per chunk = per onnxruntime call or request (memory stays flat); on CPU small is fast: "
        "benchmarks/batch_scoring.py measured 16 and 64 alike and 256 10-50%% slower for the L=32 HG-VAE",
    )
    p.add_argument("--tracking-uri", help="MLflow tracking URI for --model")
    p.add_argument("--token-env", metavar="VAR", help="with --server: bearer token from this environment variable")
    p.add_argument("--tls-ca", help="with --server: PEM root certificate to verify a TLS server")
    p.add_argument("--timeout", type=float, default=None, help="with --server: deadline for the whole run (s)")
    p.add_argument("--force", action="store_true", help="overwrite --output")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import os

    from service.batch import local_scorer, remote_scorer, score_file
    from service.client import OUTPUT_NAMES, ScoringClient, ScoringError
    from service.errors import ServiceError
    from training.dataset import DatasetError, check_writable

    if args.batch_size < 1:
        raise UsageError("--batch-size must be at least 1")
    if args.temperature is not None and not (args.temperature > 0 and args.temperature < float("inf")):
        raise UsageError("--temperature must be a positive number (leave it out when unknown)")
    if args.engine == "spark":
        if args.temperature is not None:
            raise UsageError("--temperature is not supported with --engine spark yet")
        from service.spark_scoring import run_cli

        return run_cli(args)
    outputs = [o.strip() for o in args.outputs.split(",") if o.strip()] if args.outputs else None
    if outputs:
        unknown = [o for o in outputs if o not in OUTPUT_NAMES]
        if unknown:
            raise UsageError(f"unknown output(s) {unknown}; known: {', '.join(OUTPUT_NAMES)}")
    try:
        check_writable(args.output, args.force)
    except DatasetError as exc:
        raise UsageError(str(exc)) from None
    progress = not args.no_progress
    meta_t = {} if args.temperature is None else {"nominal_temperature": args.temperature}
    try:
        if args.server:
            token = os.environ.get(args.token_env, "") if args.token_env else None
            if args.token_env and not token:
                raise UsageError(f"environment variable {args.token_env} is empty or unset")
            with ScoringClient(args.server, token=token, root_certificates=args.tls_ca, timeout=10.0) as client:
                info = client.model_info(args.served_model) if args.served_model else None
                meta = {"server": args.server}
                if info:
                    meta.update(model=info["name"], version=info["version"], run_id=info["run_id"])
                meta.update(meta_t)
                summary = score_file(
                    args.input,
                    args.output,
                    remote_scorer(
                        client, outputs, args.served_model, timeout=args.timeout, temperature=args.temperature
                    ),
                    args.batch_size,
                    args.force,
                    meta,
                    progress,
                    expect_size=info["lattice_size"] if info else None,
                )
        else:
            model = _local_model(args.model or "models:/hgvae@champion", args.tracking_uri)
            meta = {"model": model.source, "version": model.version, "run_id": model.metadata.run_id, **meta_t}
            summary = score_file(
                args.input,
                args.output,
                local_scorer(model, outputs, args.temperature),
                args.batch_size,
                args.force,
                meta,
                progress,
                expect_size=model.metadata.lattice_size,
            )
    except DatasetError as exc:
        raise UsageError(str(exc)) from None
    except ScoringError as exc:
        raise UsageError(f"server {args.server}: {exc}") from None
    except ServiceError as exc:
        raise UsageError(str(exc)) from None
    print(f"scored {summary['configurations']} configurations -> {summary['path']}")
    return 0


def _local_model(uri: str, tracking_uri: str | None):
    from service.errors import ModelLoadError
    from service.models import Resolver, parse_source
    from service.runtime import OnnxModel

    try:
        src = parse_source(uri)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    resolver = Resolver(tracking_uri)
    try:
        version = resolver.current_version(src)
        path = resolver.fetch(src, version)
        model = OnnxModel(path, src.name, version, src.uri)
        model.load()
    except ModelLoadError as exc:
        hint = " (train and promote one first, e.g. `hgvae run`)" if src.kind == "alias" else ""
        raise UsageError(f"{exc}{hint}") from None
    finally:
        resolver.close()  # onnxruntime holds the graph in memory once the session exists
    return model
