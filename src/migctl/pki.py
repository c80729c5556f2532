"""``migctl pki``: a cluster's certificates in a handful of commands.

    migctl pki init DIR [--name CN] [--force]
    migctl pki issue DIR --host NAME [--ip ADDR]... --out OUT [--days N]
    migctl pki issue DIR --client NAME --role admin|readonly --out OUT [--days N]

The work is in src/migctl/certs.py; this module is the command line only, and talks to no
daemon.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

# Here rather than in certs.py, which uses them too: that module loads `cryptography`,
# which the other migctl commands do not need at start (the parser is built for each one).
DEFAULT_CA_NAME = "vmmigrate CA"
# 825 days: the longest leaf lifetime browsers and most private CAs still accept.
DEFAULT_LEAF_DAYS = 825


def add_parser(sub: Any) -> None:
    """Add ``pki`` and its subcommands to migctl's subparsers ``sub``."""
    p = sub.add_parser("pki", help="make the cluster's TLS certificates (CA, hosts, clients)")
    psub = p.add_subparsers(
        dest="pki_command",
        metavar="init|issue",
        required=True,
        parser_class=type(p),
        help="init makes the CA, issue a host's or a client's certificate",
    )

    q = psub.add_parser("init", help="create the cluster's CA: DIR/ca.pem, DIR/ca-key.pem")
    q.add_argument("dir", metavar="DIR", help="where the CA goes (created mode 0700)")
    q.add_argument("--name", default=DEFAULT_CA_NAME, help="the CA's common name")
    q.add_argument(
        "--force",
        action="store_true",
        help="replace an existing CA (what it issued is no longer trusted)",
    )

    q = psub.add_parser(
        "issue", help="issue a host or client certificate: OUT/ca.pem, cert.pem, key.pem"
    )
    q.add_argument("dir", metavar="DIR", help="the CA's directory (from pki init)")
    who = q.add_mutually_exclusive_group(required=True)
    who.add_argument("--host", metavar="NAME", help="a host (srcd and dstd): DNS name or IP")
    who.add_argument("--client", metavar="NAME", help="a client (migctl): its user name")
    q.add_argument(
        "--ip", action="append", default=[], metavar="ADDR", help="a host's IP (repeatable)"
    )
    q.add_argument("--role", metavar="admin|readonly", help="a client's role")
    q.add_argument("--out", required=True, metavar="OUT", help="where the files go")
    q.add_argument(
        "--days",
        type=int,
        default=DEFAULT_LEAF_DAYS,
        metavar="N",
        help=f"validity in days (default {DEFAULT_LEAF_DAYS})",
    )


def run(a: argparse.Namespace) -> int:
    """Carry out ``migctl pki ...``; errors are raised as VmmigrateError (exit status 1)."""
    # cryptography is loaded for pki commands only
    from vmmigrate.common.errors import InvalidArgument  # noqa: PLC0415
    from vmmigrate.migctl import certs  # noqa: PLC0415

    directory = Path(a.dir)
    if a.pki_command == "init":
        ca = certs.init_ca(directory, name=a.name, force=a.force)
        expiry = ca.cert.not_valid_after_utc
        print(f"CA '{a.name}' created in {directory} (valid until {expiry:%Y-%m-%d})")
        return 0
    out = Path(a.out)
    if a.host is not None:
        if a.role is not None:
            raise InvalidArgument("pki issue: --role applies to --client certificates only")
        cert = certs.issue_host(directory, name=a.host, ips=a.ip, out=out, days=a.days)
        what = f"Host certificate '{a.host}'"
    else:
        if a.role is None:
            raise InvalidArgument("pki issue: --client needs --role admin|readonly")
        if a.ip:
            raise InvalidArgument("pki issue: --ip applies to --host certificates only")
        cert = certs.issue_client(directory, name=a.client, role=a.role, out=out, days=a.days)
        what = f"Client certificate '{a.client}' ({a.role})"
    print(f"{what} written to {out} (valid until {cert.not_valid_after_utc:%Y-%m-%d})")
    return 0
