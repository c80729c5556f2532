"""bench_guest's check of a copied disk: the destination holds what the source's disk held
at the switch-over, give or take the records the guest wrote after it (bench/bench_guest.py
``switchover_difference``)."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest

from bench.bench_guest import MiB, switchover_difference
from tests.helpers import guest

SIZE = 4 * MiB


def record(n: int) -> bytes:
    """The guest's record of count ``n`` (tests/data/guest/init's layout)."""
    body = b"%015d\n" % n * 28
    head = b"VMMG %012d %s%13s\n" % (n, hashlib.md5(body).hexdigest().encode(), b"")
    return head + body


def write(path: Path, offset: int, data: bytes) -> None:
    with path.open("r+b") as f:
        f.seek(offset)
        f.write(data)


def put(path: Path, n: int) -> None:
    write(path, (n % guest.SLOTS) * guest.RECORD, record(n))


@pytest.fixture
def disks(tmp_path: Path) -> tuple[Path, Path]:
    """A source disk with data past MiB 0 and counts 1..99 in its record slots (so slot
    35 holds count 99), and a destination that is its copy."""
    src, dst = tmp_path / "src.raw", tmp_path / "dst.raw"
    with src.open("wb") as f:
        f.truncate(SIZE)
    for off in range(MiB, SIZE, MiB):
        write(src, off, hashlib.sha256(str(off).encode()).digest() * (MiB // 32))
    for n in range(1, 100):
        put(src, n)
    shutil.copyfile(src, dst)
    return src, dst


def test_a_copy_and_one_the_guest_wrote_on_are_the_source_at_switch_over(
    disks: tuple[Path, Path],
) -> None:
    src, dst = disks
    assert switchover_difference(src, dst) == ""
    for n in range(100, 110):  # the destination's guest counted on
        put(dst, n)
    assert switchover_difference(src, dst) == ""


def test_an_older_record_where_the_source_had_a_newer_one_is_a_difference(
    disks: tuple[Path, Path],
) -> None:
    src, dst = disks
    put(dst, 35)  # slot 35 held count 99
    assert switchover_difference(src, dst) == (
        "the destination's record slot 35 is neither the source's nor newer"
    )


def test_a_torn_record_is_a_difference(disks: tuple[Path, Path]) -> None:
    src, dst = disks
    write(dst, 56 * guest.RECORD, b"x" * guest.RECORD)
    assert switchover_difference(src, dst) == (
        "the destination disk has torn records in slots [56]"
    )


@pytest.mark.parametrize(
    ("offset", "found"),
    [
        (2 * MiB + 7, "the destination disk differs from the source's at MiB [2]"),
        (MiB - 1, "the destination disk differs from the source's in MiB 0, past the records"),
    ],
)
def test_data_outside_the_records_must_be_the_sources(
    disks: tuple[Path, Path], offset: int, found: str
) -> None:
    src, dst = disks
    write(dst, offset, b"!")
    assert switchover_difference(src, dst) == found


def test_a_source_without_records_or_another_size_is_not_a_copy(
    disks: tuple[Path, Path], tmp_path: Path
) -> None:
    src, dst = disks
    blank = tmp_path / "blank.raw"
    with blank.open("wb") as f:
        f.truncate(SIZE)
    assert switchover_difference(blank, blank) == "the source's disk holds no record of the guest"
    with dst.open("r+b") as f:
        f.truncate(SIZE + MiB)
    assert (
        switchover_difference(src, dst) == "the destination disk's size differs from the source's"
    )
