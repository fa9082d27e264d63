"""`hgvae` command line: one verb per module in `hgvae.commands`.

Each command module defines `register(subparsers)`, which adds its parser and sets `func`; heavy
imports (torch, onnxruntime, grpc, mlflow) happen inside `func`, so `hgvae serve` never loads torch
and `hgvae --help` is instant.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from hgvae import __version__

COMMANDS = ("simulate", "train", "promote", "serve", "score", "analyze", "run")


class UsageError(Exception):
    """A bad argument or input: printed as one line, exit code 2, no traceback."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hgvae", description="Physics-guided VAE for the 2D XY model.")
    parser.add_argument("--version", action="version", version=f"hgvae {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"hgvae.commands.{name}")
        except ModuleNotFoundError as exc:  # a command whose module is not built yet
            if exc.name != f"hgvae.commands.{name}":
                raise
            continue
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UsageError as exc:
        print(f"hgvae {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"hgvae {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
