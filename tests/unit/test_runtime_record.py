"""When a runtime record's emulator counts as alive (/proc/PID/stat, hypervisor.py)."""

from __future__ import annotations

from vmmigrate.common.hypervisor import stat_start_ticks


def _stat(state: str, threads: int, ticks: int = 4242, comm: str = "qemu-system-x86") -> str:
    # fields 4..19, then num_threads (20), itrealvalue (21), starttime (22), and the rest
    middle = " ".join(["1"] * 16)
    return f"1234 ({comm}) {state} {middle} {threads} 0 {ticks} 0 0\n"


def test_a_live_process_gives_its_start_time() -> None:
    assert stat_start_ticks(_stat("S", 4)) == 4242
    assert stat_start_ticks(_stat("R", 1, comm="a) (b")) == 4242  # ')' in the name


def test_a_zombie_is_dead_only_once_its_threads_are_gone() -> None:
    # a killed QEMU: its main thread is a zombie while other threads still exit and still
    # hold its files (a tap deleted now would be busy)
    assert stat_start_ticks(_stat("Z", 3)) == 4242
    assert stat_start_ticks(_stat("Z", 1)) is None
