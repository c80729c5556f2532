"""A bounded soak in the suite: migrations back and forth with every failpoint armed at
random (see tests/helpers/soak.py; python -m scripts.soak runs the long one)."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers.soak import soak

pytestmark = pytest.mark.slow


def test_soak_with_random_failpoints(tmp_path: Path) -> None:
    counts = soak(tmp_path, migrations=120, workers=4, n_offline=10, n_live=3, percent=3.0,
                  seed=11, log=lambda line: None)
    print(counts.summary())
    assert counts.invariant_violations == 0, counts.violations
    assert counts.attempted == 120
    assert counts.succeeded + counts.failed_cleanly == counts.attempted
    assert counts.faults_injected > 0 and counts.succeeded > 0
    assert counts.tunnelled > 0  # the tunnel (credit, unix socket) under faults too
