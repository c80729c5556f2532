"""The client API on srcd: definitions and running domains, with virsh's meanings.

A domain is persistent (a definition in the store), transient (running with no definition:
it arrived by a live migration without --persistent), or both. Its state comes from the
emulator: no live emulator process means "shut off".
"""

from __future__ import annotations

import asyncio

import structlog
from vmmigrate.common import events
from vmmigrate.common.domainxml import DomainDef, parse_domain
from vmmigrate.common.errors import JobActive, OperationInvalid
from vmmigrate.common.hostcheck import check_runnable
from vmmigrate.common.hypervisor import EmulatorExit, RunState, RuntimeRecord, memory_plan
from vmmigrate.common.journal import Role
from vmmigrate.common.qmp import QMPError, QMPExecuteError
from vmmigrate.srcd.context import SourceContext

from vmmigrate.v1 import vmmigrate_pb2 as pb

log = structlog.get_logger("vmmigrate.srcd.domains")

_STATES = {
    "running": pb.DOMAIN_STATE_RUNNING,
    "paused": pb.DOMAIN_STATE_PAUSED,
    "shut off": pb.DOMAIN_STATE_SHUTOFF,
}


def domain_ref(d: DomainDef, active: bool = False) -> pb.DomainRef:
    return pb.DomainRef(name=d.name, uuid=d.uuid, id=1 if active else -1)


def emulator_gone(ctx: SourceContext, rec: RuntimeRecord, how: EmulatorExit) -> None:
    """An emulator went without being asked (QMPHypervisor.on_gone): the domain stopped,
    Stopped Failed or Stopped Shutdown. srcd notices the end of the domains it started, and
    of any whose owner is gone; not of an incoming migration's emulator whose dstd died,
    as the host never announced that domain as started (Started Migrated comes with
    Finish) and the migration fails instead."""
    incoming = ctx.store.journal_list(Role.DESTINATION)
    if any(r.domain_uuid == rec.uuid for r in incoming):
        return
    ctx.obs.events.emit(rec.name, rec.uuid, events.stopped_unasked(how.clean))


class DomainAPI:
    def __init__(self, ctx: SourceContext) -> None:
        self.ctx = ctx

    async def state_of(self, d: DomainDef) -> pb.DomainState.ValueType:
        status = await self.ctx.hypervisor.status(d.uuid)
        if status == "shutoff":
            return pb.DOMAIN_STATE_SHUTOFF
        return pb.DOMAIN_STATE_RUNNING if status == RunState.RUNNING else pb.DOMAIN_STATE_PAUSED

    async def define(self, xml: str) -> tuple[DomainDef, bool]:
        d = parse_domain(xml, max_bytes=self.ctx.config.max_xml_bytes)
        # refused before the store sees it: a definition this host would not run is not kept
        self.ctx.hypervisor.check_definition(d)
        updated = await asyncio.to_thread(self.ctx.store.define, d)
        self._event(d, events.DEFINED_UPDATED if updated else events.DEFINED_ADDED)
        return d, updated

    def _event(self, d: DomainDef, kind: tuple[str, str]) -> None:
        self.ctx.obs.events.emit(d.name, d.uuid, kind)

    async def undefine(self, key: str) -> DomainDef:
        d = await asyncio.to_thread(self.ctx.store.undefine, key)
        self._event(d, events.UNDEFINED_REMOVED)
        return d

    async def lookup(self, key: str) -> tuple[DomainDef, bool]:
        """(definition, persistent): see SourceContext.lookup."""
        return self.ctx.lookup(key)

    async def list(self, all_domains: bool) -> list[pb.ListEntry]:
        defs = await asyncio.to_thread(self.ctx.store.list_domains)
        # The emulators running now, read once: a domain with none is shut off, without a
        # look for its runtime record (with 10,000 domains, 10,000 failed opens).
        records = self.ctx.hypervisor.records()
        running = {rec.uuid for rec in records}
        known = {d.uuid for d in defs}
        transient = [t for t in self.ctx.transient_domains(records) if t.uuid not in known]
        entries = []
        for d in sorted([*defs, *transient], key=lambda x: x.name):
            state = await self.state_of(d) if d.uuid in running else pb.DOMAIN_STATE_SHUTOFF
            if not all_domains and state == pb.DOMAIN_STATE_SHUTOFF:
                continue
            active = state != pb.DOMAIN_STATE_SHUTOFF
            entries.append(pb.ListEntry(domain=domain_ref(d, active), state=state))
        return entries

    async def info(self, key: str) -> pb.InfoResponse:
        d, persistent = await self.lookup(key)
        job = self.ctx.jobs.for_domain(d.uuid)
        state = await self.state_of(d)
        return pb.InfoResponse(
            domain=domain_ref(d, state != pb.DOMAIN_STATE_SHUTOFF),
            state=state,
            os_type=d.os_type,
            vcpus=d.vcpus,
            max_memory_kib=d.memory_kib,
            used_memory_kib=await self.used_memory_kib(d),
            persistent=persistent,
            autostart=False,
            description=d.description,
            migration_job=job.migration_id if job else "",
        )

    async def used_memory_kib(self, d: DomainDef) -> int:
        """dominfo's "Used memory", as libvirt reports it: an inactive domain's
        <currentMemory>; for a running one, what its balloon holds (QMP query-balloon's
        ``actual``, which reaches the target set at start once the guest's balloon driver
        has given the memory back), or all of <memory> when it has no balloon. A monitor
        that does not answer leaves the live definition's <currentMemory>."""
        rec = self.ctx.hypervisor.record(d.uuid)
        if rec is None:
            return d.current_memory_kib
        size = len(rec.xml.encode()) + 1
        live = parse_domain(rec.xml, generate_uuid=False, max_bytes=size) if rec.xml else d
        plan = memory_plan(live, rec.emulator)
        if not plan.balloon:
            return plan.memory_kib
        try:
            reply = await self.ctx.hypervisor.execute(d.uuid, "query-balloon", timeout=5.0)
        except QMPError as exc:
            log.warning("query_balloon_failed", domain=d.name, error=str(exc))
            return plan.current_kib
        actual = reply.get("actual") if isinstance(reply, dict) else None
        return actual // 1024 if isinstance(actual, int) else plan.current_kib

    async def _response(self, d: DomainDef) -> pb.DomainResponse:
        state = await self.state_of(d)
        return pb.DomainResponse(
            domain=domain_ref(d, state != pb.DOMAIN_STATE_SHUTOFF), state=state
        )

    async def start(self, key: str) -> pb.DomainResponse:
        d, _ = await self.lookup(key)
        if self.ctx.is_active(d):
            raise OperationInvalid("domain is already running")
        if await asyncio.to_thread(self.ctx.store.job_held, d.uuid):
            raise JobActive(f"another migration job is already running for domain '{d.name}'")
        # what this host lacks (a disk, a bridge, a machine type) is said before QEMU runs
        await asyncio.to_thread(check_runnable, d, self.ctx.hypervisor.settings)
        await self.ctx.hypervisor.start(d)
        log.info("domain_started", domain=d.name)
        self._event(d, events.STARTED_BOOTED)
        return await self._response(d)

    async def destroy(self, key: str) -> pb.DomainResponse:
        d, _ = await self.lookup(key)
        if not self.ctx.is_active(d):
            raise OperationInvalid("domain is not running")
        await self.ctx.hypervisor.kill(d.uuid)
        log.info("domain_destroyed", domain=d.name)
        self._event(d, events.STOPPED_DESTROYED)
        return await self._response(d)

    async def shutdown(self, key: str) -> pb.DomainResponse:
        """ACPI power-down where the emulator has it; simvm has no guest OS to ask, so it is
        asked to quit (a clean shutdown as far as the host can tell)."""
        d, _ = await self.lookup(key)
        if not self.ctx.is_active(d):
            raise OperationInvalid("domain is not running")
        try:
            await self.ctx.hypervisor.execute(d.uuid, "system_powerdown")
        except QMPExecuteError as exc:
            if exc.error_class != "CommandNotFound":
                raise
            await self.ctx.hypervisor.quit(d.uuid)
            self._event(d, events.STOPPED_SHUTDOWN)  # simvm: it is gone now
        return await self._response(d)

    async def suspend(self, key: str) -> pb.DomainResponse:
        d, _ = await self.lookup(key)
        if not self.ctx.is_active(d):
            raise OperationInvalid("domain is not running")
        await self.ctx.hypervisor.execute(d.uuid, "stop")
        self._event(d, events.SUSPENDED_PAUSED)
        return await self._response(d)

    async def resume(self, key: str) -> pb.DomainResponse:
        d, _ = await self.lookup(key)
        if not self.ctx.is_active(d):
            raise OperationInvalid("domain is not running")
        if self.ctx.jobs.for_domain(d.uuid) is not None:
            raise JobActive(f"another migration job is already running for domain '{d.name}'")
        await self.ctx.hypervisor.execute(d.uuid, "cont")
        self._event(d, events.RESUMED_UNPAUSED)
        return await self._response(d)

    async def require_known(self, key: str) -> DomainDef:
        d, _ = await self.lookup(key)
        return d
