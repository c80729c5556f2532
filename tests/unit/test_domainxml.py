"""The domain XML model: verbatim text, UUID generation, renames, identity checks."""

from __future__ import annotations

import uuid as uuidlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from vmmigrate.common.domainxml import (
    canonical,
    check_abi_stable,
    parse_domain,
    rename,
    validate_name,
)
from vmmigrate.common.errors import OperationInvalid, XMLError

SAMPLE = """<domain type='kvm' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>web01</name>
  <uuid>DCF47DBD46D14D5BB442262A806A333A</uuid>
  <title>Web server</title>
  <description>front end &amp; cache</description>
  <memory unit='GiB'>2</memory>
  <currentMemory unit='MiB'>1024</currentMemory>
  <vcpu placement='static' current='2'>4</vcpu>
  <os><type arch='x86_64' machine='pc-q35-7.2'>hvm</type></os>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <!-- a comment that must survive -->
    <disk type='file' device='disk'><source file='/var/lib/images/web01.qcow2'/></disk>
  </devices>
  <qemu:commandline><qemu:arg value='-no-reboot'/></qemu:commandline>
</domain>
"""


def test_fields_and_verbatim_text() -> None:
    d = parse_domain(SAMPLE)
    assert d.name == "web01"
    assert d.uuid == "dcf47dbd-46d1-4d5b-b442-262a806a333a"
    assert d.title == "Web server"
    assert d.description == "front end & cache"
    assert d.memory_kib == 2 * 1024 * 1024 and d.current_memory_kib == 1024 * 1024
    assert d.vcpus == 2 and d.os_type == "hvm"
    assert d.emulator == "/usr/bin/qemu-system-x86_64"
    assert d.xml == SAMPLE  # nothing changed, nothing rewritten


def test_xml_declaration_is_dropped_but_rest_kept() -> None:
    d = parse_domain('<?xml version="1.0" encoding="UTF-8"?>\n' + SAMPLE)
    assert d.xml == SAMPLE


def test_uuid_generated_when_missing() -> None:
    xml = "<domain type='kvm'>\n  <name>nouuid</name>\n  <memory>1024</memory>\n</domain>"
    d = parse_domain(xml)
    assert str(uuidlib.UUID(d.uuid)) == d.uuid
    assert f"<name>nouuid</name>\n  <uuid>{d.uuid}</uuid>\n  <memory>" in d.xml
    with pytest.raises(XMLError, match="missing uuid element"):
        parse_domain(xml, generate_uuid=False)


def test_rename_touches_only_the_name() -> None:
    d = parse_domain(SAMPLE)
    r = rename(d, "web02")
    assert r.name == "web02" and r.uuid == d.uuid
    assert canonical(r.xml) == canonical(d.xml.replace("<name>web01</name>", "<name>web02</name>"))
    assert "<!-- a comment that must survive -->" in r.xml
    assert rename(d, "web01") is d
    with pytest.raises(XMLError):
        rename(d, "a/b")


def test_abi_identity_checks() -> None:
    d = parse_domain(SAMPLE)
    same = parse_domain(SAMPLE.replace("front end", "changed"))
    check_abi_stable(d, same, new_name=None)
    other = parse_domain(SAMPLE.replace("DCF47DBD", "ACF47DBD"))
    with pytest.raises(OperationInvalid, match=r"Target domain uuid acf47dbd-.* does not match source dcf47dbd-"):
        check_abi_stable(d, other, new_name=None)
    renamed = rename(same, "x")
    with pytest.raises(OperationInvalid, match="Target domain name 'x' does not match source 'web01'"):
        check_abi_stable(d, renamed, new_name=None)
    check_abi_stable(d, renamed, new_name="x")


@pytest.mark.parametrize(
    ("name", "message"),
    [("", "missing name information"), ("a/b", "name a/b cannot contain '/'"),
     (".", "domain name '.' is not allowed"), ("..", "domain name '..' is not allowed"),
     ("x" * 1025, "domain name is longer than 1024 bytes"),
     (" ", "missing name information"), ("\t ", "missing name information"),
     (" web", "domain name ' web' must not begin or end with whitespace"),
     ("web ", "domain name 'web ' must not begin or end with whitespace")],
)
def test_bad_names(name: str, message: str) -> None:
    with pytest.raises(XMLError) as err:
        validate_name(name)
    assert str(err.value) == message


@pytest.mark.parametrize(
    ("xml", "message"),
    [
        ("<domain><name>x</name></domain>", "missing domain type attribute"),
        ("<domain type='kvm'><name>a</name><name>b</name></domain>", "domain XML has more than one <name> element"),
        ("<domain type='kvm'><name> a</name></domain>", "domain name must not start or end with white space"),
        ("<domain type='kvm'><name>a</name><memory unit='parsec'>1</memory></domain>", "unknown suffix 'parsec'"),
        ("<domain type='kvm'><name>a</name><memory>lots</memory></domain>", "invalid value 'lots' for element <memory>"),
        ("<domain type='kvm'><name>a</name><vcpu>0</vcpu></domain>", "Invalid number of vCPUs"),
        ("<domain type='kvm'><name>a</name></domain>" + "\x00", "malformed domain XML"),
    ],
)
def test_bad_documents(xml: str, message: str) -> None:
    with pytest.raises(XMLError) as err:
        parse_domain(xml)
    assert str(err.value).startswith(message)


def test_size_limit_is_configurable() -> None:
    with pytest.raises(XMLError, match="domain XML is too large"):
        parse_domain(SAMPLE, max_bytes=100)


names = st.text(
    alphabet=st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters="/"),
    min_size=1, max_size=40,
).filter(lambda s: s.strip() == s and s not in (".", ".."))


@settings(max_examples=200, deadline=None)
@given(name=names, description=st.text(
    alphabet=st.characters(blacklist_categories=("Cs", "Cc")), max_size=60))
def test_roundtrip_property(name: str, description: str) -> None:
    from xml.sax.saxutils import escape

    xml = (f"<domain type='kvm'><name>{escape(name)}</name>"
           f"<description>{escape(description)}</description></domain>")
    d = parse_domain(xml)
    assert d.name == name
    again = parse_domain(d.xml, generate_uuid=False)
    assert again == d
    assert canonical(rename(rename(d, "tmp"), name).xml) == canonical(d.xml)


def test_disks_and_qemu_commandline_come_from_the_parse(monkeypatch: pytest.MonkeyPatch) -> None:
    """parse_domain reads the disks and <qemu:commandline> from the tree it built, so the
    migration checks (Begin, Prepare) and the store's validation parse nothing again; a
    definition made otherwise (a rename) works them out from its XML."""
    from vmmigrate.common import domainxml
    from vmmigrate.common.disks import domain_disks
    from vmmigrate.common.hypervisor import has_qemu_commandline

    xml = """<domain type='kvm' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>d</name><uuid>0b8c7e0e-8a51-4d2b-9f0e-7d0d1b1c2a3b</uuid>
  <devices>
    <disk type='file' device='disk'><driver name='qemu' type='raw' cache='none'/>
      <source file='/v/d.img'/><target dev='vda' bus='virtio'/></disk>
    <disk type='block' device='cdrom'><target dev='hdc' bus='ide'/><readonly/></disk>
  </devices>
  <qemu:commandline><qemu:arg value='-S'/></qemu:commandline>
</domain>"""
    d = parse_domain(xml)
    renamed = domainxml.rename(d, "e")

    def no_parse(*args: object, **kwargs: object) -> None:
        raise AssertionError("parsed again")

    monkeypatch.setattr(domainxml, "parse_untrusted", no_parse)
    assert [(k.target, k.type, k.cache, k.readonly) for k in domain_disks(d)] == [
        ("vda", "file", "none", False),
        ("hdc", "block", "", True),
    ]
    assert has_qemu_commandline(d) and d.parsed
    monkeypatch.undo()
    assert renamed.disks == d.disks and renamed.qemu_commandline  # from its own XML
    assert not renamed.parsed
    plain = parse_domain(xml.replace("<qemu:commandline><qemu:arg value='-S'/></qemu:commandline>", ""))
    assert not plain.qemu_commandline and plain == parse_domain(plain.xml)
