"""Every field of every RPC, fuzzed against real daemons (moderate example counts;
scripts/fuzz.py runs the same cases at scale). See fuzz/rpc.py for what is checked."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .rpc import CATALOG, Lab, Rpc, field_case, raw_case, tunnel_case

FUZZ = settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                           HealthCheck.function_scoped_fixture],
)


@pytest.mark.parametrize("rpc", CATALOG, ids=lambda r: r.name)
@FUZZ
@given(data=st.data())
def test_rpc_fields(lab: Lab, rpc: Rpc, data: st.DataObject) -> None:
    field_case(lab, rpc, data)


@settings(FUZZ, max_examples=60)
@given(data=st.data())
def test_raw_request_bytes(lab: Lab, data: st.DataObject) -> None:
    raw_case(lab, data)


@settings(FUZZ, max_examples=25)
@given(data=st.data())
def test_tunnel_stream(lab: Lab, data: st.DataObject) -> None:
    tunnel_case(lab, data)
