"""Pure parts of the input hardening: status messages cut to fit a gRPC trailer, names that
XML cannot carry."""

from __future__ import annotations

import urllib.parse

import grpc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from vmmigrate.common.domainxml import parse_domain, rename, validate_name
from vmmigrate.common.errors import NoDomain, XMLError
from vmmigrate.common.rpc import MAX_STATUS_MESSAGE_BYTES, bounded_message, status_of


def encoded_size(message: str) -> int:
    """Size of the grpc-message trailer: UTF-8, percent-encoded outside printable ASCII."""
    return len(urllib.parse.quote(message.encode("utf-8", "replace"), safe=" !\"#$&'()*+,-./:;<=>?@[\\]^_`{|}~"))


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=20_000), st.integers(1, 5))
def test_bounded_message_fits_and_keeps_short_ones(text: str, repeat: int) -> None:
    message = text * repeat
    out = bounded_message(message)
    assert encoded_size(out) <= MAX_STATUS_MESSAGE_BYTES
    if len(message) * 12 <= MAX_STATUS_MESSAGE_BYTES:
        assert out == message
    else:
        assert out == message or (out.endswith(" characters, cut)")
                                  and message.startswith(out.rsplit("... (", 1)[0]))


def test_status_of_cuts_the_message_not_the_class() -> None:
    code, message, md = status_of(NoDomain("no domain with matching name '" + "\U0001f600" * 50_000))
    assert code == grpc.StatusCode.NOT_FOUND
    assert message.startswith("no domain with matching name '\U0001f600")
    assert message.endswith("(50030 characters, cut)")
    assert md == (("vmmigrate-error-class", "NoDomain"),)


@pytest.mark.parametrize("name", ["a\x00", "a\x08b", "\x1f", "x\ud800", "x\ufffe", "\x0b"])
def test_names_xml_cannot_carry_are_refused(name: str) -> None:
    with pytest.raises(XMLError, match=r"contains a character XML cannot carry$"):
        validate_name(name)
    d = parse_domain("<domain type='kvm'><name>x</name></domain>")
    with pytest.raises(XMLError):
        rename(d, name)


@pytest.mark.parametrize("name", ["a\tb", "a\rb", "caf\u00e9", "\U0001f600", "a b"])
def test_names_xml_can_carry_survive_a_rename(name: str) -> None:
    d = parse_domain("<domain type='kvm'><name>x</name></domain>")
    assert parse_domain(rename(d, name).xml).name == name
