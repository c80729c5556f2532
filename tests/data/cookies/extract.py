"""Cut the cookies a libvirtd formatted out of its debug log (how tests/data/cookies/*.xml
were captured: see README).

    python tests/data/cookies/extract.py OUTDIR SCENARIO[,SCENARIO...] A=LOG B=LOG

Every ``qemuMigrationCookieFormat`` line carries ``cookielen`` (the cookie's length with its
NUL) and the cookie itself, which spans lines: exactly cookielen - 1 characters are taken.
The phase is the one of the last migration function the same log mentioned before it; the
cookies of both hosts are put in time order and a new scenario starts at each Begin.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

FORMAT = re.compile(
    r"^(?P<ts>\S+ \S+): \d+: debug : qemuMigrationCookieFormat:\d+ : "
    r"cookielen=(?P<len>\d+) cookie=",
    re.M,
)
FUNC = re.compile(r"debug : qemuMigration(?P<fn>\w+):\d+ :")
PHASES = [
    ("SrcBeginPhase", "begin"),
    ("DstPrepare", "prepare"),
    ("DstRun", "prepare"),
    ("DstFinish", "finish"),
    ("DstWaitForCompletion", "finish"),
    ("Src", "perform"),
    ("AnyCompleted", "perform"),
]


def phase_before(log: str, pos: int) -> str:
    for m in reversed(list(FUNC.finditer(log, 0, pos))):
        fn = m["fn"]
        if fn.startswith(("Cookie", "Params", "Caps")):
            continue
        for prefix, phase in PHASES:
            if fn.startswith(prefix):
                return phase
    raise ValueError(f"no phase before offset {pos}")


def cookies(host: str, log: str) -> list[tuple[str, str, str, str]]:
    out = []
    for m in FORMAT.finditer(log):
        text = log[m.end() : m.end() + int(m["len"]) - 1]
        out.append((m["ts"], host, phase_before(log, m.start()), text))
    return out


def main() -> None:
    outdir, scenarios = Path(sys.argv[1]), sys.argv[2].split(",")
    found = []
    for arg in sys.argv[3:]:
        host, _, path = arg.partition("=")
        found += cookies(host, Path(path).read_text())
    found.sort()
    index = -1
    for _, host, phase, text in found:
        index += phase == "begin"
        name = f"{scenarios[index]}-{phase}-{host}.xml"
        (outdir / name).write_text(text)
        print(name, len(text))


if __name__ == "__main__":
    main()
