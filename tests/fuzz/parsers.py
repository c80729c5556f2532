"""Fuzz targets for the two untrusted-XML parsers, shared by tests/fuzz and scripts/fuzz.py.

A target takes raw bytes and either returns or raises :class:`Crash`. Refusing an input with
one of our errors (a VmmigrateError, which travels as a clean gRPC status) is the expected
outcome for almost every input; anything else escaping the parser is a crash. An input that
is accepted must also give a result that holds together (see each target).

The strategies build inputs near the interesting edges: real cookies and domain XML (seeds)
with byte-level and structural mutations, DTDs and entities (XXE, entity bombs), deep
nesting, huge documents, non-UTF-8 encodings, NULs, and names that are paths.
"""

from __future__ import annotations

import uuid as uuidlib
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from hypothesis import strategies as st
from vmmigrate.common.cookie import (
    ACCEPT_CONFIRM,
    ACCEPT_FINISH,
    ACCEPT_PERFORM,
    ACCEPT_PREPARE,
    ALL_FLAGS,
    CookieFlag,
    LockState,
    MigrationCookie,
    format_cookie,
    parse_cookie,
)
from vmmigrate.common.domainxml import canonical, parse_domain, rename
from vmmigrate.common.errors import CookieError, VmmigrateError

T = TypeVar("T")

LOCAL_HOSTUUID = "4a802f00-4cba-5df6-9679-a08c4c5b577f"  # the receiver's own host UUID

ACCEPT_SETS: dict[str, CookieFlag] = {
    "prepare": ACCEPT_PREPARE,
    "perform": ACCEPT_PERFORM,
    "finish": ACCEPT_FINISH,
    "confirm": ACCEPT_CONFIRM,
    "all": ALL_FLAGS,
    "none": CookieFlag(0),
}

VECTORS = Path(__file__).resolve().parents[1] / "data" / "cookies"


class Crash(AssertionError):
    """A fuzz input made a target misbehave (unexpected exception or inconsistent result)."""


# ---------------------------------------------------------------------------------------
# Seeds


def sample_domain(name: str = "fz-seed", uuid: str | None = None) -> str:
    u = f"\n  <uuid>{uuid}</uuid>" if uuid else ""
    return (
        f"<domain type='kvm'>\n  <name>{name}</name>{u}\n"
        "  <title>t</title>\n  <description>d &amp; &#233;</description>\n"
        "  <memory unit='MiB'>64</memory>\n  <currentMemory unit='KiB'>65536</currentMemory>\n"
        "  <vcpu placement='static' current='1'>2</vcpu>\n"
        "  <os>\n    <type arch='x86_64' machine='pc'>hvm</type>\n  </os>\n"
        "  <devices>\n    <emulator>/usr/bin/qemu-system-x86_64</emulator>\n"
        "    <!-- kept verbatim -->\n    <console type='pty'/>\n  </devices>\n</domain>\n"
    )


def seed_cookies() -> list[bytes]:
    seeds = [
        format_cookie(
            MigrationCookie(
                name="fz-seed",
                uuid="dcf47dbd-46d1-4d5b-b442-262a806a333a",
                hostname="src",
                hostuuid="00000000-0000-4000-8000-000000000001",
                features=CookieFlag.LOCKSTATE | CookieFlag.PERSISTENT,
                lockstate=LockState("sanlock", "lease"),
                domain=sample_domain("fz-seed", "dcf47dbd-46d1-4d5b-b442-262a806a333a").strip(),
                statistics=(("started", "1"), ("ram_total", "2")),
            )
        )
    ]
    seeds += [p.read_bytes() for p in sorted(VECTORS.glob("*.xml"))]
    assert len(seeds) > 20, f"cookie seeds missing from {VECTORS}"
    return seeds


SEED_COOKIES = seed_cookies()
SEED_DOMAINS = [
    sample_domain().encode(),
    sample_domain("fz-seed", str(uuidlib.UUID(int=7))).encode(),
    b"<domain type='kvm'><name>x</name></domain>",
]

# ---------------------------------------------------------------------------------------
# Hostile fragments

XXE = b'<!DOCTYPE q [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>'
BOMB = (
    b'<!DOCTYPE q [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;">'
    b'<!ENTITY c "&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;">]>'
)
FRAGMENTS = [
    XXE,
    BOMB,
    b"&xxe;",
    b"&c;",
    b"<!ENTITY % p SYSTEM 'http://127.0.0.1:1/x'>",
    b"<?xml version='1.0' encoding='latin-1'?>",
    b"<?xml version='1.0' encoding='UTF-16'?>",
    b"<?xml-stylesheet href='file:///etc/passwd'?>",
    b"<xi:include xmlns:xi='http://www.w3.org/2001/XInclude' href='/etc/passwd'/>",
    b"<![CDATA[<name>cdata</name>]]>",
    b"<!-- comment -->",
    b"\x00",
    b"\xff\xfe",
    b"\xef\xbb\xbf",
    b"\xc3\x28",
    b"\xed\xa0\x80",  # an encoded surrogate: not UTF-8
    b"caf\xe9",
    b"<name>../../etc/passwd</name>",
    b"<name>/</name>",
    b"<name>..</name>",
    b"<name>.</name>",
    b"<name>a\nb</name>",
    b"<name> x </name>",
    b"<name></name>",
    b"<uuid>not-a-uuid</uuid>",
    b"<uuid>DCF47DBD46D14D5BB442262A806A333A</uuid>",
    b"<hostuuid>4a802f00-4cba-5df6-9679-a08c4c5b577f</hostuuid>",
    b"<feature name='frobnicate'/>",
    b"<feature/>",
    b"<feature name='lockstate'/>",
    b"<graphics type='spice' port='-1' tlsPort='99999999999' listen=''/>",
    b"<nbd port='65536'><disk target='' capacity='-1'/></nbd>",
    b"<nbd port='x'/>",
    b"<statistics><started>x</started><\xc3\xa9/></statistics>",
    b"<capabilities><cap/></capabilities>",
    b"<blockDirtyBitmaps><disk/></blockDirtyBitmaps>",
    b"<lockstate/>",
    b"<domain/>",
    b"<domain/><domain/>",
    b"<memory unit='EiB'>99999999999999999999999</memory>",
    b"<memory>-1</memory>",
    b"<vcpu current='0'>0</vcpu>",
    b"<vcpu>99999999999999999999999999</vcpu>",
    b"<a xmlns='urn:x'/>",
    b"<p:qemu-migration xmlns:p='urn:p'/>",
    b"<x a='1' a='2'/>",
    b"&#0;",
    b"&#xD800;",
    b"&#1114112;",
    b"&amp;&lt;&gt;&apos;&quot;",
]

# ---------------------------------------------------------------------------------------
# Strategies


def _deep(depth: int, tag: bytes = b"a") -> bytes:
    return (b"<" + tag + b">") * depth + (b"</" + tag + b">") * depth


@st.composite
def mutated(draw: st.DrawFn, seeds: list[bytes]) -> bytes:
    """A seed with a few byte-level or structural mutations."""
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.integers(0, 9))
        pos = draw(st.integers(0, len(data)))
        if op == 0 and data:  # flip a byte
            i = min(pos, len(data) - 1)
            data[i] = draw(st.integers(0, 255))
        elif op == 1:  # delete a span
            end = draw(st.integers(pos, min(len(data), pos + 64)))
            del data[pos:end]
        elif op == 2:  # insert random bytes
            data[pos:pos] = draw(st.binary(max_size=16))
        elif op == 3:  # insert a hostile fragment
            data[pos:pos] = draw(st.sampled_from(FRAGMENTS))
        elif op == 4:  # a DTD up front
            data[0:0] = draw(st.sampled_from([XXE, BOMB, b"<!DOCTYPE qemu-migration>"]))
        elif op == 5:  # deep nesting
            data[pos:pos] = _deep(draw(st.integers(30, 200)))
        elif op == 6:  # a text node made huge
            data[pos:pos] = draw(st.sampled_from([b"x", b"&amp;", b"\xc3\xa9"])) * draw(
                st.integers(1_000, 300_000)
            )
        elif op == 7:  # truncate
            del data[pos:]
        elif op == 8:  # duplicate a span (repeated elements)
            end = draw(st.integers(pos, min(len(data), pos + 200)))
            data[end:end] = data[pos:end]
        else:  # random unicode text, UTF-8 encoded
            data[pos:pos] = draw(st.text(max_size=16)).encode("utf-8", "surrogatepass")
    return bytes(data)


def xml_inputs(seeds: list[bytes]) -> st.SearchStrategy[bytes]:
    return st.one_of(
        mutated(seeds),
        st.binary(max_size=256),
        st.sampled_from(seeds),
        st.builds(
            lambda head, s: head + s, st.sampled_from(FRAGMENTS), st.sampled_from(seeds)
        ),
        st.builds(lambda s: s.decode("utf-8", "replace").encode("utf-16"), st.sampled_from(seeds)),
        st.builds(lambda s: s.decode("utf-8", "replace").encode("latin-1", "replace"),
                  st.sampled_from(seeds)),
        st.just(_deep(100_000)),
        st.just(b"<qemu-migration>" + b"x" * (4 * 1024 * 1024) + b"</qemu-migration>"),
    )


cookie_inputs = xml_inputs(SEED_COOKIES)
domain_inputs = xml_inputs(SEED_DOMAINS)

# ---------------------------------------------------------------------------------------
# Targets


def _ours_or_crash(what: str, call: Callable[[], T]) -> T | None:
    """``call()``'s result, or None if it refused the input with one of our errors (with a
    message); anything else it raises is a crash."""
    try:
        return call()
    except VmmigrateError as exc:
        if not exc.message:
            raise Crash(f"{type(exc).__name__} with an empty message") from exc
        return None
    except Exception as exc:
        raise Crash(f"{what} raised {type(exc).__name__}: {exc}") from exc


def cookie_target(data: bytes, accept: CookieFlag) -> None:
    """parse_cookie with one accept set: a MigrationCookie or one of our errors. An accepted
    cookie formats again, and what it formats to parses back to the same cookie."""
    c = _ours_or_crash(
        "parse_cookie", lambda: parse_cookie(data, accept=accept, local_hostuuid=LOCAL_HOSTUUID)
    )
    if c is None:
        return
    if not c.name or not c.uuid or not c.hostname:
        raise Crash(f"accepted cookie lacks name/uuid/hostname: {c!r}")
    try:
        out = format_cookie(c)
    except CookieError:
        return  # e.g. text that XML 1.0 cannot carry: refused, not written
    except Exception as exc:
        raise Crash(f"format_cookie raised {type(exc).__name__}: {exc}") from exc
    try:
        again = parse_cookie(out, accept=accept, local_hostuuid=LOCAL_HOSTUUID)
    except Exception as exc:
        raise Crash(f"a formatted cookie does not parse: {type(exc).__name__}: {exc}") from exc
    if again != c:
        raise Crash(f"parse(format(c)) != c:\n{c!r}\n{again!r}")


def domain_target(data: bytes, generate_uuid: bool = True) -> None:
    """parse_domain: a DomainDef or one of our errors. An accepted domain has a safe name and
    a canonical UUID, and its stored XML parses again to the same identity."""
    for text in (data, _as_str(data)):
        if text is None:
            continue
        d = _ours_or_crash(
            "parse_domain",
            lambda t=text: parse_domain(t, max_bytes=1024 * 1024, generate_uuid=generate_uuid),
        )
        if d is not None:
            _check_domain(d)


def _as_str(data: bytes) -> str | None:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _check_domain(d: object) -> None:
    from vmmigrate.common.domainxml import DomainDef

    assert isinstance(d, DomainDef)
    if not d.name or "/" in d.name or d.name in (".", "..") or "\n" in d.name:
        raise Crash(f"accepted a name that could be a path: {d.name!r}")
    if d.uuid != str(uuidlib.UUID(d.uuid)):
        raise Crash(f"uuid not canonical: {d.uuid!r}")
    try:
        again = parse_domain(d.xml, max_bytes=len(d.xml.encode()) + 1, generate_uuid=False)
        canonical(d.xml)
        renamed = rename(d, "fz-renamed")
        parse_domain(renamed.xml, max_bytes=len(renamed.xml.encode()) + 1, generate_uuid=False)
    except Exception as exc:
        raise Crash(f"stored XML does not parse again: {type(exc).__name__}: {exc}") from exc
    if (again.name, again.uuid) != (d.name, d.uuid):
        raise Crash(f"identity changed on re-parse: {(d.name, d.uuid)} -> {(again.name, again.uuid)}")
    if renamed.uuid != d.uuid or renamed.name != "fz-renamed":
        raise Crash("rename changed the UUID or did not rename")
