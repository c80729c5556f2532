"""The client API on srcd: define, undefine, list, state, info, dumpxml (virsh's meanings)."""

from __future__ import annotations

import asyncio

import structlog

from common.domainxml import DomainDef, parse_domain
from srcd.context import SourceContext
from vmmigrate.v1 import vmmigrate_pb2 as pb

log = structlog.get_logger("vmmigrate.srcd.domains")


def domain_ref(d: DomainDef, active: bool = False) -> pb.DomainRef:
    return pb.DomainRef(name=d.name, uuid=d.uuid, id=0 if active else -1)


class DomainAPI:
    def __init__(self, ctx: SourceContext) -> None:
        self.ctx = ctx

    def state_of(self, d: DomainDef) -> pb.DomainState.ValueType:
        return pb.DOMAIN_STATE_RUNNING if self.ctx.is_active(d) else pb.DOMAIN_STATE_SHUTOFF

    async def define(self, xml: str) -> tuple[DomainDef, bool]:
        d = parse_domain(xml, max_bytes=self.ctx.config.max_xml_bytes)
        updated = await asyncio.to_thread(self.ctx.store.define, d)
        return d, updated

    async def undefine(self, key: str) -> DomainDef:
        return await asyncio.to_thread(self.ctx.store.undefine, key)

    async def lookup(self, key: str) -> DomainDef:
        return await asyncio.to_thread(self.ctx.store.lookup, key)

    async def list(self, all_domains: bool) -> list[pb.ListEntry]:
        domains = await asyncio.to_thread(self.ctx.store.list_domains)
        entries = []
        for d in domains:
            state = self.state_of(d)
            if not all_domains and state == pb.DOMAIN_STATE_SHUTOFF:
                continue
            entries.append(pb.ListEntry(domain=domain_ref(d), state=state))
        return entries

    async def info(self, key: str) -> pb.InfoResponse:
        d = await self.lookup(key)
        job = self.ctx.jobs.for_domain(d.uuid)
        return pb.InfoResponse(
            domain=domain_ref(d),
            state=self.state_of(d),
            os_type=d.os_type,
            vcpus=d.vcpus,
            max_memory_kib=d.memory_kib,
            used_memory_kib=d.current_memory_kib,
            persistent=True,
            autostart=False,
            description=d.description,
            migration_job=job.migration_id if job else "",
        )
