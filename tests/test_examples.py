"""The examples run as a user runs them: as scripts, with --help and a fast --smoke mode.

The smoke runs are separate processes, as a user starts them. ``--help`` runs the script as
``__main__`` in this process, where torch and Lightning are already imported, to keep the suite fast.
The LightningCLI example (``cli.py``) has no --smoke flag: it runs a real fit from its YAML
config with command-line overrides for a few steps, as a user of the template would.
"""

from __future__ import annotations

import runpy
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES_DIR = Path(__file__).parents[1] / "examples"
CLI = EXAMPLES_DIR / "cli.py"
SCRIPTS = sorted(path for path in EXAMPLES_DIR.glob("*.py") if path != CLI)
COMPARED_INITS = ["orthogonal", "identity", "glorot", "uniform", "default"]


def run_script(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run ``python *args`` in a new process."""
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300, cwd=cwd)


def help_text(script: Path, *args: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> str:
    """What ``python script *args --help`` prints, run as ``__main__`` in this process."""
    monkeypatch.syspath_prepend(str(script.parent))  # as Python does for a script: its folder first
    monkeypatch.setattr(sys, "argv", [str(script), *args, "--help"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(script), run_name="__main__")
    assert exit_info.value.code in (0, None)
    return capsys.readouterr().out


@pytest.fixture(scope="module")
def smoke_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[subprocess.CompletedProcess, Path]]:
    """Each script's --smoke run (done once, shared by the tests below) and its log directory."""
    runs = {}
    for script in SCRIPTS:
        logdir = tmp_path_factory.mktemp(script.stem)
        runs[script.stem] = (run_script(str(script), "--smoke", "--logdir", str(logdir), cwd=logdir), logdir)
    return runs


@pytest.mark.parametrize("script", SCRIPTS, ids=[path.stem for path in SCRIPTS])
def test_example_help_and_smoke_run(script, smoke_runs, monkeypatch, capsys):
    assert "--smoke" in help_text(script, monkeypatch=monkeypatch, capsys=capsys)
    run, logdir = smoke_runs[script.stem]
    assert run.returncode == 0, run.stderr[-3000:]
    assert "GradHealth: initialized" in run.stderr + run.stdout
    assert list(logdir.rglob("events.out.tfevents.*")), "no TensorBoard event file written"


def test_compare_inits_prints_a_row_per_init_and_writes_a_run_per_init(smoke_runs):
    run, logdir = smoke_runs["compare_inits"]
    assert run.returncode == 0, run.stderr[-3000:]
    table = run.stdout[run.stdout.index("\ninit "):].splitlines()
    rows = {line.split()[0]: line.split() for line in table if line.split() and line.split()[0] in COMPARED_INITS}
    assert list(rows) == COMPARED_INITS
    for init, row in rows.items():
        assert float(row[1]) > 0, row  # the held-out loss
        assert list((logdir / "adding_rnn-relu_T10" / init).glob("events.out.tfevents.*")), init
    assert f"tensorboard --logdir {logdir / 'adding_rnn-relu_T10'}" in run.stdout


def test_copy_task_compares_its_loss_with_the_memoryless_baseline(smoke_runs):
    run, _ = smoke_runs["copy_task"]
    assert run.returncode == 0, run.stderr[-3000:]
    assert "the memoryless baseline 10 ln 8 / (T + 20) scores 0.8318" in run.stdout  # 10 ln 8 / 25 for the smoke T = 5
    assert "tensorboard --logdir" in run.stdout


def test_cli_fits_from_the_yaml_config_with_overrides(tmp_path, monkeypatch, capsys):
    assert "--config" in help_text(CLI, "fit", monkeypatch=monkeypatch, capsys=capsys)
    run = run_script(
        str(CLI), "fit", "--config", str(EXAMPLES_DIR / "configs" / "adding_lstm.yaml"),
        "--trainer.max_steps", "3", "--trainer.enable_progress_bar", "false", "--data.seq_len", "20",
        "--trainer.logger.init_args.save_dir", str(tmp_path),
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    output = run.stderr + run.stdout
    assert "GradHealth: initialized 4 parameters of 1 layers" in output
    assert "chrono" in output  # the config's chrono_t_max reached the callback
    assert list(tmp_path.rglob("events.out.tfevents.*")), "no TensorBoard event file written"
