"""Container health check: one grpc.health.v1 Check against the local server.

Exit 0 when the server answers SERVING, 1 otherwise (NOT_SERVING, unreachable, timeout), which is
what Docker's HEALTHCHECK expects. Usage: healthcheck.py [HOST:PORT] [--service NAME] [--timeout S].
Sends `authorization: Bearer $HGVAE_AUTH_TOKEN` when that variable is set, so it also works if the
server checks tokens on every method. No hgvae import: it runs in any image with grpcio-health-checking.
"""

from __future__ import annotations

import argparse
import os
import sys


def check(target: str, service: str = "", timeout: float = 2.0) -> bool:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    metadata = []
    if os.environ.get("HGVAE_AUTH_TOKEN"):
        metadata.append(("authorization", f"Bearer {os.environ['HGVAE_AUTH_TOKEN']}"))
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout, metadata=metadata)
        except grpc.RpcError as exc:
            print(f"unhealthy: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return False
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        print(f"unhealthy: {status}", file=sys.stderr)
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = f"127.0.0.1:{os.environ.get('HGVAE_PORT', '50051')}"
    parser.add_argument("target", nargs="?", default=default, help=f"server address (default {default})")
    parser.add_argument("--service", default="", help="health service name ('' = whole server)")
    parser.add_argument("--timeout", type=float, default=2.0, help="seconds to wait for the answer")
    args = parser.parse_args(argv)
    return 0 if check(args.target, args.service, args.timeout) else 1


if __name__ == "__main__":
    sys.exit(main())
