"""Executables and the temp dir, found without importing ``shutil`` and ``tempfile``.

Those two modules (and the ``bz2``/``lzma`` that ``shutil`` pulls in) cost every daemon
about half a megabyte of memory for two lookups (docs/PERFORMANCE.md, "Idle RSS").
"""

from __future__ import annotations

import os
import stat


def _executable(path: str) -> bool:
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False
    return stat.S_ISREG(mode) and os.access(path, os.X_OK)


def which(name: str) -> str | None:
    """The executable file ``name`` names: a path (one with a ``/``) is checked as it is,
    a bare name looked up in ``$PATH`` (``os.defpath`` when unset), as ``shutil.which``."""
    if os.sep in name:
        return name if _executable(name) else None
    for d in os.environ.get("PATH", os.defpath).split(os.pathsep):
        candidate = os.path.join(d or os.curdir, name)
        if _executable(candidate):
            return candidate
    return None


def temp_dir() -> str:
    """The system temp dir: ``$TMPDIR`` when it names a directory, else ``/tmp``."""
    env = os.environ.get("TMPDIR", "")
    return env if env and os.path.isdir(env) else "/tmp"
