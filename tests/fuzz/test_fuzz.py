"""Bad and edge arguments for the public ops, each case in a child process (tests/fuzz/__init__.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fuzz.cases import OPS, STRATEGIES

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("op", [*OPS, *STRATEGIES])
def test_every_bad_argument_works_or_is_a_clear_error(op):
    run = subprocess.run([sys.executable, "-m", "tests.fuzz.runner", op], cwd=ROOT, capture_output=True, text=True,
                         timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines = run.stdout.strip().splitlines()
    assert lines, f"{op}: the runner printed nothing\n{run.stderr[-2000:]}"
    assert run.returncode in (0, 1), f"{op}: the child crashed (rc {run.returncode}) at: {lines[-1]}\n{run.stderr[-2000:]}"
    failed = [line for line in lines if " FAIL " in line]
    assert not failed, "\n".join(failed)
    assert run.returncode == 0 and all(line.endswith((" ok", " clear")) for line in lines)
