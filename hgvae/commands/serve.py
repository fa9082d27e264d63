"""`hgvae serve`: the gRPC scoring service (hgvae.v1 + KServe V2 + health + reflection)."""

from __future__ import annotations

import argparse

from hgvae.cli import UsageError

HELP = "serve registered ONNX models over gRPC (micro-batched onnxruntime, hot promotion)"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help=HELP,
        description=HELP + ". Unset flags fall back to HGVAE_* environment variables, then to the defaults shown.",
    )
    p.add_argument(
        "--model",
        action="append",
        metavar="[NAME=]URI",
        help="model source, repeatable: models:/hgvae@champion (followed), models:/hgvae/3, runs:/RUN_ID, "
        "or a local .onnx (default: models:/hgvae@champion)",
    )
    p.add_argument("--host", help="interface to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="gRPC port (default 50051; 0 = any free port)")
    p.add_argument("--max-batch", type=int, help="most lattices per onnxruntime call (default: 16 on CPU, 256 on CUDA)")
    p.add_argument("--max-delay-ms", type=float, help="longest wait to fill a batch, from the oldest request (0)")
    p.add_argument("--metrics-port", type=int, help="serve Prometheus /metrics on this port")
    p.add_argument("--poll-interval", type=float, help="seconds between registry polls for alias moves (10)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI or the local store)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), help="onnxruntime provider choice (auto)")
    p.add_argument(
        "--workers", type=int, help="concurrent onnxruntime runs per model (0 = auto: one per core on CPU, 1 on CUDA)"
    )
    p.add_argument("--threads", type=int, help="onnxruntime intra-op threads per run (0 = auto: 1 with auto workers)")
    p.add_argument("--tls-cert", help="PEM certificate chain: serve TLS only (needs --tls-key)")
    p.add_argument("--tls-key", help="PEM private key")
    p.add_argument("--grace", type=float, help="seconds in-flight requests get on SIGTERM (10)")
    p.add_argument("--log-format", choices=("json", "text"), help="log line format (json)")
    p.add_argument(
        "--auth-token-env",
        metavar="VAR",
        help="require 'authorization: Bearer <token>' with the token read from this environment variable "
        "(or set HGVAE_AUTH_TOKEN)",
    )
    p.set_defaults(func=run)


def build_settings(args: argparse.Namespace) -> object:
    import os

    from pydantic import ValidationError

    from service.settings import ServerSettings

    flags = {
        "models": args.model,
        "host": args.host,
        "port": args.port,
        "max_batch_size": args.max_batch,
        "max_delay_ms": args.max_delay_ms,
        "metrics_port": args.metrics_port,
        "poll_interval_s": args.poll_interval,
        "tracking_uri": args.tracking_uri,
        "device": args.device,
        "intra_op_threads": args.threads,
        "workers": args.workers,
        "tls_cert": args.tls_cert,
        "tls_key": args.tls_key,
        "grace_s": args.grace,
        "log_format": args.log_format,
    }
    if args.auth_token_env:
        token = os.environ.get(args.auth_token_env)
        if not token:
            raise UsageError(f"environment variable {args.auth_token_env} is empty or unset")
        flags["auth_token"] = token
    try:
        return ServerSettings(**{k: v for k, v in flags.items() if v is not None})
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(x) for x in first.get("loc", ())) or "settings"
        raise UsageError(f"{where}: {first['msg']}") from None


def run(args: argparse.Namespace) -> int:
    import asyncio

    from service.logs import configure
    from service.models import parse_source
    from service.server import serve

    settings = build_settings(args)
    for spec in settings.models:  # type: ignore[attr-defined]
        try:
            parse_source(spec)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    configure(settings.log_format)  # type: ignore[attr-defined]
    return asyncio.run(serve(settings))  # type: ignore[arg-type]
