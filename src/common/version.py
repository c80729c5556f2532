"""The version every program prints for ``--version``: the installed package's own."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

DISTRIBUTION = "vmmigrate"


def package_version() -> str:
    # importlib.metadata costs every start of a program ~20 ms: imported when asked
    from importlib.metadata import PackageNotFoundError, version  # noqa: PLC0415

    try:
        return version(DISTRIBUTION)
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


class _Version(argparse.Action):
    """argparse's "version" action, with the version looked up only when it is printed."""

    def __init__(self, option_strings: Sequence[str], dest: str, prog: str, help: str) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, help=help)
        self.prog = prog

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        print(f"{self.prog} {package_version()}")
        parser.exit()


def add_version_option(ap: argparse.ArgumentParser, prog: str) -> None:
    """``--version``: print ``PROG VERSION`` and exit 0, as virsh --version does."""
    ap.add_argument(
        "--version",
        action=_Version,
        dest=argparse.SUPPRESS,
        prog=prog,
        help="print the version and exit",
    )
