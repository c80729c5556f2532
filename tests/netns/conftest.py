"""Fixtures for the network-namespace tests (see netlab.py for the topology)."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator

import pytest
from helpers.hosts import Host

from .netlab import SKIP_REASON, NetnsUnavailable, Network, skip_reason, start_hosts

_names = itertools.count()


@pytest.fixture(scope="session")
def make_network() -> Iterator[Callable[[], Network]]:
    """A factory of networks; every network made is deleted at the end of the session at the
    latest (fixtures below delete theirs earlier)."""
    reason = skip_reason()
    if reason is not None:
        pytest.skip(reason)
    made: list[Network] = []

    def make() -> Network:
        net = Network()
        try:
            net.create()
        except NetnsUnavailable as exc:  # container without the rights, seccomp, ...
            pytest.skip(f"{SKIP_REASON} ({exc})")
        made.append(net)
        return net

    yield make
    for net in made:
        net.destroy()


@pytest.fixture(scope="module")
def network(make_network: Callable[[], Network]) -> Iterator[Network]:
    net = make_network()
    yield net
    net.destroy()


@pytest.fixture(scope="module")
def ns_hosts(
    network: Network, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Host, Host]]:
    """Two hosts in two namespaces, shared by the module's happy-path tests."""
    a, b = start_hosts(network, tmp_path_factory.mktemp("netns-hosts"))
    yield a, b
    a.stop()
    b.stop()


@pytest.fixture
def domname(request: pytest.FixtureRequest) -> str:
    """A domain name unique within the test session."""
    node = request.node.name[:40].replace("[", "-").replace("]", "")
    return f"vm-ns-{node}-{next(_names)}"
