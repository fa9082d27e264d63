"""`hgvae run`: the main job. Make sure a champion model exists (simulate, train and promote a small
default one into the embedded MLflow store if not), then serve it and print a client command.

Training runs in a child process, so the long-lived server process never imports torch. A second
start finds `@champion` and goes straight to serving.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys

from hgvae.cli import UsageError

HELP = "train + promote a small default model if none is champion, then serve it"
ALIAS = "champion"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help=HELP, description=HELP + ".", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--host", default="127.0.0.1", help="interface to bind")
    p.add_argument("--port", type=int, default=50051, help="gRPC port (0 = any free port)")
    p.add_argument("--metrics-port", type=int, default=None, help="Prometheus /metrics port")
    p.add_argument("--size", type=int, default=16, help="lattice size L of the default model")
    p.add_argument("--samples", type=int, default=64, help="configurations per temperature for the default data")
    p.add_argument("--epochs", type=int, default=15, help="training epochs for the default model")
    p.add_argument("--batch-size", type=int, default=32, help="minibatch size for the default model")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--retrain", action="store_true", help="train and promote a new default model even if one exists")
    p.add_argument("--no-serve", action="store_true", help="stop after making sure a champion exists")
    p.set_defaults(func=run)


def champion_version(tracking_uri: str) -> str | None:
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from hgvae.paths import REGISTERED_MODEL_NAME

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    try:
        return str(client.get_model_version_by_alias(REGISTERED_MODEL_NAME, ALIAS).version)
    except MlflowException:
        return None


def default_data_path(size: int) -> str:
    from hgvae.paths import data_dir

    return str(data_dir() / f"default-L{size}.npz")


def prepare(args: argparse.Namespace, tracking_uri: str) -> str:
    """Simulate (or reuse) the default data, train, promote. Runs in the child process."""
    import numpy as np

    from hgvae.paths import REGISTERED_MODEL_NAME
    from training.dataset import load_dataset, save_dataset
    from training.montecarlo import simulate
    from training.registry import promote
    from training.train import train_model

    path = default_data_path(args.size)
    if os.path.exists(path):
        print(f"hgvae run: reusing data {path}", file=sys.stderr)
        data = load_dataset(path)
    else:
        temperatures = np.round(np.linspace(0.5, 1.5, 9), 3).tolist()
        print(
            f"hgvae run: simulating L={args.size}, {len(temperatures)} temperatures x {args.samples}", file=sys.stderr
        )
        data = simulate(args.size, temperatures, args.samples, seed=args.seed, progress=True)
        save_dataset(path, data.angles, data.temperature, data.metadata, force=True)
    print(f"hgvae run: training the default HG-VAE ({args.epochs} epochs)", file=sys.stderr)
    result = train_model(
        data,
        batch_size=args.batch_size,
        kind="hgvae",
        epochs=args.epochs,
        seed=args.seed,
        tracking_uri=tracking_uri,
        registered_name=REGISTERED_MODEL_NAME,
        progress=True,
    )
    verdict = promote(REGISTERED_MODEL_NAME, result.version, alias=ALIAS, tracking_uri=tracking_uri)
    if not getattr(verdict, "passed", False):
        # The demo must end with something to serve; say plainly that a gate refused it.
        report = verdict.summary() if hasattr(verdict, "summary") else str(verdict)
        for line in [*report.splitlines(), "promoting it anyway (--force) so the service has a model; train longer"]:
            print(f"hgvae run: {line}", file=sys.stderr)
        promote(REGISTERED_MODEL_NAME, result.version, alias=ALIAS, force=True, tracking_uri=tracking_uri)
    return str(result.version)


def run(args: argparse.Namespace) -> int:
    from hgvae.paths import tracking_uri as default_tracking_uri

    if args.size < 4 or args.samples < 1 or args.epochs < 1 or args.batch_size < 1:
        raise UsageError("--size must be at least 4, --samples, --epochs and --batch-size at least 1")
    tracking_uri = default_tracking_uri()
    if os.environ.get("_HGVAE_RUN_CHILD"):  # the child: train + promote, no serving
        from training.dataset import DatasetError

        try:
            prepare(args, tracking_uri)
        except (DatasetError, ValueError) as exc:
            raise UsageError(str(exc)) from None
        return 0
    version = champion_version(tracking_uri)
    if version is None or args.retrain:
        cmd = [
            sys.executable,
            "-m",
            "hgvae",
            "run",
            "--no-serve",
            "--size",
            str(args.size),
            "--samples",
            str(args.samples),
            "--epochs",
            str(args.epochs),
            "--batch-size",
            str(args.batch_size),
            "--seed",
            str(args.seed),
        ]
        child = subprocess.run(cmd, env={**os.environ, "_HGVAE_RUN_CHILD": "1"})
        if child.returncode != 0:
            print("hgvae run: error: preparing the default model failed (see above)", file=sys.stderr)
            return child.returncode
        version = champion_version(tracking_uri)
        if version is None:
            print("hgvae run: error: no @champion after training", file=sys.stderr)
            return 1
    else:
        print(f"hgvae run: reusing hgvae@{ALIAS} (version {version}) from {tracking_uri}", file=sys.stderr)
    if args.no_serve:
        return 0
    return serve(args, tracking_uri)


def serve(args: argparse.Namespace, tracking_uri: str) -> int:
    import asyncio

    from service.logs import configure
    from service.server import ScoringServer
    from service.server import serve as serve_forever
    from service.settings import ServerSettings

    settings = ServerSettings(
        models=[f"models:/hgvae@{ALIAS}"],
        host=args.host,
        port=args.port,
        tracking_uri=tracking_uri,
        metrics_port=args.metrics_port,
    )
    configure(settings.log_format)

    def ready(server: ScoringServer) -> None:
        served = server.models.current["hgvae"]
        size = served.model.metadata.lattice_size  # type: ignore[union-attr]
        address = f"{'127.0.0.1' if args.host in ('0.0.0.0', '::') else args.host}:{server.port}"
        data = default_data_path(size)
        hgvae = _command("hgvae") or f"{_command('python')} -m hgvae"
        score = f"{hgvae} score --server {address} --input {shlex.quote(data)} --output scores.npz --force"
        if not os.path.exists(data):  # champion trained elsewhere: make matching data first
            score = f"{hgvae} simulate --size {size} --samples 16 --out {shlex.quote(data)} && {score}"
        snippet = (
            "import numpy as np; from service.client import ScoringClient; "
            f"c = ScoringClient('{address}'); "
            f"print(c.score(np.random.uniform(0, 6.283, ({size}, {size})))['anomaly_score'])"
        )
        print(
            f"\nhgvae is serving models:/hgvae@{ALIAS} (version {served.version}, L={size}) on {address}.\n"
            f'Try, in another terminal:\n\n  {score}\n\n  {_command("python")} -c "{snippet}"\n\nCtrl-C stops it.',
            flush=True,
        )

    return asyncio.run(serve_forever(settings, on_ready=ready))


def _command(name: str) -> str | None:
    """How another terminal calls this installation's `name`: the bare name when PATH finds this one,
    else its full path (on a fresh machine `make run` works from .venv/bin, which is not on PATH);
    None when this installation has no such script."""
    here = os.path.join(os.path.dirname(os.path.abspath(sys.executable)), name)
    if not os.path.exists(here):
        return sys.executable if name == "python" else None
    found = shutil.which(name)
    return name if found and os.path.abspath(found) == here else shlex.quote(here)
