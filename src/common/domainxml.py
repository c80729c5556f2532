"""The libvirt domain XML model: hardened parsing, the few fields vmmigrate reads, and edits.

vmmigrate interprets only a domain's name, UUID, description and the sizing fields that
``dominfo`` shows. Everything else is kept verbatim: a definition that goes A -> B -> A
comes back byte-identical unless the user asked to change it (``--dname``, ``--xml``). When a
field must change (a UUID generated on define, a rename), only that element is touched.
"""

from __future__ import annotations

import dataclasses
import uuid as uuidlib

from lxml import etree
from vmmigrate.common.errors import OperationInvalid, XMLError
from vmmigrate.common.uuids import canonical_uuid_or_none
from vmmigrate.common.xmlsafe import first_non_xml_char, parse_untrusted

DEFAULT_MAX_XML_BYTES = 4 * 1024 * 1024


@dataclasses.dataclass(frozen=True)
class DomainDef:
    """One parsed domain definition. ``xml`` is the whole document, as stored and sent."""

    name: str
    uuid: str  # canonical: lowercase 8-4-4-4-12
    xml: str
    description: str = ""
    title: str = ""
    os_type: str = "hvm"
    vcpus: int = 1
    memory_kib: int = 0
    current_memory_kib: int = 0
    emulator: str = ""


def validate_name(name: str) -> None:
    """Refuse names libvirt refuses, and names that could be taken for paths."""
    if not name:
        raise XMLError("missing name information")
    if "/" in name:
        raise XMLError(f"name {name} cannot contain '/'")
    if "\n" in name:
        raise XMLError(f"name {name!r} cannot contain '\\n'")
    if name in (".", ".."):
        raise XMLError(f"domain name '{name}' is not allowed")
    if first_non_xml_char(name) is not None:
        # only reachable through a rename (--dname): parsed XML cannot carry these
        raise XMLError(f"name {name!r} contains a character XML cannot carry")
    if len(name.encode("utf-8")) > 1024:
        raise XMLError("domain name is longer than 1024 bytes")
    if not name.strip():
        raise XMLError("missing name information")
    if name != name.strip():
        # the parser strips a name: the definition would come back under another one
        raise XMLError(f"domain name {name!r} must not begin or end with whitespace")


def canonical_uuid(text: str) -> str:
    """libvirt accepts UUIDs with or without dashes, any case."""
    u = canonical_uuid_or_none(text)
    if u is None:
        raise XMLError("malformed uuid element")
    return u


def _child_text(root: etree._Element, tag: str) -> str | None:
    el = root.find(tag)
    if el is None:
        return None
    return el.text or ""


def _memory_kib(el: etree._Element | None) -> int:
    """libvirt's <memory unit='..'> scaled to KiB (default unit KiB)."""
    if el is None or not (el.text or "").strip():
        return 0
    try:
        value = int((el.text or "").strip())
    except ValueError:
        raise XMLError(f"invalid value '{el.text}' for element <{el.tag}>") from None
    unit = (el.get("unit") or "KiB").strip()
    scale = {
        "b": 1,
        "bytes": 1,
        "k": 1024,
        "kib": 1024,
        "kb": 1000,
        "m": 1024**2,
        "mib": 1024**2,
        "mb": 1000**2,
        "g": 1024**3,
        "gib": 1024**3,
        "gb": 1000**3,
        "t": 1024**4,
        "tib": 1024**4,
        "tb": 1000**4,
    }.get(unit.lower())
    if scale is None:
        raise XMLError(f"unknown suffix '{unit}'")
    if value < 0:
        raise XMLError(f"invalid value '{el.text}' for element <{el.tag}>")
    return (value * scale + 1023) // 1024


def _serialize(root: etree._Element) -> str:
    return etree.tostring(root, encoding="unicode")


def _insert_after(root: etree._Element, anchor: etree._Element, new: etree._Element) -> None:
    """Insert ``new`` right after ``anchor`` with the same indentation."""
    new.tail = anchor.tail
    anchor.addnext(new)


def _name(names: list[etree._Element]) -> str:
    """The domain's one <name>, validated."""
    if len(names) > 1:
        raise XMLError("domain XML has more than one <name> element")
    name = (names[0].text or "").strip() if names else ""
    validate_name(name)
    if names and names[0].text != name:
        raise XMLError("domain name must not start or end with white space")
    return name


def _vcpus(vcpu_el: etree._Element | None) -> int:
    """<vcpu current=...>N</vcpu>: the vCPUs the domain starts with (1 without the element)."""
    if vcpu_el is None:
        return 1
    try:
        vcpus = int((vcpu_el.get("current") or vcpu_el.text or "1").strip())
    except ValueError:
        raise XMLError(f"invalid value '{vcpu_el.text}' for element <vcpu>") from None
    if vcpus < 1:
        raise XMLError("Invalid number of vCPUs")
    return vcpus


def parse_domain(
    text: str | bytes,
    *,
    max_bytes: int = DEFAULT_MAX_XML_BYTES,
    generate_uuid: bool = True,
) -> DomainDef:
    """Parse untrusted domain XML.

    Raises XMLError for anything malformed or hostile. A missing <uuid> is generated (as
    libvirt's define does) when ``generate_uuid``; otherwise it is an error.
    """
    root = parse_untrusted(text, what="domain XML", max_bytes=max_bytes, error=XMLError)
    if not isinstance(root.tag, str) or root.tag != "domain":
        tag = root.tag if isinstance(root.tag, str) else "?"
        raise XMLError(f"unexpected root element <{tag}>, expecting <domain>")
    if root.get("type") is None:
        raise XMLError("missing domain type attribute")
    names = root.findall("name")
    name = _name(names)
    changed = False
    uuid_text = _child_text(root, "uuid")
    if uuid_text is None:
        if not generate_uuid:
            raise XMLError("missing uuid element")
        new = etree.Element("uuid")
        new.text = str(uuidlib.uuid4())
        _insert_after(root, names[0], new)
        uuid_text = new.text
        changed = True
    if len(root.findall("uuid")) > 1:
        raise XMLError("domain XML has more than one <uuid> element")
    uuid = canonical_uuid(uuid_text)
    vcpus = _vcpus(root.find("vcpu"))
    memory = _memory_kib(root.find("memory"))
    current = _memory_kib(root.find("currentMemory")) or memory
    os_type = (root.findtext("os/type") or "hvm").strip()
    xml = _serialize(root) if changed else _as_text(text)
    return DomainDef(
        name=name,
        uuid=uuid,
        xml=xml,
        description=_child_text(root, "description") or "",
        title=_child_text(root, "title") or "",
        os_type=os_type,
        vcpus=vcpus,
        memory_kib=memory,
        current_memory_kib=current,
        emulator=(root.findtext("devices/emulator") or "").strip(),
    )


def _as_text(text: str | bytes) -> str:
    s = text.decode("utf-8") if isinstance(text, bytes) else text
    # An XML declaration names an encoding that no longer applies once we hold text; drop it
    # so the text can be re-parsed from str by lxml.
    if s.startswith("<?xml"):
        end = s.find("?>")
        if end != -1:
            s = s[end + 2 :].lstrip("\r\n")
    return s


def rename(d: DomainDef, new_name: str) -> DomainDef:
    """The same definition under another name (libvirt's DEST_NAME)."""
    validate_name(new_name)
    if new_name == d.name:
        return d
    root = parse_untrusted(
        d.xml, what="domain XML", max_bytes=len(d.xml.encode()) + 1, error=XMLError
    )
    el = root.find("name")
    assert el is not None  # parse_domain guaranteed it
    el.text = new_name
    return dataclasses.replace(d, name=new_name, xml=_serialize(root))


def canonical(xml: str) -> bytes:
    """Canonical XML (C14N 2.0) of a document, for equality checks."""
    root = parse_untrusted(xml, what="domain XML", max_bytes=len(xml.encode()) + 1, error=XMLError)
    out: bytes = etree.tostring(root, method="c14n2", strip_text=True)  # type: ignore[call-overload]
    return out


def check_abi_stable(current: DomainDef, new: DomainDef, *, new_name: str | None) -> None:
    """The identity part of libvirt's ABI-stability check for DEST_XML / PERSIST_XML.

    The UUID must stay; the name may only differ when the user renames (``--dname``).
    """
    if new.uuid != current.uuid:
        raise OperationInvalid(
            f"Target domain uuid {new.uuid} does not match source {current.uuid}"
        )
    expected = new_name or current.name
    if new.name != expected:
        raise OperationInvalid(
            f"Target domain name '{new.name}' does not match source '{expected}'"
        )
