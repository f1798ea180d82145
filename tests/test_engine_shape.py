"""The engine's shape as users meet it: typed layer keys (a module's name never changes what is
measured), settings declared once (the callback's signature, its attributes and the configuration
text come from the configs), and checkpoints written by another version resume."""

from __future__ import annotations

import dataclasses
import inspect
import re
import warnings
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning
import torch
from torch import nn

from conftest import PLSequenceModel, tensorboard_events, trainer_kwargs
from lightning_gradhealth import GradHealth, GradHealthMonitor, InitConfig, MonitorConfig
from lightning_gradhealth.defaults import CHECKPOINT_FORMAT


class CellLoop(nn.Module):
    """A plain tanh ``nn.RNNCell`` run over the sequence by the user's own loop; the cell module's
    name is chosen by the test."""

    def __init__(self, cell_name: str) -> None:
        super().__init__()
        self.cell_name = cell_name
        self.add_module(cell_name, nn.RNNCell(3, 16))
        self.head = nn.Linear(16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cell = getattr(self, self.cell_name)
        h = x.new_zeros(x.shape[1], 16)
        for x_t in x:
            h = cell(x_t, h)
        return self.head(h)


def _vanishing_run(cell_name: str) -> Any:
    """Three logged steps of a cell loop whose small weights make the gradient vanish; the report."""
    torch.manual_seed(0)
    model = CellLoop(cell_name)
    with torch.no_grad():
        for parameter in getattr(model, cell_name).parameters():
            parameter.uniform_(-0.05, 0.05)
    monitor = GradHealthMonitor(log_every_n_steps=1, warn=lambda message: None)
    monitor.attach(model)
    generator = torch.Generator().manual_seed(1)
    for step in range(3):
        x, y = torch.randn(30, 8, 3, generator=generator), torch.randn(8, 1, generator=generator)
        monitor.start_step(step)
        loss = nn.functional.mse_loss(model(x), y)
        monitor.stop_capture()
        loss.backward()
        monitor.before_optimizer_step(step, list(model.parameters()))
        model.zero_grad()
    report = monitor.finish(step)
    monitor.detach()
    return report, monitor.timestep_summaries[cell_name]


def test_a_cell_module_named_like_a_reverse_direction_is_read_forwards_with_the_same_verdict():
    report_plain, summary_plain = _vanishing_run("cell")
    report_reverse, summary_reverse = _vanishing_run("cell_reverse")
    assert summary_plain.transmission < -3
    assert summary_reverse.transmission == pytest.approx(summary_plain.transmission, rel=1e-6)
    assert summary_reverse.horizon == summary_plain.horizon
    assert [row.verdict for row in report_reverse.layers] == [row.verdict for row in report_plain.layers] == ["vanishing"]


def test_the_callbacks_signature_is_the_configs_fields_typed_as_declared():
    parameters = inspect.signature(GradHealth).parameters
    fields = [field.name for config in (InitConfig, MonitorConfig) for field in dataclasses.fields(config)]
    assert list(parameters) == list(dict.fromkeys(fields))
    assert parameters["init"].kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for name, p in parameters.items() if name != "init")
    assert parameters["clip_val"].default is None and parameters["horizon_factor"].default == 1e3
    health = GradHealth("orthogonal", clip="norm", clip_val=0.5, seed=3)
    settings = (health.init, health.clip, health.clip_val, health.seed, health.log_every_n_steps)
    assert settings == ("orthogonal", "norm", 0.5, 3, None)
    with pytest.raises(TypeError, match="unexpected keyword argument 'clip_value'"):
        GradHealth(clip_value=1.0)


def test_every_argument_is_documented_in_the_callbacks_docstring_which_lightningcli_shows():
    documented = set(re.findall(r"^        (\w+):", GradHealth.__doc__ or "", flags=re.MULTILINE))
    assert set(inspect.signature(GradHealth).parameters) <= documented


def test_settings_read_as_attributes_and_cannot_be_assigned_unseen():
    health = GradHealth(clip="norm", clip_val=1.0)
    with pytest.raises(AttributeError, match=r"dataclasses.replace\(config, clip_val=...\)"):
        health.clip_val = 2.0
    with pytest.raises(AttributeError, match="MonitorConfig, which is frozen"):
        health.monitor.clip_val = 2.0
    with pytest.raises(AttributeError, match="read-only"):
        health.timestep_grad_norms = {}
    health.monitor.config = dataclasses.replace(health.monitor.config, clip_val=2.0)
    assert health.clip_val == health.monitor.clip_val == health.monitor.gradient_tracker.config.clip_val == 2.0
    with pytest.raises(AttributeError, match="has no attribute 'clip_value'"):
        health.clip_value


def test_a_picture_that_cannot_be_drawn_is_named_once_and_the_rest_is_written(tmp_path: Path, monkeypatch):
    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("no display")

    monkeypatch.setattr("lightning_gradhealth.figures.timestep_heatmap_image", broken)
    logger = pytorch_lightning.loggers.TensorBoardLogger(tmp_path, name="tb")
    health = GradHealth(log_every_n_steps=1, full_every_n_steps=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = pytorch_lightning.Trainer(**trainer_kwargs(max_steps=3, logger=logger), callbacks=[health])
        trainer.fit(PLSequenceModel())
    notices = [str(w.message) for w in caught if "could not draw" in str(w.message)]
    assert len(notices) == 1 and "gradhealth/rnn.l0/timestep_heatmap" in notices[0] and "no display" in notices[0]
    images = set(tensorboard_events(logger.log_dir).Tags()["images"])
    assert {"gradhealth/rnn.l0/timestep_grad_norms", "gradhealth/rnn.l0/eigenvalues"} <= images
    assert "gradhealth/rnn.l0/timestep_heatmap" not in images
    assert trainer.global_step == 3


def test_full_interval_not_a_multiple_raises_when_both_are_given_and_rounds_up_against_the_trainers():
    with pytest.raises(ValueError, match="must be a multiple of log_every_n_steps=4"):
        GradHealth(log_every_n_steps=4, full_every_n_steps=6)
    with pytest.raises(ValueError, match="must be a multiple of log_every_n_steps=4"):
        GradHealthMonitor(log_every_n_steps=4, full_every_n_steps=6)
    health = GradHealth(full_every_n_steps=6)
    trainer = pytorch_lightning.Trainer(**trainer_kwargs(max_steps=1, log_every_n_steps=4), callbacks=[health])
    trainer.fit(PLSequenceModel())
    assert (health.monitor.schedule.log_every_n_steps, health.monitor.schedule.full_every_n_steps) == (4, 8)


def _fit(tmp_path: Path, name: str, max_steps: int, ckpt_path: Path | None = None) -> tuple[GradHealth, Path]:
    """A real fit logging every step, clipping, saving its last checkpoint; the callback and the checkpoint."""
    torch.manual_seed(0)
    health = GradHealth(clip="norm", clip_val=0.01, log_every_n_steps=1)
    checkpoints = pytorch_lightning.callbacks.ModelCheckpoint(dirpath=tmp_path / name, save_last=True)
    trainer = pytorch_lightning.Trainer(
        **trainer_kwargs(max_steps=max_steps, enable_checkpointing=True), callbacks=[health, checkpoints]
    )
    trainer.fit(PLSequenceModel(), ckpt_path=ckpt_path)
    return health, tmp_path / name / "last.ckpt"


def _edit_gradhealth_state(checkpoint_path: Path, edit: Any) -> Path:
    """Rewrite the GradHealth state inside a real checkpoint file with ``edit(state) -> state``."""
    checkpoint = torch.load(checkpoint_path, weights_only=False)
    (key,) = [key for key in checkpoint["callbacks"] if key.startswith("GradHealth")]
    checkpoint["callbacks"][key] = edit(checkpoint["callbacks"][key])
    edited = checkpoint_path.with_name(f"edited-{checkpoint_path.name}")
    torch.save(checkpoint, edited)
    return edited


def _resume(tmp_path: Path, checkpoint: Path) -> tuple[GradHealth, list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        health, _ = _fit(tmp_path, "resumed", max_steps=6, ckpt_path=checkpoint)
    return health, [str(w.message) for w in caught if "checkpoint holds GradHealth state" in str(w.message)]


def test_a_resume_tolerates_an_extra_field_a_missing_field_and_says_once_what_it_dropped(tmp_path: Path):
    first, checkpoint = _fit(tmp_path, "first", max_steps=3)
    assert first.monitor.clip_steps == 3

    def edit(state: dict[str, Any]) -> dict[str, Any]:
        state["gradients"]["from_a_newer_version"] = [1, 2, 3]
        state["a_new_part"] = {"anything": 1}
        del state["gradients"]["skipped_steps"]
        return state

    resumed, notices = _resume(tmp_path, _edit_gradhealth_state(checkpoint, edit))
    assert resumed.monitor.clip_steps == 6  # the counters it could read went on
    assert resumed.skipped_steps == 0
    assert len(resumed.timestep_history["rnn.l0"]) == 6  # the heatmap rows too
    assert len(notices) == 1
    assert "gradients.from_a_newer_version" in notices[0] and "a_new_part" in notices[0]
    assert "gradients.skipped_steps" in notices[0]


def test_a_resume_from_the_unversioned_format_restores_what_matches_a_layer_and_names_the_rest(tmp_path: Path):
    first, checkpoint = _fit(tmp_path, "first", max_steps=3)
    start = first.monitor.spectrum_tracker.start_summaries["rnn.l0"]

    def as_format_0(state: dict[str, Any]) -> dict[str, Any]:
        assert state["format"] == CHECKPOINT_FORMAT
        return {  # the flat, string-keyed layout the first releases wrote
            "init_applied": state["init_applied"],
            "init_seed": state["init_seed"],
            "init_schemes": {"rnn.l0": "orthogonal"},
            "timestep_history": {"rnn.l0": [(0, torch.ones(6)), (1, torch.ones(6))], "gone.l0": [(0, torch.ones(6))]},
            "spectra_start": {"rnn.l0": vars(start)},
            **state["gradients"],
            "sigma_trackers": state["spectra"]["sigma_max"],
            "a_field_we_never_wrote": 1,
        }

    resumed, notices = _resume(tmp_path, _edit_gradhealth_state(checkpoint, as_format_0))
    assert resumed.monitor.clip_steps == 6
    assert [step for step, _ in resumed.timestep_history["rnn.l0"]] == [0, 1, 3, 4, 5]
    assert resumed.monitor.spectrum_tracker.start_summaries["rnn.l0"] == start
    assert resumed.health_report.layers[0].init == "orthogonal"
    assert len(notices) == 1 and "format 0" in notices[0]
    assert "timestep_history['gone.l0']" in notices[0] and "a_field_we_never_wrote" in notices[0]


def test_a_resume_from_a_current_checkpoint_says_nothing(tmp_path: Path):
    _, checkpoint = _fit(tmp_path, "first", max_steps=3)
    resumed, notices = _resume(tmp_path, checkpoint)
    assert notices == [] and resumed.monitor.clip_steps == 6


@pytest.mark.parametrize(
    "state",
    [
        {"format": 1, "spectra": None, "gradients": 7, 3: "a key that is not a string"},
        {"format": 1, "init_schemes": [{"key": "rnn.l0", "scheme": "x"}], "timesteps": {"history": [{"key": None}]}},
        {"format": 1, "gradients": {"clip_steps": float("inf"), "clip_windows": {"": [5, -1]}, "clip_suggester": {"count": 1}}},
        {"format": 2, "spectra": {"start": [{"key": {"module": "rnn", "layer": 0, "reverse": False, "state": "x"}}]}},
        {"timestep_history": 5, "spectra_start": {"rnn.l0": {"step": "zero"}}, "clip_steps": -2},
    ],
)
def test_a_malformed_state_never_fails_the_resume_and_is_named_once(state: dict[str, Any]):
    notices: list[str] = []
    monitor = GradHealthMonitor(log_every_n_steps=1, warn=notices.append)
    monitor.load_state_dict(state)
    monitor.attach(nn.Sequential(nn.LSTM(3, 4)), start_step=None)
    assert len(notices) == 1 and "restored what it could" in notices[0]
    assert (monitor.clip_steps, monitor.timestep_history, monitor.clip_suggester.state_dict()["count"]) == (0, {}, 0)
    monitor.detach()
