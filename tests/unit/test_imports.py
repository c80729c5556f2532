"""What a plaintext daemon does not load: cryptography (TLS material and peer identities)
and prometheus_client (metrics served) are imported when first needed, not at start-up,
which keeps an idle daemon about 12 MiB smaller (docs/PERFORMANCE.md)."""

from __future__ import annotations

import subprocess
import sys

LAZY = ("cryptography", "prometheus_client")


def test_daemon_modules_do_not_import_tls_or_metrics_libraries() -> None:
    code = (
        "import sys\n"
        "import vmmigrate.srcd.server, vmmigrate.dstd.server, vmmigrate.srcd.main, "
        "vmmigrate.dstd.main\n"
        f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({LAZY!r})))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_metrics_import_prometheus_client_when_read() -> None:
    code = (
        "import sys\n"
        "from vmmigrate.common.metrics import Metrics\n"
        "m = Metrics('source')\n"
        "m.finished('offline', 'p2p', 'completed', 0)\n"
        "before = 'prometheus_client' in sys.modules\n"
        "value = m.registry.get_sample_value('vmmigrate_migrations_total', "
        "{'role': 'source', 'kind': 'offline', 'mode': 'p2p', 'result': 'completed'})\n"
        "print(before, value)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "1.0"]
