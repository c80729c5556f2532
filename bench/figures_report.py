"""bench/run's report: the table of targets, the plots, and the section of
docs/PERFORMANCE.md between its bench/run markers.

Everything here is a pure function of the metrics (a flat dict, None where a figure could
not be measured) and of the raw samples kept for the plots, so that it can be tested
without running a benchmark.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vmmigrate.common.durable import atomic_write

BEGIN = "<!-- bench/run:begin -->"
END = "<!-- bench/run:end -->"
PLOTS = {
    "offline": "bench-offline-cdf.png",
    "evac": "bench-evacuation.png",
    "live": "bench-live.png",
}


@dataclass(frozen=True)
class Row:
    """One line of the table: vmmigrate's figure, libvirt's (if any) and the target.

    ``kind`` says what the target bounds: ``ratio_le`` / ``ratio_ge`` the ratio
    vmmigrate / libvirt, ``le`` / ``ge`` vmmigrate's own figure, ``info`` nothing."""

    key: str
    label: str
    ours: str
    theirs: str | None
    kind: str
    bound: float = 0.0


ROWS = (
    Row("offline_p2p", "offline p2p migration p50, ms", "offline_p2p_p50_ms",
        "libvirt_offline_p2p_p50_ms", "ratio_le", 0.7),
    Row("offline_managed", "offline client-driven migration p50, ms", "offline_managed_p50_ms",
        "libvirt_offline_managed_p50_ms", "ratio_le", 0.7),
    Row("floor_p2p", "the stack's floor for p2p: 3 bare grpc.aio calls + 3 fsyncs, p50 ms",
        "floor_p2p_p50_ms", "libvirt_offline_p2p_p50_ms", "info"),
    Row("floor_managed", "the same, client-driven: 4 bare calls + the same fsyncs, p50 ms",
        "floor_managed_p50_ms", "libvirt_offline_managed_p50_ms", "info"),
    Row("evac", "evacuation (MigrateMany, warm client), best of --parallel 1/4/16, migrations/s",
        "evac_best_per_s", "libvirt_evac_best_per_s", "ratio_ge", 3.0),
    Row("evac_unary", "evacuation, one Migrate per domain, best of 1/4/16 clients, migrations/s",
        "evac_unary_best_per_s", "libvirt_evac_best_per_s", "info"),
    Row("evac_migctl", "evacuation by `migctl evacuate`, best of 1/4/16, migrations/s",
        "evac_migctl_best_per_s", "libvirt_evac_best_per_s", "info"),
    Row("live_wall", "live wall time, migctl / virsh migrate --live --p2p, ms", "live_wall_ms",
        "libvirt_live_wall_ms", "ratio_le", 0.5),
    Row("live_downtime", "live guest pause (libvirt: its downtime), ms", "live_downtime_ms",
        "libvirt_live_downtime_ms", "ratio_le", 1.0),
    Row("live_overhead", "live overhead (wall - QEMU time - dest QEMU start - migctl start), ms",
        "live_overhead_ms", None, "le", 50.0),
    Row("pause_direct", "pause beyond QEMU's downtime, direct, ms",
        "live_pause_extra_direct_ms", None, "le", 10.0),
    Row("pause_tunnelled", "pause beyond QEMU's downtime, tunnelled, ms",
        "live_pause_extra_tunnelled_ms", None, "le", 20.0),
    Row("tunnelled", "tunnelled live throughput, MB/s", "tunnelled_mb_s",
        "libvirt_tunnelled_mb_s", "ratio_ge", 1.5),
    Row("direct", "direct (native) live throughput, MB/s", "direct_mb_s",
        "libvirt_direct_mb_s", "info"),
    Row("tunnel_cap", "tunnelled / direct throughput at a 400 MiB/s cap", "cap400_tunnel_ratio",
        None, "ge", 0.8),
    Row("scale_latency", "offline p2p p50 with {n:,} domains / with 10",
        "scale_latency_ratio", None, "le", 1.2),
    Row("scale_start", "daemon start with {n:,} domains, ms", "daemon_start_large_ms",
        None, "le", 1000.0),
    Row("idle_rss", "idle daemon RSS, MB (libvirt: libvirtd)", "idle_rss_mb",
        "libvirtd_rss_mb", "le", 50.0),
    Row("oneshot", "one-shot `migctl list` / `virsh list --all`, ms", "migctl_oneshot_ms",
        "virsh_list_oneshot_ms", "info"),
    Row("tunnel_stream", "tunnel stream alone (bench_tunnel), MB/s", "tunnel_stream_mb_s",
        None, "info"),
)  # fmt: skip


def ratio(ours: float | None, theirs: float | None) -> float | None:
    if ours is None or theirs is None or theirs == 0:
        return None
    return round(ours / theirs, 3)


def judge(row: Row, metrics: dict[str, float | None]) -> bool | None:
    """Whether the row's target is met; None when it cannot be told (a figure missing) or
    the row has no target."""
    ours = metrics.get(row.ours)
    if row.kind == "info" or ours is None:
        return None
    if row.kind in ("le", "ge"):
        return ours <= row.bound if row.kind == "le" else ours >= row.bound
    r = ratio(ours, metrics.get(row.theirs) if row.theirs else None)
    if r is None:
        return None
    return r <= row.bound if row.kind == "ratio_le" else r >= row.bound


def target_text(row: Row) -> str:
    return {
        "ratio_le": f"<= {row.bound:g}x libvirt",
        "ratio_ge": f">= {row.bound:g}x libvirt",
        "le": f"<= {row.bound:g}",
        "ge": f">= {row.bound:g}",
    }.get(row.kind, "")


def fmt(x: float | None) -> str:
    if x is None:
        return "null"
    if abs(x) >= 100:
        return f"{x:.0f}"
    return f"{x:.2f}" if abs(x) < 10 else f"{x:.1f}"


def cells(metrics: dict[str, float | None]) -> list[list[str]]:
    """The table's cells: metric, vmmigrate, libvirt, ratio, target, met?"""
    out = []
    for row in ROWS:
        theirs = metrics.get(row.theirs) if row.theirs else None
        r = ratio(metrics.get(row.ours), theirs)
        met = judge(row, metrics)
        out.append([
            row.label.format(n=int(metrics.get("scale_domains") or 0)),
            fmt(metrics.get(row.ours)),
            fmt(theirs) if row.theirs else "-",
            f"{r:.2f}x" if r is not None else "-",
            target_text(row) or "-",
            "-" if row.kind == "info" else {True: "yes", False: "NO", None: "n/a"}[met],
        ])  # fmt: skip
    return out


HEADER = ["metric", "vmmigrate", "libvirt", "ratio", "target", "met?"]


def text_table(metrics: dict[str, float | None]) -> str:
    rows = [HEADER, *cells(metrics)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(HEADER))]
    lines = []
    for k, r in enumerate(rows):
        first = r[0].ljust(widths[0])
        rest = "  ".join(c.rjust(w) for c, w in zip(r[1:], widths[1:], strict=True))
        lines.append(f"{first}  {rest}")
        if k == 0:
            lines.append("-" * len(lines[0]))
    return "\n".join(lines)


def markdown_table(metrics: dict[str, float | None]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(r) + " |" for r in cells(metrics)]
    return "\n".join(lines)


def targets_met(metrics: dict[str, float | None]) -> dict[str, bool | None]:
    return {row.key: judge(row, metrics) for row in ROWS if row.kind != "info"}


# ---------------------------------------------------------------------------------------
# docs/PERFORMANCE.md


def replace_section(text: str, section: str) -> str:
    """``text`` with what lies between the markers replaced by ``section`` (markers kept).
    Without markers, the section (with its markers) goes in before the first second-level
    heading, i.e. right after the document's introduction."""
    block = f"{BEGIN}\n{section.strip()}\n{END}"
    start, end = text.find(BEGIN), text.find(END)
    if start != -1 and end != -1 and start < end:
        return text[:start] + block + text[end + len(END) :]
    if start != -1 or end != -1:
        raise ValueError(f"only one of the markers {BEGIN} / {END} is in the document")
    at = text.find("\n## ")
    if at == -1:
        return text.rstrip("\n") + "\n\n" + block + "\n"
    return text[: at + 1] + block + "\n\n" + text[at + 1 :]


def write_file(path: Path, data: bytes) -> None:
    """Replace ``path`` atomically (common/durable.py), keeping a readable 0644 mode."""
    atomic_write(path, data)
    os.chmod(path, 0o644)


def rewrite_doc(doc: Path, section: str) -> None:
    write_file(doc, replace_section(doc.read_text(), section).encode())


WIDTH = 92  # the document's prose width


def wrap(text: str) -> list[str]:
    return textwrap.wrap(text, WIDTH, break_on_hyphens=False, break_long_words=False)


def bullets(items: Sequence[str]) -> list[str]:
    return [line for item in items for line in textwrap.wrap(
        item, WIDTH, initial_indent="- ", subsequent_indent="  ", break_on_hyphens=False,
        break_long_words=False)]  # fmt: skip


def section(info: dict[str, Any], metrics: dict[str, float | None], plots: Sequence[str],
            notes: Sequence[str]) -> str:
    """The "Figures (bench/run)" section: when, where, how, the table, the plots."""
    m = info["machine"]
    intro = (
        "Written by `bench/run` on every run: everything between the `bench/run` markers is "
        "replaced, so edit the script, not this section. Ratios are vmmigrate / libvirt, "
        "both measured in the same run, interleaved (one benchmark of each in turn). The "
        "machine is shared: read the load average before trusting an absolute figure."
    )
    facts = [
        f"date: {info['date']}",
        f"machine: {m['nproc']} CPUs ({m['cpu_model']}), Linux {m['kernel']}, {m['qemu']}, "
        f"{info['libvirt_version']}; load average {m['load_start']:.2f} at the start, "
        f"{m['load_end']:.2f} at the end",
        f"command: `{info['command']}` ({info['mode']}), {info['runtime_s']:.0f} s",
        f"libvirt: {info['libvirt']}",
        f"sizes: {info['sizes']}",
    ]
    lines = ["## Figures (bench/run)", "", *wrap(intro), "", *bullets(facts), ""]
    lines += [markdown_table(metrics), ""]
    if notes:
        lines += [*bullets(notes), ""]
    for name in plots:
        lines.append(f"![{name}]({name})")
    if not plots:
        lines.append(f"(no plots: {info.get('plots_why', 'not drawn')})")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# plots (matplotlib, the optional `bench` extra)


def _cdf(ax: Any, samples: Sequence[float], label: str, style: str) -> None:
    xs = sorted(samples)
    ys = [(i + 1) / len(xs) for i in range(len(xs))]
    ax.step(xs, ys, style, where="post", label=f"{label} (p50 {statistics.median(xs):.1f} ms)")


def plot_offline(plt: Any, data: dict[str, Any], path: Path) -> bool:
    series = [
        ("vmmigrate p2p", data.get("offline", {}).get("p2p"), "C0-"),
        ("vmmigrate client-driven", data.get("offline", {}).get("managed"), "C0--"),
        ("libvirt p2p", data.get("lv_offline", {}).get("p2p"), "C3-"),
        ("libvirt client-driven", data.get("lv_offline", {}).get("direct"), "C3--"),
    ]
    series = [s for s in series if s[1]]
    if not series:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for label, xs, style in series:
        _cdf(ax, xs, label, style)
    ax.set_xscale("log")
    plain = plt.FuncFormatter(lambda v, _: f"{v:g}")  # 3, 10, 20 rather than 3x10^0
    ax.xaxis.set_major_formatter(plain)
    ax.xaxis.set_minor_formatter(plain)
    ax.tick_params(axis="x", which="minor", labelsize=7)
    ax.set_xlabel("offline migration latency, ms (log scale)")
    ax.set_ylabel("fraction of migrations")
    ax.set_title("Offline migration latency, one inactive domain")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    _save(plt, fig, path)
    return True


def plot_evac(plt: Any, data: dict[str, Any], path: Path) -> bool:
    series = [
        ("vmmigrate, one MigrateMany (warm client), --parallel", data.get("evac"), "C0-o"),
        ("vmmigrate, one Migrate per domain, in-process clients", data.get("evac_unary"), "C1-^"),
        ("vmmigrate, migctl evacuate --parallel", data.get("evacuate"), "C2-s"),
        ("libvirt, API client threads", data.get("lv_evac"), "C3-o"),
    ]
    if not any(rates for _, rates, _ in series):
        return False
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for label, rates, style in series:
        if not rates:
            continue
        levels = sorted(rates, key=int)
        ax.plot([int(x) for x in levels], [rates[x] for x in levels], style, label=label)
    ax.set_xscale("log", base=2)
    ax.set_xticks([1, 4, 16], labels=["1", "4", "16"])
    ax.set_xlabel("concurrent clients (threads, --parallel)")
    ax.set_ylabel("migrations/s")
    ax.set_ylim(bottom=0)
    ax.set_title(f"Evacuation of {data.get('evac_domains', '?')} inactive domains, A -> B")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    _save(plt, fig, path)
    return True


def plot_live(plt: Any, data: dict[str, Any], path: Path) -> bool:
    """Wall time and guest pause per migration (dots) and their medians (bars)."""
    groups = [
        ("vmmigrate\ndirect", data.get("live", {}).get("direct"), "C0"),
        ("libvirt\nnative", data.get("lv_live", {}).get("native"), "C3"),
        ("vmmigrate\ntunnelled", data.get("live", {}).get("tunnelled"), "C0"),
        ("libvirt\ntunnelled", data.get("lv_live", {}).get("tunnelled"), "C3"),
    ]
    groups = [g for g in groups if g[1]]
    if not groups:
        return False
    fig, (ax_w, ax_p) = plt.subplots(1, 2, figsize=(9, 4.2))
    for k, (_label, rows, color) in enumerate(groups):
        for ax, key in ((ax_w, "wall_ms"), (ax_p, "pause_ms")):
            xs = [r[key] for r in rows if r.get(key) is not None]
            if xs:
                ax.bar(k, statistics.median(xs), color=color, alpha=0.5)
                ax.plot([k] * len(xs), xs, "k.", markersize=4)
    for ax, title in ((ax_w, "wall time (migctl / virsh), ms"),
                      (ax_p, "guest pause (libvirt: its downtime), ms")):  # fmt: skip
        ax.set_xticks(range(len(groups)), labels=[g[0] for g in groups], fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.grid(True, axis="y", alpha=0.3)
    fig.suptitle(f"Live migration, {data.get('live_guest', '512 MiB guest')}", fontsize=11)
    _save(plt, fig, path)
    return True


def _save(plt: Any, fig: Any, path: Path) -> None:
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    try:
        fig.savefig(tmp, dpi=100)
        write_file(path, tmp.read_bytes())
    finally:
        plt.close(fig)
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def draw(data: dict[str, Any], out_dir: Path) -> tuple[list[str], str]:
    """Draw every plot there are figures for into ``out_dir``; (file names, why none)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return [], "matplotlib is not installed (pip install -e '.[bench]')"
    drawn = []
    for key, fn in (("offline", plot_offline), ("evac", plot_evac), ("live", plot_live)):
        if fn(plt, data, out_dir / PLOTS[key]):
            drawn.append(PLOTS[key])
    return drawn, "" if drawn else "no figures to plot"
