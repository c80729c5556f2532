"""dstd: the destination side of migrations."""

from __future__ import annotations

import argparse
import sys

from vmmigrate.common.config import DEFAULT_DSTD_PORT
from vmmigrate.common.daemon import daemon_main
from vmmigrate.common.failpoints import DSTD_FAILPOINTS
from vmmigrate.dstd.server import running_server


def _options(ap: argparse.ArgumentParser) -> None:
    ap.add_argument(
        "--migration-address",
        dest="migration_address",
        help="address emulators listen on for incoming migration streams",
    )
    ap.add_argument("--migration-ports", dest="migration_ports", help="port range MIN-MAX for them")
    ap.add_argument(
        "--storage-dir",
        dest="storage_dirs",
        action="append",
        help="a directory storage copy may create and write incoming disks in (repeatable; "
        "default: none, storage copy refused)",
    )
    ap.add_argument(
        "--max-incoming",
        dest="max_incoming",
        type=int,
        help="incoming migrations at once (default 64, 0 = no limit)",
    )


def main(argv: list[str] | None = None) -> None:
    sys.exit(
        daemon_main(
            "dstd",
            description="vmmigrate destination daemon: the destination side of migrations",
            default_port=DEFAULT_DSTD_PORT,
            server_factory=running_server,
            failpoint_names=DSTD_FAILPOINTS,
            extra_options=_options,
            argv=argv,
        )
    )


if __name__ == "__main__":
    main()
