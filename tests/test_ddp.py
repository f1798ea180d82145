"""Init under real multi-process DDP (2 CPU processes, gloo): identical weights on every rank."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

SCRIPT = Path(__file__).parent / "scripts" / "ddp_init.py"


def test_ddp_ranks_start_from_identical_initialized_weights(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path)], env=env, capture_output=True, text=True, timeout=240
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rank0, rank1 = (torch.load(tmp_path / f"rank{rank}.pt") for rank in (0, 1))
    assert rank0.keys() == rank1.keys()
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name
    # and the init did run: every gate block of the recurrent matrix is orthogonal
    for block in rank0["rnn.weight_hh_l0"].double().chunk(4):
        assert torch.allclose(block @ block.T, torch.eye(8, dtype=torch.float64), atol=1e-5)
