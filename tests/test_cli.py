"""GradHealth configured from YAML in a real LightningCLI run, from both Lightning namespaces."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning.cli
from packaging.requirements import Requirement

TESTS = Path(__file__).parent
PYPROJECT = TESTS.parent / "pyproject.toml"

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
        clip: Norm                   # names in any case, as in Python
        clip_val: 1.0
        on_nonfinite: SKIP
        linear_init: he
        exclude: [head]
"""

SHORT = 10
"""Lines of stderr a refused name may take: one line says it, whatever the CLI's options."""


def _cli(
    tmp_path: Path, *arguments: str, namespace: str = "pytorch_lightning", config: str = CONFIG
) -> subprocess.CompletedProcess[str]:
    """``train.py fit --config config.yaml *arguments`` through a real LightningCLI of ``namespace``."""
    script, config_file = tmp_path / "train.py", tmp_path / "config.yaml"
    model = "LSequenceModel" if namespace == "lightning.pytorch" else "PLSequenceModel"
    script.write_text(SCRIPT.format(tests=str(TESTS), model=model, namespace=namespace))
    config_file.write_text(config)
    command = [sys.executable, str(script), "fit", "--config", str(config_file), *arguments]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("namespace", ["lightning.pytorch", "pytorch_lightning"])
def test_a_yaml_configured_gradhealth_runs_in_lightning_cli_and_a_misspelt_init_is_one_line(tmp_path, namespace):
    run = _cli(tmp_path, namespace=namespace)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "GradHealth: initialized 4 parameters of 1 layers" in run.stderr + run.stdout

    bad = _cli(tmp_path, "--trainer.callbacks.init_args.init=orthogonl", namespace=namespace)
    assert bad.returncode != 0 and "Did you mean 'orthogonal'?" in bad.stderr
    assert len(bad.stderr.splitlines()) < SHORT, bad.stderr
    assert "Traceback" not in bad.stderr and "usage:" not in bad.stderr


def test_a_misspelt_name_in_the_config_file_stops_with_one_line_before_training(tmp_path):
    run = _cli(tmp_path, config=CONFIG.replace("clip: Norm", "clip: Nrom"))
    assert run.returncode != 0
    message = "error: GradHealth: Unknown clip mode 'Nrom'. Did you mean 'norm'? Valid values: None, 'norm', 'value', 'agc'."
    assert run.stderr.splitlines()[-1] == message, run.stderr
    assert len(run.stderr.splitlines()) < SHORT, run.stderr
    assert "GradHealth: initialized" not in run.stderr + run.stdout  # nothing was built


def test_the_cli_extra_brings_what_lightningcli_asks_for():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    extras = tomllib.loads(PYPROJECT.read_text())["project"]["optional-dependencies"]
    [brought] = [Requirement(text) for text in extras["cli"]]
    asked = Requirement(str(pytorch_lightning.cli._JSONARGPARSE_SIGNATURES_AVAILABLE.requirement))
    assert (brought.name, brought.extras, brought.specifier) == (asked.name, asked.extras, asked.specifier)
