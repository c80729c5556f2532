"""The host's identity: its UUID, created once in ``STATE_DIR/host.json`` (atomically, under
the store lock, so that srcd and dstd starting together for the first time agree on it), and
its hostname. The UUID is what the migration cookie's ``<hostuuid>`` carries, and what the
same-host check compares.
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid as uuidlib
from dataclasses import dataclass
from pathlib import Path

import structlog
from vmmigrate.common.durable import atomic_write, storage_errors
from vmmigrate.common.errors import InvalidArgument, StorageError
from vmmigrate.common.uuids import canonical_uuid_or_none, require_uuid

log = structlog.get_logger("vmmigrate.store")

HOST_FILE = "host.json"


@dataclass(frozen=True)
class HostIdentity:
    host_uuid: str  # canonical lowercase 8-4-4-4-12, sent as the cookie's <hostuuid>
    hostname: str


def host_uuid_valid(u: str) -> bool:
    # libvirt's virUUIDIsValid: a UUID made of one repeated hex digit (all zeros, all 'f',
    # typical of broken SMBIOS tables) does not identify a host.
    return len(set(u.replace("-", ""))) > 1


def host_uuid_override(text: str) -> str:
    """A host UUID given by configuration, canonical; InvalidArgument if unusable."""
    u = require_uuid(text, "host uuid")
    if not host_uuid_valid(u):
        raise InvalidArgument(f"invalid host uuid {text!r}")
    return u


def load_or_create_host_uuid(path: Path) -> str:
    """The UUID kept in ``path``, created there if the file does not exist yet. The caller
    holds the store lock."""
    data: bytes | None = None
    with storage_errors("read", path), contextlib.suppress(FileNotFoundError):
        data = path.read_bytes()
    if data is None:
        new = str(uuidlib.uuid4())
        body = {"host_uuid": new, "created_unix": time.time()}
        atomic_write(path, json.dumps(body, sort_keys=True).encode() + b"\n")
        log.info("host_uuid_created", host_uuid=new, path=str(path))
        return new
    # A host whose identity silently changed would defeat the same-host check: an
    # unreadable host.json is an error, never a reason to invent a new UUID.
    try:
        text = json.loads(data)["host_uuid"]
        u = canonical_uuid_or_none(text) if isinstance(text, str) else None
    except (ValueError, KeyError, TypeError):
        u = None
    if u is None or not host_uuid_valid(u):
        raise StorageError(f"cannot read {path}: no valid host_uuid in it")
    return u
