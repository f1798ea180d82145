"""docs/dashboard.py's run selection: TensorBoard reads the selected runs, and only those, through the links.

The screenshots themselves need Chromium and are not part of the suite; the tool's own pieces
that decide what TensorBoard shows are tested here against TensorBoard's own reader.
"""

from __future__ import annotations

import doctest
import importlib.util
from pathlib import Path
from types import ModuleType

import pytest
from tensorboard.backend.event_processing.plugin_event_multiplexer import EventMultiplexer
from tensorboard.util import tensor_util
from torch.utils.tensorboard import SummaryWriter

DASHBOARD = Path(__file__).parents[1] / "docs" / "dashboard.py"
RUNS = ["identity_seed0", "identity_seed1", "uniform_seed0", "uniform_seed1"]


@pytest.fixture(scope="module")
def dashboard() -> ModuleType:
    spec = importlib.util.spec_from_file_location("dashboard", DASHBOARD)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dashboard_docstring_examples(dashboard):
    assert doctest.testmod(dashboard).failed == 0


def test_only_the_selected_runs_reach_tensorboard_with_their_values(dashboard, tmp_path):
    logdir = tmp_path / "logs" / "adding_rnn-relu_T100"
    for index, run in enumerate(RUNS):
        with SummaryWriter(str(logdir / run)) as writer:
            writer.add_scalar("gradhealth/rnn.l0/1_transmission", float(index), global_step=3)
        (logdir / run / "hparams.yaml").write_text("{}\n")

    assert dashboard.link_runs(logdir, r"_seed1$", tmp_path / "shown") == ["identity_seed1", "uniform_seed1"]
    multiplexer = EventMultiplexer()
    multiplexer.AddRunsFromDirectory(str(tmp_path / "shown"))
    multiplexer.Reload()
    assert sorted(multiplexer.Runs()) == ["identity_seed1", "uniform_seed1"]
    for run in ("identity_seed1", "uniform_seed1"):
        (event,) = multiplexer.Tensors(run, "gradhealth/rnn.l0/1_transmission")
        assert (event.step, float(tensor_util.make_ndarray(event.tensor_proto))) == (3, float(RUNS.index(run)))
    assert (tmp_path / "shown" / "uniform_seed1" / "hparams.yaml").is_symlink()

    with pytest.raises(SystemExit, match="no run under .* matches --runs 'seed7'"):
        dashboard.link_runs(logdir, "seed7", tmp_path / "none")


def test_split_pages_are_written_next_to_the_sheet(dashboard):
    assert dashboard.page_path(Path("docs/dashboard.png"), "custom_scalars") == Path("docs/dashboard_custom_scalars.png")
