"""The real Linux guest (tests/helpers/guest.py) under bare QEMU: it boots, counts on its
console and its disk, and moves live between two QEMUs on loopback, with shared storage and
with its disk copied over NBD by hand (the QMP sequence the storage-copy work will drive:
nbd-server-start/-add on the destination, drive-mirror to it until ready, migrate, cancel the
mirror, nbd-server-stop, cont). No vmmigrate daemon is involved yet.

Timings are printed (run with -s to see them) and kept as the tests' user properties.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import guest as g
from helpers import guestvm as gv
from helpers.guestvm import Report

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(g.QEMU is None, reason="QEMU not installed (qemu-system-x86)"),
]

MiB = 1 << 20
image = gv.image_fixture  # the fixtures image and report
report = gv.report_fixture


@pytest.fixture
def guests() -> Iterator[list[g.Guest]]:
    """Every QEMU a test starts, stopped at the end whatever happened."""
    started: list[g.Guest] = []
    yield started
    for q in started:
        q.stop()


def check_disk(disk: Path, fmt: str, newer_than: int, console_last: int) -> g.Records:
    """Nothing torn, the newest record newer than newer_than and at least what the console
    last showed (each count reaches the disk before the console), and the slots hold the last
    SLOTS counts."""
    recs = g.disk_records(disk, fmt)
    assert recs.torn == [], f"torn records in slots {recs.torn}"
    assert recs.newest > newer_than
    assert recs.newest >= console_last
    expected = list(range(max(1, recs.newest - g.SLOTS + 1), recs.newest + 1))
    assert recs.counts == expected
    return recs


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_guest_boots_and_counts(
    image: g.Image, tmp_path: Path, guests: list[g.Guest], fmt: str, report: Report
) -> None:
    disk = tmp_path / f"disk.{fmt}"
    g.create_disk(disk, fmt, 64 * MiB)
    q = g.Guest(image, disk, fmt, tmp_path, "boot")
    guests.append(q)
    report(f"boot_to_first_count_{fmt}", q.wait_for_count(1))
    q.wait_for_count(15)
    out = q.output().decode(errors="replace")
    assert "guest: disk vda" in out
    assert "guest: nic eth0 52:54:00:12:34:56" in out
    assert "failed" not in out, out
    q.stop()
    counts = q.counts()
    assert counts[0] == 1 and gv.consecutive(counts)
    check_disk(disk, fmt, 0, counts[-1])


def test_guest_live_migration_shared_storage(
    image: g.Image, tmp_path: Path, guests: list[g.Guest], report: Report
) -> None:
    disk = tmp_path / "shared.raw"
    g.create_disk(disk, "raw", 64 * MiB)
    src = g.Guest(image, disk, "raw", tmp_path, "src")
    guests.append(src)
    src.wait_for_count(10)
    dst = g.Guest(image, disk, "raw", tmp_path, "dst", incoming=True)
    guests.append(dst)
    report("live_migration_shared", g.migrate(src, dst))
    run_on_and_check(src, dst, disk)


def run_on_and_check(src: g.Guest, dst: g.Guest, disk: Path) -> int:
    """After the switch-over: the destination runs and counts on, the source is done; both
    stopped, the counts went on without a reboot and ``disk`` holds them, none torn.
    Returns the source's last count."""
    assert src.status() == "postmigrate"
    assert dst.status() == "running"
    src_last = src.counts()[-1]
    dst.wait_for_count(src_last + 15)
    dst.stop()
    src.stop()
    check_continued(src_last, dst)
    check_disk(disk, "raw", src_last, dst.counts()[-1])
    return src_last


def check_continued(src_last: int, dst: g.Guest) -> None:
    """The destination went on counting from where the source stopped: no boot on it, its
    first full line the next count (or the one after, when the switch cut a line)."""
    out = dst.output().decode(errors="replace")
    assert "guest: start" not in out, "the guest started again on the destination"
    counts = dst.counts()
    assert src_last + 1 <= counts[0] <= src_last + 2, (src_last, counts[:3])
    assert gv.consecutive(counts)


def test_guest_live_migration_nbd_storage_copy(
    image: g.Image, tmp_path: Path, guests: list[g.Guest], report: Report
) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    src_disk, dst_disk = tmp_path / "a" / "disk.raw", tmp_path / "b" / "disk.raw"
    g.create_disk(src_disk, "raw", 256 * MiB, pattern=True)
    g.create_disk(dst_disk, "raw", 256 * MiB)
    src = g.Guest(image, src_disk, "raw", tmp_path / "a", "src")
    guests.append(src)
    src.wait_for_count(10)
    dst = g.Guest(image, dst_disk, "raw", tmp_path / "b", "dst", incoming=True)
    guests.append(dst)

    t0 = time.monotonic()
    port = g.start_nbd_export(dst)
    g.mirror_to_nbd(src, port)
    report("nbd_mirror_ready_256MiB", time.monotonic() - t0)
    report("nbd_memory_migration", g.migrate(src, dst, resume=False))
    g.end_mirror(src)
    dst.cmd("nbd-server-stop")
    report("nbd_storage_copy_total", time.monotonic() - t0)
    # Both sides are paused here: the copy must be exact, pattern and records alike.
    assert g.differing_blocks(src_disk, dst_disk) == []
    dst.cmd("cont")
    src_last = run_on_and_check(src, dst, dst_disk)
    # After stopping, only the records' first MiB moved on: the rest is the source's disk.
    assert g.differing_blocks(src_disk, dst_disk) == [0]
    # The source may have written one record it had no time to print before it stopped.
    assert g.disk_records(src_disk, "raw").newest <= src_last + 1
