"""Property-based fuzzing of the cookie and domain XML parsers (moderate example counts;
scripts/fuzz.py runs the same targets at scale)."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .parsers import (
    ACCEPT_SETS,
    FRAGMENTS,
    SEED_COOKIES,
    SEED_DOMAINS,
    cookie_inputs,
    cookie_target,
    domain_inputs,
    domain_target,
)

FUZZ = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@pytest.mark.parametrize("accept", sorted(ACCEPT_SETS))
@FUZZ
@given(data=cookie_inputs)
def test_cookie_parser_never_crashes(accept: str, data: bytes) -> None:
    cookie_target(data, ACCEPT_SETS[accept])


@FUZZ
@given(data=domain_inputs, generate_uuid=st.booleans())
def test_domain_parser_never_crashes(data: bytes, generate_uuid: bool) -> None:
    domain_target(data, generate_uuid)


@pytest.mark.parametrize("fragment", FRAGMENTS)
def test_every_hostile_fragment_in_every_seed_position(fragment: bytes) -> None:
    """Deterministic sweep: each hostile fragment inserted after every '>' of every seed."""
    for seed in SEED_COOKIES[:2] + SEED_DOMAINS[:1]:
        cuts = [i + 1 for i, b in enumerate(seed) if b == ord(">")]
        for cut in cuts[:40]:
            data = seed[:cut] + fragment + seed[cut:]
            for accept in ACCEPT_SETS.values():
                cookie_target(data, accept)
            domain_target(data)
