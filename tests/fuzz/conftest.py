"""One lab (two hosts, real srcd and dstd processes) shared by the RPC fuzz tests of a module."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from .rpc import Lab


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    lab = Lab(tmp_path_factory.mktemp("fuzzlab"))
    yield lab
    lab.close()
