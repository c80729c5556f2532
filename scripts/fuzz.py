#!/usr/bin/env python3
"""Run the fuzz targets of tests/fuzz at scale and report, per target: inputs tried,
crashes, time.

Targets:
  cookie-<accept>   parse_cookie with one accept set (prepare, perform, finish, confirm,
                    all, none), then format and parse again
  domain            parse_domain (with and without UUID generation), re-parse, rename
  rpc-<Service.Method>[variant]  every field of one RPC, mutated, sent to real srcd/dstd
                    processes (two loopback hosts, 127.0.0.6 and 127.0.0.7)
  rpc-raw           arbitrary bytes as the serialized request of any unary method
  rpc-tunnel        the TunnelBytes.Carry stream with arbitrary messages and metadata

Engines: hypothesis (every target; generation only, no shrinking, fresh random seeds per
batch) and, for the parser targets, atheris (coverage-guided libFuzzer, seeded with real
cookies and domain XML) when it is installed (`pip install atheris`; it ships wheels, no
clang needed). A crash is an input that made a target raise anything but a refusal of ours,
an inconsistent result, an UNKNOWN/INTERNAL status, a dead daemon, or a state change from a
refused request; each is written to --crash-dir.

Examples:
From the repository root (tests.fuzz is imported from there):
  .venv/bin/python -m scripts.fuzz --seconds 60     # every target, 60 s each
  .venv/bin/python -m scripts.fuzz --targets 'cookie-*' domain --engine atheris --seconds 300
  .venv/bin/python -m scripts.fuzz --targets 'rpc-*' --max-examples 2000 --json out.json
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass
class Result:
    target: str
    engine: str
    inputs: int = 0
    crashes: int = 0
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------
# hypothesis engine


def run_hypothesis(name: str, case: Callable[..., None], strategy: object, *, seconds: float,
                   max_examples: int, crash_dir: Path) -> Result:
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hseed

    res = Result(name, "hypothesis")
    start = time.monotonic()
    # the budget is checked between batches (a test must draw the same way every time)
    batch = 50 if name.startswith("rpc-") else 200

    def record(exc: BaseException, arg: object) -> None:
        res.crashes += 1
        crash_dir.mkdir(parents=True, exist_ok=True)
        path = crash_dir / f"{name}-{res.crashes}.txt"
        path.write_text(f"{type(exc).__name__}: {exc}\n\ninput: {arg!r}\n\n"
                        + "".join(traceback.format_exception(exc)))
        if len(res.notes) < 5:
            res.notes.append(f"{type(exc).__name__}: {str(exc)[:300]} ({path})")

    while time.monotonic() - start < seconds and res.inputs < max_examples:
        n = min(batch, max_examples - res.inputs)

        @settings(max_examples=n, deadline=None, database=None, phases=[Phase.generate],
                  suppress_health_check=list(HealthCheck))
        @hseed(int.from_bytes(os.urandom(8), "big"))
        @given(strategy)
        def body(arg: object) -> None:
            res.inputs += 1
            try:
                case(arg)
            except Exception as exc:  # every escape is a finding
                if type(exc).__name__ in ("StopTest", "Frozen", "UnsatisfiedAssumption"):
                    raise
                record(exc, arg)

        body()
    res.seconds = round(time.monotonic() - start, 1)
    return res


def parser_targets() -> dict[str, tuple[Callable[..., None], object]]:
    from hypothesis import strategies as st

    from tests.fuzz import parsers as P

    out: dict[str, tuple[Callable[..., None], object]] = {}
    for acc_name, accept in P.ACCEPT_SETS.items():
        out[f"cookie-{acc_name}"] = (
            lambda data, accept=accept: P.cookie_target(data, accept), P.cookie_inputs)
    out["domain"] = (lambda args: P.domain_target(*args),
                     st.tuples(P.domain_inputs, st.booleans()))
    return out


def rpc_targets(lab_box: list[object]) -> dict[str, tuple[Callable[..., None], object]]:
    from hypothesis import strategies as st

    from tests.fuzz import rpc as R

    def lab() -> R.Lab:
        if not lab_box:
            lab_box.append(R.Lab(Path(tempfile.mkdtemp(prefix="vmmigrate-fuzz-"))))
        return lab_box[0]  # type: ignore[return-value]

    out: dict[str, tuple[Callable[..., None], object]] = {}
    for rpc in R.CATALOG:
        out[f"rpc-{rpc.name}"] = (lambda data, rpc=rpc: R.field_case(lab(), rpc, data), st.data())
    out["rpc-raw"] = (lambda data: R.raw_case(lab(), data), st.data())
    out["rpc-tunnel"] = (lambda data: R.tunnel_case(lab(), data), st.data())
    return out


# ---------------------------------------------------------------------------------------
# atheris engine (parser targets), one child process per target


def atheris_child(target: str) -> None:
    import atheris

    with atheris.instrument_imports():
        from vmmigrate.common import cookie, domainxml, xmlsafe  # noqa: F401
    from tests.fuzz import parsers as P

    if target == "domain":
        def one(data: bytes) -> None:
            P.domain_target(data[1:], bool(data[:1]) and data[0] & 1 == 1)
    else:
        accept = P.ACCEPT_SETS[target.removeprefix("cookie-")]

        def one(data: bytes) -> None:
            P.cookie_target(data, accept)

    atheris.Setup(sys.argv[:1] + sys.argv[sys.argv.index("--") + 1:], one)
    atheris.Fuzz()


def run_atheris(name: str, seconds: float, max_examples: int, crash_dir: Path) -> Result:
    from tests.fuzz import parsers as P

    res = Result(name, "atheris")
    corpus = Path(tempfile.mkdtemp(prefix=f"corpus-{name}-"))
    seeds = P.SEED_DOMAINS if name == "domain" else P.SEED_COOKIES
    for i, s in enumerate(seeds):
        (corpus / f"seed-{i}").write_bytes(b"\x01" + s if name == "domain" else s)
    crash_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "scripts.fuzz", "--atheris-child", name, "--",
           f"-max_total_time={int(seconds)}", f"-runs={max_examples}", "-max_len=65536",
           "-rss_limit_mb=2048", "-timeout=30", f"-artifact_prefix={crash_dir}/{name}-",
           "-print_final_stats=1", str(corpus)]
    start = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, errors="replace", check=False)
    res.seconds = round(time.monotonic() - start, 1)
    out = proc.stderr
    m = re.findall(r"stat::number_of_executed_units:\s*(\d+)", out) or re.findall(
        r"Done (\d+) runs", out)
    res.inputs = int(m[-1]) if m else 0
    if proc.returncode != 0:
        res.crashes = 1
        tail = out[-1500:]
        (crash_dir / f"{name}-atheris.log").write_text(out)
        res.notes.append(f"exit {proc.returncode}: {tail}")
    cov = re.findall(r"cov: (\d+) ft: (\d+)", out)
    if cov:
        res.notes.append(f"coverage: {cov[-1][0]} edges, {cov[-1][1]} features")
    return res


# ---------------------------------------------------------------------------------------


def main() -> int:
    if "--atheris-child" in sys.argv:
        atheris_child(sys.argv[sys.argv.index("--atheris-child") + 1])
        return 0
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--targets", nargs="*", default=["*"], help="glob patterns (default: all)")
    ap.add_argument("--engine", choices=["hypothesis", "atheris", "both", "auto"],
                    default="auto",
                    help="auto: atheris for parsers when installed, else hypothesis")
    ap.add_argument("--seconds", type=float, default=60.0, help="time budget per target")
    ap.add_argument("--max-examples", type=int, default=10**9, help="input cap per target")
    ap.add_argument("--crash-dir", type=Path, default=Path("fuzz-crashes"))
    ap.add_argument("--json", type=Path, help="write the results here too")
    ap.add_argument("--list", action="store_true", help="list the targets and exit")
    args = ap.parse_args()

    try:
        import atheris  # noqa: F401

        have_atheris = True
    except ImportError:
        have_atheris = False
    if args.engine == "atheris" and not have_atheris:
        print("atheris is not installed (pip install atheris)", file=sys.stderr)
        return 2

    lab_box: list[object] = []
    parsers = parser_targets()
    rpcs = rpc_targets(lab_box)
    everything = {**parsers, **rpcs}
    chosen = [n for n in everything if any(fnmatch.fnmatch(n, p) for p in args.targets)]
    if args.list:
        print("\n".join(chosen))
        return 0
    results: list[Result] = []
    started = time.time()
    try:
        for name in chosen:
            engines = []
            if name in parsers:
                if args.engine in ("atheris", "both") or (args.engine == "auto" and have_atheris):
                    engines.append("atheris")
                if args.engine in ("hypothesis", "both") or (
                        args.engine == "auto" and not have_atheris):
                    engines.append("hypothesis")
            else:
                engines.append("hypothesis")
            for engine in engines:
                if engine == "atheris":
                    r = run_atheris(name, args.seconds, args.max_examples, args.crash_dir)
                else:
                    case, strategy = everything[name]
                    r = run_hypothesis(name, case, strategy, seconds=args.seconds,
                                       max_examples=args.max_examples, crash_dir=args.crash_dir)
                results.append(r)
                print(f"{r.target:50} {r.engine:10} inputs {r.inputs:>9}  crashes {r.crashes:>3}"
                      f"  {r.seconds:>7.1f} s", flush=True)
                for note in r.notes:
                    print(f"    {note}", flush=True)
    finally:
        if lab_box:
            lab_box[0].close()  # type: ignore[attr-defined]
    total_in = sum(r.inputs for r in results)
    total_cr = sum(r.crashes for r in results)
    total_s = round(time.time() - started, 1)
    print(f"{'TOTAL':50} {'':10} inputs {total_in:>9}  crashes {total_cr:>3}  {total_s:>7.1f} s")
    if args.json:
        args.json.write_text(json.dumps({
            "command": " ".join(sys.argv),
            "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cpus, "
                       f"Python {platform.python_version()}, {platform.platform()}",
            "started_unix": started,
            "results": [asdict(r) for r in results],
            "total_inputs": total_in,
            "total_crashes": total_cr,
            "total_seconds": total_s,
        }, indent=2))
    return 1 if total_cr else 0


if __name__ == "__main__":
    sys.exit(main())
