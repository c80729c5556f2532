#!/usr/bin/env python3
"""What the destination's "can this host run it" check costs a migration: the first
``check_runnable`` of a QEMU domain in a process (it asks QEMU ``-machine help`` and
``-cpu help``) against the calls after it (QEMU's answers cached per binary: a ``stat``, a
dictionary lookup, and the XML and file checks), plus the cached lookup alone.

    .venv/bin/python -m bench.bench_hostcheck --n 2000
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from vmmigrate.common.domainxml import parse_domain
from vmmigrate.common.hostcheck import check_runnable, qemu_offer
from vmmigrate.common.hypervisor import EmulatorSettings

XML = """<domain type='qemu'><name>bench</name><uuid>4dea22b3-1d52-d8f3-2516-782e98ab3fa0</uuid>
<memory unit='MiB'>512</memory><vcpu>2</vcpu>
<os><type arch='x86_64' machine='q35'>hvm</type></os>
<cpu mode='host-model'/>
<devices>
<disk type='file' device='disk'><driver name='qemu' type='raw' cache='none'/>
<source file='{image}'/><target dev='vda' bus='virtio'/></disk>
<disk type='file' device='cdrom'><target dev='sda' bus='sata'/><readonly/></disk>
<interface type='user'><model type='virtio'/></interface>
</devices></domain>"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2000, help="cached calls timed (2000)")
    args = ap.parse_args()
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        raise SystemExit("qemu-system-x86_64 is not installed")
    with tempfile.TemporaryDirectory() as tmp:
        image = Path(tmp) / "vm.img"
        image.write_bytes(b"")
        d = parse_domain(XML.format(image=image))
        settings = EmulatorSettings(default="qemu", qemu_binary=qemu)
        t0 = time.perf_counter()
        check_runnable(d, settings)
        first = time.perf_counter() - t0
        calls = []
        for _ in range(args.n):
            t0 = time.perf_counter()
            check_runnable(d, settings)
            calls.append(time.perf_counter() - t0)
        lookups = []
        for _ in range(args.n):
            t0 = time.perf_counter()
            qemu_offer(qemu)
            lookups.append(time.perf_counter() - t0)
    print(f"first check_runnable (asks QEMU):  {first * 1e3:8.2f} ms")
    for label, xs in (("check_runnable, cached", calls), ("qemu_offer lookup alone", lookups)):
        xs.sort()
        print(
            f"{label:32s}  median {statistics.median(xs) * 1e6:7.1f} us   "
            f"p99 {xs[int(len(xs) * 0.99)] * 1e6:7.1f} us   max {xs[-1] * 1e6:7.1f} us"
        )


if __name__ == "__main__":
    main()
