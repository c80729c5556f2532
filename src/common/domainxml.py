"""The libvirt domain XML model: hardened parsing, the few fields vmmigrate reads, and edits.

vmmigrate interprets only a domain's name, UUID, description and the sizing fields that
``dominfo`` shows. Everything else is kept verbatim: a definition that goes A -> B -> A
comes back byte-identical unless the user asked to change it (``--dname``, ``--xml``). When a
field must change (a UUID generated on define, a rename), only that element is touched.
"""

from __future__ import annotations

import dataclasses
import functools
import uuid as uuidlib

from lxml import etree
from vmmigrate.common.errors import OperationInvalid, XMLError
from vmmigrate.common.uuids import canonical_uuid_or_none
from vmmigrate.common.xmlsafe import first_non_xml_char, parse_untrusted

DEFAULT_MAX_XML_BYTES = 4 * 1024 * 1024
QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"  # libvirt's <qemu:...> extensions


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

    # What the checks read from the XML beyond the fields above, taken from the tree that
    # parse_domain built (so that Begin's and Prepare's checks parse nothing again);
    # worked out from ``xml`` for a DomainDef made otherwise. Not fields: not compared.

    @functools.cached_property
    def disks(self) -> tuple[Disk, ...]:
        """The ``<devices><disk>`` elements, in document order."""
        return _disks(_reparse(self.xml))

    @functools.cached_property
    def qemu_commandline(self) -> bool:
        """Whether it has libvirt's ``<qemu:commandline>`` (QEMU arguments passed through)."""
        return _has_qemu_commandline(_reparse(self.xml))

    @functools.cached_property
    def parsed(self) -> bool:
        """Whether it is what parse_domain gave for its ``xml`` (False: made otherwise)."""
        return False


def _reparse(xml: str) -> etree._Element:
    # parse_domain's hardened parser accepted this XML already: the re-parse cannot expand
    return parse_untrusted(xml, what="domain XML", max_bytes=len(xml.encode()) + 1, error=XMLError)


def _has_qemu_commandline(root: etree._Element) -> bool:
    return root.find(f"{{{QEMU_NS}}}commandline") is not None


def _disks(root: etree._Element) -> tuple[Disk, ...]:
    return tuple(_disk(el) for el in root.iterfind("devices/disk"))


@dataclasses.dataclass(frozen=True)
class Disk:
    """One ``<disk>``: what the checks and simvm need; the XML stays the reference."""

    type: str  # file | block | network | volume | dir | nvme ...
    device: str  # disk | cdrom | floppy | lun
    source: str  # the file or device path, the network name; "" when none (no media)
    target: str  # <target dev=...>: vda, sda, hdc
    bus: str
    format: str  # <driver type=...>: raw, qcow2; "" when not given
    cache: str  # <driver cache=...>; "" for the hypervisor's default
    readonly: bool
    shareable: bool
    # the first layer of <backingStore> (libvirt's backing chain), "" when the XML has none
    backing: str = ""
    backing_format: str = ""

    @property
    def empty(self) -> bool:
        return not self.source


def _source(el: etree._Element, kind: str) -> str:
    src = el.find("source")
    if src is None:
        return ""
    attr = {"file": "file", "block": "dev", "dir": "dir", "network": "name"}.get(kind)
    if attr is not None:
        return (src.get(attr) or "").strip()
    # volume and the rest: any of the usual attributes names it
    return next((src.get(a, "") for a in ("file", "dev", "volume", "name") if src.get(a)), "")


def _backing(el: etree._Element) -> tuple[str, str]:
    """(path, format) of a disk's first backing layer; ("", "") without one."""
    store = el.find("backingStore")
    if store is None:
        return "", ""
    fmt = store.find("format")
    return _source(store, store.get("type") or "file"), (
        (fmt.get("type") or "") if fmt is not None else ""
    )


def _disk(el: etree._Element) -> Disk:
    kind = el.get("type") or "file"
    target = el.find("target")
    driver = el.find("driver")
    backing, backing_format = _backing(el)
    return Disk(
        type=kind,
        device=el.get("device") or "disk",
        source=_source(el, kind),
        target=(target.get("dev") or "") if target is not None else "",
        bus=(target.get("bus") or "") if target is not None else "",
        format=(driver.get("type") or "") if driver is not None else "",
        cache=(driver.get("cache") or "") if driver is not None else "",
        readonly=el.find("readonly") is not None,
        shareable=el.find("shareable") is not None,
        backing=backing,
        backing_format=backing_format,
    )


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
    d = DomainDef(
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
    # the cached properties, from this tree (a frozen dataclass: set as its own
    # __post_init__ would; they are no fields)
    object.__setattr__(d, "disks", _disks(root))
    object.__setattr__(d, "qemu_commandline", _has_qemu_commandline(root))
    object.__setattr__(d, "parsed", True)
    return d


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
