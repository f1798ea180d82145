"""GradHealth configured from YAML in a real LightningCLI run, from both Lightning namespaces."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).parent

SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
from conftest import {model}
from {namespace}.cli import LightningCLI

class Model({model}):
    def __init__(self) -> None:
        super().__init__()

LightningCLI(Model, save_config_callback=None)
"""

CONFIG = """
trainer:
  max_steps: 2
  logger: false
  enable_checkpointing: false
  enable_progress_bar: false
  accelerator: cpu
  callbacks:
    - class_path: lightning_gradhealth.GradHealth
      init_args:
        init: orthogonal
        chrono_t_max: 50
        clip: norm
        clip_val: 1.0
        on_nonfinite: skip
        linear_init: he
        exclude: [head]
"""


@pytest.mark.parametrize("namespace, model", [("lightning.pytorch", "LSequenceModel"), ("pytorch_lightning", "PLSequenceModel")])
def test_a_yaml_configured_gradhealth_runs_in_lightning_cli(tmp_path, namespace, model):
    script, config = tmp_path / "train.py", tmp_path / "config.yaml"
    script.write_text(SCRIPT.format(tests=str(TESTS), model=model, namespace=namespace))
    config.write_text(CONFIG)
    command = [sys.executable, str(script), "fit", "--config", str(config)]
    run = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "GradHealth: initialized 4 parameters of 1 layers" in run.stderr + run.stdout

    bad = subprocess.run(
        [sys.executable, str(script), "fit", "--config", str(config), "--trainer.callbacks.init_args.init=orthogonl"],
        capture_output=True, text=True, timeout=300,
    )
    assert bad.returncode != 0 and "Did you mean 'orthogonal'?" in bad.stderr
