"""QEMU domains for the integration tests: the smallest definition around the devices a test
gives (no OS: a disk is all there is), defined and started on a host, and removed again."""

from __future__ import annotations

import uuid as uuidlib
from collections.abc import Callable
from pathlib import Path

from .hosts import Host


def qemu_domain_xml(
    name: str,
    u: str,
    devices: str = "",
    *,
    domain_type: str = "kvm",
    memory_mib: int = 64,
    machine: str = "pc",
    emulator: str | None = None,
) -> str:
    """One vCPU, ``memory_mib``, an x86_64 ``machine``, ``devices`` (XML) and the
    ``emulator`` binary if given (else the host's configured QEMU)."""
    inside = [f"<emulator>{emulator}</emulator>"] if emulator else []
    inside += [devices] if devices else []
    lines = "".join(f"\n    {line}" for line in inside)
    return f"""<domain type='{domain_type}'>
  <name>{name}</name>
  <uuid>{u}</uuid>
  <memory unit='MiB'>{memory_mib}</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='{machine}'>hvm</type></os>
  <devices>{lines}
  </devices>
</domain>
"""


def disk_xml(
    path: Path, target: str = "vda", fmt: str = "raw", extra: str = "", cache: str | None = None
) -> str:
    """A virtio file disk (``extra``: more XML inside <disk>)."""
    cache_attr = f" cache='{cache}'" if cache else ""
    return (
        f"<disk type='file' device='disk'><driver name='qemu' type='{fmt}'{cache_attr}/>"
        f"<source file='{path}'/><target dev='{target}' bus='virtio'/>{extra}</disk>"
    )


def define_and_start(host: Host, name: str, xml: Callable[[str], str]) -> str:
    """Define ``xml(uuid)`` (a new uuid) on ``host`` and start it; returns the uuid."""
    u = str(uuidlib.uuid4())
    host.define(xml(u), f"{name}.xml")
    host.migctl("start", name)
    return u


def destroy_and_undefine(host: Host, name: str) -> None:
    """The domain stopped and its definition removed (its disks stay)."""
    host.migctl("destroy", name)
    host.migctl("undefine", name)
