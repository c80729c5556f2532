"""srcd: a host's front door and the source side of migrations."""

from __future__ import annotations

import argparse
import sys

from vmmigrate.common.config import DEFAULT_SRCD_PORT
from vmmigrate.common.daemon import daemon_main
from vmmigrate.common.failpoints import SRCD_FAILPOINTS
from vmmigrate.srcd.server import running_server


def _options(ap: argparse.ArgumentParser) -> None:
    ap.add_argument(
        "--max-outgoing",
        dest="max_outgoing",
        type=int,
        help="outgoing migrations at once; more wait for a slot (default 64, 0 = no limit)",
    )
    ap.add_argument(
        "--downtime-limit",
        dest="downtime_limit_ms",
        type=int,
        help="live migration: the downtime limit to start with and never go below, ms "
        "(default 20; escalates to --downtime-limit-max when the guest does not converge)",
    )
    ap.add_argument(
        "--downtime-limit-max",
        dest="downtime_limit_max_ms",
        type=int,
        help="live migration: the most the downtime limit escalates to, ms (default 300)",
    )


def main(argv: list[str] | None = None) -> None:
    sys.exit(
        daemon_main(
            "srcd",
            description="vmmigrate source daemon: client API and source side of migrations",
            default_port=DEFAULT_SRCD_PORT,
            server_factory=running_server,
            failpoint_names=SRCD_FAILPOINTS,
            extra_options=_options,
            argv=argv,
        )
    )


if __name__ == "__main__":
    main()
