"""simvm's disks: the record format, -drive, and real simvm processes writing a disk,
stopping, restarting and migrating live with the disk shared (the same file)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from vmmigrate.simvm import disk as simdisk
from vmmigrate.simvm.disk import RECORD_SIZE, DriveError, parse_drive, scan

from tests.unit.test_simvm import (
    UUID,
    Lab,
    QMPError,
    incoming_port,
    status,
    wait_migration,
    wait_reply,
)


@pytest.fixture
def sim(tmp_path: Path) -> Iterator[Lab]:
    lab = Lab(tmp_path)
    try:
        yield lab
    finally:
        lab.stop_all()


def make_disk(path: Path, size: int = 64 << 10) -> str:
    with path.open("wb") as f:
        f.truncate(size)
    return str(path)


def assert_continuous(path: str) -> list[int]:
    """No torn record, no duplicate, no gap: the window holds the last N records written,
    the sequence of one guest that never restarted its count. Returns the sequence."""
    found = scan(path)
    assert found.torn == [], f"torn records in slots {found.torn}"
    seqs = found.seqs
    assert seqs, "no record on the disk"
    assert seqs == list(range(seqs[0], seqs[-1] + 1)), "a gap or a duplicate"
    slots = simdisk.slots_of(os.path.getsize(path))
    assert len(seqs) == min(seqs[-1] + 1, slots)
    for r in found.records:
        assert r.slot == r.seq % slots and r.uuid == UUID
    return seqs


# -- the record format ------------------------------------------------------------------------


def test_record_round_trip_and_torn_detection(tmp_path: Path) -> None:
    raw = simdisk.encode_record(7, bytes(16))
    assert len(raw) == RECORD_SIZE
    rec = simdisk.decode_record(3, raw)
    assert isinstance(rec, simdisk.Record) and (rec.slot, rec.seq) == (3, 7)
    assert simdisk.decode_record(0, bytes(RECORD_SIZE)) is None
    for at in (10, 100, RECORD_SIZE - 1):  # header, payload, checksum
        bad = bytearray(raw)
        bad[at] ^= 0xFF
        assert simdisk.decode_record(0, bytes(bad)) is False
    # half a new record over an old one: torn
    mixed = simdisk.encode_record(9, bytes(16))[:256] + raw[256:]
    assert simdisk.decode_record(0, mixed) is False
    path = make_disk(tmp_path / "d.img", 8 * RECORD_SIZE)
    with open(path, "r+b") as f:
        f.seek(2 * RECORD_SIZE)
        f.write(raw)
        f.seek(5 * RECORD_SIZE)
        f.write(mixed)
    found = scan(path)
    assert [(r.slot, r.seq) for r in found.records] == [(2, 7)] and found.torn == [5]
    assert found.last == 7 and scan(make_disk(tmp_path / "e.img")).last == -1


def test_slots_window() -> None:
    assert simdisk.slots_of(100) == 0
    assert simdisk.slots_of(64 << 10) == 128
    assert simdisk.slots_of(1 << 30) == simdisk.MAX_SLOTS


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("file=/a/b.img", simdisk.DriveSpec("/a/b.img")),
        (
            "file=/a,,b.img,format=raw,if=virtio,cache=none",
            simdisk.DriveSpec("/a,b.img", cache="none"),
        ),
        (
            "file=/x,readonly=on,cache=directsync",
            simdisk.DriveSpec("/x", "raw", "virtio", "directsync", True),
        ),
        ("file=/x,media=cdrom", simdisk.DriveSpec("/x", readonly=True, media="cdrom")),
    ],
)
def test_parse_drive(value: str, expected: simdisk.DriveSpec) -> None:
    assert parse_drive(value) == expected


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("file=/x,format=qcow2", "format 'qcow2' is not supported by simvm"),
        ("file=/x,bogus=1", "Invalid parameter 'bogus'"),
        ("format=raw", "simvm needs file=PATH"),
        ("file=/x,cache=fast", "invalid cache option"),
        ("file=/x,readonly=yes", "Parameter 'readonly' expects 'on' or 'off'"),
    ],
)
def test_parse_drive_refusals(value: str, message: str) -> None:
    with pytest.raises(DriveError, match=message):
        parse_drive(value)


# -- simvm processes ------------------------------------------------------------------------


def _drive(path: str, *extra: str) -> tuple[str, str]:
    return "-drive", ",".join([f"file={path}", "format=raw", "if=virtio", *extra])


def test_a_running_guest_writes_its_disk_and_stops_cleanly(sim: Lab, tmp_path: Path) -> None:
    path = make_disk(tmp_path / "vda.img")
    vm = sim.start("vm", *_drive(path, "cache=none"))

    async def body() -> None:
        q = await vm.connect()
        first = (await q.ok("x-simvm-query-disks"))[0]
        assert first["file"] == path and first["cache"] == "none" and not first["failed"]
        busy = await wait_reply(q, "x-simvm-query-disks", lambda d: d[0]["next-seq"] > 150)
        await q.ok("stop")
        stopped = (await q.ok("x-simvm-query-disks"))[0]["next-seq"]
        assert stopped >= busy[0]["next-seq"]
        # stopping flushed the disk: every record written is there, nothing after
        assert assert_continuous(path)[-1] == stopped - 1
        await q.ok("cont")
        await wait_reply(q, "x-simvm-query-disks", lambda d: d[0]["next-seq"] > stopped + 10)
        await q.ok("quit")
        assert await vm.wait_exit() == 0

    sim.run(body())
    assert_continuous(path)


def test_a_cold_start_goes_on_after_the_last_record(sim: Lab, tmp_path: Path) -> None:
    path = make_disk(tmp_path / "vda.img", 16 * RECORD_SIZE)  # a small window: it wraps
    first = sim.start("first", *_drive(path))

    async def run_until(vm_q_seq: int) -> None:
        q = await first.connect()
        await wait_reply(q, "x-simvm-query-disks", lambda d: d[0]["next-seq"] > vm_q_seq)
        await q.ok("quit")
        assert await first.wait_exit() == 0

    sim.run(run_until(40))
    last = assert_continuous(path)[-1]
    second = sim.start("second", "-S", *_drive(path))

    async def body() -> None:
        q = await second.connect()
        assert (await q.ok("x-simvm-query-disks"))[0]["next-seq"] == last + 1
        await q.ok("cont")
        await wait_reply(q, "x-simvm-query-disks", lambda d: d[0]["next-seq"] > last + 20)
        await q.ok("quit")
        assert await second.wait_exit() == 0

    sim.run(body())
    assert assert_continuous(path)[-1] >= last + 20


def test_live_migration_on_shared_storage_continues_the_sequence(
    sim: Lab, tmp_path: Path
) -> None:
    path = make_disk(tmp_path / "shared.img")
    src = sim.start("src", "-seed", "5", "-dirty-rate", "500", *_drive(path, "cache=none"))
    dst = sim.start("dst", "-incoming", "tcp:127.0.0.1:0", *_drive(path, "cache=none"))

    async def body() -> None:
        s, d = await src.connect(), await dst.connect()
        await wait_reply(s, "x-simvm-query-disks", lambda x: x[0]["next-seq"] > 50)
        await s.ok("migrate", uri=f"tcp:127.0.0.1:{await incoming_port(d)}")
        assert (await wait_migration(s))["status"] == "completed"
        assert await status(s) == "postmigrate"
        at_switchover = (await s.ok("x-simvm-query-disks"))[0]["next-seq"]
        await wait_reply(d, "x-simvm-query-disks", lambda x: x[0]["next-seq"] > at_switchover + 30)
        await d.ok("quit")
        assert await dst.wait_exit() == 0
        # the source, paused after the migration, wrote nothing more
        assert (await s.ok("x-simvm-query-disks"))[0]["next-seq"] == at_switchover
        await s.ok("quit")

    sim.run(body())
    seqs = assert_continuous(path)  # no restart, no overlap of the two writers
    assert seqs[-1] > 80


def test_storage_copy_commands_are_refused_by_name(sim: Lab, tmp_path: Path) -> None:
    vm = sim.start("vm", *_drive(make_disk(tmp_path / "vda.img")))

    async def body() -> None:
        q = await vm.connect()
        for name in simdisk_commands():
            with pytest.raises(QMPError) as info:
                await q.ok(name, device="drive0", target="nbd:127.0.0.1:1", sync="full")
            assert info.value.cls == "GenericError"
            assert name in info.value.desc and "storage copy needs QEMU" in info.value.desc

    sim.run(body())


def simdisk_commands() -> tuple[str, ...]:
    from vmmigrate.simvm.monitor import STORAGE_COPY_COMMANDS

    return STORAGE_COPY_COMMANDS


def test_a_missing_disk_stops_simvm_at_start(sim: Lab, tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.img")
    vm = sim.start("vm", *_drive(missing))
    assert vm.proc.wait(15) == 1
    assert f"Could not open '{missing}'" in vm.log.read_text()


def test_a_readonly_disk_is_never_written(sim: Lab, tmp_path: Path) -> None:
    ro = make_disk(tmp_path / "ro.img")
    rw = make_disk(tmp_path / "rw.img")
    vm = sim.start("vm", *_drive(ro, "readonly=on"), *_drive(rw))

    async def body() -> None:
        q = await vm.connect()
        await wait_reply(q, "x-simvm-query-disks", lambda d: d[1]["next-seq"] > 20)
        await q.ok("quit")
        assert await vm.wait_exit() == 0

    sim.run(body())
    assert scan(ro).records == [] and Path(ro).read_bytes() == bytes(64 << 10)
    assert_continuous(rw)
