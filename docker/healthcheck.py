"""Container health probe: both daemons of this host answer grpc health SERVING.

Exit 0 when srcd and dstd both report SERVING for the overall server (service ""), else 1
with the reason on stderr, as Docker's HEALTHCHECK expects.
"""

import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def serving(address: str, timeout: float) -> str | None:
    """None when SERVING, else why not."""
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout)
        except grpc.RpcError as e:
            return f"{address}: {e.code().name}"
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        return f"{address}: {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}"
    return None


def main() -> int:
    timeout = float(os.environ.get("HEALTH_TIMEOUT", "3"))
    addresses = sys.argv[1:] or [
        f"127.0.0.1:{os.environ.get('SRCD_PORT', '7301')}",
        f"127.0.0.1:{os.environ.get('DSTD_PORT', '7302')}",
    ]
    problems = [p for p in (serving(a, timeout) for a in addresses) if p]
    for p in problems:
        print(f"unhealthy: {p}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
