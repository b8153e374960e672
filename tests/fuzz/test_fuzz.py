"""Bad and edge arguments for the public ops and strategies (tests/fuzz/__init__.py). The cases run
in one child process (importing torch once, not once an op, keeps the suite within CI's minute); a
crash ends the child, and the op it was in fails with the case that crashed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fuzz.cases import OPS, STRATEGIES

ROOT = Path(__file__).resolve().parents[2]
NAMES = [*OPS, *STRATEGIES]


@pytest.fixture(scope="module")
def verdicts() -> tuple[dict[str, list[str]], str]:
    """Each op's printed lines, and the child's end (its return code and stderr) for a crash."""
    run = subprocess.run([sys.executable, "-m", "tests.fuzz.runner", *NAMES], cwd=ROOT, capture_output=True, text=True,
                         timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines: dict[str, list[str]] = {}
    for line in run.stdout.splitlines():
        if line.startswith("case "):
            lines.setdefault(line.split()[1], []).append(line)
    return lines, f"rc {run.returncode}\n{run.stderr[-2000:]}"


@pytest.mark.parametrize("op", NAMES)
def test_every_bad_argument_works_or_is_a_clear_error(verdicts, op):
    lines, end = verdicts
    mine = lines.get(op, [])
    assert mine, f"{op}: no case ran (the child crashed before it?) {end}"
    assert all(line.endswith((" ok", " clear")) or " FAIL " in line for line in mine[:-1])
    assert mine[-1].endswith((" ok", " clear")) or " FAIL " in mine[-1], f"{op}: the child crashed at {mine[-1]!r}: {end}"
    failed = [line for line in mine if " FAIL " in line]
    assert not failed, "\n".join(failed)
    assert len(mine) >= 10, f"{op}: only {len(mine)} cases"
