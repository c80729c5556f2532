"""bench/run's libvirt side: the libvirt lab's own scripts, driven as its libvirt_lab.sh
drives them.

The lab (../shared/anchors/libvirt-lab, see its README.md) runs two libvirtd 9.0 in network
namespaces hostA (10.77.0.1) and hostB (10.77.0.2). Its lv_*.py scripts run inside hostA
with Debian's /usr/bin/python3 (python3-libvirt is installed for it), as ``libvirt_lab.sh
bench|evac|live`` runs them. Bringing the lab up and down is bench_guest's (``open_lab``,
``Lab``); this module only measures.

lv_bench_api.py prints medians only; the CDF needs every sample, so it runs under a small
runpy wrapper that prints the script's own ``res`` (mode -> milliseconds) as one JSON line
afterwards. lv_evac_bench.py and lv_live_bench.py write their rows with --json.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

from bench.bench_guest import HOSTS, Lab
from bench.bench_live import make_fill

LAB_PYTHON = "/usr/bin/python3"  # Debian's, with python3-libvirt (the lab's README)
LAB_NETNS = "hostA"
TCP_URI = {"A": "qemu+tcp://10.77.0.1/system", "B": "qemu+tcp://10.77.0.2/system"}
RESULT_MARK = "BENCH_RUN_RESULT "
# run a lab script as __main__, then print its module-level ``res`` as one JSON line
RUNPY_WRAPPER = (
    "import json, runpy, sys\n"
    "sys.argv = sys.argv[1:]\n"
    "g = runpy.run_path(sys.argv[0], run_name='__main__')\n"
    f"print({RESULT_MARK!r} + json.dumps(g['res']), flush=True)\n"
)
LIVE_NAME = "figs-live"  # bench/run's own names: nothing of another user's is touched
EVAC_PREFIX = "figs-evac"
FILL_MIB = 400
SCRIPT_TIMEOUT = 1800.0


class LabRunner:
    """The lab's scripts and virsh, each run with its output kept in ``work``."""

    def __init__(self, lab: Lab, work: Path) -> None:
        self.lab = lab
        self.work = work
        self.env = {**os.environ, "LAB": str(lab.state)}

    def _run(self, argv: list[str], log_name: str, timeout: float = SCRIPT_TIMEOUT) -> str:
        """Run ``argv`` inside hostA from the lab's directory; its stdout, or RuntimeError
        with the last lines of its output."""
        log = self.work / log_name
        r = subprocess.run(
            ["ip", "netns", "exec", LAB_NETNS, *argv],
            cwd=self.lab.script_dir,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
            check=False,
        )
        log.write_text(f"$ {' '.join(argv)}\n{r.stdout}\n--- stderr\n{r.stderr}")
        if r.returncode != 0:
            tail = (r.stdout + r.stderr).strip().splitlines()[-3:]
            raise RuntimeError(f"{log_name.removesuffix('.log')} failed ({r.returncode}): {tail}")
        return r.stdout

    def script(self, name: str) -> str:
        return str(self.lab.script_dir / name)

    def latency(self, n: int, log_name: str = "lv_latency.log") -> dict[str, list[float]]:
        """lv_bench_api.py: ``n`` domains, each migrated A -> B -> A per mode; the
        milliseconds of every migration by mode (``p2p``; ``direct`` = client-driven)."""
        out = self._run(
            [LAB_PYTHON, "-c", RUNPY_WRAPPER, self.script("lv_bench_api.py"),
             TCP_URI["A"], TCP_URI["B"], str(n)],
            log_name,
        )  # fmt: skip
        for line in out.splitlines():
            if line.startswith(RESULT_MARK):
                res: dict[str, list[float]] = json.loads(line[len(RESULT_MARK) :])
                return res
        raise RuntimeError("lv_bench_api.py printed no result")

    def evac(self, n: int, threads: str) -> list[dict[str, Any]]:
        """lv_evac_bench.py: ``n`` inactive domains A -> B at each thread count, once."""
        path = self.work / "lv_evac.jsonl"
        path.unlink(missing_ok=True)
        self._run(
            [LAB_PYTHON, self.script("lv_evac_bench.py"), TCP_URI["A"], TCP_URI["B"],
             "--n", str(n), "--threads", threads, "--repeats", "1", "--prefix", EVAC_PREFIX,
             "--json", str(path)],
            "lv_evac.log",
        )  # fmt: skip
        return read_jsonl(path)

    def fill(self) -> Path:
        """The lab's 400 MiB of random data (libvirt_lab.sh live makes the same file)."""
        path = self.lab.state / "fill400.bin"
        if not path.exists() or path.stat().st_size != FILL_MIB << 20:
            make_fill(path, FILL_MIB)
        return path

    def live(self, runs: int, tunnelled: bool) -> list[dict[str, Any]]:
        """lv_live_bench.py: ``runs`` live p2p migrations of the 512 MiB guest (400 MiB
        random RAM) by ``virsh migrate``, native or tunnelled; one row each."""
        mode = "tunnelled" if tunnelled else "native"
        path = self.work / f"lv_live_{mode}.jsonl"
        path.unlink(missing_ok=True)
        argv = [
            LAB_PYTHON, self.script("lv_live_bench.py"), TCP_URI["A"], TCP_URI["B"],
            "--runs", str(runs), "--name", LIVE_NAME, "--fill", str(self.fill()),
            "--json", str(path),
        ]  # fmt: skip
        if tunnelled:
            argv.append("--tunnelled")
        try:
            self._run(argv, f"lv_live_{mode}.log")
        finally:
            self.discard(LIVE_NAME)  # the script leaves its guest behind when it fails
        return read_jsonl(path)

    def discard(self, name: str) -> None:
        """Destroy and undefine ``name`` wherever it is (nothing when it is gone)."""
        for h in HOSTS:
            for verb in ("destroy", "undefine"):
                with contextlib.suppress(subprocess.TimeoutExpired, OSError):
                    subprocess.run(
                        ["virsh", "-q", "-c", self.lab.uri(h), verb, name],
                        capture_output=True, timeout=60, check=False, stdin=subprocess.DEVNULL,
                    )  # fmt: skip

    def virsh_list(self, reps: int) -> list[float]:
        """``virsh list --all`` on host A over its unix socket, as one process each time;
        milliseconds from its start to its exit."""
        walls = []
        for _ in range(reps):
            t0 = time.perf_counter()
            subprocess.run(
                ["virsh", "-c", self.lab.uri("A"), "list", "--all"],
                capture_output=True, timeout=60, check=True, stdin=subprocess.DEVNULL,
            )  # fmt: skip
            walls.append((time.perf_counter() - t0) * 1e3)
        return walls

    def libvirtd_rss_mb(self) -> float | None:
        """Resident memory of host A's libvirtd, MB (10^6 bytes)."""
        pid = self.lab.pid("A")
        return None if pid is None else rss_mb(pid)


def rss_mb(pid: int) -> float | None:
    """VmRSS of a process in MB (10^6 bytes); None when it is gone."""
    with contextlib.suppress(OSError, ValueError), open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) * 1024 / 1e6, 1)
    return None


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def median_or_none(xs: list[float]) -> float | None:
    return round(statistics.median(xs), 3) if xs else None
