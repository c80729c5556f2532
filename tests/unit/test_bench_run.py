"""bench/run's own logic (bench/figures*.py), without running a benchmark: the targets, the
table, the document's marked section, the plots, what a failed step leaves, and the last
JSON line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench import figures
from bench import figures_report as report
from bench.figures_lab import RESULT_MARK, RUNPY_WRAPPER

ROOT = Path(__file__).resolve().parents[2]


def metrics(**kw: float | None) -> dict[str, float | None]:
    m: dict[str, float | None] = {k: None for s in figures.STEPS for k in s.keys}
    m.update(kw)
    return m


# ---------------------------------------------------------------------------------------
# targets and the table


def row(key: str) -> report.Row:
    return next(r for r in report.ROWS if r.key == key)


def test_ratio_targets_compare_with_libvirt() -> None:
    r = row("offline_p2p")  # <= 0.7x libvirt
    assert report.judge(r, metrics(offline_p2p_p50_ms=3.5, libvirt_offline_p2p_p50_ms=5.0)) is True
    assert report.judge(r, metrics(offline_p2p_p50_ms=3.6, libvirt_offline_p2p_p50_ms=5.0)) is False
    e = row("evac")  # >= 3x libvirt
    assert report.judge(e, metrics(evac_best_per_s=900, libvirt_evac_best_per_s=300)) is True
    assert report.judge(e, metrics(evac_best_per_s=899, libvirt_evac_best_per_s=300)) is False


def test_absolute_targets_need_only_our_figure() -> None:
    assert report.judge(row("live_overhead"), metrics(live_overhead_ms=50.0)) is True
    assert report.judge(row("live_overhead"), metrics(live_overhead_ms=50.1)) is False
    assert report.judge(row("tunnel_cap"), metrics(cap400_tunnel_ratio=0.8)) is True
    assert report.judge(row("tunnel_cap"), metrics(cap400_tunnel_ratio=0.79)) is False


def test_a_missing_figure_leaves_the_target_undecided() -> None:
    assert report.judge(row("offline_p2p"), metrics(offline_p2p_p50_ms=3.0)) is None
    assert report.judge(row("offline_p2p"), metrics(libvirt_offline_p2p_p50_ms=3.0)) is None
    assert report.judge(row("live_overhead"), metrics()) is None
    assert report.judge(row("oneshot"), metrics(migctl_oneshot_ms=1, virsh_list_oneshot_ms=2)) is None
    met = report.targets_met(metrics())
    assert set(met) == {r.key for r in report.ROWS if r.kind != "info"}
    assert set(met.values()) == {None}


def test_table_has_every_row_with_nulls_and_verdicts() -> None:
    m = metrics(offline_p2p_p50_ms=3.0, libvirt_offline_p2p_p50_ms=5.0, idle_rss_mb=66.0,
                scale_domains=10000)  # fmt: skip
    text = report.text_table(m)
    lines = text.splitlines()
    assert lines[0].split() == ["metric", "vmmigrate", "libvirt", "ratio", "target", "met?"]
    assert len(lines) == 2 + len(report.ROWS)
    p2p = next(line for line in lines if line.startswith("offline p2p"))
    assert p2p.split()[-7:] == ["3.00", "5.00", "0.60x", "<=", "0.7x", "libvirt", "yes"]
    rss = next(line for line in lines if line.startswith("idle daemon RSS"))
    assert rss.split()[-1] == "NO" and "66.0" in rss
    assert "daemon start with 10,000 domains" in text
    md = report.markdown_table(m)
    assert md.count("\n") == 1 + len(report.ROWS)
    assert "| null |" in md


# ---------------------------------------------------------------------------------------
# docs/PERFORMANCE.md


DOC = "# Performance\n\nIntro.\n\n## The machine\n\nText.\n\n## Benchmarks\n\nMore.\n"


def test_section_goes_in_before_the_first_heading_then_is_replaced_in_place() -> None:
    once = report.replace_section(DOC, "## Figures (bench/run)\n\nfirst")
    assert once.index(report.BEGIN) < once.index("## The machine")
    assert once.startswith("# Performance\n\nIntro.\n\n" + report.BEGIN)
    twice = report.replace_section(once, "## Figures (bench/run)\n\nsecond")
    assert "second" in twice and "first" not in twice
    assert twice.count(report.BEGIN) == 1 and twice.count(report.END) == 1
    assert twice.replace("second", "first") == once  # nothing outside the markers moved
    assert report.replace_section(twice, "## Figures (bench/run)\n\nsecond") == twice


def test_a_lone_marker_is_refused() -> None:
    with pytest.raises(ValueError, match="only one of the markers"):
        report.replace_section(DOC + report.BEGIN + "\n", "x")


def test_the_repository_document_has_exactly_one_marked_section() -> None:
    text = (ROOT / "docs" / "PERFORMANCE.md").read_text()
    assert text.count(report.BEGIN) == 1 and text.count(report.END) == 1
    inner = text[text.index(report.BEGIN) : text.index(report.END)]
    assert "## Figures (bench/run)" in inner
    assert inner.count("\n## ") == 1  # no other section inside the markers


def info() -> dict[str, Any]:
    return {
        "date": "2026-12-02 18:00 UTC",
        "machine": {"nproc": 2, "cpu_model": "CPU", "kernel": "6.1", "qemu": "QEMU 7.2",
                    "load_start": 1.0, "load_end": 2.0},
        "libvirt_version": "libvirtd (libvirt) 9.0.0",
        "command": "bench/run --quick",
        "mode": "quick",
        "runtime_s": 280.0,
        "libvirt": "not measured: --no-libvirt",
        "sizes": "small",
        "plots_why": "matplotlib is not installed",
    }


def test_rewrite_doc_writes_the_section_and_keeps_the_rest(tmp_path: Path) -> None:
    doc = tmp_path / "PERFORMANCE.md"
    doc.write_text(DOC)
    text = report.section(info(), metrics(), ["bench-live.png"], ["a note"])
    report.rewrite_doc(doc, text)
    out = doc.read_text()
    assert "![bench-live.png](bench-live.png)" in out and "- a note" in out
    assert "`bench/run --quick` (quick)" in out and "not measured: --no-libvirt" in out
    assert out.endswith("## Benchmarks\n\nMore.\n")
    assert doc.stat().st_mode & 0o777 == 0o644
    assert "(no plots: matplotlib is not installed)" in report.section(info(), metrics(), [], [])


# ---------------------------------------------------------------------------------------
# plots


def plot_data() -> dict[str, Any]:
    return {
        "offline": {"p2p": [3.0, 4.0, 5.0], "managed": [4.0, 5.0]},
        "lv_offline": {"p2p": [5.0, 6.0], "direct": [3.0]},
        "evac": {"1": 100.0, "4": 200.0, "16": 250.0},
        "lv_evac": {"1": 180.0, "4": 330.0, "16": 380.0},
        "live": {"direct": [{"wall_ms": 700, "pause_ms": 90}], "tunnelled": []},
        "lv_live": {"native": [{"wall_ms": 3300, "pause_ms": 45}, {"wall_ms": 3400, "pause_ms": None}]},
    }


def test_plots_are_png_files(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib", reason="matplotlib (the bench extra) not installed")
    drawn, why = report.draw(plot_data(), tmp_path)
    assert drawn == list(report.PLOTS.values()) and why == ""
    for name in drawn:
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob(".*"))  # no temporary file left
    assert report.draw({}, tmp_path / "none") == ([], "no figures to plot")


# ---------------------------------------------------------------------------------------
# steps, failures and the last line


def test_a_failing_step_leaves_its_figures_null_with_the_reason(tmp_path: Path) -> None:
    run = figures.Run(figures.QUICK, tmp_path, None)

    def half(r: figures.Run) -> None:
        r.set("offline_p2p_p50_ms", 4.0)
        raise RuntimeError("daemon died")

    step = figures.Step("offline", "vmmigrate",
                        ("offline_p2p_p50_ms", "offline_managed_p50_ms"), half)  # fmt: skip
    run.step(step, 1, 2)
    assert run.metrics["offline_p2p_p50_ms"] == 4.0  # measured before the failure: kept
    assert run.metrics["offline_managed_p50_ms"] is None
    assert run.why_null["offline_managed_p50_ms"] == "offline failed: RuntimeError: daemon died"
    assert "daemon died" in (tmp_path / "offline.log").read_text()  # the traceback
    run.step(figures.Step("lv_evac", "libvirt", ("libvirt_evac_best_per_s",), half), 2, 2,
             skip="libvirt not measured: not root")  # fmt: skip
    assert run.why_null["libvirt_evac_best_per_s"] == "libvirt not measured: not root"


def test_rates_keep_the_runs_that_moved_everything_in_one_direction() -> None:
    rows = [
        {"clients": 1, "direction": "A->B", "migr_per_s": 100.0, "ok": True},
        {"clients": 1, "direction": "B->A", "migr_per_s": 300.0, "ok": True},
        {"clients": 4, "direction": "A->B", "migr_per_s": 500.0, "ok": False},
        {"clients": 16, "direction": "A->B", "migr_per_s": 200.0, "ok": True},
    ]
    assert figures.a_to_b_rates(rows, "clients", lambda r: r["ok"]) == {"1": 100.0, "16": 200.0}


def live_json(direct_wall: list[float], errors: list[str] | None = None) -> dict[str, Any]:
    def col(xs: list[float]) -> dict[str, float]:
        return {"n": len(xs), "median": sorted(xs)[len(xs) // 2]} if xs else {"n": 0}

    direct = {"wall_ms": col(direct_wall), "guest_pause_ms": col([95.0]), "downtime_ms": col([80.0]),
              "pause_minus_downtime_ms": col([15.0]), "overhead_ms": col([600.0])}  # fmt: skip
    if errors:
        direct = {k: {"n": 0} for k in direct} | {"errors": errors}
    return {
        "config": {"mem_mib": 512, "fill_mib": 400},
        "raw": {"raw": [{"dst_qemu_startup_ms": 1900.0}],  # one slow start on a busy machine
                "raw_chain": [{"dst_qemu_startup_ms": 300.0}, {"dst_qemu_startup_ms": 350.0}]},
        "vmmigrate": {"direct_migctl": [{"wall_ms": w, "guest_pause_ms": 95.0} for w in direct_wall]},
        "summary": {
            "direct_migctl": direct,
            "tunnelled_migctl": {"pause_minus_downtime_ms": col([30.0])},
            "targets": {"throughput": {"direct_MBps": 1500.0, "tunnelled_MBps": 0.0}},
        },
    }


def fake_live(monkeypatch: pytest.MonkeyPatch, result: dict[str, Any]) -> None:
    def main(argv: list[str]) -> int:
        Path(argv[argv.index("--json") + 1]).write_text(json.dumps(result))
        print("bench_live's own output")
        return 0

    monkeypatch.setattr(figures.bench_live, "main", main)
    monkeypatch.setattr(figures, "migctl_startup_ms", lambda reps: 150.0)


def test_live_figures_and_the_overhead(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_live(monkeypatch, live_json([800.0, 700.0, 900.0]))
    run = figures.Run(figures.QUICK, tmp_path, None)
    figures.live(run)
    m = run.metrics
    assert (m["live_wall_ms"], m["live_downtime_ms"], m["live_qemu_downtime_ms"]) == (800.0, 95.0, 80.0)
    assert m["live_overhead_ms"] == 600.0 - 350.0 - 150.0
    assert (m["live_pause_extra_direct_ms"], m["live_pause_extra_tunnelled_ms"]) == (15.0, 30.0)
    assert m["direct_mb_s"] == 1500.0
    assert m["tunnelled_mb_s"] is None and "tunnelled" in run.why_null["tunnelled_mb_s"]
    assert "bench_live's own output" in (tmp_path / "live.log").read_text()
    assert run.data["live"]["direct"][0] == {"wall_ms": 800.0, "pause_ms": 95.0}


def test_the_overhead_uses_each_migrations_own_destination_start_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With dstd's emulator_started start-up in the rows, the overhead subtracts it per
    migration (not the raw baselines' bare QEMUs); only migctl's start-up comes from apart."""
    result = live_json([800.0, 700.0, 900.0])
    direct = result["summary"]["direct_migctl"]
    direct["dst_emulator_startup_ms"] = {"n": 3, "median": 280.0}
    direct["overhead_minus_dst_startup_ms"] = {"n": 3, "median": 190.0}
    fake_live(monkeypatch, result)
    run = figures.Run(figures.QUICK, tmp_path, None)
    figures.live(run)
    m = run.metrics
    assert m["live_overhead_ms"] == 190.0 - 150.0
    assert m["live_dst_qemu_startup_ms"] == 280.0
    assert any("each migration's own" in n for n in figures.notes(run))


def test_live_without_a_successful_migration_says_why(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_live(monkeypatch, live_json([], errors=["UNAVAILABLE: dstd gone"]))
    run = figures.Run(figures.QUICK, tmp_path, None)
    figures.live(run)
    assert run.metrics["live_wall_ms"] is None and run.metrics["live_overhead_ms"] is None
    assert run.why_null["live_wall_ms"] == "UNAVAILABLE: dstd gone"


def test_libvirt_live_rows_must_end_running_with_their_ram() -> None:
    rows = [
        {"ram_words_ok": 8, "dst_state": [1, 1]},
        {"ram_words_ok": 7, "dst_state": [1, 1]},
        {"ram_words_ok": 8, "dst_state": [5, 1]},
        {"ram_words_ok": 8, "dst_state": None},
    ]
    assert figures.lv_rows_ok(rows) == rows[:1]


def test_main_prints_the_json_last_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    def fine(r: figures.Run) -> None:
        r.set("offline_p2p_p50_ms", 4.2)
        r.set("offline_managed_p50_ms", 5.0)
        r.set("evac_best_per_s", 120.0)

    steps = tuple(figures.Step(s.name, s.tool, s.keys, fine if s.name == "offline" else s.run)
                  for s in figures.STEPS)  # fmt: skip
    monkeypatch.setattr(figures, "STEPS", steps)
    monkeypatch.setattr(figures.signal, "signal", lambda *a: None)  # pytest's handlers stay
    monkeypatch.chdir(tmp_path)  # main() moves to the repository's root: undone afterwards
    assert figures.main(["--only", "offline,lv_evac", "--no-libvirt", "--workdir", str(tmp_path)]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    last = json.loads(out[-1])
    required = ["offline_p2p_p50_ms", "offline_managed_p50_ms", "evac_best_per_s", "live_wall_ms",
                "live_downtime_ms", "live_overhead_ms", "tunnelled_mb_s", "direct_mb_s",
                "idle_rss_mb", "migctl_oneshot_ms"]  # fmt: skip
    libvirt = [f"libvirt_{k}" for k in [*required[:5], "tunnelled_mb_s"]]
    assert set(required + libvirt) <= set(last)
    assert last["offline_p2p_p50_ms"] == 4.2 and last["quick"] is False
    assert last["libvirt"] == "not measured: --no-libvirt"
    assert last["why_null"]["libvirt_evac_best_per_s"] == "libvirt not measured: --no-libvirt"
    assert last["why_null"]["live_wall_ms"] == "step not run (--only)"
    assert last["targets_met"]["offline_p2p"] is None
    assert any(line.startswith("offline p2p migration p50") for line in out)


def test_only_refuses_an_unknown_step(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        figures.parse_args(["--only", "offline,warp"])
    assert "unknown step(s) warp" in capsys.readouterr().err


def test_the_runpy_wrapper_prints_the_scripts_result(tmp_path: Path) -> None:
    script = tmp_path / "lv_fake.py"
    script.write_text("import sys\nres = {'p2p': [float(sys.argv[1])], 'direct': []}\nprint('chatter')\n")
    r = subprocess.run([sys.executable, "-c", RUNPY_WRAPPER, str(script), "4.5"],
                       capture_output=True, text=True, check=True, timeout=60)  # fmt: skip
    lines = r.stdout.splitlines()
    assert lines[0] == "chatter" and lines[1].startswith(RESULT_MARK)
    assert json.loads(lines[1][len(RESULT_MARK) :]) == {"p2p": [4.5], "direct": []}


def test_bench_run_is_an_executable_launcher() -> None:
    launcher = ROOT / "bench" / "run"
    assert launcher.stat().st_mode & 0o111
    r = subprocess.run([str(launcher), "--help"], capture_output=True, text=True, check=True,
                       timeout=120)  # fmt: skip
    assert "--quick" in r.stdout and "--no-libvirt" in r.stdout
    assert "steps: " + ", ".join(figures.STEP_NAMES) in r.stdout.replace("\n", " ")


@pytest.mark.parametrize("shape", ["p2p", "client"])
def test_the_stacks_floor_is_measured_with_real_processes(tmp_path: Path, shape: str) -> None:
    """bench_grpc_floor runs its three parties as processes on loopback, times every call
    sequence, and leaves none of its processes behind."""
    from bench import bench_grpc_floor

    out = tmp_path / "floor.json"
    before = set(_children())
    argv = ["--n", "30", "--warmup", "3", "--shape", shape, "--fsync", "--json", str(out)]
    assert bench_grpc_floor.main(argv) == 0
    got = json.loads(out.read_text())
    assert got["shape"] == shape and got["fsync"] is True and got["n"] == 30
    assert 0 < got["min_ms"] <= got["p50_ms"] <= got["p90_ms"] <= got["p99_ms"]
    assert set(_children()) <= before


def _children() -> list[int]:
    """This process's children (from /proc)."""
    me = str(os.getpid())
    kids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if stat.rsplit(")", 1)[1].split()[1] == me:
                kids.append(int(entry.name))
    return kids
