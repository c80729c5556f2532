"""The migration cookie: libvirt's ``<qemu-migration>`` document, parsed and formatted.

Every v3 phase hands the next one an opaque cookie. It is a small UTF-8 XML document (sent
NUL-terminated by libvirt, at most 4 MiB) whose children always come in this order::

    <qemu-migration>
      <name>..</name> <uuid>..</uuid>          the domain, as the source knows it
      <hostname>..</hostname> <hostuuid>..</hostuuid>   the *sender's* host
      <feature name='..'/>...                  mandatory features: a receiver that was not
                                               asked to handle one must fail
      <graphics/> <lockstate/> <domain/> <network/> <nbd/> <statistics/> <cpu/>
      <capabilities/> <blockDirtyBitmaps/>     optional sections; a receiver only reads
                                               those it asked for in this phase
    </qemu-migration>

:class:`MigrationCookie` is a frozen value; :func:`parse_cookie` and :func:`format_cookie`
are pure functions (no I/O, no clock, no host lookups: the caller passes its own host UUID).
``features`` records only the ``<feature>`` elements (libvirt's "mandatory" flags); which
optional sections are present is simply which fields are not ``None``.

Sections vmmigrate does not interpret (``<domain>``, ``<network>``, ``<cpu>``,
``<blockDirtyBitmaps>``) are kept as XML text, standalone (indentation level 0, no trailing
newline). :func:`format_cookie` indents them into the cookie and :func:`parse_cookie`
removes that indentation again, touching only whitespace-only text, so a section travels
byte-identical and libvirt's own cookies re-format byte for byte (the serializer,
:mod:`common.xmlwriter`, writes as libvirt does).

Error texts follow libvirt's ``qemuMigrationCookieXMLParse`` word for word
(docs/ARCHITECTURE.md section 5).
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from typing import Any

from lxml import etree
from vmmigrate.common.errors import CookieError, SameHost
from vmmigrate.common.uuids import canonical_uuid_or_none
from vmmigrate.common.xmlsafe import DEFAULT_MAX_DEPTH, parse_untrusted
from vmmigrate.common.xmlwriter import XmlWriter, qualified_name

__all__ = [
    "ACCEPT_CONFIRM",
    "ACCEPT_FINISH",
    "ACCEPT_PERFORM",
    "ACCEPT_PREPARE",
    "ALL_FLAGS",
    "COOKIE_MAX_BYTES",
    "FEATURE_NAMES",
    "MANDATORY",
    "NO_FEATURES",
    "Capability",
    "CookieFlag",
    "Graphics",
    "LockState",
    "MigrationCookie",
    "Nbd",
    "NbdDisk",
    "format_cookie",
    "parse_cookie",
]

# REMOTE_MIGRATE_COOKIE_MAX in libvirt's remote_protocol.x.
COOKIE_MAX_BYTES = 4 * 1024 * 1024


class CookieFlag(enum.IntFlag):
    """libvirt's qemuMigrationCookieFlags: bit index = position in its enum."""

    GRAPHICS = 1 << 0
    LOCKSTATE = 1 << 1
    PERSISTENT = 1 << 2
    NETWORK = 1 << 3
    NBD = 1 << 4
    STATS = 1 << 5
    MEMORY_HOTPLUG = 1 << 6
    CPU_HOTPLUG = 1 << 7
    CPU = 1 << 8
    ALLOW_REBOOT = 1 << 9  # obsolete; only its feature name survives
    CAPS = 1 << 10
    BLOCK_DIRTY_BITMAPS = 1 << 11


# The strings used in <feature name='..'/> (qemuMigrationCookieFlag enum strings).
FEATURE_NAMES: dict[CookieFlag, str] = {
    CookieFlag.GRAPHICS: "graphics",
    CookieFlag.LOCKSTATE: "lockstate",
    CookieFlag.PERSISTENT: "persistent",
    CookieFlag.NETWORK: "network",
    CookieFlag.NBD: "nbd",
    CookieFlag.STATS: "statistics",
    CookieFlag.MEMORY_HOTPLUG: "memory-hotplug",
    CookieFlag.CPU_HOTPLUG: "cpu-hotplug",
    CookieFlag.CPU: "cpu",
    CookieFlag.ALLOW_REBOOT: "allowReboot",
    CookieFlag.CAPS: "capabilities",
    CookieFlag.BLOCK_DIRTY_BITMAPS: "block-dirty-bitmaps",
}
_FEATURE_BY_NAME: dict[str, CookieFlag] = {v: k for k, v in FEATURE_NAMES.items()}

ALL_FLAGS = CookieFlag((1 << 12) - 1)
NO_FEATURES = CookieFlag(0)

# Features libvirt announces with <feature name=..>: a receiver that does not understand one
# must refuse the migration rather than silently lose lock state, the persistent definition
# or the hotplug layout (docs/ARCHITECTURE.md section 5).
MANDATORY = (
    CookieFlag.LOCKSTATE
    | CookieFlag.PERSISTENT
    | CookieFlag.MEMORY_HOTPLUG
    | CookieFlag.CPU_HOTPLUG
)

# What each receiving phase parses (docs/ARCHITECTURE.md section 5).
ACCEPT_PREPARE = (
    CookieFlag.LOCKSTATE
    | CookieFlag.NBD
    | CookieFlag.MEMORY_HOTPLUG
    | CookieFlag.CPU_HOTPLUG
    | CookieFlag.CPU
    | CookieFlag.CAPS
    | CookieFlag.BLOCK_DIRTY_BITMAPS
)
# libvirt adds NBD here only for storage migrations. Accepting it always costs nothing: the
# destination only sends <nbd> when it started an NBD server, and NBD is never mandatory.
ACCEPT_PERFORM = (
    CookieFlag.GRAPHICS | CookieFlag.CAPS | CookieFlag.BLOCK_DIRTY_BITMAPS | CookieFlag.NBD
)
# PERSISTENT is always accepted in Finish so that older senders' <domain> is not refused.
ACCEPT_FINISH = CookieFlag.NETWORK | CookieFlag.STATS | CookieFlag.NBD | CookieFlag.PERSISTENT
ACCEPT_CONFIRM = CookieFlag.STATS

# libvirt knows more graphics types, but only these two ever carry migration data.
_GRAPHICS_TYPES = ("vnc", "spice")


@dataclass(frozen=True)
class Graphics:
    """Where clients reconnect after the switch-over (libvirt bakes it for SPICE only).

    ``tls_port`` is -1 when there is none; libvirt writes ``tlsPort`` for SPICE always and
    never for VNC, so for VNC it is written only when it is not -1. ``cert_info`` is
    ``'subject'`` whenever ``cert_value`` is set (the only kind libvirt reads).
    """

    type: str
    port: int
    listen: str
    tls_port: int
    cert_info: str | None = None
    cert_value: str | None = None


@dataclass(frozen=True)
class LockState:
    """The lock manager's name and its opaque lease state."""

    driver: str
    leases: str | None = None


@dataclass(frozen=True)
class NbdDisk:
    """A disk the destination must pre-create: its target name and size in bytes."""

    target: str
    capacity: int


@dataclass(frozen=True)
class Nbd:
    """The destination's NBD server port (Prepare -> Perform) or the disks to copy."""

    port: int | None = None
    disks: tuple[NbdDisk, ...] = ()


@dataclass(frozen=True)
class Capability:
    """A QEMU migration capability the sender supports; ``auto``: it always enables it."""

    name: str
    auto: bool


@dataclass(frozen=True)
class MigrationCookie:
    """One cookie. ``None`` means the section is absent (or was not accepted on parse)."""

    name: str
    uuid: str
    hostname: str  # the sender's
    hostuuid: str  # the sender's, canonical 8-4-4-4-12 lowercase (parse normalises it)
    features: CookieFlag = NO_FEATURES  # the <feature name=.../> elements present
    graphics: Graphics | None = None
    lockstate: LockState | None = None
    domain: str | None = None  # the embedded <domain> element, as XML text
    network: str | None = None  # raw XML text of <network>
    nbd: Nbd | None = None
    statistics: tuple[tuple[str, str], ...] | None = None  # (element name, text), in order
    cpu: str | None = None  # raw XML text of <cpu>
    capabilities: tuple[Capability, ...] | None = None  # None = absent, () = empty element
    block_dirty_bitmaps: str | None = None  # raw XML text of <blockDirtyBitmaps>


# ---------------------------------------------------------------------------------------
# Parsing


def parse_cookie(
    data: bytes,
    *,
    accept: CookieFlag,
    local_hostuuid: str | None = None,
    expect_name: str | None = None,
    expect_uuid: str | None = None,
    max_bytes: int = COOKIE_MAX_BYTES,
) -> MigrationCookie:
    """Parse and check a received cookie.

    ``accept`` is what this phase handles: other optional sections are ignored (left
    ``None``), other ``<feature>``s are refused. ``local_hostuuid`` is the receiver's own host
    UUID (refused with :class:`SameHost`); ``expect_name``/``expect_uuid`` are the domain's.
    Raises :class:`CookieError` for anything else that is wrong.
    """
    raw = bytes(data)
    # libvirt sends strlen+1 bytes; the terminator is optional for us (gRPC frames bytes).
    if raw.endswith(b"\0"):
        raw = raw[:-1]
    # A NUL inside would make libvirt silently cut the cookie short; refuse it instead.
    # (Oversize data is left to parse_untrusted, which says so with the size.)
    if len(raw) <= max_bytes and b"\0" in raw:
        raise CookieError("migration cookie contains a NUL byte before its end")
    root = parse_untrusted(raw, what="migration cookie", max_bytes=max_bytes, error=CookieError)
    if root.tag != "qemu-migration":
        # A default namespace would otherwise print as the very name we expect.
        shown = root.tag if root.prefix is None else qualified_name(root)
        raise CookieError(f"unexpected root element <{shown}>, expecting <qemu-migration>")

    name, uuid, hostname, hostuuid = _parse_identity(
        root, expect_name=expect_name, expect_uuid=expect_uuid, local_hostuuid=local_hostuuid
    )
    return MigrationCookie(
        name=name,
        uuid=uuid,
        hostname=hostname,
        hostuuid=hostuuid,
        features=_parse_features(root, accept),
        **_parse_sections(root, accept),
    )


def _parse_identity(
    root: etree._Element,
    *,
    expect_name: str | None,
    expect_uuid: str | None,
    local_hostuuid: str | None,
) -> tuple[str, str, str, str]:
    """The domain's name and UUID and the sender's hostname and host UUID, checked."""
    name = _child_string(root, "name")
    if not name:
        raise CookieError("missing name element in migration data")
    if expect_name is not None and name != expect_name:
        raise CookieError(f"Incoming cookie data had unexpected name {name} vs {expect_name}")

    uuid = _child_string(root, "uuid")
    if not uuid:
        raise CookieError("missing uuid element in migration data")
    if expect_uuid is not None:
        # libvirt compares the cookie's text with its own canonical rendering of the UUID.
        expected = canonical_uuid_or_none(expect_uuid) or expect_uuid
        if uuid != expected:
            raise CookieError(f"Incoming cookie data had unexpected UUID {uuid} vs {expected}")

    hostname = _child_string(root, "hostname")
    if not hostname:
        raise CookieError("missing hostname element in migration data")

    hostuuid_text = _child_string(root, "hostuuid")
    if not hostuuid_text:
        raise CookieError("missing hostuuid element in migration data")
    hostuuid = canonical_uuid_or_none(hostuuid_text)
    if hostuuid is None:
        raise CookieError("malformed hostuuid element in migration data")
    # Only the host UUID decides "same host": equal hostnames (localhost, clones) are common
    # and harmless, which is why libvirt stopped comparing them.
    if local_hostuuid is not None:
        local = canonical_uuid_or_none(local_hostuuid)
        if local is None:
            raise ValueError(f"local host UUID {local_hostuuid!r} is malformed")
        if hostuuid == local:
            raise SameHost(f"Attempt to migrate guest to the same host {hostuuid_text}")
    return name, uuid, hostname, hostuuid


def _parse_sections(root: etree._Element, accept: CookieFlag) -> dict[str, Any]:
    """The optional sections this phase accepts, as MigrationCookie fields."""

    accepted = accept.value  # plain ints: Flag's own & costs microseconds

    def wanted(flag: CookieFlag, tag: str) -> etree._Element | None:
        # libvirt reads an optional section only when this phase asked for it.
        return root.find(tag) if flag.value & accepted else None

    # (Elements are tested with "is None": an lxml element without children is falsy.)
    el = wanted(CookieFlag.GRAPHICS, "graphics")
    graphics = None if el is None else _parse_graphics(el)
    el = wanted(CookieFlag.LOCKSTATE, "lockstate")
    lockstate = None if el is None else _parse_lockstate(el)

    domain: str | None = None
    if CookieFlag.PERSISTENT.value & accepted:
        domains = root.findall("domain")
        if len(domains) > 1:
            raise CookieError("Too many domain elements in migration cookie")
        if domains:
            domain = _section_text(domains[0])

    el = wanted(CookieFlag.NETWORK, "network")
    network = None if el is None else _section_text(el)
    el = wanted(CookieFlag.NBD, "nbd")
    nbd = None if el is None else _parse_nbd(el)
    el = wanted(CookieFlag.STATS, "statistics")
    statistics = None if el is None else _parse_statistics(el)
    el = wanted(CookieFlag.CPU, "cpu")
    cpu = None if el is None else _section_text(el)
    el = wanted(CookieFlag.CAPS, "capabilities")
    capabilities = None if el is None else _parse_capabilities(el)
    el = wanted(CookieFlag.BLOCK_DIRTY_BITMAPS, "blockDirtyBitmaps")
    bitmaps = None if el is None else _parse_block_dirty_bitmaps(root, el)
    return {
        "graphics": graphics,
        "lockstate": lockstate,
        "domain": domain,
        "network": network,
        "nbd": nbd,
        "statistics": statistics,
        "cpu": cpu,
        "capabilities": capabilities,
        "block_dirty_bitmaps": bitmaps,
    }


def _parse_features(root: etree._Element, accept: CookieFlag) -> CookieFlag:
    features = CookieFlag(0)
    for el in root.iterfind("feature"):
        fname = el.get("name")
        if fname is None:
            raise CookieError("missing feature name")
        flag = _FEATURE_BY_NAME.get(fname)
        if flag is None:
            raise CookieError(f"Unknown migration cookie feature {fname}")
        # As in libvirt, any announced feature this phase does not handle is fatal (in
        # practice only the MANDATORY ones are ever announced).
        if not flag & accept:
            raise CookieError(f"Unsupported migration cookie feature {fname}")
        features |= flag
    return features


def _parse_graphics(el: etree._Element) -> Graphics:
    gtype = el.get("type")
    if not gtype:
        raise CookieError("missing type attribute in migration data")
    if gtype not in _GRAPHICS_TYPES:
        raise CookieError(f"unknown graphics type {gtype}")
    port = _c_int(el.get("port"), -(2**31), 2**31 - 1)
    if port is None:
        raise CookieError("missing port attribute in migration data")
    tls_port = _c_int(el.get("tlsPort"), -(2**31), 2**31 - 1)
    if tls_port is None:
        # Only SPICE has a TLS port in libvirt's cookie; for VNC it is simply absent.
        if gtype == "spice":
            raise CookieError("missing tlsPort attribute in migration data")
        tls_port = -1
    listen = el.get("listen")
    if not listen:
        raise CookieError("missing listen attribute in migration data")
    cert_value: str | None = None
    for cert in el.iterfind("cert"):
        if cert.get("info") == "subject":
            cert_value = cert.get("value") or None
            break
    return Graphics(
        type=gtype,
        port=port,
        listen=listen,
        tls_port=tls_port,
        cert_info="subject" if cert_value is not None else None,
        cert_value=cert_value,
    )


def _parse_lockstate(el: etree._Element) -> LockState:
    driver = el.get("driver")
    if not driver:
        raise CookieError("Missing lock driver name in migration cookie")
    # An empty <leases> means "no state", as in libvirt.
    return LockState(driver=driver, leases=_child_string(el, "leases") or None)


def _parse_nbd(el: etree._Element) -> Nbd:
    port_text = el.get("port")
    port: int | None = None
    if port_text:  # libvirt treats port='' as no port
        port = _c_int(port_text, -(2**31), 2**31 - 1)
        if port is None:
            raise CookieError(f"Malformed nbd port '{port_text}'")
    disks: list[NbdDisk] = []
    for disk in el.iterfind("disk"):
        target = disk.get("target")
        if not target:
            raise CookieError("Malformed disk target")
        cap_text = disk.get("capacity")
        capacity = _c_uint(cap_text, 2**64 - 1)
        if capacity is None:
            # libvirt prints a missing value as <null> (its NULLSTR).
            raise CookieError(
                f"Malformed disk capacity: '{'<null>' if cap_text is None else cap_text}'"
            )
        disks.append(NbdDisk(target=target, capacity=capacity))
    return Nbd(port=port, disks=tuple(disks))


def _parse_statistics(el: etree._Element) -> tuple[tuple[str, str], ...]:
    # libvirt reads a fixed list of counters; we keep every simple child, in order, so that
    # newer senders' counters survive a relay.
    return tuple(
        (child.tag, _string_value(child))
        for child in el
        if isinstance(child.tag, str) and not child.tag.startswith("{")
    )


def _parse_capabilities(el: etree._Element) -> tuple[Capability, ...]:
    caps: list[Capability] = []
    for cap in el.iterfind("cap"):
        cname = cap.get("name")
        if cname is None:
            raise CookieError("missing migration capability name")
        # Unknown names are kept: which QEMU capabilities exist is the hypervisor's business.
        caps.append(Capability(name=cname, auto=cap.get("auto") == "yes"))
    return tuple(caps)


def _parse_block_dirty_bitmaps(root: etree._Element, el: etree._Element) -> str:
    # libvirt validates the disks of every <blockDirtyBitmaps>, not only the first.
    for disk in root.iterfind("blockDirtyBitmaps/disk"):
        if disk.get("target") is None:
            raise CookieError("malformed <blockDirtyBitmaps> in migration cookie")
        for bitmap in disk.iterfind("bitmap"):
            if bitmap.get("name") is None or bitmap.get("alias") is None:
                raise CookieError("malformed <blockDirtyBitmaps> in migration cookie")
    return _section_text(el)


def _string_value(el: etree._Element) -> str:
    """XPath string(): all descendant text, without comments or processing instructions."""
    return "".join(str(t) for t in el.itertext())


def _child_string(el: etree._Element, tag: str) -> str:
    """libvirt's ``string(./tag[1])``: '' when the child is missing."""
    child = el.find(tag)
    return "" if child is None else _string_value(child)


_C_SPACE = " \t\n\v\f\r"
_C_INT_RE = re.compile(rf"[{_C_SPACE}]*([+-]?[0-9]+)\Z")
_C_UINT_RE = re.compile(rf"[{_C_SPACE}]*\+?([0-9]+)\Z")


def _c_int(text: str | None, lo: int, hi: int) -> int | None:
    """libvirt's virStrToLong_i: base 10, leading blanks, the whole string, in range.

    Python's int() would also take trailing blanks and underscores, which libvirt refuses.
    """
    if text is None or (m := _C_INT_RE.match(text)) is None:
        return None
    value = int(m.group(1))
    return value if lo <= value <= hi else None


def _c_uint(text: str | None, hi: int) -> int | None:
    # Unlike strtoull we refuse a minus sign rather than wrap it around to a huge size.
    if text is None or (m := _C_UINT_RE.match(text)) is None:
        return None
    value = int(m.group(1))
    return value if value <= hi else None


# ---------------------------------------------------------------------------------------
# Formatting


def format_cookie(c: MigrationCookie) -> bytes:
    """Write ``c`` exactly as libvirt would: fixed child order, 2-space indentation,
    single-quoted attributes, a trailing newline (and no NUL: the transport adds it).

    Raises :class:`CookieError` when a raw section is not well-formed XML with the right
    root element, or when a string holds characters XML cannot carry (libvirt silently drops
    those; dropping them here would change the name the peer checks against).
    """
    out = ["<qemu-migration>\n"]
    out.append(f"  <name>{_esc_text(c.name)}</name>\n")
    out.append(f"  <uuid>{_esc_text(c.uuid)}</uuid>\n")
    out.append(f"  <hostname>{_esc_text(c.hostname)}</hostname>\n")
    out.append(f"  <hostuuid>{_esc_text(c.hostuuid)}</hostuuid>\n")
    for flag in CookieFlag:  # bit order, as libvirt loops over its flag enum
        if flag & c.features:
            out.append(f"  <feature name='{FEATURE_NAMES[flag]}'/>\n")
    if c.graphics is not None:
        out.append(_format_graphics(c.graphics))
    if c.lockstate is not None:
        out.append(_format_lockstate(c.lockstate))
    if c.domain is not None:
        out.append(_format_section(c.domain, "domain"))
    if c.network is not None:
        out.append(_format_section(c.network, "network"))
    if c.nbd is not None:
        out.append(_format_nbd(c.nbd))
    if c.statistics is not None:
        out.append(_format_statistics(c.statistics))
    if c.cpu is not None:
        out.append(_format_section(c.cpu, "cpu"))
    if c.capabilities is not None:
        out.append(_format_capabilities(c.capabilities))
    if c.block_dirty_bitmaps is not None:
        out.append(_format_section(c.block_dirty_bitmaps, "blockDirtyBitmaps"))
    out.append("</qemu-migration>\n")
    data = "".join(out).encode("utf-8")
    # Fail on the sender rather than have every receiver refuse it.
    if len(data) > COOKIE_MAX_BYTES:
        raise CookieError(
            f"migration cookie is too large: {len(data)} bytes (limit {COOKIE_MAX_BYTES})"
        )
    return data


_STAT_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*")


def _format_lockstate(ls: LockState) -> str:
    if ls.leases:
        return (
            f"  <lockstate driver='{_esc_attr(ls.driver)}'>\n"
            f"    <leases>{_esc_text(ls.leases)}</leases>\n"
            "  </lockstate>\n"
        )
    # libvirt omits a lock state without leases; we keep the driver so that the value
    # survives a round trip.
    return f"  <lockstate driver='{_esc_attr(ls.driver)}'/>\n"


def _format_statistics(statistics: tuple[tuple[str, str], ...]) -> str:
    out = ["  <statistics>\n"]
    for sname, value in statistics:
        if not _STAT_NAME_RE.fullmatch(sname):
            raise CookieError(f"invalid statistics element name {sname!r}")
        out.append(f"    <{sname}>{_esc_text(value)}</{sname}>\n")
    out.append("  </statistics>\n")
    return "".join(out)


def _format_capabilities(caps: tuple[Capability, ...]) -> str:
    lines = "".join(
        f"    <cap name='{_esc_attr(cap.name)}' auto='{'yes' if cap.auto else 'no'}'/>\n"
        for cap in caps
    )
    return f"  <capabilities>\n{lines}  </capabilities>\n"


def _format_graphics(g: Graphics) -> str:
    attrs = f" type='{_esc_attr(g.type)}' port='{g.port}' listen='{_esc_attr(g.listen)}'"
    if g.type == "spice" or g.tls_port != -1:
        attrs += f" tlsPort='{g.tls_port}'"
    if not g.cert_value:
        return f"  <graphics{attrs}/>\n"
    info = _esc_attr(g.cert_info or "subject")
    return (
        f"  <graphics{attrs}>\n"
        f"    <cert info='{info}' value='{_esc_attr(g.cert_value)}'/>\n"
        "  </graphics>\n"
    )


def _format_nbd(nbd: Nbd) -> str:
    # libvirt omits port 0; we write any port that is set so that it round-trips.
    head = "  <nbd" if nbd.port is None else f"  <nbd port='{nbd.port}'"
    if not nbd.disks:
        return head + "/>\n"
    disks = "".join(
        f"    <disk target='{_esc_attr(d.target)}' capacity='{d.capacity}'/>\n" for d in nbd.disks
    )
    return f"{head}>\n{disks}  </nbd>\n"


# ---------------------------------------------------------------------------------------
# Raw sections

_INDENT = 2  # a section's element sits one level below <qemu-migration>

# libvirt's virBufferEscapeString escapes all five in text and attributes alike.
_WRITER = XmlWriter("migration cookie", CookieError)
_esc_text = _WRITER.text
_esc_attr = _WRITER.attr


def _section_text(el: etree._Element) -> str:
    """A cookie child as standalone XML text (its cookie indentation removed)."""
    out: list[str] = []
    _WRITER.element(el, out, -_INDENT)
    return "".join(out)


def _format_section(text: str, tag: str) -> str:
    """A standalone section, indented into the cookie, as one line group."""
    # The section must nest below <qemu-migration>, hence one level less than the usual limit.
    el = parse_untrusted(
        text,
        what=f"<{tag}> section of the migration cookie",
        max_bytes=COOKIE_MAX_BYTES,
        error=CookieError,
        max_depth=DEFAULT_MAX_DEPTH - 1,
    )
    if el.tag != tag:
        raise CookieError(
            f"<{tag}> section of the migration cookie has root element <{qualified_name(el)}>"
        )
    out = [" " * _INDENT]
    _WRITER.element(el, out, _INDENT)
    out.append("\n")
    return "".join(out)
