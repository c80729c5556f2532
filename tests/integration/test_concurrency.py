"""Concurrency: many migrations in flight between two hosts while other clients define,
undefine and list on both; host limits (max_incoming on dstd, max_outgoing on srcd)."""

from __future__ import annotations

import asyncio
import threading
import uuid as uuidlib
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import grpc
import grpc.aio
import pytest
from helpers.hosts import Host, sample_domain_xml, settled
from vmmigrate.common.flags import SOURCE_ONLY, MigrateFlag

from vmmigrate.v1 import vmmigrate_pb2 as pb
from vmmigrate.v1 import vmmigrate_pb2_grpc as pb_grpc

OFFLINE_P2P = (
    MigrateFlag.OFFLINE | MigrateFlag.PERSIST_DEST | MigrateFlag.PEER2PEER
    | MigrateFlag.UNDEFINE_SOURCE
)
OFFLINE_MANAGED = MigrateFlag.OFFLINE | MigrateFlag.PERSIST_DEST | MigrateFlag.CHANGE_PROTECTION


class JournalWatch:
    """Samples a host's journal (jobs/) in a thread: the most records seen at once."""

    def __init__(self, h: Host) -> None:
        self.dir = h.state_dir / "jobs"
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, sum(1 for p in self.dir.glob("*.json")))
            self._stop.wait(0.005)

    def __enter__(self) -> JournalWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def run(coro_fn: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(coro_fn())


def _channel(address: str) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(address, options=[("grpc.enable_http_proxy", 0)])


def _failed_rpcs(h: Host, daemon: str, code: str) -> list[dict[str, object]]:
    d = h.srcd if daemon == "srcd" else h.dstd
    assert d is not None
    return [e for e in d.events() if e.get("event") == "rpc_failed" and e.get("code") == code]


@pytest.mark.slow
def test_200_offline_migrations_in_flight_with_churn(fresh_hosts: tuple[Host, Host]) -> None:
    """200 p2p offline migrations A -> B at once (the destination holds each reservation a
    while, so they overlap), while two clients per host define, undefine and list."""
    a, b = fresh_hosts
    a.start(srcd_args=["--max-outgoing", "256"])
    b.start(dstd_args=["--max-incoming", "256"],
            env={"VMMIGRATE_FAILPOINTS": "dstd.finish.before=delay(10000)"})
    n = 200
    names = [f"conc{i:03d}" for i in range(n)]
    churned: dict[str, set[str]] = {"A": set(), "B": set()}
    errors: list[str] = []

    async def main() -> None:
        ch_a, ch_b = _channel(a.src), _channel(b.src)
        dom_a, dom_b = pb_grpc.DomainServiceStub(ch_a), pb_grpc.DomainServiceStub(ch_b)
        await asyncio.gather(*(
            dom_a.Define(pb.DefineRequest(xml=sample_domain_xml(nm)), timeout=60) for nm in names
        ))
        done = asyncio.Event()

        async def churn(host: str, dom: pb_grpc.DomainServiceStub, k: int) -> None:
            i = 0
            while not done.is_set():
                nm = f"churn-{host}-{k}-{i}"
                await dom.Define(pb.DefineRequest(xml=sample_domain_xml(nm)), timeout=60)
                listed = await dom.List(pb.ListRequest(all=True), timeout=60)
                if nm not in {e.domain.name for e in listed.domains}:
                    errors.append(f"{nm} missing from the list right after Define")
                if i % 2:
                    await dom.Undefine(pb.UndefineRequest(domain=nm), timeout=60)
                else:
                    churned[host].add(nm)
                i += 1

        async def migrate(nm: str) -> pb.MigrateResponse:
            return await dom_a.Migrate(
                pb.MigrateRequest(domain=nm, dest_uri=b.dst, flags=int(OFFLINE_P2P)), timeout=300
            )

        churners = [asyncio.ensure_future(churn(h, d, k))
                    for h, d in (("A", dom_a), ("B", dom_b)) for k in range(2)]
        try:
            with JournalWatch(b) as watch_b:
                results = await asyncio.gather(*(migrate(nm) for nm in names))
        finally:
            done.set()
            await asyncio.gather(*churners)
            await ch_a.close()
            await ch_b.close()
        assert all(r.dest_domain.name == nm for r, nm in zip(results, names, strict=True))
        # they were in flight together: most reservations were held at the same time
        assert watch_b.peak >= n * 3 // 4, f"only {watch_b.peak} incoming migrations at once"

    run(main)
    assert errors == []
    settled(a, b)
    on_a, on_b = set(a.names()), set(b.names())
    assert on_b == set(names) | churned["B"]
    assert on_a == churned["A"]


@pytest.mark.slow
def test_destination_limit_answers_busy_and_sources_back_off(fresh_hosts: tuple[Host, Host]) -> None:
    """max_incoming 2: at most two incoming migrations at once; the others get
    RESOURCE_EXHAUSTED, retry with backoff, and all complete."""
    a, b = fresh_hosts
    a.start()
    b.start(dstd_args=["--max-incoming", "2"],
            env={"VMMIGRATE_FAILPOINTS": "dstd.finish.before=delay(300)"})
    names = [f"lim{i}" for i in range(8)]
    for nm in names:
        a.define(sample_domain_xml(nm), f"{nm}.xml")

    async def main() -> None:
        async with _channel(a.src) as ch:
            dom = pb_grpc.DomainServiceStub(ch)
            with JournalWatch(b) as watch:
                await asyncio.gather(*(
                    dom.Migrate(pb.MigrateRequest(domain=nm, dest_uri=b.dst,
                                                  flags=int(OFFLINE_P2P)), timeout=120)
                    for nm in names
                ))
            assert watch.peak <= 2, f"{watch.peak} incoming migrations at once, limit 2"

    run(main)
    assert sorted(b.names()) == names and a.names() == []
    busy = _failed_rpcs(b, "dstd", "RESOURCE_EXHAUSTED")
    assert busy, "the limit was never hit"
    assert all("too many incoming migrations on this host" in str(e["error"]) for e in busy)
    settled(a, b)


@pytest.mark.slow
def test_busy_destination_refuses_prepare_clearly(fresh_hosts: tuple[Host, Host]) -> None:
    """A Prepare beyond max_incoming: RESOURCE_EXHAUSTED with a clear text, nothing
    reserved; once a slot frees, the same Prepare succeeds."""
    a, b = fresh_hosts
    a.start()
    b.start(dstd_args=["--max-incoming", "1"])
    for nm in ("busy1", "busy2"):
        a.define(sample_domain_xml(nm, str(uuidlib.uuid4())), f"{nm}.xml")

    async def main() -> None:
        async with _channel(a.src) as cha, _channel(b.dst) as chb:
            src = pb_grpc.MigrationSourceServiceStub(cha)
            dst = pb_grpc.MigrationDestinationServiceStub(chb)
            begun = {}
            for nm in ("busy1", "busy2"):
                mid = f"mid-{nm}-{uuidlib.uuid4()}"
                r = await src.Begin(pb.BeginRequest(
                    header=pb.PhaseHeader(migration_id=mid, flags=int(OFFLINE_MANAGED)),
                    domain=nm, dest_address=b.dst), timeout=30)
                begun[nm] = (mid, r)

            def prepare(nm: str) -> Awaitable[pb.PrepareResponse]:
                mid, r = begun[nm]
                flags = MigrateFlag(r.flags) & ~SOURCE_ONLY & ~MigrateFlag.CHANGE_PROTECTION
                return dst.Prepare(pb.PrepareRequest(
                    header=pb.PhaseHeader(migration_id=mid, flags=int(flags), cookie=r.cookie),
                    domain_xml=r.domain_xml), timeout=30)

            first = await prepare("busy1")
            again = await prepare("busy1")  # a retry: the first answer, no second job
            assert again == first
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await prepare("busy2")
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "too many incoming migrations on this host (1, max_incoming 1)" in (
                err.value.details() or "")
            assert len(b.journal()) == 1
            mid1, r1 = begun["busy1"]
            flags1 = MigrateFlag(r1.flags) & ~SOURCE_ONLY & ~MigrateFlag.CHANGE_PROTECTION
            await dst.Finish(pb.FinishRequest(
                header=pb.PhaseHeader(migration_id=mid1, flags=int(flags1)),
                dest_name="busy1", cancelled=True), timeout=30)
            await prepare("busy2")  # a slot is free again
            for nm in ("busy1", "busy2"):
                mid, r = begun[nm]
                flags = MigrateFlag(r.flags) & ~SOURCE_ONLY & ~MigrateFlag.CHANGE_PROTECTION
                if nm == "busy2":
                    await dst.Finish(pb.FinishRequest(
                        header=pb.PhaseHeader(migration_id=mid, flags=int(flags)),
                        dest_name=nm, cancelled=True), timeout=30)
                await src.Confirm(pb.ConfirmRequest(
                    header=pb.PhaseHeader(migration_id=mid, flags=int(r.flags)),
                    domain=nm, cancelled=True), timeout=30)
                # Confirm is idempotent: a retry gets the same (empty) answer
                await src.Confirm(pb.ConfirmRequest(
                    header=pb.PhaseHeader(migration_id=mid, flags=int(r.flags)),
                    domain=nm, cancelled=True), timeout=30)

    run(main)
    settled(a, b)
    assert sorted(a.names()) == ["busy1", "busy2"] and b.names() == []


def test_busy_source_queues_then_refuses_clearly(fresh_hosts: tuple[Host, Host]) -> None:
    """max_outgoing 1: a second migration waits for the slot; a client-driven Begin that
    cannot get one in time is refused with RESOURCE_EXHAUSTED and a clear text."""
    a, b = fresh_hosts
    a.start(srcd_args=["--max-outgoing", "1", "--rpc-timeout", "2"])
    b.start(env={"VMMIGRATE_FAILPOINTS": "dstd.finish.before=delay(300)"})
    for nm in ("q1", "q2", "q3"):
        a.define(sample_domain_xml(nm), f"{nm}.xml")

    async def main() -> None:
        async with _channel(a.src) as ch:
            dom = pb_grpc.DomainServiceStub(ch)
            src = pb_grpc.MigrationSourceServiceStub(ch)
            # queued, not refused: all three p2p migrations complete, one at a time
            with JournalWatch(a) as watch:
                await asyncio.gather(*(
                    dom.Migrate(pb.MigrateRequest(domain=nm, dest_uri=b.dst,
                                                  flags=int(OFFLINE_P2P)), timeout=60)
                    for nm in ("q1", "q2")
                ))
            assert watch.peak == 1
            # a parked client-driven job holds the only slot
            await src.Begin(pb.BeginRequest(
                header=pb.PhaseHeader(migration_id="hold-q3", flags=int(OFFLINE_MANAGED)),
                domain="q3", dest_address=b.dst), timeout=30)
            assert sorted(b.names()) == ["q1", "q2"]
            a.define(sample_domain_xml("q4"), "q4.xml")
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await src.Begin(pb.BeginRequest(
                    header=pb.PhaseHeader(migration_id="wait-q4", flags=int(OFFLINE_MANAGED)),
                    domain="q4", dest_address=b.dst), timeout=30)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "too many outgoing migrations on this host (max_outgoing 1)" in (
                err.value.details() or "")
            await src.Confirm(pb.ConfirmRequest(
                header=pb.PhaseHeader(migration_id="hold-q3", flags=int(OFFLINE_MANAGED)),
                domain="q3", cancelled=True), timeout=30)
            await dom.Migrate(pb.MigrateRequest(domain="q4", dest_uri=b.dst,
                                                flags=int(OFFLINE_P2P)), timeout=60)

    run(main)
    settled(a, b)
    assert sorted(a.names()) == ["q3"] and sorted(b.names()) == ["q1", "q2", "q4"]
