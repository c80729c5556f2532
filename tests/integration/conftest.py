from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers.hosts import Host

_counter = itertools.count()

# The inner loop (`pytest -m "not slow"`, under two minutes with tests/unit and tests/fuzz):
# of the integration tests, the offline paths, every bad-input refusal and the memory check
# of each live mode, over real daemons. Every other integration test is marked slow here (CI
# runs them all); tests already marked slow stay so.
INNER_LOOP_MODULES = {"test_offline", "test_bad_input", "test_hardened_inputs"}
INNER_LOOP_TESTS = {
    "test_live.py::test_live_migration_moves_memory_intact",
    "test_tls.py::test_offline_migration_over_mtls",
    "test_tls.py::test_readonly_client_may_query_not_change",
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        path = Path(str(item.fspath))
        if path.parent.name != "integration" or path.stem in INNER_LOOP_MODULES:
            continue
        if f"{path.name}::{item.originalname}" not in INNER_LOOP_TESTS:  # type: ignore[attr-defined]
            item.add_marker(pytest.mark.slow)


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
