"""A mount namespace per test host, for storage tests on one machine.

Two hosts of one machine see the same files; real hosts without shared storage do not. Here a
host gets a mount namespace of its own in which a host-private directory is bind-mounted on a
directory common to every host (the image directory a domain's XML names): the same path then
holds a different file on each host, as it does on two machines.

The namespace is held by a process (``unshare -m --propagation private``, so that nothing
mounted in it reaches the machine's namespace or another host's) that bind-mounts the
directory and then sleeps. A Host whose prefix is :attr:`MountNamespace.prefix` (``nsenter
--mount=/proc/PID/ns/mnt``) runs its daemons there; the emulators they start inherit it.
Stopping the holder (by its pid) ends the namespace with the last process in it, and its
mount with it: nothing is unmounted by hand and nothing is left mounted on the machine.

Needs root (CAP_SYS_ADMIN) and util-linux's unshare and nsenter: :func:`skip_reason` says
why not, for a skip.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

UNSHARE = shutil.which("unshare")
NSENTER = shutil.which("nsenter")
SETPRIV = shutil.which("setpriv")
READY_TIMEOUT = 10.0


def skip_reason() -> str | None:
    """Why mount namespaces cannot be made here, or None."""
    if os.geteuid() != 0:
        return "mount namespaces need root (CAP_SYS_ADMIN)"
    if UNSHARE is None or NSENTER is None or SETPRIV is None:
        return "mount namespaces need util-linux's unshare, nsenter and setpriv"
    return None


class MountNamespace:
    """A namespace in which ``private`` is mounted on ``common`` (both made if missing)."""

    def __init__(self, private: Path, common: Path) -> None:
        assert UNSHARE is not None and SETPRIV is not None, skip_reason()
        self.private = private
        self.common = common
        private.mkdir(parents=True, exist_ok=True)
        common.mkdir(parents=True, exist_ok=True)
        # unshare, setpriv and the shell exec what follows and the shell execs sleep, so the
        # pid Popen knows stays the holder; it dies with this process (a test run killed hard
        # leaves no namespace behind)
        script = 'mount --bind -- "$1" "$2" && echo ready && exec sleep infinity'
        self.proc = subprocess.Popen(
            [UNSHARE, "-m", "--propagation", "private", SETPRIV, "--pdeathsig", "KILL", "--",
             "sh", "-c", script, "sh", str(private), str(common)],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self) -> None:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()  # "ready", or nothing when the shell failed
        if line.strip() != b"ready":
            self.proc.wait(READY_TIMEOUT)
            err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
            raise RuntimeError(f"mount namespace for {self.common}: {err.strip()}")

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def prefix(self) -> list[str]:
        """What runs a command in the namespace (a Host's prefix)."""
        assert NSENTER is not None
        return [NSENTER, f"--mount=/proc/{self.pid}/ns/mnt", "--"]

    def run(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        r = subprocess.run(
            [*self.prefix, *cmd], capture_output=True, text=True, timeout=30,
            stdin=subprocess.DEVNULL, check=False,
        )  # fmt: skip
        if check and r.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} in {self.pid}'s namespace: {r.stderr}")
        return r

    def stop(self) -> None:
        """Kill the holder (by pid). The namespace ends once whatever else runs in it (the
        host's daemons and emulators, stopped first by Host.stop) is gone too."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(READY_TIMEOUT)
        for pipe in (self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()

    def __enter__(self) -> MountNamespace:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
