"""iproute2's ``ip`` for tests that make network namespaces of their own (and delete them)."""

from __future__ import annotations

import shutil
import subprocess

IP = shutil.which("ip")


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """``ip ARGS`` (30 s at most); with ``check``, a failure fails the test with its stderr."""
    assert IP is not None
    r = subprocess.run([IP, *args], capture_output=True, text=True, timeout=30,
                       stdin=subprocess.DEVNULL, check=False)  # fmt: skip
    if check and r.returncode != 0:
        raise AssertionError(f"ip {' '.join(args)}: {r.stderr.strip()}")
    return r
