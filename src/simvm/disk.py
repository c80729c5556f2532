"""simvm's disks: the raw images it is given (``-drive``) and the records its guest writes.

The guest workload writes, on every vCPU tick, one record to each writable disk: a
512-byte sector holding a magic, a sequence number, the domain's UUID, a payload derived
from both and a CRC32 of the rest, at slot ``seq % slots`` (the disk's first ``slots``
sectors, a rotating window). Every :data:`FSYNC_EVERY` records and whenever the vCPU
stops, the disk is fsynced (QEMU flushes every drive when a VM stops, which is what makes
a switchover safe on shared storage).

The next sequence number of each disk lives in guest memory (the cursor page), not in
simvm's own state: it moves with the memory in a live migration, so the destination goes
on where the source stopped, and a destination that resumed with stale memory would write
duplicate sequence numbers, which :func:`scan` shows. A cold start (no incoming memory)
reads it from the disk, as a guest finds its place on its disk at boot.

A record whose CRC does not match is torn: a write that did not complete as a whole.
"""

from __future__ import annotations

import dataclasses
import os
import struct
import uuid as uuidlib
import zlib

RECORD_SIZE = 512  # one sector: a sector write is never half old, half new on a disk
MAX_SLOTS = 4096  # the window: 2 MiB at the start of the disk
FSYNC_EVERY = 32  # records per fsync (and at every stop)
RECORD_MAGIC = b"SIMVMREC"
_HEAD = struct.Struct("<8sQ16s")  # magic, sequence number, domain UUID
_CRC = struct.Struct("<I")
_PAYLOAD = RECORD_SIZE - _HEAD.size - _CRC.size


class DriveError(ValueError):
    """A ``-drive`` option simvm cannot use (the message is QEMU-like)."""


@dataclasses.dataclass(frozen=True)
class DriveSpec:
    """One ``-drive file=PATH,format=raw,if=virtio,cache=MODE[,readonly=on]``."""

    file: str
    format: str = "raw"
    interface: str = "virtio"
    cache: str = "writeback"
    readonly: bool = False
    media: str = "disk"


_DRIVE_KEYS = frozenset(
    {"file", "format", "if", "cache", "readonly", "media", "id", "index", "serial", "aio"}
)
_CACHE_MODES = frozenset({"none", "writeback", "writethrough", "directsync", "unsafe"})


def _split_options(value: str) -> list[str]:
    """QEMU's option syntax: items separated by ',', a literal comma written ',,'."""
    items, cur, i = [], [], 0
    while i < len(value):
        if value[i] == ",":
            if value[i + 1 : i + 2] == ",":
                cur.append(",")
                i += 2
                continue
            items.append("".join(cur))
            cur = []
        else:
            cur.append(value[i])
        i += 1
    items.append("".join(cur))
    return items


def parse_drive(value: str) -> DriveSpec:
    opts: dict[str, str] = {}
    for item in _split_options(value):
        key, sep, val = item.partition("=")
        if not sep or key not in _DRIVE_KEYS:
            raise DriveError(f"-drive {value}: Invalid parameter '{key}'")
        opts[key] = val
    if not opts.get("file"):
        raise DriveError(f"-drive {value}: simvm needs file=PATH")
    fmt = opts.get("format", "raw")
    if fmt != "raw":
        raise DriveError(f"-drive {value}: format '{fmt}' is not supported by simvm (raw only)")
    cache = opts.get("cache", "writeback")
    if cache not in _CACHE_MODES:
        raise DriveError(f"-drive {value}: invalid cache option")
    readonly = opts.get("readonly", "off")
    if readonly not in ("on", "off"):
        raise DriveError(f"-drive {value}: Parameter 'readonly' expects 'on' or 'off'")
    media = opts.get("media", "disk")
    return DriveSpec(
        file=opts["file"],
        format=fmt,
        interface=opts.get("if", "virtio"),
        cache=cache,
        readonly=readonly == "on" or media == "cdrom",
        media=media,
    )


def encode_record(seq: int, vm_uuid: bytes) -> bytes:
    head = _HEAD.pack(RECORD_MAGIC, seq, vm_uuid)
    seed = head[8:]
    payload = (seed * (_PAYLOAD // len(seed) + 1))[:_PAYLOAD]
    body = head + payload
    return body + _CRC.pack(zlib.crc32(body))


@dataclasses.dataclass(frozen=True)
class Record:
    slot: int
    seq: int
    uuid: str


@dataclasses.dataclass(frozen=True)
class Scan:
    records: list[Record]  # valid records, by slot
    torn: list[int]  # slots holding a record magic with a bad checksum

    @property
    def seqs(self) -> list[int]:
        return sorted(r.seq for r in self.records)

    @property
    def last(self) -> int:
        """The highest sequence number on the disk, -1 when none."""
        return max((r.seq for r in self.records), default=-1)


def slots_of(size: int) -> int:
    return min(size // RECORD_SIZE, MAX_SLOTS)


def decode_record(slot: int, data: bytes) -> Record | bool | None:
    """The record in one sector: a Record, None for no record, False for a torn one."""
    if len(data) < RECORD_SIZE or data[:8] != RECORD_MAGIC:
        return None
    body = data[: RECORD_SIZE - _CRC.size]
    (crc,) = _CRC.unpack_from(data, RECORD_SIZE - _CRC.size)
    if zlib.crc32(body) != crc or data != encode_record(*_HEAD.unpack_from(data)[1:]):
        return False
    _, seq, raw_uuid = _HEAD.unpack_from(data)
    return Record(slot, seq, str(uuidlib.UUID(bytes=raw_uuid)))


def scan(path: str) -> Scan:
    """Every record in the window of the disk at ``path``."""
    records: list[Record] = []
    torn: list[int] = []
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        data = f.read(slots_of(size) * RECORD_SIZE)
    for slot in range(len(data) // RECORD_SIZE):
        found = decode_record(slot, data[slot * RECORD_SIZE : (slot + 1) * RECORD_SIZE])
        if isinstance(found, Record):
            records.append(found)
        elif found is False:
            torn.append(slot)
    return Scan(records, torn)


class Drive:
    """One open disk image. Not thread-safe: the machine calls it under its lock."""

    def __init__(self, spec: DriveSpec, vm_uuid: str) -> None:
        self.spec = spec
        self._uuid = uuidlib.UUID(vm_uuid).bytes
        flags = os.O_RDONLY if spec.readonly else os.O_RDWR
        try:
            self.fd = os.open(spec.file, flags | os.O_CLOEXEC)
        except OSError as exc:
            raise DriveError(
                f"-drive file={spec.file}: Could not open '{spec.file}': {exc.strerror}"
            ) from exc
        self.slots = slots_of(os.fstat(self.fd).st_size)
        self.failed = False  # a write failed: no more writes (the error was reported)
        self._unsynced = 0
        if not spec.readonly and self.slots < 1:
            os.close(self.fd)
            raise DriveError(
                f"-drive file={spec.file}: simvm needs a disk of at least {RECORD_SIZE} bytes"
            )

    @property
    def writable(self) -> bool:
        return not self.spec.readonly and not self.failed

    def next_seq_on_disk(self) -> int:
        """Where a cold-started guest goes on: after the disk's last record."""
        return scan(self.spec.file).last + 1

    def write(self, seq: int) -> None:
        """Write record ``seq`` at its slot (OSError when the disk fails)."""
        os.pwrite(self.fd, encode_record(seq, self._uuid), (seq % self.slots) * RECORD_SIZE)
        self._unsynced += 1
        if self._unsynced >= FSYNC_EVERY:
            self.flush()

    def flush(self) -> None:
        if self._unsynced and not self.failed:
            self._unsynced = 0
            os.fsync(self.fd)

    def close(self) -> None:
        try:
            if not self.spec.readonly and not self.failed:
                self._unsynced = max(self._unsynced, 1)
                self.flush()
        finally:
            os.close(self.fd)
