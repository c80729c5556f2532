"""The migration cookie: golden vectors (real libvirt's and ours), every parser error text,
hostile input, and a property test that whatever we format we parse back unchanged."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from vmmigrate.common.cookie import (
    ACCEPT_CONFIRM,
    ACCEPT_FINISH,
    ACCEPT_PERFORM,
    ACCEPT_PREPARE,
    ALL_FLAGS,
    COOKIE_MAX_BYTES,
    FEATURE_NAMES,
    MANDATORY,
    Capability,
    CookieFlag,
    Graphics,
    LockState,
    MigrationCookie,
    Nbd,
    NbdDisk,
    format_cookie,
    parse_cookie,
)
from vmmigrate.common.errors import CookieError, OperationInvalid, SameHost

# Ours: captured from real libvirt migrations, plus a few written by us (tests/data/cookies/README)
VECTORS = Path(__file__).resolve().parents[1] / "data" / "cookies"
SAMPLES = sorted(p.name for p in VECTORS.glob("*.xml"))
LAB_A = "11111111-1111-4111-8111-111111111111"
LAB_B = "22222222-2222-4222-8222-222222222222"

DOM_UUID = "dcf47dbd-46d1-4d5b-b442-262a806a333a"
SRC_HOSTUUID = "4a802f00-4cba-5df6-9679-a08c4c5b577f"
OTHER_UUID = "00000000-0000-4000-8000-000000000001"
LIVE_UUID = "5d0c6a2e-8f43-4b7e-9a51-3c2f1e0d9b74"
OFFLINE_UUID = "0b9e3f52-7a61-4c1d-8e2f-6d4a5b3c2e10"
WRITTEN_SRC = "9f4e2d6c-1b3a-4c58-a7e9-0d2f6b8c4a17"

HEADER = (
    "<qemu-migration>\n"
    "  <name>upstream</name>\n"
    f"  <uuid>{DOM_UUID}</uuid>\n"
    "  <hostname>hostname</hostname>\n"
    f"  <hostuuid>{SRC_HOSTUUID}</hostuuid>\n"
)


def sample(name: str) -> bytes:
    return (VECTORS / name).read_bytes()


def cookie(body: str = "") -> bytes:
    return (HEADER + body + "</qemu-migration>\n").encode()


# ---------------------------------------------------------------------------------------
# Golden vectors: libvirt's own cookies and ours


@pytest.mark.parametrize("name", SAMPLES)
def test_sample_reformats_byte_for_byte(name: str) -> None:
    data = sample(name)
    assert format_cookie(parse_cookie(data, accept=ALL_FLAGS)) == data


@pytest.mark.parametrize("name", SAMPLES)
def test_sample_round_trip_is_stable(name: str) -> None:
    once = format_cookie(parse_cookie(sample(name), accept=ALL_FLAGS))
    twice = format_cookie(parse_cookie(once, accept=ALL_FLAGS))
    assert twice == once
    assert parse_cookie(once, accept=ALL_FLAGS) == parse_cookie(sample(name), accept=ALL_FLAGS)


def test_vectors_are_there() -> None:
    assert len(SAMPLES) >= 22
    assert sum(name.startswith("written-") for name in SAMPLES) == 3


def test_header_only_cookie() -> None:
    c = parse_cookie(sample("offline-p2p-prepare-B.xml"), accept=ALL_FLAGS)
    assert c == MigrationCookie(name="offvm", uuid=OFFLINE_UUID, hostname="B", hostuuid=LAB_B)
    assert c.capabilities is None
    assert c.features == CookieFlag(0)


def test_live_begin_fields() -> None:
    c = parse_cookie(sample("live-p2p-begin-A.xml"), accept=ALL_FLAGS)
    assert (c.name, c.uuid, c.hostname, c.hostuuid) == ("cookievm", LIVE_UUID, "A", LAB_A)
    # a lockstate feature without a <lockstate> section (no lock manager), and the guest's
    # <maxMemory slots=...> announced as memory-hotplug
    assert c.features == CookieFlag.LOCKSTATE | CookieFlag.MEMORY_HOTPLUG
    assert c.lockstate is None
    assert c.cpu is not None
    assert c.cpu.startswith("<cpu mode='custom' match='exact' check='full'>\n")
    assert "  <model fallback='forbid'>qemu64</model>\n" in c.cpu
    assert c.capabilities is not None
    assert [cap.name for cap in c.capabilities][:3] == ["xbzrle", "auto-converge", "rdma-pin-all"]
    assert [cap.name for cap in c.capabilities if cap.auto] == ["pause-before-switchover"]


def test_all_sections_fields() -> None:
    c = parse_cookie(sample("written-all-sections.xml"), accept=ALL_FLAGS)
    assert (c.name, c.uuid, c.hostname, c.hostuuid) == (
        "atlas",
        "3c9e7b12-5d4f-4a86-b1e0-8f27c6d5a943",
        "src.lab.example",
        WRITTEN_SRC,
    )
    assert c.features == CookieFlag(0)  # sections present, but no <feature> announced
    assert c.graphics == Graphics(
        type="spice",
        port=5902,
        listen="192.0.2.10",
        tls_port=5903,
        cert_info="subject",
        cert_value="C=XX,O=Lab,CN=src.lab.example",
    )
    assert c.lockstate == LockState(driver="sanlock", leases="lease-atlas-0001")
    assert c.nbd == Nbd(port=49160, disks=(NbdDisk("vda", 1 << 30), NbdDisk("vdb", 16 << 20)))
    assert c.capabilities == (Capability("xbzrle", False), Capability("auto-converge", True))
    assert c.statistics is not None
    assert c.statistics[:3] == (
        ("started", "1700000000000"),
        ("stopped", "1700000002500"),
        ("sent", "1700000002600"),
    )
    assert c.statistics[-1] == ("auto_converge_throttle", "20")
    assert len(c.statistics) == 9
    assert c.cpu == "<cpu mode='host-model' check='partial'/>"
    assert c.network == (
        "<network>\n"
        "  <interface index='0' vporttype='openvswitch'>\n"
        "    <portdata>ovs-port-atlas</portdata>\n"
        "  </interface>\n"
        "</network>"
    )
    assert c.block_dirty_bitmaps is None


def test_perform_domain_is_standalone_xml() -> None:
    c = parse_cookie(sample("live-p2p-perform-A.xml"), accept=ALL_FLAGS)
    assert c.features == CookieFlag.PERSISTENT
    assert c.domain is not None
    lines = c.domain.split("\n")
    assert lines[0] == "<domain type='qemu'>"
    assert lines[1] == "  <name>cookievm</name>"
    assert lines[-1] == "</domain>"
    assert "    <emulator>/usr/bin/qemu-system-x86_64</emulator>" in lines
    assert "  <maxMemory slots='4' unit='KiB'>524288</maxMemory>" in lines


def test_live_perform_statistics() -> None:
    c = parse_cookie(sample("nbd-spice-perform-A.xml"), accept=ALL_FLAGS)
    assert c.statistics is not None
    names = [name for name, _ in c.statistics]
    assert names[:3] == ["started", "stopped", "sent"]
    assert names[-1] == "auto_converge_throttle"
    assert dict(c.statistics)["memory_page_size"] == "4096"
    assert c.nbd == Nbd(port=None, disks=(NbdDisk("vda", 16 << 20),))


def test_hotplug_dest_fields() -> None:
    c = parse_cookie(sample("written-hotplug-dest.xml"), accept=ALL_FLAGS)
    assert c.features == CookieFlag.MEMORY_HOTPLUG | CookieFlag.CPU_HOTPLUG
    assert c.graphics == Graphics(type="vnc", port=5900, listen="127.0.0.1", tls_port=-1)
    assert c.capabilities is None


def test_nbd_prepare_fields() -> None:
    c = parse_cookie(sample("nbd-spice-prepare-B.xml"), accept=ALL_FLAGS)
    assert c.graphics == Graphics(type="spice", port=5911, listen="0.0.0.0", tls_port=-1)
    assert c.nbd == Nbd(port=49153, disks=(NbdDisk("vda", 16 << 20),))
    assert c.capabilities is not None
    assert [cap.name for cap in c.capabilities if cap.auto] == ["late-block-activate"]


def test_nbd_bitmaps_fields() -> None:
    c = parse_cookie(sample("written-nbd-bitmaps.xml"), accept=ALL_FLAGS)
    assert c.name == "ledger"
    assert c.features == CookieFlag.ALLOW_REBOOT
    assert c.nbd == Nbd(port=None, disks=(NbdDisk("sda", 512 << 20), NbdDisk("vda", 2 << 30)))
    assert c.capabilities == (Capability("dirty-bitmaps", False),)
    assert c.block_dirty_bitmaps is not None
    assert c.block_dirty_bitmaps.startswith("<blockDirtyBitmaps>\n  <disk target='vda'>\n")
    assert "    <bitmap name='weekly' alias='libvirt-1-weekly'/>\n" in c.block_dirty_bitmaps


# ---------------------------------------------------------------------------------------
# Building cookies in code


def test_offline_begin_cookie_is_what_libvirt_emits() -> None:
    c = MigrationCookie(
        name="vm1",
        uuid=DOM_UUID,
        hostname="src.example.org",
        hostuuid=SRC_HOSTUUID,
        features=CookieFlag.LOCKSTATE,
    )
    assert (
        format_cookie(c)
        == (
            "<qemu-migration>\n"
            "  <name>vm1</name>\n"
            f"  <uuid>{DOM_UUID}</uuid>\n"
            "  <hostname>src.example.org</hostname>\n"
            f"  <hostuuid>{SRC_HOSTUUID}</hostuuid>\n"
            "  <feature name='lockstate'/>\n"
            "</qemu-migration>\n"
        ).encode()
    )
    assert parse_cookie(format_cookie(c), accept=ACCEPT_PREPARE) == c


def test_features_are_written_in_bit_order() -> None:
    c = MigrationCookie(
        name="vm",
        uuid=DOM_UUID,
        hostname="h",
        hostuuid=SRC_HOSTUUID,
        features=CookieFlag.CPU_HOTPLUG | CookieFlag.LOCKSTATE | CookieFlag.MEMORY_HOTPLUG,
    )
    text = format_cookie(c).decode()
    assert text.index("'lockstate'") < text.index("'memory-hotplug'") < text.index("'cpu-hotplug'")


def test_special_characters_are_escaped_like_libvirt() -> None:
    c = MigrationCookie(name="a&b<c>'d\"", uuid=DOM_UUID, hostname="h", hostuuid=SRC_HOSTUUID)
    assert b"<name>a&amp;b&lt;c&gt;&apos;d&quot;</name>" in format_cookie(c)
    assert parse_cookie(format_cookie(c), accept=ALL_FLAGS).name == c.name


def test_domain_from_another_serializer_is_indented_and_canonical() -> None:
    c = MigrationCookie(
        name="vm",
        uuid=DOM_UUID,
        hostname="h",
        hostuuid=SRC_HOSTUUID,
        domain='<domain type="kvm">\n  <name>vm</name>\n</domain>\n',
    )
    data = format_cookie(c)
    assert b"  <domain type='kvm'>\n    <name>vm</name>\n  </domain>\n" in data
    parsed = parse_cookie(data, accept=ALL_FLAGS)
    assert parsed.domain == "<domain type='kvm'>\n  <name>vm</name>\n</domain>"


def test_namespaced_domain_survives_byte_for_byte() -> None:
    data = cookie(
        "  <domain type='kvm' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>\n"
        "    <name>vm</name>\n"
        "    <description>two\nlines</description>\n"
        "    <!-- a comment -->\n"
        "    <qemu:commandline>\n"
        "      <qemu:arg value='-S'/>\n"
        "    </qemu:commandline>\n"
        "  </domain>\n"
    )
    c = parse_cookie(data, accept=ALL_FLAGS)
    assert c.domain is not None
    assert "<description>two\nlines</description>" in c.domain
    assert format_cookie(c) == data


def test_format_refuses_characters_xml_cannot_carry() -> None:
    c = MigrationCookie(name="a\x01b", uuid=DOM_UUID, hostname="h", hostuuid=SRC_HOSTUUID)
    with pytest.raises(CookieError, match="U\\+0001"):
        format_cookie(c)


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ("<domain><name>vm</name>", "malformed <domain> section"),
        ("<network/>", "<domain> section of the migration cookie has root element <network>"),
    ],
)
def test_format_refuses_bad_raw_sections(section: str, message: str) -> None:
    c = MigrationCookie(
        name="vm", uuid=DOM_UUID, hostname="h", hostuuid=SRC_HOSTUUID, domain=section
    )
    with pytest.raises(CookieError, match=message):
        format_cookie(c)


# ---------------------------------------------------------------------------------------
# Parser checks, with libvirt's texts

ERROR_CASES: list[tuple[str, bytes, dict[str, str], str]] = [
    (
        "no-name",
        f"<qemu-migration><uuid>{DOM_UUID}</uuid></qemu-migration>".encode(),
        {},
        "missing name element in migration data",
    ),
    (
        "empty-name",
        b"<qemu-migration><name></name></qemu-migration>",
        {},
        "missing name element in migration data",
    ),
    (
        "name-mismatch",
        cookie(),
        {"expect_name": "other"},
        "Incoming cookie data had unexpected name upstream vs other",
    ),
    (
        "no-uuid",
        b"<qemu-migration><name>vm</name></qemu-migration>",
        {},
        "missing uuid element in migration data",
    ),
    (
        "uuid-mismatch",
        cookie(),
        {"expect_uuid": OTHER_UUID},
        f"Incoming cookie data had unexpected UUID {DOM_UUID} vs {OTHER_UUID}",
    ),
    (
        "no-hostname",
        f"<qemu-migration><name>vm</name><uuid>{DOM_UUID}</uuid></qemu-migration>".encode(),
        {},
        "missing hostname element in migration data",
    ),
    (
        "no-hostuuid",
        (
            f"<qemu-migration><name>vm</name><uuid>{DOM_UUID}</uuid>"
            "<hostname>h</hostname></qemu-migration>"
        ).encode(),
        {},
        "missing hostuuid element in migration data",
    ),
    (
        "bad-hostuuid",
        (
            f"<qemu-migration><name>vm</name><uuid>{DOM_UUID}</uuid>"
            "<hostname>h</hostname><hostuuid>not-a-uuid</hostuuid></qemu-migration>"
        ).encode(),
        {},
        "malformed hostuuid element in migration data",
    ),
    ("feature-no-name", cookie("<feature/>"), {}, "missing feature name"),
    (
        "feature-unknown",
        cookie("<feature name='bogus'/>"),
        {},
        "Unknown migration cookie feature bogus",
    ),
    (
        "feature-unsupported",
        cookie("<feature name='persistent'/>"),
        {"accept": "PREPARE"},
        "Unsupported migration cookie feature persistent",
    ),
    (
        "lockstate-no-driver",
        cookie("<lockstate><leases>x</leases></lockstate>"),
        {},
        "Missing lock driver name in migration cookie",
    ),
    (
        "two-domains",
        cookie("<domain type='kvm'/><domain type='kvm'/>"),
        {},
        "Too many domain elements in migration cookie",
    ),
    (
        "graphics-no-type",
        cookie("<graphics port='1' listen='a' tlsPort='2'/>"),
        {},
        "missing type attribute in migration data",
    ),
    (
        "graphics-unknown-type",
        cookie("<graphics type='sdl' port='1' listen='a' tlsPort='2'/>"),
        {},
        "unknown graphics type sdl",
    ),
    (
        "graphics-no-port",
        cookie("<graphics type='spice' listen='a' tlsPort='2'/>"),
        {},
        "missing port attribute in migration data",
    ),
    (
        "graphics-bad-port",
        cookie("<graphics type='spice' port='12x' listen='a' tlsPort='2'/>"),
        {},
        "missing port attribute in migration data",
    ),
    (
        "graphics-no-tlsport",
        cookie("<graphics type='spice' port='1' listen='a'/>"),
        {},
        "missing tlsPort attribute in migration data",
    ),
    (
        "graphics-no-listen",
        cookie("<graphics type='spice' port='1' tlsPort='2'/>"),
        {},
        "missing listen attribute in migration data",
    ),
    ("nbd-bad-port", cookie("<nbd port='x1'/>"), {}, "Malformed nbd port 'x1'"),
    (
        "nbd-port-out-of-range",
        cookie("<nbd port='4294967296'/>"),
        {},
        "Malformed nbd port '4294967296'",
    ),
    ("nbd-no-target", cookie("<nbd><disk capacity='1'/></nbd>"), {}, "Malformed disk target"),
    (
        "nbd-bad-capacity",
        cookie("<nbd><disk target='vda' capacity='-1'/></nbd>"),
        {},
        "Malformed disk capacity: '-1'",
    ),
    (
        "nbd-no-capacity",
        cookie("<nbd><disk target='vda'/></nbd>"),
        {},
        "Malformed disk capacity: '<null>'",
    ),
    (
        "cap-no-name",
        cookie("<capabilities><cap auto='yes'/></capabilities>"),
        {},
        "missing migration capability name",
    ),
    (
        "bitmaps-no-target",
        cookie("<blockDirtyBitmaps><disk><bitmap name='a' alias='b'/></disk></blockDirtyBitmaps>"),
        {},
        "malformed <blockDirtyBitmaps> in migration cookie",
    ),
    (
        "bitmaps-no-alias",
        cookie(
            "<blockDirtyBitmaps><disk target='vda'><bitmap name='a'/></disk></blockDirtyBitmaps>"
        ),
        {},
        "malformed <blockDirtyBitmaps> in migration cookie",
    ),
    (
        "wrong-root",
        b"<domain type='kvm'/>",
        {},
        "unexpected root element <domain>, expecting <qemu-migration>",
    ),
]

ACCEPTS = {"PREPARE": ACCEPT_PREPARE, "ALL": ALL_FLAGS}


@pytest.mark.parametrize(
    ("data", "kwargs", "message"),
    [pytest.param(d, k, m, id=i) for i, d, k, m in ERROR_CASES],
)
def test_parser_error_texts(data: bytes, kwargs: dict[str, str], message: str) -> None:
    accept = ACCEPTS[kwargs.get("accept", "ALL")]
    with pytest.raises(CookieError) as exc:
        parse_cookie(
            data,
            accept=accept,
            expect_name=kwargs.get("expect_name"),
            expect_uuid=kwargs.get("expect_uuid"),
            local_hostuuid=OTHER_UUID,
        )
    assert str(exc.value) == message
    assert type(exc.value) is CookieError


def test_expected_name_and_uuid_that_match_pass() -> None:
    c = parse_cookie(
        cookie(), accept=ALL_FLAGS, expect_name="upstream", expect_uuid=DOM_UUID.upper()
    )
    assert c.name == "upstream"


def test_same_host_is_refused_by_uuid() -> None:
    with pytest.raises(SameHost) as exc:
        parse_cookie(cookie(), accept=ALL_FLAGS, local_hostuuid=SRC_HOSTUUID.upper())
    assert str(exc.value) == f"Attempt to migrate guest to the same host {SRC_HOSTUUID}"
    assert isinstance(exc.value, OperationInvalid)
    assert not isinstance(exc.value, CookieError)


def test_same_hostname_other_uuid_is_fine() -> None:
    c = parse_cookie(cookie(), accept=ALL_FLAGS, local_hostuuid=OTHER_UUID)
    assert c.hostname == "hostname"


def test_hostuuid_is_read_liberally_and_stored_canonically() -> None:
    data = cookie().replace(SRC_HOSTUUID.encode(), b" 4A802F004CBA5DF6-9679-A08C4C5B577F ")
    assert parse_cookie(data, accept=ALL_FLAGS).hostuuid == SRC_HOSTUUID
    with pytest.raises(SameHost):
        parse_cookie(data, accept=ALL_FLAGS, local_hostuuid=SRC_HOSTUUID)


def test_unknown_elements_are_ignored() -> None:
    c = parse_cookie(cookie("  <allowReboot value='yes'/>\n  <future/>\n"), accept=ALL_FLAGS)
    assert c == parse_cookie(cookie(), accept=ALL_FLAGS)


def test_vnc_graphics_need_no_tls_port() -> None:
    c = parse_cookie(cookie("<graphics type='vnc' port='5900' listen='::'/>"), accept=ALL_FLAGS)
    assert c.graphics == Graphics(type="vnc", port=5900, listen="::", tls_port=-1)
    assert b"<graphics type='vnc' port='5900' listen='::'/>" in format_cookie(c)


def test_lockstate_without_leases() -> None:
    c = parse_cookie(cookie("<lockstate driver='sanlock'><leases/></lockstate>"), accept=ALL_FLAGS)
    assert c.lockstate == LockState(driver="sanlock", leases=None)
    assert parse_cookie(format_cookie(c), accept=ALL_FLAGS) == c


# ---------------------------------------------------------------------------------------
# Framing and hostile input


def test_trailing_nul_is_stripped() -> None:
    data = sample("written-all-sections.xml")
    assert parse_cookie(data + b"\0", accept=ALL_FLAGS) == parse_cookie(data, accept=ALL_FLAGS)


@pytest.mark.parametrize("data", [cookie().replace(b"upstream", b"up\0stream"), cookie() + b"\0\0"])
def test_nul_inside_is_refused(data: bytes) -> None:
    with pytest.raises(CookieError, match="NUL"):
        parse_cookie(data, accept=ALL_FLAGS)


XXE = (
    b'<?xml version="1.0"?>\n<!DOCTYPE qemu-migration [<!ENTITY x SYSTEM "file:///etc/passwd">]>\n'
    b"<qemu-migration><name>&x;</name></qemu-migration>"
)
BOMB = (
    b'<!DOCTYPE q [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;">'
    b'<!ENTITY c "&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;">]><qemu-migration><name>&c;</name>'
    b"</qemu-migration>"
)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        pytest.param(XXE, "must not contain a DTD", id="xxe"),
        pytest.param(BOMB, "must not contain a DTD", id="entity-bomb"),
        pytest.param(
            cookie().replace(b"upstream", b"up\xffstream"), "not valid UTF-8", id="latin1"
        ),
        pytest.param(b"<qemu-migration><name>vm</qemu-migration>", "malformed", id="malformed"),
        pytest.param(b"", "empty", id="empty"),
        pytest.param(cookie("<x>" * 100 + "</x>" * 100), "nests too deeply", id="too-deep"),
    ],
)
def test_hostile_input_is_refused(data: bytes, message: str) -> None:
    with pytest.raises(CookieError, match=message):
        parse_cookie(data, accept=ALL_FLAGS)


def test_oversize_is_refused() -> None:
    data = cookie("<!--" + "x" * COOKIE_MAX_BYTES + "-->")
    with pytest.raises(CookieError, match="too large"):
        parse_cookie(data, accept=ALL_FLAGS)
    with pytest.raises(CookieError, match="too large"):
        parse_cookie(cookie(), accept=ALL_FLAGS, max_bytes=100)


# ---------------------------------------------------------------------------------------
# What each phase accepts


def test_constants() -> None:
    assert MANDATORY == (
        CookieFlag.LOCKSTATE
        | CookieFlag.PERSISTENT
        | CookieFlag.MEMORY_HOTPLUG
        | CookieFlag.CPU_HOTPLUG
    )
    assert FEATURE_NAMES[CookieFlag.STATS] == "statistics"
    assert FEATURE_NAMES[CookieFlag.ALLOW_REBOOT] == "allowReboot"
    assert len(FEATURE_NAMES) == 12
    assert ACCEPT_CONFIRM == CookieFlag.STATS
    assert CookieFlag.PERSISTENT in ACCEPT_FINISH
    assert CookieFlag.GRAPHICS in ACCEPT_PERFORM
    assert CookieFlag.LOCKSTATE in ACCEPT_PREPARE


def test_confirm_reads_only_statistics() -> None:
    c = parse_cookie(sample("written-all-sections.xml"), accept=ACCEPT_CONFIRM)
    assert c.statistics is not None
    assert (c.graphics, c.lockstate, c.domain, c.network, c.nbd, c.cpu, c.capabilities) == (
        (None,) * 7
    )


def test_prepare_ignores_graphics_domain_network_statistics() -> None:
    c = parse_cookie(sample("written-all-sections.xml"), accept=ACCEPT_PREPARE)
    assert (c.graphics, c.domain, c.network, c.statistics) == (None, None, None, None)
    assert c.lockstate == LockState("sanlock", "lease-atlas-0001")
    assert c.nbd is not None
    assert c.cpu is not None
    assert c.capabilities is not None


def test_finish_reads_domain_network_nbd_statistics() -> None:
    c = parse_cookie(sample("written-all-sections.xml"), accept=ACCEPT_FINISH)
    assert None not in (c.domain, c.network, c.nbd, c.statistics)
    assert (c.graphics, c.lockstate, c.cpu, c.capabilities) == (None, None, None, None)


def test_sections_not_accepted_are_not_even_checked() -> None:
    data = cookie("<graphics/><nbd port='bad'/><domain/><domain/>")
    c = parse_cookie(data, accept=ACCEPT_CONFIRM)
    assert (c.graphics, c.nbd, c.domain) == (None, None, None)


def test_hotplug_features_need_prepare() -> None:
    data = sample("written-hotplug-dest.xml")
    assert parse_cookie(data, accept=ACCEPT_PREPARE).features == (
        CookieFlag.MEMORY_HOTPLUG | CookieFlag.CPU_HOTPLUG
    )
    with pytest.raises(CookieError, match=r"^Unsupported migration cookie feature memory-hotplug$"):
        parse_cookie(data, accept=ACCEPT_FINISH)


# ---------------------------------------------------------------------------------------
# Property: parse(format(c)) == c


def _xml_char(ch: str) -> bool:
    cp = ord(ch)
    return cp in (0x9, 0xA, 0xD) or 0x20 <= cp <= 0xD7FF or 0xE000 <= cp <= 0xFFFD or cp > 0xFFFF


_chars = st.one_of(
    st.sampled_from(list("&<>'\"\r\n\t ;]")),
    st.characters(codec="utf-8").filter(_xml_char),
)
texts = st.text(_chars, max_size=12)
nonempty = st.text(_chars, min_size=1, max_size=12)
int32 = st.integers(-(2**31), 2**31 - 1)
uuids = st.uuids().map(str)


def esc(s: str) -> str:
    for a, b in (("&", "&amp;"), ("<", "&lt;"), (">", "&gt;"), ("'", "&apos;"), ('"', "&quot;")):
        s = s.replace(a, b)
    return s.replace("\r", "&#13;")


def esc_attr(s: str) -> str:
    return esc(s).replace("\n", "&#10;").replace("\t", "&#9;")


@st.composite
def graphics(draw: st.DrawFn) -> Graphics:
    cert = draw(st.one_of(st.none(), nonempty))
    return Graphics(
        type=draw(st.sampled_from(["spice", "vnc"])),
        port=draw(int32),
        listen=draw(nonempty),
        tls_port=draw(int32),
        cert_info=None if cert is None else "subject",
        cert_value=cert,
    )


domains = st.builds(
    lambda name, desc: (
        f"<domain type='kvm'>\n  <name>{esc(name)}</name>\n"
        f"  <description>{esc(desc)}</description>\n  <devices/>\n</domain>"
    ),
    nonempty,
    nonempty,
)
networks = st.builds(
    lambda vport, data: (
        f"<network>\n  <interface index='0' vporttype='{esc_attr(vport)}'>\n"
        f"    <portdata>{esc(data)}</portdata>\n  </interface>\n</network>"
    ),
    texts,
    nonempty,
)
cpus = st.one_of(
    st.just("<cpu mode='host-passthrough' check='none' migratable='on'/>"),
    st.builds(
        lambda model: (
            f"<cpu mode='custom' match='exact'>\n  <model fallback='forbid'>{esc(model)}</model>\n"
            "</cpu>"
        ),
        nonempty,
    ),
)
bitmaps = st.builds(
    lambda target, name: (
        f"<blockDirtyBitmaps>\n  <disk target='{esc_attr(target)}'>\n"
        f"    <bitmap name='{esc_attr(name)}' alias='libvirt-{esc_attr(name)}'/>\n"
        "  </disk>\n</blockDirtyBitmaps>"
    ),
    texts,
    texts,
)
stat_names = st.from_regex(r"[A-Za-z_][A-Za-z0-9_.-]{0,12}", fullmatch=True)


@st.composite
def cookies(draw: st.DrawFn) -> MigrationCookie:
    flags = draw(st.lists(st.sampled_from(list(CookieFlag)), unique=True))
    features = CookieFlag(0)
    for f in flags:
        features |= f
    maybe = st.booleans()
    return MigrationCookie(
        name=draw(nonempty),
        uuid=draw(uuids),
        hostname=draw(nonempty),
        hostuuid=draw(uuids),
        features=features,
        graphics=draw(st.one_of(st.none(), graphics())),
        lockstate=draw(
            st.one_of(st.none(), st.builds(LockState, nonempty, st.one_of(st.none(), nonempty)))
        ),
        domain=draw(domains) if draw(maybe) else None,
        network=draw(networks) if draw(maybe) else None,
        nbd=draw(
            st.one_of(
                st.none(),
                st.builds(
                    Nbd,
                    st.one_of(st.none(), int32),
                    st.lists(
                        st.builds(NbdDisk, nonempty, st.integers(0, 2**64 - 1)), max_size=3
                    ).map(tuple),
                ),
            )
        ),
        statistics=draw(
            st.one_of(st.none(), st.lists(st.tuples(stat_names, texts), max_size=4).map(tuple))
        ),
        cpu=draw(cpus) if draw(maybe) else None,
        capabilities=draw(
            st.one_of(
                st.none(),
                st.lists(st.builds(Capability, texts, st.booleans()), max_size=4).map(tuple),
            )
        ),
        block_dirty_bitmaps=draw(bitmaps) if draw(maybe) else None,
    )


@settings(deadline=None, max_examples=300)
@given(cookies())
def test_parse_inverts_format(c: MigrationCookie) -> None:
    data = format_cookie(c)
    assert parse_cookie(data, accept=ALL_FLAGS) == c
    assert parse_cookie(data + b"\0", accept=ALL_FLAGS, expect_name=c.name, expect_uuid=c.uuid) == c
