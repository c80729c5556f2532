#!/usr/bin/env python3
"""The real Linux guest, vmmigrate against libvirt 9.0, in one run (issue 11).

The guest is tests/helpers/guest.py's: Debian's cloud kernel and a busybox initramfs that
counts every ~100 ms to its virtio disk and then to its serial console ("count N"), booted
directly (<kernel>, <initrd>, <cmdline>), q35, TCG, one vCPU, --mem MiB of RAM (256), a raw
virtio disk with cache='none', no balloon, no USB. Both tools run the same domain XML; the
only difference is that libvirt is given the console log (``<log file=... append='on'/>``)
while vmmigrate keeps its own per-domain one (common/hypervisor.py qemu_facts).

Cases, N repetitions each (--n, default 5), vmmigrate and libvirt interleaved (their order
swapped every round) so that machine noise falls on both:

  boot        the start request (``migctl start`` / ``virsh start``, timed as a subprocess
              from its launch) to the first "count" line in the console log; also when the
              start command returned and when the emulator process started (its /proc
              start time). A fresh domain per repetition, defined beforehand (not timed),
              destroyed and undefined after.
  shared      ``migrate --live --p2p --persistent DOM DEST``, timed as a subprocess, the
              guest ping-ponging A -> B -> A on a disk both hosts see (one file). virsh also
              gets --unsafe: libvirt refuses a disk on a local file system ("Migration
              without shared storage is unsafe") and the lab's hosts share one ext4; the
              flag skips that check and nothing else.
  copy        the same with --copy-storage-all and a 256 MiB raw disk (--disk-mib) filled
              with data (so the whole size moves), each host with a file of its own at the
              same path, so that both tools do the same work from the same domain XML:
              libvirt's lab hosts in their private /var, vmmigrate's hosts in a directory
              that each sees through a mount namespace of its own
              (tests/helpers/mountns.py; needs root), where their dstd may create and
              export disks (--storage-dir). The destination's file exists beforehand (empty,
              of the same size), as both tools allow.
  copy_tunnelled
              the same with --tunnelled as well: the disks' NBD streams go through the
              managers' connection with the memory's (docs/ARCHITECTURE.md section 14).
  A tool that refuses a case (or fails its first migration) is reported as "n/a
  (refused: ERROR)" for it; one that cannot run it here as "n/a (REASON)".

After every migration: the job's time, QEMU's downtime and the data moved (``domjobinfo
--completed`` on the source: no --undefinesource), when the destination's emulator process
was started (its /proc start time), how long the source emulator stayed a zombie (exited,
not yet reaped) and when it was gone relative to the client's return (a manager that waits
for its emulator to be gone waits for its reaping too), the guest counting on at the
destination, and with storage copy the destination's disk holding what the source's held
at the switch-over (the source's file as its stopped emulator left it; every byte equal,
but record slots the destination's guest has since written with newer counts). A timeline
of each migration: vmmigrate's from its daemons' JSON logs (``--migration-id``), libvirt's
with --libvirt-trace from its daemons' debug logs (set with virt-admin for the run, to a
file of their own beside their log, and put back at the end; that logging is work libvirt
does not do otherwise, so take the wall times from a run without it). One untimed boot and
one untimed round trip of each case first warm the daemons (libvirtd probes QEMU's
capabilities on its first use).

vmmigrate: two hosts (srcd + dstd each) on 127.0.0.2 and 127.0.0.3, as bench_live. libvirt:
the lab of --libvirt-lab DIR (default ../shared/anchors/libvirt-lab beside the repository,
if present; see its README.md): two libvirtd 9.0 in network namespaces (10.77.0.1,
10.77.0.2) with private /var and /run; virsh talks to each over its unix socket, the
migrations go host to host over TCP. The lab is brought up if it is down (root; it installs
Debian packages if missing) and down at the end only if this run brought it up. Without the
lab (or with --no-libvirt) only vmmigrate is measured and the report says why.

    .venv/bin/python -m bench.bench_guest [--n 5] [--libvirt-lab DIR | --no-libvirt]
        [--libvirt-trace] [--mem 256] [--disk-mib 256] [--settle 0.5] [--json PATH]
        [--workdir DIR]

The report: per case and tool the median, min and max (seconds) and the ratio
vmmigrate/libvirt of the medians, details (start command, emulator start, job time,
zombie time, downtime, client start-up), the timelines' medians, and a last line of JSON
with the medians. Every process, mount namespace and domain this script starts is stopped
(by pid, or destroyed by name) before it exits.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid as uuidlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from bench.bench_live import (
    TIMELINE_EVENTS,
    machine_info,
    migctl_argv,
    parse_jobinfo,
    summarize,
    timeline,
)
from tests.helpers import guest, mountns
from tests.helpers.hosts import Host

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_LAB = ROOT.parent / "shared" / "anchors" / "libvirt-lab"
HOSTS = ("A", "B")
VM_IPS = {"A": "127.0.0.2", "B": "127.0.0.3"}
# the lab's addresses (libvirt_lab.sh): where one libvirtd reaches the other
LAB_IPS = {"A": "10.77.0.1", "B": "10.77.0.2"}
LAB_DISK_DIR = "/var/lib/vmmigrate-bench"  # private to each lab host (an overlay of /var)
TOOLS = ("vmmigrate", "libvirt")
CASES = {
    "boot": "boot to first count",
    "shared": "live, shared storage",
    "copy": "live, --copy-storage-all",
    "copy_tunnelled": "live, copy, --tunnelled",
}
MIGRATIONS = ("shared", "copy", "copy_tunnelled")
# each migration case's flags beside --live --p2p --persistent
CASE_FLAGS = {
    "shared": [],
    "copy": ["--copy-storage-all"],
    "copy_tunnelled": ["--copy-storage-all", "--tunnelled"],
}
JSON_KEYS = {
    "boot": "boot_first_count",
    "shared": "live_shared",
    "copy": "live_copy_storage_all",
    "copy_tunnelled": "live_copy_storage_all_tunnelled",
}
# the daemons' log events in vmmigrate's timeline of a migration (bench_live's, and the
# storage copy's)
VM_EVENTS = {
    "srcd": (
        *TIMELINE_EVENTS["srcd"],
        "mirrors_started",
        "mirrors_ready",
        "mirrors_completed",
        "tunnel_drained",
        "nbd_tunnel_closed",
    ),
    "dstd": (
        *TIMELINE_EVENTS["dstd"],
        "incoming_disk_created",
        "incoming_nbd_started",
        "incoming_nbd_stopped",
    ),
}
CMDLINE = "console=ttyS0 quiet panic=-1"  # as tests/helpers/guest.py boots it
MiB = 1 << 20
POLL_S = 0.005
CLIENT_TIMEOUT = 60.0
BOOT_TIMEOUT = 120.0
MIGRATE_TIMEOUT = 300.0
COUNT_TIMEOUT = 30.0
T = TypeVar("T")


class ClientError(RuntimeError):
    """migctl or virsh failed: the message is its last error line."""


def error_text(stderr: str) -> str:
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    return lines[-1].removeprefix("error: ") if lines else "failed with no message"


def run_client(argv: Sequence[str], timeout: float = CLIENT_TIMEOUT) -> tuple[float, str]:
    """Run a client command; (wall seconds, stdout), or ClientError."""
    t0 = time.monotonic()
    try:
        r = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise ClientError(f"{' '.join(argv[:4])} ... timed out after {timeout:.0f} s") from exc
    wall = time.monotonic() - t0
    if r.returncode != 0:
        raise ClientError(error_text(r.stderr))
    return wall, r.stdout


# ---------------------------------------------------------------------------------------
# the guest's console


def console_counts(path: Path | None) -> list[int]:
    if path is None:
        return []
    try:
        data = path.read_bytes()
    except OSError:
        return []
    return [int(n) for n in guest.COUNT_RE.findall(data)]


def wait_count_above(log: Callable[[], Path | None], above: int, timeout: float) -> bool:
    """Whether the console shows a count above ``above`` within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if max(console_counts(log()), default=0) > above:
            return True
        time.sleep(0.05)
    return False


# ---------------------------------------------------------------------------------------
# the domain


@dataclass(frozen=True)
class Spec:
    name: str
    uuid: str
    disk: str
    console_log: str  # "" for the host's own per-domain console log


def domain_xml(spec: Spec, img: guest.Image, mem_mib: int) -> str:
    log = f"\n      <log file='{spec.console_log}' append='on'/>" if spec.console_log else ""
    return f"""<domain type='qemu'>
  <name>{spec.name}</name>
  <uuid>{spec.uuid}</uuid>
  <memory unit='MiB'>{mem_mib}</memory>
  <currentMemory unit='MiB'>{mem_mib}</currentMemory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <kernel>{img.vmlinuz}</kernel>
    <initrd>{img.initrd}</initrd>
    <cmdline>{CMDLINE}</cmdline>
  </os>
  <features><acpi/><apic/></features>
  <on_reboot>destroy</on_reboot>
  <devices>
    <emulator>{guest.QEMU}</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw' cache='none'/>
      <source file='{spec.disk}'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <serial type='pty'>{log}
    </serial>
    <console type='pty'/>
    <controller type='usb' model='none'/>
    <memballoon model='none'/>
  </devices>
</domain>
"""


# ---------------------------------------------------------------------------------------
# the two tools


class Side:
    """One tool's two hosts, driven through its command-line client."""

    tool = ""
    copy_dir = ""  # where a copied disk is, the same path on both hosts

    def __init__(self, work: Path, img: guest.Image, mem_mib: int) -> None:
        self.work = work / self.tool
        self.work.mkdir(parents=True, exist_ok=True)
        self.img = img
        self.mem_mib = mem_mib
        self.defined: set[str] = set()
        self.boot_disk = self.work / "boot.raw"
        guest.create_disk(self.boot_disk, "raw", 64 * MiB)

    def cmd(self, host: str, *args: str) -> list[str]:
        raise NotImplementedError

    def dest(self, host: str) -> str:
        """The destination URI for a migration to ``host``."""
        raise NotImplementedError

    def console_log(self, host: str, spec: Spec) -> Path | None:
        raise NotImplementedError

    def spec_console(self, name: str) -> str:
        return ""

    def emulator_pid(self, host: str, spec: Spec) -> int | None:
        raise NotImplementedError

    def host_path(self, host: str, path: str) -> Path:
        """Where this process sees a file of ``host`` at ``path``."""
        return Path(path)

    def copy_disk(self, name: str, pattern: Path) -> str:
        """The disk of a storage-copy guest: one path, a file of its own on each host, A's
        holding ``pattern``, B's empty (of the same size)."""
        path = f"{self.copy_dir}/{name}.raw"
        for h in HOSTS:
            self.host_path(h, self.copy_dir).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(pattern, self.host_path("A", path))
        guest.create_disk(self.host_path("B", path), "raw", pattern.stat().st_size)
        return path

    def unavailable(self, case: str) -> str:
        """Why this tool cannot run ``case`` here ("" when it can)."""
        return ""

    def migrate_flags(self, case: str) -> list[str]:
        return CASE_FLAGS[case]

    def hop_args(self, migration_id: str) -> list[str]:
        """The client's options that give a migration its id (none: the tool cannot)."""
        return []

    def timeline(self, frm: str, to: str, migration_id: str, t_unix: float) -> dict[str, float]:
        """The managers' log events of a migration, ms after ``t_unix`` (none: not read)."""
        return {}

    def run(self, host: str, *args: str, timeout: float = CLIENT_TIMEOUT) -> tuple[float, str]:
        return run_client(self.cmd(host, *args), timeout)

    def define(self, host: str, spec: Spec) -> Path:
        xml = self.work / f"{spec.name}.{host}.xml"
        xml.write_text(domain_xml(spec, self.img, self.mem_mib))
        self.run(host, "define", str(xml))
        self.defined.add(spec.name)
        return xml

    def state(self, host: str, name: str) -> str:
        try:
            return self.run(host, "domstate", name)[1].strip()
        except ClientError:
            return "undefined"

    def discard(self, name: str, hosts: Sequence[str] = HOSTS) -> None:
        """Destroy and undefine ``name`` on ``hosts``."""
        for host in hosts:
            for verb in ("destroy", "undefine"):
                with contextlib.suppress(ClientError):
                    self.run(host, verb, name)
        self.defined.discard(name)

    def close(self) -> None:
        for name in list(self.defined):
            self.discard(name)


class VmSide(Side):
    """vmmigrate: a srcd and a dstd per host, on loopback addresses, migctl as the client.

    Each host runs in a mount namespace of its own (tests/helpers/mountns.py) in which
    ``copy_dir`` shows a directory of that host's, so that a copied disk is a file of its
    own on each host at the same path, as on libvirt's lab hosts; dstd may create and
    export disks there (--storage-dir). Everything else (the shared disk, the state
    directories) both hosts see alike. Without mount namespaces (not root) the hosts run
    without them and the storage-copy cases are not measured."""

    tool = "vmmigrate"

    def __init__(self, work: Path, img: guest.Image, mem_mib: int) -> None:
        super().__init__(work, img, mem_mib)
        self.copy_dir = str(self.work / "images")
        self.no_namespace = mountns.skip_reason() or ""
        self.spaces: dict[str, mountns.MountNamespace] = {}
        self.hosts: dict[str, Host] = {}
        try:
            for h in HOSTS:
                self.hosts[h] = Host(h, VM_IPS[h], self.work / h, prefix=self._namespace(h))
                self.hosts[h].start(dstd_args=["--storage-dir", self.copy_dir])
        except BaseException:
            self.close()
            raise

    def _namespace(self, host: str) -> list[str]:
        """The prefix that runs a command in ``host``'s mount namespace (made here)."""
        if self.no_namespace:
            return []
        private = self.work / f"{host}-images"
        self.spaces[host] = mountns.MountNamespace(private, Path(self.copy_dir))
        return self.spaces[host].prefix

    def unavailable(self, case: str) -> str:
        return self.no_namespace if case.startswith("copy") else ""

    def host_path(self, host: str, path: str) -> Path:
        p = Path(path)
        if host in self.spaces and p.is_relative_to(self.copy_dir):
            return self.spaces[host].private / p.relative_to(self.copy_dir)
        return p

    def cmd(self, host: str, *args: str) -> list[str]:
        return migctl_argv(self.hosts[host].src, *args)

    def dest(self, host: str) -> str:
        return self.hosts[host].dst

    def record(self, host: str, spec: Spec) -> dict[str, Any]:
        """The domain's runtime record on ``host`` ({} when there is none)."""
        path = self.hosts[host].state_dir / "run" / f"{spec.uuid}.json"
        try:
            rec: dict[str, Any] = json.loads(path.read_text())
        except (OSError, ValueError):
            return {}
        return rec

    def emulator_pid(self, host: str, spec: Spec) -> int | None:
        pid = self.record(host, spec).get("pid")
        return int(pid) if pid else None

    def console_log(self, host: str, spec: Spec) -> Path | None:
        """The log file of the emulator's serial port 0, from its runtime record's argv."""
        for arg in self.record(host, spec).get("argv", []):
            m = re.search(r"id=charserial0,.*?logfile=([^,]+)", str(arg))
            if m:
                return Path(m.group(1))
        return None

    def hop_args(self, migration_id: str) -> list[str]:
        return ["--migration-id", migration_id]

    def timeline(self, frm: str, to: str, migration_id: str, t_unix: float) -> dict[str, float]:
        return timeline(self.hosts[frm], self.hosts[to], migration_id, t_unix, VM_EVENTS)

    def close(self) -> None:
        try:
            super().close()
        finally:
            for h in self.hosts.values():
                h.stop()
            for ns in self.spaces.values():  # after the daemons and emulators in them
                ns.stop()


class LvSide(Side):
    """libvirt: the lab's two libvirtd, virsh as the client; with ``trace``, a timeline of
    each migration from the daemons' debug logs (:class:`LibvirtTrace`)."""

    tool = "libvirt"
    copy_dir = LAB_DISK_DIR

    def __init__(
        self, work: Path, img: guest.Image, mem_mib: int, lab: Lab, trace: bool = False
    ) -> None:
        self.lab = lab
        super().__init__(work, img, mem_mib)
        self.trace = LibvirtTrace(lab) if trace else None

    def cmd(self, host: str, *args: str) -> list[str]:
        return ["virsh", "-q", "-c", self.lab.uri(host), *args]

    def dest(self, host: str) -> str:
        return f"qemu+tcp://{LAB_IPS[host]}/system"

    def console_log(self, host: str, spec: Spec) -> Path | None:
        return Path(spec.console_log)

    def spec_console(self, name: str) -> str:
        return str(self.work / f"{name}.console.log")

    def emulator_pid(self, host: str, spec: Spec) -> int | None:
        try:
            return int(self.host_path(host, f"/run/libvirt/qemu/{spec.name}.pid").read_text())
        except (OSError, ValueError):
            return None

    def migrate_flags(self, case: str) -> list[str]:
        return ["--unsafe"] if case == "shared" else super().migrate_flags(case)

    def host_path(self, host: str, path: str) -> Path:
        return self.lab.root(host) / path.lstrip("/")

    def timeline(self, frm: str, to: str, migration_id: str, t_unix: float) -> dict[str, float]:
        return self.trace.timeline(frm, to, t_unix) if self.trace else {}

    def close(self) -> None:
        try:
            super().close()
        finally:
            if self.trace is not None:
                self.trace.close()
            for h in HOSTS:
                if self.lab.is_up(h):
                    shutil.rmtree(self.host_path(h, LAB_DISK_DIR), ignore_errors=True)


# libvirt's log lines that mark a migration's steps: (the host's role, text in the line,
# the step's name). The source's are its migration code's debug lines (which phase it
# calls) and its QMP traffic with the source QEMU; the destination's the same for Prepare
# and Finish.
LIBVIRT_STEPS = (
    ("src", "qemuMigrationSrcBeginPhase:", "begin"),
    ("dst", "qemuMigrationDstPrepare", "prepare"),
    ("dst", "running with pid=", "emulator_spawned"),
    ("dst", '"execute":"nbd-server-start"', "nbd_server_start"),
    ("dst", '"execute":"migrate-incoming"', "migrate_incoming"),
    ("src", " : Perform3 ", "perform3"),
    ("src", '"execute":"blockdev-add","arguments":{"driver":"nbd"', "nbd_blockdev_add"),
    ("src", '"execute":"blockdev-mirror"', "blockdev_mirror"),
    ("src", '"event": "BLOCK_JOB_READY"', "mirror_ready"),
    ("src", '"execute":"migrate",', "migrate"),
    ("src", '"event": "MIGRATION", "data": {"status": "pre-switchover"}', "pre_switchover"),
    ("src", '"execute":"migrate-continue"', "migrate_continue"),
    ("src", '"event": "MIGRATION", "data": {"status": "completed"}', "completed"),
    ("src", " : Finish3 ", "finish3"),
    ("dst", '"execute":"nbd-server-stop"', "nbd_server_stop"),
    ("dst", '"execute":"cont"', "cont"),
    ("src", " : Confirm3 ", "confirm3"),
    ("src", "qemuProcessStop:", "process_stop"),
)
# what the trace logs: libvirt's migration and process code at debug, its QMP traffic
TRACE_FILTERS = "1:qemu.qemu_migration 1:qemu.qemu_process 2:qemu.qemu_monitor"
TRACE_LOG = "/var/log/libvirt/bench-guest-trace.log"


class LibvirtTrace:
    """The lab's daemons log their migrations' steps to TRACE_LOG (virt-admin, beside
    their own log) while this exists; :meth:`close` puts their settings back."""

    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.saved: dict[str, tuple[str, str]] = {}
        try:
            for h in HOSTS:
                filters, outputs = self.setting(h, "filters"), self.setting(h, "outputs")
                self.saved[h] = (filters, outputs)
                self.lab.admin(h, "daemon-log-filters", f"{filters} {TRACE_FILTERS}".strip())
                self.lab.admin(h, "daemon-log-outputs", f"{outputs} 1:file:{TRACE_LOG}".strip())
        except BaseException:
            self.close()
            raise

    def setting(self, host: str, what: str) -> str:
        """The daemon's log filters or outputs, as they were set: virt-admin shows a filter
        ``1:name`` as ``1:*name*``, which set again would gain another pair of stars."""
        out = self.lab.admin(host, f"daemon-log-{what}")
        items = out.strip().removeprefix(f"Logging {what}:").split()
        return " ".join(re.sub(r"^(\d:)\*([^*]+)\*$", r"\1\2", item) for item in items)

    def timeline(self, frm: str, to: str, t_unix: float) -> dict[str, float]:
        """Each step's first log line at or after ``t_unix``, ms after it."""
        lines = {"src": self.lines(frm, t_unix), "dst": self.lines(to, t_unix)}
        out: dict[str, float] = {}
        for role, text, step in LIBVIRT_STEPS:
            for t, line in lines[role]:
                if text in line:
                    out[f"{role}.{step}"] = round((t - t_unix) * 1e3, 1)
                    break
        return dict(sorted(out.items(), key=lambda kv: kv[1]))

    def lines(self, host: str, t_unix: float) -> list[tuple[float, str]]:
        try:
            text = (self.lab.root(host) / TRACE_LOG.lstrip("/")).read_text(errors="replace")
        except OSError:
            return []
        out = []
        for line in text.splitlines():
            with contextlib.suppress(ValueError):  # a continuation line (cookie XML ...)
                t = datetime.datetime.strptime(line[:28], "%Y-%m-%d %H:%M:%S.%f%z").timestamp()
                if t >= t_unix:
                    out.append((t, line))
        return out

    def close(self) -> None:
        for h, (filters, outputs) in self.saved.items():
            if self.lab.is_up(h):
                self.lab.admin(h, "daemon-log-outputs", outputs)
                self.lab.admin(h, "daemon-log-filters", filters)
                (self.lab.root(h) / TRACE_LOG.lstrip("/")).unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------
# the libvirt lab


class Lab:
    """The lab of ../shared/anchors/libvirt-lab: its script and its state directory."""

    def __init__(self, script_dir: Path, state: Path) -> None:
        self.script_dir = script_dir
        self.state = state

    def pid(self, host: str) -> int | None:
        try:
            pid = int((self.state / "lv" / host / "libvirtd.pid").read_text())
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
        except (OSError, ValueError):
            return None
        return pid if comm == "libvirtd" else None

    def socket(self, host: str) -> Path:
        return self.state / "lv" / host / "run" / "libvirt" / "libvirt-sock"

    def is_up(self, host: str) -> bool:
        return self.pid(host) is not None and self.socket(host).exists()

    def any_trace(self) -> bool:
        """Something of the lab exists (a daemon, a namespace)."""
        return any(self.pid(h) is not None for h in HOSTS) or any(
            Path(f"/run/netns/{ns}").exists() for ns in ("hostA", "hostB", "lab-br")
        )

    def uri(self, host: str) -> str:
        return f"qemu+unix:///system?socket={self.socket(host)}"

    def admin(self, host: str, *args: str) -> str:
        """virt-admin on the host's daemon (its admin socket); its output."""
        sock = self.state / "lv" / host / "run" / "libvirt" / "libvirt-admin-sock"
        uri = f"libvirtd:///system?socket={sock}"
        return run_client(["virt-admin", "-c", uri, *args])[1]

    def root(self, host: str) -> Path:
        """The host's file system as its libvirtd sees it (its own mount namespace)."""
        return Path(f"/proc/{self.pid(host)}/root")

    def script(self, verb: str, log: Path) -> None:
        env = {**os.environ, "LAB": str(self.state)}
        with log.open("ab") as out:
            r = subprocess.run(
                ["bash", str(self.script_dir / "libvirt_lab.sh"), verb],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                timeout=1200,
                check=False,
            )
        if r.returncode != 0:
            tail = log.read_text(errors="replace").strip().splitlines()[-3:]
            raise RuntimeError(f"libvirt_lab.sh {verb} failed ({r.returncode}): {tail}")


def open_lab(args: argparse.Namespace, work: Path) -> tuple[Lab | None, bool, str]:
    """(the lab, whether this run brought it up, why libvirt is not measured)."""
    if args.no_libvirt:
        return None, False, "--no-libvirt"
    lab_dir = Path(args.libvirt_lab) if args.libvirt_lab else DEFAULT_LAB
    if not (lab_dir / "libvirt_lab.sh").exists():
        return None, False, f"no libvirt lab at {lab_dir} (--libvirt-lab DIR)"
    if os.geteuid() != 0:
        return None, False, "the libvirt lab needs root"
    lab = Lab(lab_dir, Path(args.lab_state))
    if all(lab.is_up(h) for h in HOSTS):
        return lab, False, ""
    if lab.any_trace():
        return None, False, f"the libvirt lab is half up: run {lab_dir}/libvirt_lab.sh down first"
    print(f"bringing the libvirt lab up ({lab_dir}/libvirt_lab.sh up)", flush=True)
    try:
        lab.script("up", work / "lab.log")
        if not all(lab.is_up(h) for h in HOSTS) or shutil.which("virsh") is None:
            raise RuntimeError("libvirt_lab.sh up ran but the daemons or virsh are missing")
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
        with contextlib.suppress(RuntimeError, OSError, subprocess.TimeoutExpired):
            lab.script("down", work / "lab.log")
        return None, False, str(exc)
    return lab, True, ""


# ---------------------------------------------------------------------------------------
# boot


def watch_boot(
    proc: subprocess.Popen[str], log: Callable[[], Path | None], t0: float
) -> dict[str, float]:
    """Poll the start command and the console until both the command has returned and the
    first count is there; seconds after ``t0`` of each."""
    out: dict[str, float] = {}
    while len(out) < 2:
        if "start_cmd_ms" not in out and proc.poll() is not None:
            out["start_cmd_ms"] = (time.monotonic() - t0) * 1e3
            if proc.returncode != 0:
                assert proc.stderr is not None
                raise ClientError(error_text(proc.stderr.read()))
        if "wall_ms" not in out and console_counts(log()):
            out["wall_ms"] = (time.monotonic() - t0) * 1e3
        if time.monotonic() - t0 > BOOT_TIMEOUT:
            raise TimeoutError(f"no count on the console after {BOOT_TIMEOUT:.0f} s")
        time.sleep(POLL_S)
    return {k: round(v, 1) for k, v in out.items()}


def emulator_started_ms(pid: int | None, t0_boot: float) -> float | None:
    """When the emulator process was started, ms after ``t0_boot`` (CLOCK_BOOTTIME), from
    its /proc start time (clock ticks since boot, so 10 ms steps)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    ticks = int(stat[stat.rindex(")") + 2 :].split()[19])
    return round((ticks / os.sysconf("SC_CLK_TCK") - t0_boot) * 1e3, 1)


def boot_once(side: Side, tag: str) -> dict[str, Any]:
    """Define a fresh domain on A, time start -> first count, then destroy and undefine."""
    name = f"bg-boot-{tag}"
    spec = Spec(name, str(uuidlib.uuid4()), str(side.boot_disk), side.spec_console(name))
    side.define("A", spec)
    t0_boot = time.clock_gettime(time.CLOCK_BOOTTIME)
    t0 = time.monotonic()
    proc = subprocess.Popen(
        side.cmd("A", "start", name),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        row: dict[str, Any] = dict(watch_boot(proc, lambda: side.console_log("A", spec), t0))
        row["emulator_ms"] = emulator_started_ms(side.emulator_pid("A", spec), t0_boot)
        return row
    except (ClientError, TimeoutError) as exc:
        return {"error": str(exc)}
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
        side.discard(name, ("A",))


# ---------------------------------------------------------------------------------------
# live migration


def proc_state(pid: int) -> str:
    """A process's state letter ("R", "S", "Z" ...), "" once it is gone (reaped)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat[stat.rindex(")") + 2]


class ExitWatch:
    """When the source emulator of a migration exits and when it is gone (reaped by its
    parent), polled every 10 ms in a thread: a manager that waits for its emulator to be
    gone before it returns waits for the reaping too."""

    def __init__(self, pid: int | None) -> None:
        self.pid = pid
        self.zombie: float | None = None
        self.gone: float | None = None
        self._halt = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        if pid is not None:
            self._thread.start()

    def _run(self) -> None:
        assert self.pid is not None
        while not self._halt.is_set():
            state, now = proc_state(self.pid), time.monotonic()
            if state == "Z" and self.zombie is None:
                self.zombie = now
            if not state:
                self.gone = now
                return
            time.sleep(0.01)

    def result(self, returned: float, timeout: float = 5.0) -> dict[str, float | None]:
        """How long it was a zombie (0: never seen as one), and when it was gone, ms after
        the client returned at ``returned`` (negative: before); waits up to ``timeout``."""
        if self._thread.is_alive():
            self._thread.join(timeout)
        self._halt.set()
        if self.gone is None:
            return {"src_zombie_ms": None, "src_gone_after_return_ms": None}
        return {
            "src_zombie_ms": round((self.gone - (self.zombie or self.gone)) * 1e3, 1),
            "src_gone_after_return_ms": round((self.gone - returned) * 1e3, 1),
        }


def other(host: str) -> str:
    return "B" if host == "A" else "A"


def switchover_difference(src: Path, dst: Path) -> str:
    """How the destination's copy ``dst`` differs from what the source's disk ``src`` held
    at the switch-over ("" when it does not): after it only the destination's guest has
    written, each count's record into its slot of MiB 0, so every other byte must be the
    source's and every slot the source's record or a newer one."""
    if src.stat().st_size != dst.stat().st_size:
        return "the destination disk's size differs from the source's"
    diff = [off // MiB for off in guest.differing_blocks(src, dst)]
    if set(diff) - {0}:
        return f"the destination disk differs from the source's at MiB {diff[:5]}"
    area = guest.SLOTS * guest.RECORD
    head = {p: guest.read_head(p, "raw", MiB) for p in (src, dst)}
    if head[src][area:] != head[dst][area:]:
        return "the destination disk differs from the source's in MiB 0, past the records"
    newest = guest.parse_records(head[src][:area]).newest
    if not newest:
        return "the source's disk holds no record of the guest"
    records = guest.parse_records(head[dst][:area])
    if records.torn:
        return f"the destination disk has torn records in slots {records.torn[:5]}"
    rewritten = {n % guest.SLOTS for n in records.counts if n > newest}
    for slot in range(guest.SLOTS):
        at = slice(slot * guest.RECORD, (slot + 1) * guest.RECORD)
        if head[src][at] != head[dst][at] and slot not in rewritten:
            return f"the destination's record slot {slot} is neither the source's nor newer"
    return ""


class Series:
    """One running guest of one tool, migrated back and forth between its two hosts."""

    def __init__(self, side: Side, case: str, pattern: Path) -> None:
        self.side = side
        self.case = case
        self.name = f"bg-{case.replace('_', '-')}"
        self.copied = "--copy-storage-all" in CASE_FLAGS[case]
        if self.copied:  # a file of its own on each host, at one path
            disk = side.copy_disk(self.name, pattern)
        else:  # one file both hosts see
            disk = str(side.work / f"{self.name}.raw")
            guest.create_disk(Path(disk), "raw", pattern.stat().st_size)
        console = side.spec_console(self.name)
        self.spec = Spec(self.name, str(uuidlib.uuid4()), disk, console)
        self.where = "A"

    def start(self) -> None:
        self.side.define("A", self.spec)
        self.side.run("A", "start", self.name)
        if not wait_count_above(self.log("A"), 0, BOOT_TIMEOUT):
            raise RuntimeError(f"{self.side.tool}: {self.name} never counted on A")

    def log(self, host: str) -> Callable[[], Path | None]:
        return lambda: self.side.console_log(host, self.spec)

    def argv(self, frm: str, to: str, migration_id: str) -> list[str]:
        return self.side.cmd(
            frm,
            "migrate",
            "--live",
            "--p2p",
            "--persistent",
            *self.side.migrate_flags(self.case),
            *self.side.hop_args(migration_id),
            self.name,
            self.side.dest(to),
        )

    def hop(self) -> dict[str, Any]:
        frm, to = self.where, other(self.where)
        before = max(console_counts(self.log(frm)()), default=0)
        row: dict[str, Any] = {"direction": f"{frm}->{to}"}
        watch = ExitWatch(self.side.emulator_pid(frm, self.spec))
        mid, t_unix = str(uuidlib.uuid4()), time.time()
        t0_boot = time.clock_gettime(time.CLOCK_BOOTTIME)
        try:
            wall, _ = run_client(self.argv(frm, to, mid), MIGRATE_TIMEOUT)
            returned = time.monotonic()
        except ClientError as exc:
            watch.result(time.monotonic(), timeout=0)
            self.where = self.locate()
            moved = "refused" if self.where == frm else "failed"
            return {**row, "error": str(exc), "outcome": moved}
        self.where = to
        row["wall_ms"] = round(wall * 1e3, 1)
        row.update(watch.result(returned))
        row["dst_emulator_ms"] = emulator_started_ms(self.side.emulator_pid(to, self.spec), t0_boot)
        row.update(self.job(frm, row["wall_ms"]))
        row["timeline_ms"] = self.side.timeline(frm, to, mid, t_unix)
        return {**row, **self.check(frm, to, before)}

    def job(self, host: str, wall_ms: float) -> dict[str, Any]:
        """The completed job's statistics on the host the guest left (its "Time elapsed"
        runs from Begin to the job's end, with either tool)."""
        try:
            info = parse_jobinfo(self.side.run(host, "domjobinfo", "--completed", self.name)[1])
        except ClientError as exc:
            return {"jobinfo_error": str(exc)}
        return {
            "job_ms": info["time_elapsed_ms"],
            "outside_job_ms": round(wall_ms - info["time_elapsed_ms"], 1),
            "downtime_ms": info["downtime_ms"],
            "data_MiB": round(info["data_processed"] / MiB, 1),
        }

    def check(self, frm: str, to: str, before: int) -> dict[str, Any]:
        """The guest counts on at the destination; a copied disk holds what the source's
        held at the switch-over (the source's file, which its stopped emulator left)."""
        out: dict[str, Any] = {}
        if not wait_count_above(self.log(to), before, COUNT_TIMEOUT):
            out["error"] = f"the guest did not count on {to} after the migration"
        if self.copied:
            src, dst = (self.side.host_path(h, self.spec.disk) for h in (frm, to))
            problem = switchover_difference(src, dst)
            out["disk_copy_ok"] = not problem
            if problem:
                out["error"] = problem
        return out

    def locate(self) -> str:
        for h in (self.where, other(self.where)):
            if self.side.state(h, self.name) in ("running", "paused"):
                return h
        raise RuntimeError(f"{self.side.tool}: {self.name} runs on neither host")

    def stop(self) -> None:
        self.side.discard(self.name)


# ---------------------------------------------------------------------------------------
# the run


def order(items: Sequence[T], i: int) -> list[T]:
    """Round i's order: swapped every round, so that neither tool always goes first."""
    return list(items) if i % 2 == 0 else list(reversed(items))


def brief(row: dict[str, Any]) -> str:
    return json.dumps({k: v for k, v in row.items() if k not in ("direction", "timeline_ms")})


def boot_phase(sides: Sequence[Side], args: argparse.Namespace) -> dict[str, Any]:
    rows: dict[str, list[dict[str, Any]]] = {s.tool: [] for s in sides}
    for s in sides:
        print(f"boot warm-up {s.tool}: {brief(boot_once(s, f'{s.tool}-warm'))}", flush=True)
    for i in range(args.n):
        for s in order(sides, i):
            row = boot_once(s, f"{s.tool}-{i}")
            rows[s.tool].append(row)
            print(f"boot {i + 1}/{args.n} {s.tool}: {brief(row)}", flush=True)
    return {"rows": rows, "refused": {}}


def warm_up(ser: Series) -> str:
    """An untimed round trip; returns the refusal (or failure) text if the first hop fails."""
    ser.start()
    for _ in HOSTS:
        row = ser.hop()
        print(f"{ser.case} warm-up {ser.side.tool}: {brief(row)}", flush=True)
        if "error" in row and "outcome" in row:
            return f"{row['outcome']}: {row['error']}"
    return ""


def migration_phase(
    sides: Sequence[Side], case: str, args: argparse.Namespace, pattern: Path
) -> dict[str, Any]:
    rows: dict[str, list[dict[str, Any]]] = {s.tool: [] for s in sides}
    refused: dict[str, str] = {}
    series: list[Series] = []
    try:
        for s in sides:
            reason = s.unavailable(case)
            if not reason:
                series.append(Series(s, case, pattern))
                reason = warm_up(series[-1])
            if reason:
                refused[s.tool] = reason
        for i in range(args.n):
            for ser in order(series, i):
                if ser.side.tool in refused:
                    continue
                row = ser.hop()
                rows[ser.side.tool].append(row)
                print(f"{case} {i + 1}/{args.n} {ser.side.tool}: {brief(row)}", flush=True)
                time.sleep(args.settle)
    finally:
        for ser in series:
            ser.stop()
    return {"rows": rows, "refused": refused}


def client_startup(sides: Sequence[Side]) -> dict[str, Any]:
    """What the client alone costs: ``list --all`` on host A, 1 untimed + 3 timed."""
    out = {}
    for s in sides:
        s.run("A", "list", "--all")
        out[s.tool] = summarize([s.run("A", "list", "--all")[0] * 1e3 for _ in range(3)])
    return out


def run_all(sides: Sequence[Side], args: argparse.Namespace, work: Path) -> dict[str, Any]:
    pattern = work / "pattern.raw"
    guest.create_disk(pattern, "raw", args.disk_mib * MiB, pattern=True)
    phases = {"boot": boot_phase(sides, args)}
    for case in MIGRATIONS:
        phases[case] = migration_phase(sides, case, args, pattern)
    return {"phases": phases, "client_startup_ms": client_startup(sides)}


# ---------------------------------------------------------------------------------------
# report


DETAIL_KEYS = {
    "boot": ("start_cmd_ms", "emulator_ms"),
    "shared": (
        "dst_emulator_ms",
        "job_ms",
        "outside_job_ms",
        "src_zombie_ms",
        "src_gone_after_return_ms",
        "downtime_ms",
        "data_MiB",
    ),
}
DETAIL_KEYS["copy"] = DETAIL_KEYS["copy_tunnelled"] = DETAIL_KEYS["shared"]


def summarize_case(case: str, phase: dict[str, Any], tool: str) -> dict[str, Any]:
    if tool in phase["refused"]:
        return {"na": phase["refused"][tool]}
    rows = phase["rows"].get(tool, [])
    ok = [r for r in rows if "error" not in r]
    out: dict[str, Any] = {"ok": len(ok), "n": len(rows)}
    for key in ("wall_ms", *DETAIL_KEYS[case]):
        out[key] = summarize([float(r[key]) for r in ok if r.get(key) is not None])
    out["timeline_median_ms"] = timeline_medians(ok)
    errors = sorted({str(r["error"]) for r in rows if "error" in r})
    if errors:
        out["errors"] = errors
    return out


def timeline_medians(rows: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Each timeline event's median over ``rows``, in the order of those medians."""
    times: dict[str, list[float]] = {}
    for r in rows:
        for k, v in r.get("timeline_ms", {}).items():
            times.setdefault(k, []).append(v)
    med = {k: round(statistics.median(v), 1) for k, v in times.items()}
    return dict(sorted(med.items(), key=lambda kv: kv[1]))


def analyse(run: dict[str, Any], tools: Sequence[str]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for case in CASES:
        phase = run["phases"][case]
        summary[case] = {t: summarize_case(case, phase, t) for t in tools}
    return summary


def median_s(s: dict[str, Any] | None) -> float | None:
    if not s or "na" in s or not s["wall_ms"].get("n"):
        return None
    return round(float(s["wall_ms"]["median"]) / 1e3, 3)


def ratio(case_summary: dict[str, Any]) -> float | None:
    vm = median_s(case_summary.get("vmmigrate"))
    lv = median_s(case_summary.get("libvirt"))
    return round(vm / lv, 2) if vm is not None and lv else None


def ok_of(s: dict[str, Any]) -> str:
    return f"{s['ok']}/{s['n']}"


def table_rows(summary: dict[str, Any], libvirt_note: str) -> list[str]:
    lines = [
        f"{'case':<27}{'tool':<11}{'ok':>5}{'median s':>10}{'min s':>8}{'max s':>8}"
        f"{'vmmigrate/libvirt':>19}"
    ]
    for case, title in CASES.items():
        r = ratio(summary[case])
        for i, tool in enumerate(TOOLS):
            head = f"{title if i == 0 else '':<27}{tool:<11}"
            s = summary[case].get(tool)
            if s is None:
                lines.append(f"{head}{libvirt_note}")
            elif "na" in s:
                lines.append(f"{head}n/a ({s['na']})")
            elif not s["wall_ms"].get("n"):
                lines.append(f"{head}{ok_of(s):>5} no successful run")
            else:
                w = s["wall_ms"]
                tail = f"{r:>19.2f}" if r is not None and i == 0 else ""
                lines.append(
                    f"{head}{ok_of(s):>5}{w['median'] / 1e3:>10.2f}"
                    f"{w['min'] / 1e3:>8.2f}{w['max'] / 1e3:>8.2f}{tail}"
                )
    return lines


def med(s: dict[str, Any], key: str) -> str:
    """The median of a summarized detail, in whole units ("-" when there is none)."""
    x = s.get(key, {})
    return f"{x['median']:.0f}" if x.get("n") else "-"


def detail_rows(summary: dict[str, Any], startup: dict[str, Any]) -> list[str]:
    lines = ["", "details (medians):"]
    for tool, s in summary["boot"].items():
        if "wall_ms" in s:
            lines.append(
                f"  boot, {tool}: emulator process started after {med(s, 'emulator_ms')} ms, "
                f"start command returned after {med(s, 'start_cmd_ms')} ms"
            )
    for case in MIGRATIONS:
        for tool, s in summary[case].items():
            if "wall_ms" in s:
                lines.append(
                    f"  {CASES[case]}, {tool}: destination QEMU started after "
                    f"{med(s, 'dst_emulator_ms')} ms; job (domjobinfo) {med(s, 'job_ms')} ms, "
                    f"outside it {med(s, 'outside_job_ms')} ms; source QEMU a zombie for "
                    f"{med(s, 'src_zombie_ms')} ms, gone {med(s, 'src_gone_after_return_ms')} "
                    f"ms after the client returned; QEMU downtime "
                    f"{med(s, 'downtime_ms')} ms, {med(s, 'data_MiB')} MiB moved"
                )
    for tool, s in startup.items():
        lines.append(f"  client alone (list --all), {tool}: {s['median']:.0f} ms")
    for case, title in CASES.items():
        for tool, s in summary[case].items():
            lines += [f"  error in {title}, {tool}: {e}" for e in s.get("errors", [])]
    return lines


def timeline_rows(summary: dict[str, Any]) -> list[str]:
    """The managers' log events of each migration case, median ms after the client
    started the migration."""
    lines = ["", "timeline (median ms after the client started the migration):"]
    for case in MIGRATIONS:
        for tool, s in summary[case].items():
            events = s.get("timeline_median_ms")
            if events:
                lines.append(f"  {CASES[case]}, {tool}:")
                lines.append("    " + ", ".join(f"{k}={v:.0f}" for k, v in events.items()))
    return lines if len(lines) > 2 else []


def headline(results: dict[str, Any]) -> dict[str, Any]:
    s = results["summary"]
    return {
        "bench": "bench_guest",
        "n": results["config"]["n"],
        "median_s": {JSON_KEYS[c]: {t: median_s(s[c].get(t)) for t in TOOLS} for c in CASES},
        "ratio_vmmigrate_over_libvirt": {JSON_KEYS[c]: ratio(s[c]) for c in CASES},
        "libvirt": results["libvirt"],
    }


def report(results: dict[str, Any]) -> str:
    m, c = results["machine"], results["config"]
    lines = [
        f"machine: {m['nproc']} CPUs {m['cpu_model']}, kernel {m['kernel']}, {m['qemu']}, "
        f"{results['libvirt_version']}; load average {m['loadavg_start'][0]:.1f} at start, "
        f"{m['loadavg_end'][0]:.1f} at end",
        f"guest: {c['mem_mib']} MiB RAM, {c['disk_mib']} MiB raw disk (cache=none), n={c['n']}; "
        f"libvirt: {results['libvirt']}",
        "",
        *table_rows(results["summary"], results["libvirt"]),
        *detail_rows(results["summary"], results["run"]["client_startup_ms"]),
        *timeline_rows(results["summary"]),
        f"  runtime {results['runtime_s']} s",
    ]
    return "\n".join(lines)


def libvirt_version() -> str:
    try:
        out = subprocess.run(
            ["libvirtd", "--version"], capture_output=True, text=True, timeout=10, check=False
        ).stdout
    except OSError:
        return "libvirtd not installed"
    return out.strip() or "libvirtd: unknown version"


# ---------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--n", type=int, default=5, help="repetitions of each case (default 5)")
    ap.add_argument("--mem", type=int, default=256, help="guest RAM, MiB (256)")
    ap.add_argument("--disk-mib", type=int, default=256, help="disk size, MiB (256)")
    ap.add_argument("--settle", type=float, default=0.5, help="seconds between migrations")
    ap.add_argument("--libvirt-lab", metavar="DIR", help=f"the libvirt lab (default {DEFAULT_LAB})")
    ap.add_argument("--no-libvirt", action="store_true", help="measure vmmigrate only")
    ap.add_argument(
        "--libvirt-trace",
        action="store_true",
        help="log libvirt's migration steps at debug level and report their timeline",
    )
    ap.add_argument(
        "--lab-state",
        default=os.environ.get("LAB", "/tmp/libvirt-lab"),
        help="the lab's state directory ($LAB, default /tmp/libvirt-lab)",
    )
    ap.add_argument("--json", metavar="PATH", help="write every result as JSON")
    ap.add_argument("--workdir", help="keep everything here (default: a temp dir, removed)")
    args = ap.parse_args(argv)
    if args.n < 1 or args.mem < 64 or args.disk_mib < 2:
        ap.error("--n must be at least 1, --mem at least 64, --disk-mib at least 2")
    return args


def measure(args: argparse.Namespace, work: Path, results: dict[str, Any]) -> None:
    img = guest.image()
    guest.qemu_img()
    sides: list[Side] = []
    lab, brought_up, why = open_lab(args, work)
    results["libvirt"] = "measured" if lab else f"not available: {why}"
    try:
        sides.append(VmSide(work, img, args.mem))
        if lab is not None:
            sides.append(LvSide(work, img, args.mem, lab, args.libvirt_trace))
        results["tools"] = [s.tool for s in sides]
        results["run"] = run_all(sides, args, work)
    finally:
        for s in reversed(sides):
            s.close()
        if lab is not None and brought_up:
            print("bringing the libvirt lab down", flush=True)
            lab.script("down", work / "lab.log")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def on_term(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench-guest-"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    results: dict[str, Any] = {
        "machine": machine_info(),
        "libvirt_version": libvirt_version(),
        "config": {
            **vars(args),
            "command": " ".join(["bench.bench_guest", *(argv or sys.argv[1:])]),
        },
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
    }
    results["config"]["mem_mib"] = args.mem
    try:
        measure(args, work, results)
    except guest.GuestUnavailable as exc:
        print(f"the guest cannot be had here: {exc}", file=sys.stderr)
        return 2
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    results["machine"]["loadavg_end"] = os.getloadavg()
    results["runtime_s"] = round(time.monotonic() - started, 1)
    results["summary"] = analyse(results["run"], results["tools"])
    print(f"\n{report(results)}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
        print(f"results written to {args.json}")
    print(json.dumps(headline(results)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
