"""One simvm: the machine plus its migrations, as the QMP commands see it.

Methods here are what the commands do; they raise :class:`CommandError` with QEMU's error
class and, where QEMU has one, QEMU's message. They run on the event loop thread; the
migration threads only touch the machine (which locks) and their own status cells.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from typing import Any

from vmmigrate.simvm.incoming import IncomingMigration
from vmmigrate.simvm.machine import Machine, RunState
from vmmigrate.simvm.migration import (
    PARAMETER_RANGES,
    RUNNING,
    SUPPORTED_CAPABILITIES,
    Capabilities,
    EmitFn,
    MigrationStatus,
    Parameters,
)
from vmmigrate.simvm.outgoing import OutgoingMigration, parse_migration_uri

log = logging.getLogger("simvm.emulator")

MIGRATION_ACTIVE = "There's a migration process in progress"


class CommandError(Exception):
    """A QMP error reply: ``{"error": {"class": cls, "desc": desc}}``."""

    def __init__(self, desc: str, cls: str = "GenericError") -> None:
        super().__init__(desc)
        self.desc = desc
        self.cls = cls


class Emulator:
    def __init__(
        self,
        *,
        name: str,
        uuid: str,
        machine: Machine,
        emit: EmitFn,
        request_exit: Callable[[int, str], None],
        autostart: bool,
    ) -> None:
        self.name = name
        self.uuid = uuid
        self.machine = machine
        self.params = Parameters()
        self.caps = Capabilities()
        self._emit = emit
        self._request_exit = request_exit
        self._autostart = autostart
        self.outgoing: OutgoingMigration | None = None
        self.incoming: IncomingMigration | None = None
        self.incoming_deferred = False

    # -- incoming ---------------------------------------------------------------------

    def listen_incoming(self, uri: str) -> None:
        """Bind the -incoming address; OSError / ValueError when it cannot be used."""
        inc = IncomingMigration(
            self.machine,
            self.uuid,
            uri,
            self.caps,
            self._emit,
            autostart=self._autostart,
            on_failure=self._incoming_failed,
        )
        inc.listen()
        self.incoming = inc
        inc.start()

    def _incoming_failed(self, reason: str) -> None:
        # QEMU reports "load of migration failed" and exits with EXIT_FAILURE
        self._request_exit(1, reason)

    def migrate_incoming(self, uri: str) -> None:
        if not self.incoming_deferred:
            raise CommandError("'-incoming' was not specified on the command line")
        if self.incoming is not None:
            raise CommandError("The incoming migration has already been started")
        try:
            self.listen_incoming(uri)
        except ValueError:
            raise CommandError("Parameter 'uri' expects a valid migration protocol") from None
        except OSError as exc:
            raise CommandError(f"Failed to bind socket: {exc.strerror or exc}") from exc

    # -- run state --------------------------------------------------------------------

    def query_status(self) -> dict[str, Any]:
        state = self.machine.state
        return {
            "status": state.value,
            "running": state is RunState.RUNNING,
            "singlestep": False,
        }

    def stop(self) -> None:
        # QEMU: while inmigrate, stay paused once the memory has arrived
        if self.machine.state is RunState.INMIGRATE and self._set_autostart(False):
            return
        if self.machine.state is RunState.RUNNING:
            self.machine.transition(RunState.PAUSED)
        # QEMU's vm_stop does nothing when the VM is not running

    def cont(self) -> None:
        state = self.machine.state
        if state is RunState.FINISH_MIGRATE:
            raise CommandError("Migration is not finalized yet")
        if state is RunState.SHUTDOWN:
            raise CommandError("Resetting the Virtual Machine is required")
        # QEMU: while inmigrate, start as soon as the memory has arrived
        if state is RunState.INMIGRATE and self._set_autostart(True):
            return
        self.machine.transition(RunState.RUNNING)

    def _set_autostart(self, on: bool) -> bool:
        """False when the incoming memory arrived meanwhile (act on the new state)."""
        self._autostart = on
        return self.incoming is None or self.incoming.set_autostart(on)

    def quit(self) -> None:
        self._request_exit(0, "host-qmp-quit")

    # -- outgoing migration -----------------------------------------------------------

    def migrate(self, uri: str) -> None:
        if self.outgoing is not None and self.outgoing.status.value in RUNNING:
            raise CommandError(MIGRATION_ACTIVE)
        if self.machine.state is RunState.INMIGRATE:
            raise CommandError("Guest is waiting for an incoming migration")
        if self.machine.state is RunState.POSTMIGRATE:
            raise CommandError("Can't migrate the vm that was paused due to previous migration")
        try:
            parse_migration_uri(uri)
        except ValueError:
            raise CommandError("Parameter 'uri' expects a valid migration protocol") from None
        job = OutgoingMigration(
            self.machine,
            vm_uuid=self.uuid,
            uri=uri,
            params=self.params,
            caps=self.caps,
            emit=self._emit,
        )
        self.outgoing = job
        job.start()

    def migrate_cancel(self) -> None:
        if self.outgoing is not None:
            self.outgoing.cancel()

    def query_migrate(self) -> dict[str, Any]:
        if self.outgoing is not None:
            return self.outgoing.info()
        if self.incoming is not None:
            return self.incoming.info()
        return {}

    def set_parameters(self, values: dict[str, Any]) -> None:
        checked: dict[str, int] = {}
        for name, value in values.items():
            if name not in PARAMETER_RANGES:
                raise CommandError(f"Parameter '{name}' is unexpected")
            attr, low, high, wording = PARAMETER_RANGES[name]
            if not isinstance(value, int) or isinstance(value, bool):
                raise CommandError(f"Invalid parameter type for '{name}', expected: integer")
            if not low <= value <= high:
                raise CommandError(f"Parameter '{attr}' expects {wording}")
            checked[attr] = value
        for attr, value in checked.items():  # all or nothing, as QEMU
            setattr(self.params, attr, value)
        log.info("migration parameters %s", checked)

    def set_capabilities(self, caps: list[Any]) -> None:
        if self.outgoing is not None and self.outgoing.status.value in RUNNING:
            raise CommandError(MIGRATION_ACTIVE)
        if self.incoming is not None and self.incoming.status.value is MigrationStatus.ACTIVE:
            raise CommandError(MIGRATION_ACTIVE)
        wanted: dict[str, bool] = {}
        for i, item in enumerate(caps):
            if not isinstance(item, dict) or set(item) != {"capability", "state"}:
                raise CommandError(
                    f"Invalid parameter type for 'capabilities[{i}]', expected: object "
                    "with members 'capability' and 'state'"
                )
            name, state = item["capability"], item["state"]
            if not isinstance(name, str) or not isinstance(state, bool):
                raise CommandError(f"Invalid parameter type for 'capabilities[{i}]'")
            if name not in SUPPORTED_CAPABILITIES:
                raise CommandError(f"Migration capability '{name}' is not supported by simvm")
            wanted[name.replace("-", "_")] = state
        for attr, state in wanted.items():
            setattr(self.caps, attr, state)

    # -- simvm extras -----------------------------------------------------------------

    def checksum(self) -> dict[str, Any]:
        """x-simvm-checksum (blocking: run it off the event loop)."""
        m = self.machine
        with m.lock:
            digest = hashlib.sha256(m.view).hexdigest()
            writes = m.writes
        out: dict[str, Any] = {"sha256": digest, "pages": m.page_count, "writes": writes}
        if self.incoming is not None and self.incoming.source_sha256 is not None:
            out["source-sha256"] = self.incoming.source_sha256
        return out

    def set_dirty_rate(self, rate: int) -> None:
        if rate < 0:
            raise CommandError("Parameter 'pages-per-second' expects a non-negative integer")
        self.machine.dirty_rate = rate

    def shutdown(self) -> None:
        """Stop everything before the process exits."""
        self.machine.transition(RunState.SHUTDOWN)
        if self.outgoing is not None:
            self.outgoing.cancel()
            self.outgoing.join(2.0)
        if self.incoming is not None:
            self.incoming.close()
        self.machine.stop_vcpu()
