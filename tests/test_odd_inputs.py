"""Odd batches, graphs and models are measured, or named with the true reason, never silently
dropped: an empty batch, reentrant activation checkpointing, a sequence long enough for float32 to
underflow, a single step, an LSTM with ``proj_size``, a float64 model, and a module saved with
``torch.save`` during fit. Each case in a real fit, against the unrolled autograd reference where
there is something to measure."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

import pytest
import pytorch_lightning
import torch
from pytorch_lightning.loggers import Logger
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from conftest import PLSequenceModel, trainer_kwargs
from lightning_gradhealth import GradHealth
from lightning_gradhealth.config import MonitorConfig
from lightning_gradhealth.health import layer_verdict, summarize_timesteps
from lightning_gradhealth.keys import LayerKey
from lightning_gradhealth.probe import TimestepProbe
from lightning_gradhealth.trackers import Notices, TimestepTracker
from reference_rnn import reference_norms, unrolled

TESTS = Path(__file__).parent
Batch = tuple[Tensor, Tensor]


class RecordingLogger(Logger):
    """A Lightning logger that keeps every scalar it is sent."""

    def __init__(self) -> None:
        super().__init__()
        self.scalars: list[tuple[str, float]] = []

    @property
    def name(self) -> str:
        return "recording"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: Optional[int] = None) -> None:
        self.scalars += list(metrics.items())

    def nonfinite(self) -> list[tuple[str, float]]:
        return [(tag, value) for tag, value in self.scalars if tag.startswith("gradhealth/") and not math.isfinite(value)]


class BatchesAndWeights(pytorch_lightning.Callback):
    """Each training batch and the weights it runs with (``state_dict`` copies)."""

    def __init__(self) -> None:
        self.seen: list[tuple[Batch, dict[str, Tensor]]] = []

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        state = {name: value.detach().clone() for name, value in pl_module.state_dict().items()}
        self.seen.append(((batch[0].clone(), batch[1].clone()), state))


def fit(model: nn.Module, health: GradHealth, *callbacks: Any, **overrides: Any) -> tuple[RecordingLogger, list[str]]:
    """A real fit; the scalars sent to a logger and GradHealth's warnings."""
    logger = RecordingLogger()
    trainer = pytorch_lightning.Trainer(callbacks=[health, *callbacks], **trainer_kwargs(logger=logger, **overrides))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model)
    notices = [str(w.message) for w in caught if str(w.message).startswith("GradHealth") and "TensorBoard" not in str(w.message)]
    return logger, notices


def reference(
    model: nn.Module, layer: nn.Module, batch: Batch, inputs: Callable[[Tensor], Tensor] = nn.Identity()
) -> dict[str, Tensor]:
    """||dL/dh_t|| of ``layer`` (named ``rnn``) from the hand-unrolled reference, for the conftest
    model's loss on ``batch``: ``layer`` over ``inputs(x)`` from zero states, its last state
    through ``model.head``, MSE. A cell is keyed by its own name, a fused layer by ``rnn.l0``."""
    x, y = batch
    is_cell = isinstance(layer, nn.RNNCellBase)
    cell_type = "lstm" if isinstance(layer, (nn.LSTM, nn.LSTMCell)) else "gru"
    width = getattr(layer, "proj_size", 0) or layer.hidden_size
    zeros = torch.zeros(getattr(layer, "num_layers", 1), x.shape[0], width, dtype=x.dtype)
    cells = torch.zeros(1, x.shape[0], layer.hidden_size, dtype=x.dtype) if cell_type == "lstm" else None
    output, _, _, states, cell_states = unrolled(layer, cell_type, inputs(x).transpose(0, 1), zeros, cells)
    nn.functional.mse_loss(model.head(output[-1]), y).backward()
    name = "rnn" if is_cell else "rnn.l0"
    norms = {name: reference_norms(states["l0"])}
    if cell_states["l0"][0] is not None:
        norms[name + ".cell"] = reference_norms(cell_states["l0"])
    return norms


def assert_norms_equal(measured: dict[str, Tensor], expected: dict[str, Tensor], rtol: float = 1e-5) -> None:
    assert set(measured) == set(expected)
    for key, values in expected.items():
        torch.testing.assert_close(measured[key], values, rtol=rtol, atol=0, msg=key)


# ----------------------------------------------------------------------------------------------
# an empty batch


class EmptyBatchAt(PLSequenceModel):
    """The conftest model, whose training batches ``empty_at`` hold no sequence (B = 0)."""

    def __init__(self, empty_at: set[int], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.empty_at = empty_at

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        x, y = batch
        if batch_idx in self.empty_at:
            return (self(x[:0]) - y[:0]).pow(2).sum()
        return super().training_step(batch, batch_idx)


def test_an_empty_batch_is_skipped_and_named_once_and_later_steps_are_measured_exactly():
    torch.manual_seed(0)
    model, health, batches = EmptyBatchAt({1, 2}), GradHealth(log_every_n_steps=1), BatchesAndWeights()
    _, notices = fit(model, health, batches, max_steps=4)
    assert [step for step, _ in health.timestep_history["rnn.l0"]] == [0, 3]
    assert len([notice for notice in notices if "empty batch" in notice]) == 1
    assert not [notice for notice in notices if "cannot measure" in notice]
    batch, state = batches.seen[3]
    model.load_state_dict(state)
    assert_norms_equal(health.timestep_grad_norms, reference(model, model.rnn, batch))
    assert health.health_report.layers[0].verdict != "unmeasured"


def test_a_layer_skipped_in_the_latest_step_is_unmeasured_for_the_true_reason():
    torch.manual_seed(0)
    lstm, cell = nn.LSTM(3, 4), nn.GRUCell(3, 4)
    probe = TimestepProbe(nn.ModuleDict({"rnn": lstm, "cell": cell}))
    probe.attach()
    probe.arm()
    output, _ = lstm(torch.randn(5, 0, 3))
    h = cell(torch.randn(0, 3))
    probe.disarm()
    (output.sum() + h.sum()).backward()
    result = probe.compute()
    probe.detach()
    assert result.norms == {}
    assert set(result.unmeasured) == {LayerKey("rnn", 0), LayerKey("cell")}
    assert all("empty batch" in reason for reason in result.unmeasured.values())
    tracker = TimestepTracker(MonitorConfig(), Notices())
    tracker.update(result, step=7)
    verdict, reason = layer_verdict(None, unmeasured_reason=tracker.unmeasured[LayerKey("rnn", 0)])
    assert verdict == "unmeasured" and "empty batch" in reason and "timesteps=False" not in reason


# ----------------------------------------------------------------------------------------------
# reentrant activation checkpointing


class ReentrantLSTM(PLSequenceModel):
    """An input projection, then the LSTM inside ``checkpoint(..., use_reentrant=True)``."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(3, 3)

    def forward(self, x: Tensor) -> Tensor:
        out = checkpoint(lambda inputs: self.rnn(inputs)[0], self.embed(x), use_reentrant=True)
        return self.head(out[:, -1])


class ReentrantCellChunks(PLSequenceModel):
    """An input projection, then a ``GRUCell`` loop in chunks of two steps, each chunk inside
    ``checkpoint(..., use_reentrant=True)``: backward recomputes the chunks last to first."""

    def __init__(self) -> None:
        super().__init__(build=lambda: nn.GRUCell(3, 8))
        self.embed = nn.Linear(3, 3)

    def chunk(self, h: Tensor, inputs: Tensor) -> Tensor:
        for t in range(inputs.shape[1]):
            h = self.rnn(inputs[:, t], h)
        return h

    def forward(self, x: Tensor) -> Tensor:
        inputs, h = self.embed(x), x.new_zeros(x.shape[0], 8)
        for start in range(0, inputs.shape[1], 2):
            h = checkpoint(self.chunk, h, inputs[:, start : start + 2], use_reentrant=True)
        return self.head(h)


@pytest.mark.parametrize("model_class", [ReentrantLSTM, ReentrantCellChunks])
def test_reentrant_activation_checkpointing_is_measured_exactly_in_forward_order(model_class: type):
    torch.manual_seed(0)
    model, health, batches = model_class(), GradHealth(log_every_n_steps=2), BatchesAndWeights()
    _, notices = fit(model, health, batches, max_steps=3)
    assert notices == []
    assert [step for step, _ in health.timestep_history[sorted(health.timestep_grad_norms)[0]]] == [0, 2]
    batch, state = batches.seen[2]
    model.load_state_dict(state)
    assert_norms_equal(health.timestep_grad_norms, reference(model, model.rnn, batch, model.embed))


def test_a_reentrant_recomputation_in_a_later_micro_batch_is_not_mistaken_for_the_armed_one():
    torch.manual_seed(0)
    lstm, embed, head = nn.LSTM(3, 4), nn.Linear(3, 3), nn.Linear(4, 1)
    probe = TimestepProbe(nn.ModuleDict({"rnn": lstm}))
    probe.attach()
    batches = [torch.randn(6, 2, 3) for _ in range(2)]

    def loss(x: Tensor) -> Tensor:
        return head(checkpoint(lambda inputs: lstm(inputs)[0], embed(x), use_reentrant=True)[-1]).sum()

    probe.arm()
    first = loss(batches[0])
    probe.disarm()
    first.backward()
    loss(batches[1]).backward()  # a second micro-batch: its recomputation runs after the armed one's
    measured = probe.compute().norms_by_name
    probe.detach()
    output, _, _, states, cells = unrolled(lstm, "lstm", embed(batches[0]), torch.zeros(1, 2, 4), torch.zeros(1, 2, 4))
    head(output[-1]).sum().backward()
    expected = {"rnn.l0": reference_norms(states["l0"]), "rnn.l0.cell": reference_norms(cells["l0"])}
    assert_norms_equal(measured, expected)


# ----------------------------------------------------------------------------------------------
# a sequence long enough for float32 to underflow; a single step


def test_an_underflowing_gradient_is_vanishing_below_a_finite_bound_that_float64_confirms():
    torch.manual_seed(0)
    model = PLSequenceModel(build=lambda: nn.RNN(3, 8, batch_first=True), seq_len=5000)
    health, batches = GradHealth(init="uniform", log_every_n_steps=1), BatchesAndWeights()
    logger, notices = fit(model, health, batches, max_steps=1)
    assert logger.nonfinite() == []
    norms = health.timestep_grad_norms["rnn.l0"]
    summary = health.timestep_summaries["rnn.l0"]
    floor = torch.finfo(torch.float32).tiny
    assert norms.dtype == torch.float32 and norms[0] == 0 and summary.underflow_steps > 0
    assert bool((norms[: summary.underflow_steps] < floor).all()) and norms[summary.underflow_steps] >= floor
    assert summary.transmission == math.log10(floor / summary.last_norm)
    assert ("gradhealth/rnn.l0/1_transmission", summary.transmission) in logger.scalars
    (layer,) = health.health_report.layers
    assert layer.verdict == "vanishing" and f"below 10^{summary.transmission:+.1f}" in layer.reason
    assert f"<{summary.transmission:+.2f}" in health.health_report.format()
    assert len([notice for notice in notices if "underflows" in notice and "a bound" in notice]) == 1
    # the bound is true: in float64 the same steps are below float32's smallest normal number
    (batch, state), = batches.seen
    double = PLSequenceModel(build=lambda: nn.RNN(3, 8, batch_first=True), seq_len=5000).double()
    double.load_state_dict(state)
    x, y = batch[0].double(), batch[1].double()
    h0 = torch.zeros(1, x.shape[0], 8, dtype=x.dtype)
    output, _, _, states, _ = unrolled(double.rnn, "rnn_tanh", x.transpose(0, 1), h0, None)
    nn.functional.mse_loss(double.head(output[-1]), y).backward()
    assert bool((reference_norms(states["l0"])[: summary.underflow_steps] < floor).all())


def test_a_single_step_has_no_rate_and_logs_no_nan():
    torch.manual_seed(0)
    health = GradHealth(log_every_n_steps=1)
    logger, _ = fit(PLSequenceModel(seq_len=1), health, max_steps=2)
    assert logger.nonfinite() == []
    assert not [tag for tag, _ in logger.scalars if tag.endswith("rate_per_step")]
    report = health.health_report.format()
    assert "one step: no rate" in report and "nan" not in report


def test_summaries_never_hold_infinite_transmission_and_say_when_it_is_a_bound():
    underflowed = summarize_timesteps(torch.tensor([0.0, 1e-40, 1e-30, 1.0]))  # float32: 1e-40 is subnormal
    assert underflowed.underflow_steps == 2 and underflowed.transmission_is_bound
    assert underflowed.transmission == pytest.approx(math.log10(torch.finfo(torch.float32).tiny))
    assert math.log10(underflowed.rate_per_step) == pytest.approx(-30.0)  # fitted over the resolved steps only
    double = summarize_timesteps(torch.tensor([1e-40, 1.0], dtype=torch.float64))
    assert double.underflow_steps == 0 and double.transmission == pytest.approx(-40.0)
    single = summarize_timesteps(torch.tensor([2.0]))
    assert single.transmission == 0.0 and math.isnan(single.rate_per_step)
    assert "one step: no rate" in layer_verdict(single)[1]


# ----------------------------------------------------------------------------------------------
# an LSTM with proj_size; a float64 model


def test_an_lstm_with_proj_size_says_its_blocks_have_no_radius_and_logs_no_nan():
    torch.manual_seed(0)
    health = GradHealth(log_every_n_steps=1, full_every_n_steps=1)
    model = PLSequenceModel(build=lambda: nn.LSTM(3, 8, proj_size=4, batch_first=True), output_width=4)
    logger, _ = fit(model, health, max_steps=2)
    assert logger.nonfinite() == []
    assert [tag for tag, _ in logger.scalars if tag == "gradhealth/rnn.l0/5_sigma_max/i"]
    report = health.health_report.format()
    assert "n/a (non-square)" in report and "nan" not in report


def test_a_float64_model_is_measured_in_float64():
    torch.manual_seed(0)
    model, health, batches = PLSequenceModel(), GradHealth(log_every_n_steps=1, full_every_n_steps=1), BatchesAndWeights()
    fit(model, health, batches, max_steps=2, precision="64-true")
    assert {norms.dtype for norms in health.timestep_grad_norms.values()} == {torch.float64}
    assert {spectrum.sigma_max.dtype for spectrum in health.spectra.values()} == {torch.float64}
    batch, state = batches.seen[1]
    model.load_state_dict(state)
    batch = (batch[0].double(), batch[1].double())
    assert_norms_equal(health.timestep_grad_norms, reference(model, model.rnn, batch), rtol=1e-12)


# ----------------------------------------------------------------------------------------------
# torch.save of the module during fit


USER_HOOKS = """
class UserHook:
    \"\"\"A picklable forward hook of the user's own, which counts its calls.\"\"\"

    def __init__(self):
        self.calls = 0

    def __call__(self, module, args, output):
        self.calls += 1
"""
"""A module of the user's own (written to the test's directory): the snapshots hold its hook."""


class SnapshotsAndHooks(pytorch_lightning.Callback):
    """A user's snapshot callback: ``torch.save(pl_module)`` after the backward pass of step 0 (the
    probe's captures live) and at the end of step 1; it also registers a hook of its own on the
    LSTM at train start and removes it through its handle after step 0."""

    def __init__(self, directory: Path, hook: Any) -> None:
        self.directory, self.hook, self.handle = directory, hook, None

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self.handle = pl_module.rnn.register_forward_hook(self.hook)

    def on_after_backward(self, trainer: Any, pl_module: Any) -> None:
        if trainer.global_step == 0:
            torch.save(pl_module, self.directory / "during_step.pt")

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if batch_idx == 0:
            self.handle.remove()
        if batch_idx == 1:
            torch.save(pl_module, self.directory / "between_steps.pt")


LOAD_SNAPSHOTS = """
import sys
import torch
sys.path.insert(0, {tests!r})  # the model's class

HOOK_DICTS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
              "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks")

def check(path):
    model = torch.load(path, weights_only=False)
    for name, module in model.named_modules():
        assert "__getstate__" not in vars(module), name
        for attr in HOOK_DICTS:
            for hook in getattr(module, attr).values():
                assert not type(hook).__module__.startswith("lightning_gradhealth"), (name, attr, hook)
    assert [type(h).__name__ for h in model.rnn._forward_hooks.values()] == {expected!r}[path.split("/")[-1]]
    assert model(torch.randn(2, 6, 3)).shape == (2, 1)

sys.modules["lightning_gradhealth"] = None  # the package cannot be imported
for path in {paths!r}:
    check(path)
del sys.modules["lightning_gradhealth"]
import lightning_gradhealth  # and with it importable, nothing of it comes back either
for path in {paths!r}:
    check(path)
print("loaded")
"""


def test_a_module_saved_during_fit_holds_nothing_of_gradhealth_and_loads_without_it(tmp_path: Path):
    (tmp_path / "user_hooks.py").write_text(USER_HOOKS)
    sys.path.insert(0, str(tmp_path))
    try:
        from user_hooks import UserHook
    finally:
        sys.path.remove(str(tmp_path))
    torch.manual_seed(0)
    model, health, snapshots = PLSequenceModel(), GradHealth(log_every_n_steps=1), SnapshotsAndHooks(tmp_path, UserHook())
    fit(model, health, snapshots, max_steps=3)
    assert snapshots.hook.calls == 1  # removed through its own handle after step 0
    assert [step for step, _ in health.timestep_history["rnn.l0"]] == [0, 1, 2]
    paths = [str(tmp_path / "during_step.pt"), str(tmp_path / "between_steps.pt")]
    for path in paths:
        assert b"lightning_gradhealth" not in Path(path).read_bytes()
    expected = {"during_step.pt": ["UserHook"], "between_steps.pt": []}
    script = textwrap.dedent(LOAD_SNAPSHOTS).format(tests=str(TESTS), paths=paths, expected=expected)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS.parent), os.environ.get("PYTHONPATH", "")]))}
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env)
    assert run.returncode == 0 and "loaded" in run.stdout, run.stderr[-3000:]
