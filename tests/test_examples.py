"""The examples run as a user runs them: as scripts, with --help and a fast --smoke mode.

The smoke runs are separate processes, as a user starts them. ``--help`` runs the script as
``__main__`` in this process, where torch and Lightning are already imported, to keep the suite fast.
The LightningCLI example (``cli.py``) has no --smoke flag: it runs a real fit from its YAML
config with command-line overrides for a few steps, as a user of the template would.
"""

from __future__ import annotations

import doctest
import importlib
import re
import runpy
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import torch

import pytest

from lightning_gradhealth.health import summarize_timesteps

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


def table_rows(output: str, title: str, first_cells: list[str]) -> dict[str, list[str]]:
    """The rows of the table printed below the line that contains ``title``, keyed by their first
    cell, split at runs of two or more spaces; only rows whose first cell is in ``first_cells``."""
    lines = output[output.index(title):].splitlines()[2:]  # below the title and the header
    rows = {}
    for line in lines:
        cells = re.split(r"\s{2,}", line.strip())
        if cells[0] not in first_cells:
            break
        rows[cells[0]] = cells
    return rows


def report_transmissions(output: str) -> list[str]:
    """The transmission cell of the layer's row in each health report in ``output``, in order."""
    cells = []
    lines = output.splitlines()
    for index, line in enumerate(lines):
        if line.startswith("GradHealth health report at step"):
            header = re.split(r"\s{2,}", lines[index + 1].strip())
            row = re.split(r"\s{2,}", lines[index + 2].strip())
            cells.append(row[header.index("transmission")])
    return cells


def test_compare_inits_prints_a_row_per_init_and_writes_a_run_per_init(smoke_runs):
    run, logdir = smoke_runs["compare_inits"]
    assert run.returncode == 0, run.stderr[-3000:]
    rows = table_rows(run.stdout, "seed 0; always predicting 1", COMPARED_INITS)
    assert list(rows) == COMPARED_INITS
    for init, row in rows.items():
        assert float(row[1]) > 0, row  # the held-out loss
        assert list((logdir / "adding_rnn-relu_T10" / f"{init}_seed0").glob("events.out.tfevents.*")), init
    assert "over the seeds" not in run.stdout  # one seed: no summary over seeds
    assert f"tensorboard --logdir {logdir / 'adding_rnn-relu_T10'}" in run.stdout


SEEDS_INITS = ["orthogonal", "uniform"]


@pytest.fixture(scope="module")
def seeds_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess, dict[str, list[str]], Path]:
    """compare_inits over seeds 0 and 1 (two inits), then a rerun of one init on seed 1: the first
    run's output, the event files of each run directory before the rerun, and the run group."""
    logdir = tmp_path_factory.mktemp("seeds")
    script = str(EXAMPLES_DIR / "compare_inits.py")
    first = run_script(script, "--smoke", "--seeds", "0", "1", "--inits", *SEEDS_INITS, "--logdir", str(logdir), cwd=logdir)
    assert first.returncode == 0, first.stderr[-3000:]
    run_group = logdir / "adding_rnn-relu_T10"
    before = {run.name: sorted(path.name for path in run.glob("events.out.tfevents.*")) for run in run_group.iterdir()}
    rerun = run_script(script, "--smoke", "--seed", "1", "--inits", "orthogonal", "--logdir", str(logdir), cwd=logdir)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    return first, before, run_group


def test_compare_inits_writes_one_run_per_init_and_seed_and_a_rerun_replaces_only_its_own(seeds_runs):
    _, before, run_group = seeds_runs
    runs = {f"{init}_seed{seed}" for init in SEEDS_INITS for seed in (0, 1)}
    assert set(before) == runs
    assert all(len(events) == 1 for events in before.values()), before
    after = {run.name: sorted(path.name for path in run.glob("events.out.tfevents.*")) for run in run_group.iterdir()}
    assert set(after) == runs
    for run in runs - {"orthogonal_seed1"}:
        assert after[run] == before[run], run  # untouched by the rerun
    assert len(after["orthogonal_seed1"]) == 1 and after["orthogonal_seed1"] != before["orthogonal_seed1"]


def test_compare_inits_summarizes_each_init_over_the_seeds(seeds_runs):
    run, _, _ = seeds_runs
    per_seed = {seed: table_rows(run.stdout, f"seed {seed}; always predicting 1", SEEDS_INITS) for seed in (0, 1)}
    assert all(list(rows) == SEEDS_INITS for rows in per_seed.values())
    summary = table_rows(run.stdout, "seeds 0, 1: mean (lowest..highest)", SEEDS_INITS)
    assert list(summary) == SEEDS_INITS
    for init in SEEDS_INITS:
        ratios = [float(per_seed[seed][init][2]) for seed in (0, 1)]
        assert ratios[0] != ratios[1], "the seed changed nothing"  # each seed has its own data and draws
        mean, low, high = map(float, re.fullmatch(r"(\S+) \((\S+)\.\.(\S+)\)", summary[init][1]).groups())
        assert mean == pytest.approx(sum(ratios) / 2, abs=0.011)  # from ratios printed to 2 decimals
        assert (low, high) == (min(ratios), max(ratios))
        verdicts = {seed: per_seed[seed][init][7] for seed in (0, 1)}
        expected = f"{verdicts[0]} (all)" if verdicts[0] == verdicts[1] else f"{verdicts[0]} (0); {verdicts[1]} (1)"
        assert summary[init][-1] == expected


def test_compare_inits_prints_an_underflowed_transmission_as_the_bound_the_report_gives(seeds_runs):
    run, _, _ = seeds_runs
    tables = [table_rows(run.stdout, f"seed {seed}; always predicting 1", SEEDS_INITS) for seed in (0, 1)]
    end_transmissions = [rows[init][3].split(" -> ")[1] for rows in tables for init in SEEDS_INITS]
    reports = report_transmissions(run.stderr)  # GradHealth prints its report to stderr
    assert len(reports) == len(end_transmissions) == 4
    for printed, reported in zip(end_transmissions, reports):
        assert printed.startswith("<") == reported.startswith("<"), (printed, reported)
        assert float(printed.lstrip("<")) == pytest.approx(float(reported.lstrip("<")), abs=0.051)


@pytest.fixture
def compare_inits(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """The example imported as a module (its folder first on the path, as for the script)."""
    monkeypatch.syspath_prepend(str(EXAMPLES_DIR))
    return importlib.import_module("compare_inits")


def test_compare_inits_transmission_text_marks_a_bound(compare_inits):
    assert doctest.testmod(compare_inits).failed == 0
    bound = summarize_timesteps(torch.tensor([0.0, 0.0, 1e-30, 1e-20, 1.0]))  # float32: the first two underflowed
    measured = summarize_timesteps(torch.tensor([1e-3, 1e-2, 1.0]))
    assert bound.transmission_is_bound and compare_inits.format_transmission(bound) == "<-37.9"
    assert compare_inits.format_transmission(measured) == "-3.0"
    assert compare_inits.format_transmission(summarize_timesteps(torch.tensor([1.0, 0.0]))) == "-"  # no gradient at the end
    transmission_range = compare_inits.value_range([measured, bound], lambda s: s.transmission, compare_inits.format_transmission)
    assert transmission_range == "<-37.9..-3.0"


def test_compare_inits_refuses_repeated_or_negative_seeds(monkeypatch, capsys):
    script = EXAMPLES_DIR / "compare_inits.py"
    monkeypatch.syspath_prepend(str(EXAMPLES_DIR))
    for seeds in (["1", "1"], ["-1"]):
        monkeypatch.setattr(sys, "argv", [str(script), "--smoke", "--seeds", *seeds])
        with pytest.raises(SystemExit) as exit_info:
            runpy.run_path(str(script), run_name="__main__")
        assert exit_info.value.code == 2
        assert f"--seeds takes distinct non-negative integers, got {' '.join(seeds)}" in capsys.readouterr().err


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
