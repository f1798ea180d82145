"""The examples run as a user runs them: as scripts, with --help and a fast --smoke mode."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = sorted((Path(__file__).parents[1] / "examples").glob("*.py"))


@pytest.mark.parametrize("script", EXAMPLES, ids=[path.stem for path in EXAMPLES])
def test_example_help_and_smoke_run(script, tmp_path):
    help_text = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert help_text.returncode == 0 and "--smoke" in help_text.stdout
    run = subprocess.run(
        [sys.executable, str(script), "--smoke", "--logdir", str(tmp_path)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "GradHealth: initialized" in run.stderr + run.stdout
    assert list(tmp_path.rglob("events.out.tfevents.*")), "no TensorBoard event file written"
