"""Real daemons in real processes: one "host" is a srcd and a dstd sharing a state dir.

Daemons listen on port 0 of the host's own loopback address (127.0.0.2, 127.0.0.3 ...) and
report the bound address in their ready line, so tests never race for ports.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

READY_TIMEOUT = 20.0


def sample_domain_xml(name: str, uuid: str | None = None, memory_mib: int = 64) -> str:
    uuid_line = f"\n  <uuid>{uuid}</uuid>" if uuid else ""
    return f"""<domain type='kvm'>
  <name>{name}</name>{uuid_line}
  <description>test domain {name}</description>
  <memory unit='MiB'>{memory_mib}</memory>
  <currentMemory unit='MiB'>{memory_mib}</currentMemory>
  <vcpu placement='static'>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <boot dev='hd'/>
  </os>
  <features><acpi/><apic/></features>
  <on_poweroff>destroy</on_poweroff>
  <devices>
    <!-- kept verbatim: vmmigrate does not interpret devices -->
    <console type='pty'/>
  </devices>
</domain>
"""


class Daemon:
    def __init__(self, kind: str, host: Host, extra: Sequence[str] = (), env: dict[str, str] | None = None,
                 port: int = 0) -> None:
        self.kind = kind
        self.host = host
        self.log_path = host.workdir / f"{kind}.log"
        self.address = ""
        args = [
            host.python, "-m", f"vmmigrate.{kind}",
            "--listen", f"{host.ip}:{port}",
            "--state-dir", str(host.state_dir),
            "--log-format", "json",
            *extra,
        ]
        full_env = dict(os.environ)
        full_env.update(env or {})
        self.log = self.log_path.open("ab")
        self.start_offset = self.log.tell()
        self.proc = subprocess.Popen(
            host.prefix + args, stdout=self.log, stderr=subprocess.STDOUT, env=full_env,
            stdin=subprocess.DEVNULL,
        )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()  # it died starting (or never got ready): no process, no open log
            raise

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.kind} exited with {self.proc.returncode}:\n{self.output()}")
            for event in self.events():
                if event.get("event") == "daemon_ready":
                    self.address = str(event["listen"])
                    return
            time.sleep(0.02)
        raise RuntimeError(f"{self.kind} not ready after {READY_TIMEOUT}s:\n{self.output()}")

    @property
    def port(self) -> int:
        return int(self.address.rpartition(":")[2])

    def output(self) -> str:
        with self.log_path.open("rb") as fh:
            fh.seek(self.start_offset)
            return fh.read().decode(errors="replace")

    def events(self) -> list[dict[str, object]]:
        out = []
        for line in self.output().splitlines():
            if line.startswith("{"):
                try:
                    out.append(json.loads(line))
                except ValueError:
                    continue
        return out

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if not self.log.closed:
            self.log.close()


class Host:
    """A host: its loopback IP, its state dir, its srcd and dstd."""

    def __init__(self, name: str, ip: str, workdir: Path, prefix: Sequence[str] = (),
                 python: str | None = None,
                 migctl_args: Sequence[str] = ()) -> None:
        self.name = name
        # the daemons' interpreter (their simvm emulators run with it too); migctl keeps ours
        self.python = python or sys.executable
        self.ip = ip
        self.workdir = workdir
        self.state_dir = workdir / "state"
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.prefix = list(prefix)  # e.g. ["ip", "netns", "exec", "hostA"]
        # migctl's own options for every call (e.g. --tls-dir DIR, --insecure)
        self.migctl_args = list(migctl_args)
        self.srcd: Daemon | None = None
        self.dstd: Daemon | None = None

    def start(self, srcd_args: Sequence[str] = (), dstd_args: Sequence[str] = (),
              env: dict[str, str] | None = None) -> Host:
        self.start_srcd(srcd_args, env)
        self.start_dstd(dstd_args, env)
        return self

    def start_srcd(self, extra: Sequence[str] = (), env: dict[str, str] | None = None) -> Daemon:
        port = 0
        if self.srcd is not None:
            self.srcd.stop()  # a restart: the old process is gone or goes now
            port = self.srcd.port  # a restarted daemon keeps its address, as on a real host
        self.srcd = Daemon("srcd", self, extra, env, port)
        return self.srcd

    def start_dstd(self, extra: Sequence[str] = (), env: dict[str, str] | None = None) -> Daemon:
        port = 0
        if self.dstd is not None:
            self.dstd.stop()
            port = self.dstd.port
        self.dstd = Daemon("dstd", self, extra, env, port)
        return self.dstd

    @property
    def src(self) -> str:
        assert self.srcd is not None
        return self.srcd.address

    @property
    def dst(self) -> str:
        assert self.dstd is not None
        return self.dstd.address

    def stop(self) -> None:
        for d in (self.srcd, self.dstd):
            if d is not None:
                d.stop()
        self.kill_emulators()

    def kill_emulators(self) -> None:
        """Emulators outlive their daemons (by design): kill, by pid, those this host's
        runtime records name, so that no test leaves a guest running."""
        run = self.state_dir / "run"
        killed = []
        for path in sorted(run.glob("*.json")) if run.exists() else []:
            try:
                rec = json.loads(path.read_text())
                pid = int(rec["pid"])
                with open(f"/proc/{pid}/stat") as fh:
                    stat = fh.read()
            except (OSError, ValueError, KeyError):
                continue
            fields = stat[stat.rindex(")") + 2 :].split()
            if fields[0] != "Z" and int(fields[19]) == int(rec.get("start_ticks", -1)):
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
        # SIGKILL is not instant (the kernel still frees the guest's memory): wait, so that
        # whoever looks for emulators next does not find these still exiting
        end = time.monotonic() + 10
        while killed and time.monotonic() < end:
            killed = [pid for pid in killed if _running(pid)]
            if killed:
                time.sleep(0.01)

    def migctl(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-m", "vmmigrate.migctl", "-c", self.src, *self.migctl_args, *args]
        r = subprocess.run(
            self.prefix + cmd, capture_output=True, text=True, timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
        if check and r.returncode != 0:
            raise AssertionError(f"migctl {' '.join(args)} failed ({r.returncode}): {r.stderr}")
        return r

    def names(self) -> list[str]:
        if self.prefix or self.migctl_args:  # in a namespace, or TLS: as migctl does
            out = self.migctl("list", "--all", "--name").stdout
            return [line for line in out.splitlines() if line]
        # the same List RPC migctl sends, without a client process per check
        import grpc

        from vmmigrate.v1 import vmmigrate_pb2 as pb
        from vmmigrate.v1 import vmmigrate_pb2_grpc as pb_grpc

        with grpc.insecure_channel(self.src, options=[("grpc.enable_http_proxy", 0)]) as ch:
            r = pb_grpc.DomainServiceStub(ch).List(pb.ListRequest(all=True), timeout=30)
        return [e.domain.name for e in r.domains]

    def define(self, xml: str, filename: str) -> str:
        path = self.workdir / filename
        path.write_text(xml)
        return self.migctl("define", str(path)).stdout

    def domain_files(self) -> list[Path]:
        d = self.state_dir / "domains"
        return sorted(d.glob("*.xml")) if d.exists() else []

    def journal(self) -> list[Path]:
        d = self.state_dir / "jobs"
        return sorted(d.glob("*.json")) if d.exists() else []


def wait_until(predicate: Callable[[], object], timeout: float = 30.0, what: str = "") -> None:
    """Poll ``predicate`` until it is true; fail the test after ``timeout`` seconds."""
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what or predicate}")
        time.sleep(0.05)


def settled(*hosts: Host, timeout: float = 30.0) -> None:
    """Wait until no host has a migration job left in its journal (recovery has run)."""
    wait_until(lambda: all(h.journal() == [] for h in hosts), timeout, "empty journals")


def _running(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            stat = fh.read()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"
