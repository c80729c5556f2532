"""Storage copy, the source's Begin side (docs/ARCHITECTURE.md section 14): which disks are
copied, their sizes for the Begin cookie's ``<nbd>``, and for --copy-storage-inc the
backing chains the destination needs to create its overlays.

The disks copied are libvirt's (qemuMigrationAnyCopyDisk: --migrate-disks, else every
writable, unshared disk with media); their size is the running emulator's (the virtual size
of the disk's format node), as libvirt reads it from QEMU for the cookie.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from lxml import etree
from vmmigrate.common import qemuargv
from vmmigrate.common.cookie import Nbd, NbdDisk
from vmmigrate.common.disks import STORAGE_COPY, copied_disks, domain_disks
from vmmigrate.common.domainxml import DomainDef, parse_domain
from vmmigrate.common.errors import OperationFailed, XMLError
from vmmigrate.common.flags import MigrateFlag
from vmmigrate.common.hypervisor import QMPHypervisor
from vmmigrate.common.xmlsafe import parse_untrusted

# (path, format) of each backing layer, the overlay's own backing first
Chain = tuple[tuple[str, str], ...]


@dataclasses.dataclass(frozen=True)
class CopiedDisk:
    """One disk a storage copy mirrors to the destination."""

    target: str  # vda
    capacity: int  # bytes: the virtual size, as the destination creates it
    node: str  # the source's format node: the mirror's device
    export: str  # the destination's NBD export name, also the mirror job's id
    backing: Chain = ()  # the source image's backing chain (used by --copy-storage-inc)


def backing_chain(image: dict[str, Any]) -> Chain:
    """The backing layers of one image of query-named-block-nodes, top down (the nested
    "backing-image"s; a flat answer names the first layer only)."""
    chain: list[tuple[str, str]] = []
    layer = image.get("backing-image")
    while isinstance(layer, dict):
        chain.append((str(layer.get("filename", "")), str(layer.get("format", ""))))
        layer = layer.get("backing-image")
    if not chain and image.get("full-backing-filename"):
        fmt = str(image.get("backing-filename-format") or "raw")
        chain.append((str(image["full-backing-filename"]), fmt))
    return tuple(chain)


def copies_of(
    running: DomainDef, migrate_disks: Sequence[str], nodes: Sequence[dict[str, Any]]
) -> tuple[CopiedDisk, ...]:
    """The disks to copy, with their size and chain from the emulator's block nodes
    (query-named-block-nodes). Pure: the caller asks the emulator."""
    names = qemuargv.disk_nodes(running)
    images = {str(n.get("node-name")): n.get("image", {}) for n in nodes}
    out = []
    for disk in copied_disks(domain_disks(running), migrate_disks):
        named = names.get(disk.target)
        image = images.get(named.format_node) if named is not None else None
        if named is None or not image or "virtual-size" not in image:
            # libvirt: the disk's size comes from QEMU; without it there is no cookie
            raise OperationFailed(f"unable to find the size of disk '{disk.target}' to copy")
        out.append(
            CopiedDisk(
                target=disk.target,
                capacity=int(image["virtual-size"]),
                node=named.format_node,
                export=named.export,
                backing=backing_chain(image),
            )
        )
    return tuple(out)


async def plan_copies(
    hv: QMPHypervisor, running: DomainDef, flags: MigrateFlag, migrate_disks: Sequence[str]
) -> tuple[CopiedDisk, ...]:
    """Begin: the disks this migration copies (none without --copy-storage-*)."""
    if not flags & STORAGE_COPY:
        return ()
    # not flat: each image with its whole backing chain
    nodes = await hv.execute(running.uuid, "query-named-block-nodes")
    return copies_of(running, migrate_disks, nodes if isinstance(nodes, list) else [])


def begin_nbd(flags: MigrateFlag, copies: Sequence[CopiedDisk]) -> Nbd | None:
    """The Begin cookie's ``<nbd>``: a ``<disk target capacity>`` per copied disk, for the
    destination to create what it lacks (libvirt sends it, possibly empty, whenever storage
    copy is asked)."""
    if not flags & STORAGE_COPY:
        return None
    return Nbd(disks=tuple(NbdDisk(c.target, c.capacity) for c in copies))


def _chain_element(chain: Chain) -> etree._Element:
    """libvirt's nested <backingStore> for ``chain``, ended by an empty one."""
    top = store = etree.Element("backingStore", type="file")
    for i, (path, fmt) in enumerate(chain):
        if i:
            store = etree.SubElement(store, "backingStore", type="file")
        etree.SubElement(store, "format", type=fmt)
        etree.SubElement(store, "source", file=path)
    etree.SubElement(store, "backingStore")
    return top


def with_backing_stores(
    d: DomainDef, flags: MigrateFlag, copies: Sequence[CopiedDisk]
) -> DomainDef:
    """--copy-storage-inc copies only the top layer: the destination creates a missing
    disk as an overlay of the same backing file, which it learns from the disk's
    ``<backingStore>`` (libvirt's live XML shows the chain). A chain the XML already states
    is left as it is."""
    chained = {c.target: c.backing for c in copies if c.backing}
    if MigrateFlag.NON_SHARED_INC not in flags or not chained:
        return d
    # parse_domain accepted this XML already: the re-parse cannot expand
    root = parse_untrusted(
        d.xml, what="domain XML", max_bytes=len(d.xml.encode()) + 1, error=XMLError
    )
    for disk in root.iterfind("devices/disk"):
        target = disk.find("target")
        chain = chained.get(target.get("dev", "") if target is not None else "")
        if chain and disk.find("backingStore") is None:
            disk.append(_chain_element(chain))
    text = etree.tostring(root, encoding="unicode")
    return parse_domain(text, generate_uuid=False, max_bytes=len(text.encode()) + 1)
