"""Container health probe: both daemons of this host answer grpc health SERVING.

Exit 0 when srcd and dstd both report SERVING for the overall server (service ""), else 1
with the reason on stderr, as Docker's HEALTHCHECK expects.

The daemons serve mutual TLS only, so the probe presents this host's own certificate (from
$VMMIGRATE_TLS_DIR, the directory the daemons were given). It dials loopback, which the
certificate does not name: the TLS target name is the certificate's own DNS name instead,
so the daemon's certificate is still checked against the cluster's CA and that name.
$VMMIGRATE_TLS_DIR empty or missing: plaintext (a host started with --insecure).
"""

import os
import sys
from pathlib import Path

import grpc
from cryptography import x509
from grpc_health.v1 import health_pb2, health_pb2_grpc


def tls_channel(address: str, directory: Path) -> grpc.Channel:
    ca, cert, key = (directory / n for n in ("ca.pem", "cert.pem", "key.pem"))
    parsed = x509.load_pem_x509_certificate(cert.read_bytes())
    sans = parsed.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    name = sans.get_values_for_type(x509.DNSName)[0]
    credentials = grpc.ssl_channel_credentials(
        root_certificates=ca.read_bytes(),
        private_key=key.read_bytes(),
        certificate_chain=cert.read_bytes(),
    )
    options = [("grpc.ssl_target_name_override", name)]
    return grpc.secure_channel(address, credentials, options=options)


def serving(address: str, tls_dir: Path | None, timeout: float) -> str | None:
    """None when SERVING, else why not."""
    channel = tls_channel(address, tls_dir) if tls_dir else grpc.insecure_channel(address)
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout)
        except grpc.RpcError as e:
            return f"{address}: {e.code().name}: {e.details()}"
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        return f"{address}: {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}"
    return None


def main() -> int:
    timeout = float(os.environ.get("HEALTH_TIMEOUT", "3"))
    tls = os.environ.get("VMMIGRATE_TLS_DIR", "")
    tls_dir = Path(tls) if tls and Path(tls, "cert.pem").exists() else None
    addresses = sys.argv[1:] or [
        f"127.0.0.1:{os.environ.get('SRCD_PORT', '7301')}",
        f"127.0.0.1:{os.environ.get('DSTD_PORT', '7302')}",
    ]
    problems = [p for p in (serving(a, tls_dir, timeout) for a in addresses) if p]
    for p in problems:
        print(f"unhealthy: {p}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
