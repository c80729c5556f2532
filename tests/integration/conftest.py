from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers.hosts import Host

_counter = itertools.count()


@pytest.fixture(scope="module")
def hosts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Host, Host]]:
    """Two hosts on 127.0.0.2 and 127.0.0.3, each with a srcd and a dstd, shared by a module."""
    base = tmp_path_factory.mktemp("hosts")
    a = Host("A", "127.0.0.2", base / "A").start()
    b = Host("B", "127.0.0.3", base / "B").start()
    yield a, b
    a.stop()
    b.stop()


@pytest.fixture
def fresh_hosts(tmp_path: Path) -> Iterator[tuple[Host, Host]]:
    """Two hosts for one test (for tests that kill or restart daemons)."""
    a = Host("A", "127.0.0.2", tmp_path / "A")
    b = Host("B", "127.0.0.3", tmp_path / "B")
    yield a, b
    a.stop()
    b.stop()


@pytest.fixture
def domname(request: pytest.FixtureRequest) -> str:
    """A domain name unique within the test session."""
    return f"vm-{request.node.name[:40].replace('[', '-').replace(']', '')}-{next(_counter)}"
