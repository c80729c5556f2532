"""common/hostpaths: executables and the temp dir, as shutil and tempfile find them, and
the daemons no longer import those two modules at all."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from vmmigrate.common.hostpaths import temp_dir, which


def test_which_finds_what_shutil_finds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    exe = tmp_path / "bin" / "tool"
    exe.parent.mkdir()
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    plain = tmp_path / "bin" / "data"
    plain.write_text("x")
    plain.chmod(0o644)
    (tmp_path / "bin" / "adir").mkdir(mode=0o755)
    monkeypatch.setenv("PATH", f"{tmp_path / 'nowhere'}:{exe.parent}")
    for name in ("tool", "data", "adir", "missing", str(exe), str(plain), "/nonexistent/tool"):
        assert which(name) == shutil.which(name), name
    assert which("tool") == str(exe)
    assert which("data") is None
    assert which(str(exe)) == str(exe)


def test_temp_dir_follows_tmpdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    assert temp_dir() == str(tmp_path)
    monkeypatch.setenv("TMPDIR", str(tmp_path / "missing"))
    assert temp_dir() == "/tmp"
    monkeypatch.delenv("TMPDIR")
    assert temp_dir() == "/tmp"


def test_the_daemons_do_not_import_shutil_or_tempfile() -> None:
    code = (
        "import sys\n"
        "import vmmigrate.srcd.main, vmmigrate.srcd.server, vmmigrate.dstd.main, "
        "vmmigrate.dstd.server, vmmigrate.common.daemon\n"
        "print(sorted(m for m in ('shutil', 'tempfile', 'bz2', 'lzma') if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True,
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
    )  # fmt: skip
    assert out.stdout.strip() == "[]"
