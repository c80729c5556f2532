"""The version every program prints for ``--version``: the installed package's own."""

from __future__ import annotations

import argparse
from importlib.metadata import PackageNotFoundError, version

DISTRIBUTION = "vmmigrate"


def package_version() -> str:
    try:
        return version(DISTRIBUTION)
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


def add_version_option(ap: argparse.ArgumentParser, prog: str) -> None:
    """``--version``: print ``PROG VERSION`` and exit 0, as virsh --version does."""
    ap.add_argument(
        "--version",
        action="version",
        version=f"{prog} {package_version()}",
        help="print the version and exit",
    )
