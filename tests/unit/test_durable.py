"""common.durable: atomic, durable writes and their failure modes."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
from vmmigrate.common.durable import atomic_write, clean_temp_files, durable_unlink, fsync_dir
from vmmigrate.common.errors import StorageError, StorageFull


def temp_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith(".tmp-"))


def test_atomic_write_creates_the_file_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "a.xml"
    atomic_write(target, b"<domain/>")
    assert target.read_bytes() == b"<domain/>"
    assert temp_files(tmp_path) == []
    assert target.stat().st_mode & 0o777 == 0o600


def test_atomic_write_replaces_existing_content(tmp_path: Path) -> None:
    target = tmp_path / "a.xml"
    target.write_bytes(b"old content that is longer")
    atomic_write(target, b"new")
    assert target.read_bytes() == b"new"
    assert temp_files(tmp_path) == []


def test_atomic_write_large_payload(tmp_path: Path) -> None:
    data = os.urandom(3 * 1024 * 1024 + 17)
    atomic_write(tmp_path / "big", data)
    assert (tmp_path / "big").read_bytes() == data


def test_atomic_write_sets_mtime_when_asked(tmp_path: Path) -> None:
    target = tmp_path / "a"
    atomic_write(target, b"x", mtime_ns=1_234_567_890_123_456_789)
    assert target.stat().st_mtime_ns == 1_234_567_890_123_456_789


def test_directory_in_the_way_leaves_it_untouched(tmp_path: Path) -> None:
    target = tmp_path / "victim"
    target.mkdir()
    (target / "inside").write_bytes(b"keep me")
    with pytest.raises(StorageError, match=r"^cannot write .*victim: Is a directory$"):
        atomic_write(target, b"data")
    assert (target / "inside").read_bytes() == b"keep me"
    assert temp_files(tmp_path) == []


def test_missing_directory_is_a_storage_error(tmp_path: Path) -> None:
    target = tmp_path / "nope" / "a.xml"
    with pytest.raises(StorageError) as info:
        atomic_write(target, b"data")
    assert str(info.value) == f"cannot write {target}: No such file or directory"
    assert not isinstance(info.value, StorageFull)


def test_failed_fsync_keeps_old_content(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "a.xml"
    target.write_bytes(b"old")

    def broken_fsync(fd: int) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(StorageError) as info:
        atomic_write(target, b"new")
    assert str(info.value) == f"cannot write {target}: Input/output error"
    monkeypatch.undo()
    assert target.read_bytes() == b"old"
    assert temp_files(tmp_path) == []


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
def test_full_disk_simulated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int) -> None:
    target = tmp_path / "a.xml"
    target.write_bytes(b"old")

    def full_write(fd: int, data: object) -> int:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "write", full_write)
    with pytest.raises(StorageFull) as info:
        atomic_write(target, b"new")
    assert str(info.value) == f"cannot write {target}: No space left on device"
    monkeypatch.undo()
    assert target.read_bytes() == b"old"
    assert temp_files(tmp_path) == []


def test_full_disk_real_tmpfs(tiny_fs: Path) -> None:
    target = tiny_fs / "a.xml"
    atomic_write(target, b"old")
    with pytest.raises(StorageFull) as info:
        atomic_write(target, b"x" * (1024 * 1024))
    assert str(info.value) == f"cannot write {target}: No space left on device"
    assert isinstance(info.value, StorageError)
    assert target.read_bytes() == b"old"
    assert temp_files(tiny_fs) == []
    # and the file system is usable again afterwards
    atomic_write(target, b"new")
    assert target.read_bytes() == b"new"


def test_durable_unlink(tmp_path: Path) -> None:
    target = tmp_path / "a"
    target.write_bytes(b"x")
    assert durable_unlink(target) is True
    assert not target.exists()
    assert durable_unlink(target) is False


def test_durable_unlink_error_is_translated(tmp_path: Path) -> None:
    target = tmp_path / "dir"
    target.mkdir()
    (target / "f").write_bytes(b"x")
    with pytest.raises(StorageError, match=r"^cannot remove "):
        durable_unlink(target)
    assert (target / "f").exists()


def test_fsync_dir(tmp_path: Path) -> None:
    fsync_dir(tmp_path)
    with pytest.raises(StorageError, match="No such file or directory"):
        fsync_dir(tmp_path / "missing")


def test_clean_temp_files_removes_only_leftovers(tmp_path: Path) -> None:
    (tmp_path / ".tmp-a.xml.123").write_bytes(b"half")
    (tmp_path / ".tmp-b").write_bytes(b"")
    (tmp_path / "keep.xml").write_bytes(b"whole")
    (tmp_path / ".tmp-dir").mkdir()  # not a file: left alone
    assert clean_temp_files(tmp_path) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == [".tmp-dir", "keep.xml"]
    assert clean_temp_files(tmp_path) == 0
