"""Observability end to end: metrics scraped after migrations, lifecycle events on both hosts,
history after restarts, --json, gRPC reflection. Real srcd and dstd processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import urllib.request
import uuid as uuidlib
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import grpc
import pytest
from helpers.hosts import Host, sample_domain_xml, wait_until
from helpers.live import start_domain, state
from helpers.qmp import runtime_record
from prometheus_client.parser import text_string_to_metric_families


def _start(h: Host) -> Host:
    return h.start([f"--metrics-listen={h.ip}:0"], [f"--metrics-listen={h.ip}:0"])


def _metrics_address(d: object) -> str:
    for ev in d.events():  # type: ignore[attr-defined]
        if ev.get("event") == "metrics_listening":
            return str(ev["metrics"])
    raise AssertionError("no metrics_listening line")


def scrape(daemon: object) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    url = f"http://{_metrics_address(daemon)}/metrics"
    with urllib.request.urlopen(url, timeout=10) as r:  # loopback only
        text = r.read().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_count_migrations_on_both_hosts(fresh_hosts: tuple[Host, Host], domname: str) -> None:
    a, b = fresh_hosts
    _start(a)
    _start(b)
    off, live = f"{domname}-off", f"{domname}-live"
    a.define(sample_domain_xml(off), f"{off}.xml")
    a.migctl("migrate", "--offline", "--persistent", "--p2p", off, b.dst)
    start_domain(a, live)
    a.migctl("migrate", "--live", "--persistent", "--p2p", live, b.dst)
    r = a.migctl("migrate", "--offline", "--persistent", "--p2p", "no-such-domain", b.dst, check=False)
    assert r.returncode != 0

    src = scrape(a.srcd)
    dst = scrape(b.dstd)
    m = "vmmigrate_migrations_total"
    for kind in ("offline", "live"):
        assert value(src, m, role="source", kind=kind, mode="p2p", result="completed") == 1
        assert value(dst, m, role="destination", kind=kind, mode="p2p", result="completed") == 1
    assert value(src, "vmmigrate_migration_bytes_total", role="source") > 0
    # the destination counts the same bytes, from the Perform cookie's statistics
    assert value(dst, "vmmigrate_migration_bytes_total", role="destination") == value(
        src, "vmmigrate_migration_bytes_total", role="source")
    assert value(src, "vmmigrate_refusals_total", role="source", reason="no-domain") == 1
    assert value(src, "vmmigrate_migrations_in_flight", role="source") == 0
    assert value(dst, "vmmigrate_migrations_in_flight", role="destination") == 0
    # phase durations: Begin and Confirm on the source, Prepare and Finish on the destination
    assert value(src, "vmmigrate_migration_phase_seconds_count", role="source", phase="begin3") == 2
    assert value(dst, "vmmigrate_migration_phase_seconds_count", role="destination", phase="prepare") == 2
    # the other host's daemons saw nothing
    assert value(scrape(b.srcd), m, role="source", kind="live", mode="p2p", result="completed") == 0


class Watcher:
    """A `migctl event` process whose stdout a thread reads line by line (events are
    flushed as they come), so that a test waits for the lines it expects, however slow
    the machine, and then stops the watcher with Ctrl-C (virsh's "event loop
    interrupted") instead of racing a --timeout."""

    def __init__(self, h: Host, *args: str) -> None:
        assert h.srcd is not None
        srcd = h.srcd
        before = sum(1 for e in srcd.events() if e.get("event") == "events_stream_opened")
        self.p = subprocess.Popen(
            [*h.prefix, sys.executable, "-m", "vmmigrate.migctl", "-c", h.src, *h.migctl_args,
             "event", *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL,
        )
        self.lines: list[str] = []
        self.errors: list[str] = []
        self.readers = [
            threading.Thread(target=_read, args=(pipe, into), daemon=True)
            for pipe, into in ((self.p.stdout, self.lines), (self.p.stderr, self.errors))
        ]
        for reader in self.readers:
            reader.start()
        WATCHERS.append(self)
        wait_until(
            lambda: sum(1 for e in srcd.events() if e.get("event") == "events_stream_opened") > before,
            60, "the event stream",
        )

    def wait_for(self, n: int) -> None:
        """Until ``n`` lines have come (bounded: a missing event fails the test)."""
        wait_until(lambda: len(self.lines) >= n, 60, f"{n} event line(s), got {self.lines}")

    def interrupt(self) -> list[str]:
        """Ctrl-C; its whole output (the event lines, then virsh's two closing lines)."""
        self.p.send_signal(signal.SIGINT)
        return self.finish()

    def finish(self, status: int = 0) -> list[str]:
        """The output once the process has ended by itself; its exit status is ``status``."""
        self.p.wait(timeout=60)
        self._close()
        assert self.p.returncode == status, self.errors
        return self.lines

    def stop(self) -> None:
        """After a failed test: end the process if it still runs."""
        if self.p.poll() is None:
            self.p.kill()
            self.p.wait(timeout=60)
        self._close()

    def _close(self) -> None:
        for reader in self.readers:
            reader.join(timeout=60)
        for pipe in (self.p.stdout, self.p.stderr):
            if pipe is not None:
                pipe.close()


WATCHERS: list[Watcher] = []


def _read(pipe: IO[str] | None, into: list[str]) -> None:
    assert pipe is not None
    for line in pipe:
        into.append(line.rstrip("\n"))


@pytest.fixture(autouse=True)
def _stop_watchers() -> Iterator[None]:
    yield
    while WATCHERS:
        WATCHERS.pop().stop()


def test_events_for_lifecycle_and_migration(fresh_hosts: tuple[Host, Host], domname: str) -> None:
    a, b = fresh_hosts
    a.start()
    b.start()
    mig = f"{domname}-mig"
    watch_a = Watcher(a, "--loop", "--timeout", "120")
    watch_b = Watcher(b, "--loop", "--timeout", "120", "--json")
    first = Watcher(a, "--domain", domname, "--timeout", "120")  # ends after one event
    # --timeout still ends a loop: a domain without events, virsh's exit status 1 for none
    quiet = Watcher(a, "--domain", f"{domname}-quiet", "--loop", "--timeout", "1")
    start_domain(a, domname)
    for cmd in ("suspend", "resume", "destroy", "undefine"):
        a.migctl(cmd, domname)
    start_domain(a, mig)
    a.migctl("migrate", "--live", "--persistent", "--p2p", "--undefinesource", mig, b.dst)

    assert quiet.finish(status=1) == ["event loop timed out", "events received: 0"]
    assert first.finish() == [
        f"event 'lifecycle' for domain '{domname}': Defined Added", "events received: 1"]
    expected_a = [
        f"event 'lifecycle' for domain '{domname}': {words}"
        for words in ("Defined Added", "Started Booted", "Suspended Paused", "Resumed Unpaused",
                      "Stopped Destroyed", "Undefined Removed")
    ] + [
        f"event 'lifecycle' for domain '{mig}': {words}"
        for words in ("Defined Added", "Started Booted", "Stopped Migrated", "Undefined Removed")
    ]
    watch_a.wait_for(len(expected_a))
    watch_b.wait_for(3)
    assert watch_a.interrupt() == [
        *expected_a, "event loop interrupted", f"events received: {len(expected_a)}"]
    got_b = [json.loads(line) for line in watch_b.interrupt()]  # --json: the events only
    assert [(e["domain"], e["event"], e["detail"], e["daemon"]) for e in got_b] == [
        (mig, "Started", "Migrated", "dstd"),
        (mig, "Defined", "Added", "dstd"),
        (mig, "Resumed", "Migrated", "dstd"),
    ]


def test_an_emulator_that_dies_unasked_is_stopped_failed(
    fresh_hosts: tuple[Host, Host], domname: str
) -> None:
    """An emulator killed from outside: its domain stops, Stopped Failed (libvirt's event
    for an emulator that went without a shutdown), sent once by the daemon that started it:
    srcd for a domain started here, dstd for one that arrived by migration."""
    a, b = fresh_hosts
    a.start()
    b.start()
    here, moved = domname, f"{domname}-moved"
    u_here = start_domain(a, here)
    u_moved = start_domain(a, moved)
    a.migctl("migrate", "--live", "--persistent", "--p2p", moved, b.dst)
    watch_a = Watcher(a, "--loop", "--timeout", "120", "--json")
    watch_b = Watcher(b, "--loop", "--timeout", "120", "--json")
    for h, u in ((a, u_here), (b, u_moved)):
        rec = runtime_record(h.state_dir, u)
        assert rec is not None
        os.kill(rec["pid"], signal.SIGKILL)
    watch_a.wait_for(1)
    watch_b.wait_for(1)
    got_a = [json.loads(line) for line in watch_a.interrupt()]
    got_b = [json.loads(line) for line in watch_b.interrupt()]
    assert [(e["domain"], e["event"], e["detail"], e["daemon"]) for e in got_a] == [
        (here, "Stopped", "Failed", "srcd")]
    assert [(e["domain"], e["event"], e["detail"], e["daemon"]) for e in got_b] == [
        (moved, "Stopped", "Failed", "dstd")]
    assert (state(a, here), state(b, moved)) == ("shut off", "shut off")
    assert runtime_record(a.state_dir, u_here) is None and runtime_record(b.state_dir, u_moved) is None
    # the domain starts again, and a destroy of it is a Stopped Destroyed alone
    watch_a = Watcher(a, "--loop", "--timeout", "120")
    a.migctl("start", here)
    a.migctl("destroy", here)
    watch_a.wait_for(2)
    assert watch_a.interrupt() == [
        *(f"event 'lifecycle' for domain '{here}': {words}"
          for words in ("Started Booted", "Stopped Destroyed")),
        "event loop interrupted", "events received: 2"]


def test_history_survives_restarts(fresh_hosts: tuple[Host, Host], domname: str) -> None:
    a, b = fresh_hosts
    a.start()
    b.start()
    off, live = f"{domname}-off", f"{domname}-live"
    a.define(sample_domain_xml(off, str(uuidlib.uuid4())), f"{off}.xml")
    a.migctl("migrate", "--offline", "--persistent", off, b.dst)  # client-driven
    start_domain(a, live)
    a.migctl("migrate", "--live", "--persistent", "--p2p", live, b.dst)
    for h in (a, b):
        h.start()  # a restart of both daemons: the in-memory jobs are gone

    jobs_a = json.loads(a.migctl("jobs", "--json").stdout)
    jobs_b = json.loads(b.migctl("jobs", "--json").stdout)
    assert [(j["domain"], j["role"], j["kind"], j["mode"], j["result"]) for j in jobs_a] == [
        (off, "source", "offline", "client-driven", "completed"),
        (live, "source", "live", "p2p", "completed"),
    ]
    assert [(j["domain"], j["role"], j["kind"], j["result"]) for j in jobs_b] == [
        (off, "destination", "offline", "completed"),
        (live, "destination", "live", "completed"),
    ]
    assert jobs_a[1]["bytes"] > 0 and jobs_a[1]["peer"] == b.dst
    assert jobs_a[1]["ended_unix"] >= jobs_a[1]["started_unix"] > 0
    assert [j["domain"] for j in json.loads(a.migctl("jobs", "--json", "--domain", live).stdout)] == [live]
    assert len(json.loads(b.migctl("jobs", "--json", "--limit", "1").stdout)) == 1
    table = a.migctl("jobs").stdout
    assert "Migration ID" in table and live in table and off in table

    out = json.loads(a.migctl("domjobinfo", live, "--completed", "--json").stdout)
    assert out["type"] == "Completed" and out["operation"] == "Outgoing migration"
    assert out["data_processed"] > 0
    incoming = json.loads(b.migctl("domjobinfo", live, "--completed", "--json").stdout)
    assert incoming["type"] == "Completed" and incoming["operation"] == "Incoming migration"
    text = a.migctl("domjobinfo", live, "--completed").stdout
    assert "Job type:         Completed" in text


def _jobinfo(h: Host, name: str) -> dict[str, object]:
    out: dict[str, object] = json.loads(h.migctl("domjobinfo", name, "--completed", "--json").stdout)
    return out


def test_domjobinfo_completed_on_the_destination_and_after_a_return(
    fresh_hosts: tuple[Host, Host], domname: str
) -> None:
    """The destination's record and domjobinfo --completed carry the source's figures
    (downtime, bytes, memory, time); after A -> B -> A, each host shows its newest job."""
    a, b = fresh_hosts
    a.start()
    b.start()
    start_domain(a, domname)
    a.migctl("migrate", "--live", "--persistent", "--p2p",
             "--migration-id", "there", domname, b.dst)
    [out] = json.loads(a.migctl("jobs", "--json", "--domain", domname).stdout)
    [came] = json.loads(b.migctl("jobs", "--json", "--domain", domname).stdout)
    assert (out["role"], came["role"]) == ("source", "destination")
    assert came["bytes"] == out["bytes"] > 0
    assert came["downtime_ms"] == out["downtime_ms"]
    on_a, on_b = _jobinfo(a, domname), _jobinfo(b, domname)
    assert (on_b["type"], on_b["operation"], on_b["migration_id"]) == (
        "Completed", "Incoming migration", "there")
    for field in ("downtime_ms", "data_processed", "data_total", "data_remaining", "page_size",
                  "iteration", "setup_time_ms"):
        assert on_b[field] == on_a[field], field
    assert isinstance(on_b["time_elapsed_ms"], int) and on_b["time_elapsed_ms"] > 0
    assert "Total downtime:   " + str(on_b["downtime_ms"]) in b.migctl(
        "domjobinfo", domname, "--completed").stdout

    # back to A, client-driven (both hosts keep the inactive definition, so both can be
    # asked): A's srcd still holds its outgoing job in memory, but the incoming one is
    # newer; B now shows its outgoing one
    b.migctl("migrate", "--live", "--persistent", "--migration-id", "back",
             domname, a.dst)
    back_on_a, back_on_b = _jobinfo(a, domname), _jobinfo(b, domname)
    assert (back_on_a["operation"], back_on_a["migration_id"]) == ("Incoming migration", "back")
    assert (back_on_b["operation"], back_on_b["migration_id"]) == ("Outgoing migration", "back")
    assert back_on_a["data_processed"] == back_on_b["data_processed"] > 0
    assert back_on_a["downtime_ms"] == back_on_b["downtime_ms"]
    a.start()  # a restart of A's daemons reads the same from the history
    assert _jobinfo(a, domname) == back_on_a


def test_json_list_and_dominfo(fresh_hosts: tuple[Host, Host], domname: str) -> None:
    a, _ = fresh_hosts
    a.start_srcd()
    u = start_domain(a, domname)
    rows = json.loads(a.migctl("list", "--all", "--json").stdout)
    assert {"id": 1, "name": domname, "uuid": u, "state": "running"} in rows
    info = json.loads(a.migctl("dominfo", domname, "--json").stdout)
    assert info["domain"]["uuid"] == u and info["state"] == "running"
    assert info["persistent"] is True and info["vcpus"] == 1
    assert json.loads(a.migctl("domjobinfo", domname, "--json").stdout)["type"] == "None"


def test_reflection_lists_services(fresh_hosts: tuple[Host, Host], tmp_path: Path) -> None:
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase,
    )

    a, _ = fresh_hosts
    a.start()
    for address, wanted in (
        (a.src, {"vmmigrate.v1.DomainService", "vmmigrate.v1.MigrationSourceService"}),
        (a.dst, {"vmmigrate.v1.MigrationDestinationService"}),
    ):
        with grpc.insecure_channel(address, options=[("grpc.enable_http_proxy", 0)]) as ch:
            services = set(ProtoReflectionDescriptorDatabase(ch).get_services())
        assert wanted <= services
        assert {"grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= services


def test_sigusr1_logs_every_task_and_changes_nothing(fresh_hosts: tuple[Host, Host]) -> None:
    """SIGUSR1 (docs/ARCHITECTURE.md, systemd): each daemon logs one task_dump line per
    asyncio task, with where it waits, and goes on serving."""
    a, _ = fresh_hosts
    a.start()
    assert a.srcd is not None and a.dstd is not None
    for proc in (a.srcd, a.dstd):
        proc.proc.send_signal(signal.SIGUSR1)
    for proc in (a.srcd, a.dstd):
        wait_until(lambda p=proc: "task_dump" in p.output(), 10, "a task dump")
        dumps = [json.loads(line) for line in proc.output().splitlines()
                 if line.startswith("{") and '"task_dump"' in line]
        assert dumps and all(isinstance(d["stack"], list) for d in dumps)
        assert any(d["stack"] for d in dumps)  # the daemon's own tasks, with their frames
        assert proc.proc.poll() is None
    a.define(sample_domain_xml("after-usr1", str(uuidlib.uuid4())), "after-usr1.xml")
    assert a.names() == ["after-usr1"]
