"""GradHealth applying init in real Lightning fits: once, at the start of fit, never on resume."""

from __future__ import annotations

import logging
import warnings

import lightning.pytorch as lightning_pytorch
import numpy as np
import pytest
import pytorch_lightning
import torch
from torch import nn

from conftest import LSequenceModel, PLSequenceModel, trainer_kwargs, weights
from lightning_gradhealth import GradHealth


class WeightsAtTrainStart(pytorch_lightning.Callback):
    """Records the weights right before the first training batch (after every on_fit_start)."""

    def __init__(self) -> None:
        self.snapshots: list[dict[str, torch.Tensor]] = []

    def on_train_start(self, trainer, pl_module) -> None:
        self.snapshots.append(weights(pl_module))


def _assert_orthogonal_gates(lstm: nn.LSTM) -> None:
    for block in np.split(lstm.weight_hh_l0.detach().double().numpy(), 4):
        np.testing.assert_allclose(block @ block.T, np.eye(block.shape[0]), atol=1e-5)


@pytest.mark.parametrize("namespace", ["pytorch_lightning", "lightning.pytorch"])
def test_init_runs_at_fit_start_in_both_lightning_namespaces(namespace, seeded):
    trainer_class, model_class = {
        "pytorch_lightning": (pytorch_lightning.Trainer, PLSequenceModel),
        "lightning.pytorch": (lightning_pytorch.Trainer, LSequenceModel),
    }[namespace]
    assert isinstance(GradHealth(), (pytorch_lightning.Callback, lightning_pytorch.Callback))
    model, recorder = model_class(), WeightsAtTrainStart()
    callback = GradHealth(init="orthogonal", forget_bias=1.5)
    trainer_class(callbacks=[callback, recorder], **trainer_kwargs()).fit(model)

    start = recorder.snapshots[0]
    for block in np.split(start["rnn.weight_hh_l0"].double().numpy(), 4):
        np.testing.assert_allclose(block @ block.T, np.eye(8), atol=1e-5)
    assert torch.equal((start["rnn.bias_ih_l0"] + start["rnn.bias_hh_l0"])[8:16], torch.full((8,), 1.5))
    assert callback.init_applied
    assert {r.parameter for r in callback.init_report} == {
        "rnn.weight_ih_l0", "rnn.weight_hh_l0", "rnn.bias_ih_l0", "rnn.bias_hh_l0"
    }
    # the head is a plain nn.Linear: untouched without linear_init
    assert not torch.equal(start["head.bias"], torch.zeros(1))


def test_no_arguments_changes_no_weight(seeded):
    model, recorder = PLSequenceModel(), WeightsAtTrainStart()
    before = weights(model)
    pytorch_lightning.Trainer(callbacks=[GradHealth(), recorder], **trainer_kwargs()).fit(model)
    assert all(torch.equal(before[name], value) for name, value in recorder.snapshots[0].items())


class BuiltInConfigureModel(PLSequenceModel):
    def __init__(self) -> None:
        super().__init__(build=lambda: nn.Identity())

    def configure_model(self) -> None:
        if isinstance(self.rnn, nn.Identity):
            self.rnn = nn.GRU(3, 8, batch_first=True)


def test_layers_created_in_configure_model_are_initialized(seeded):
    model, recorder = BuiltInConfigureModel(), WeightsAtTrainStart()
    callback = GradHealth(init="identity")
    pytorch_lightning.Trainer(callbacks=[callback, recorder], **trainer_kwargs()).fit(model)
    assert torch.equal(recorder.snapshots[0]["rnn.weight_hh_l0"], torch.eye(8).repeat(3, 1))
    assert {r.layer_key for r in callback.recurrent_weights} == {"rnn.l0"}


def test_second_fit_does_not_initialize_again(seeded):
    model, recorder = PLSequenceModel(), WeightsAtTrainStart()
    callback = GradHealth(init="orthogonal")
    pytorch_lightning.Trainer(callbacks=[callback, recorder], **trainer_kwargs()).fit(model)
    after_first_fit = weights(model)
    assert not torch.equal(after_first_fit["rnn.weight_hh_l0"], recorder.snapshots[0]["rnn.weight_hh_l0"])
    pytorch_lightning.Trainer(callbacks=[callback, recorder], **trainer_kwargs(max_steps=2)).fit(model)
    assert all(torch.equal(after_first_fit[name], value) for name, value in recorder.snapshots[1].items())


def test_the_same_callback_initializes_a_new_model_in_a_later_fit(seeded):
    callback = GradHealth(init="identity")
    pytorch_lightning.Trainer(callbacks=[callback], **trainer_kwargs()).fit(PLSequenceModel())
    model, recorder = PLSequenceModel(build=lambda: nn.GRU(3, 8, batch_first=True)), WeightsAtTrainStart()
    pytorch_lightning.Trainer(callbacks=[callback, recorder], **trainer_kwargs()).fit(model)
    assert torch.equal(recorder.snapshots[0]["rnn.weight_hh_l0"], torch.eye(8).repeat(3, 1))


def test_parametrized_recurrent_weights_are_left_out_with_one_warning(seeded):
    from torch.nn.utils import parametrizations

    model = PLSequenceModel()
    parametrizations.orthogonal(model.rnn, "weight_hh_l0")
    health = GradHealth(init="identity", log_every_n_steps=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pytorch_lightning.Trainer(callbacks=[health], **trainer_kwargs()).fit(model)
    assert sum("leaves out the parametrized weights rnn.weight_hh_l0" in str(w.message) for w in caught) == 1
    assert "rnn.weight_hh_l0" not in {r.parameter for r in health.init_report}
    assert health.timestep_grad_norms["rnn.l0"].shape == (6,)


@pytest.mark.parametrize("saved_with_gradhealth", [True, False])
def test_resume_from_checkpoint_keeps_the_checkpoints_weights_bit_for_bit(tmp_path, saved_with_gradhealth, seeded):
    first_callbacks = [GradHealth(init="orthogonal")] if saved_with_gradhealth else []
    trainer = pytorch_lightning.Trainer(callbacks=first_callbacks, **trainer_kwargs(max_steps=4))
    trainer.fit(PLSequenceModel())
    checkpoint_path = tmp_path / "run.ckpt"
    trainer.save_checkpoint(checkpoint_path)
    saved = torch.load(checkpoint_path, weights_only=False)
    assert ("GradHealth" in saved["callbacks"]) == saved_with_gradhealth

    recorder, callback = WeightsAtTrainStart(), GradHealth(init="orthogonal")
    resumed = pytorch_lightning.Trainer(callbacks=[callback, recorder], **trainer_kwargs(max_steps=6))
    model = PLSequenceModel()
    resumed.fit(model, ckpt_path=checkpoint_path)
    trained = weights(model)
    # a later fit of the resumed model (more steps) goes on from its trained weights: no init
    pytorch_lightning.Trainer(callbacks=[callback, recorder], **trainer_kwargs(max_steps=2)).fit(model)
    assert all(torch.equal(recorder.snapshots[-1][name], value) for name, value in trained.items())

    restored = recorder.snapshots[0]
    assert restored.keys() == saved["state_dict"].keys()
    for name, value in saved["state_dict"].items():
        assert torch.equal(restored[name], value), name
    assert callback.init_report == []
    assert resumed.global_step == 6


def test_same_seed_gives_the_same_initial_weights_across_runs():
    snapshots = []
    for model_seed in (1, 2):
        torch.manual_seed(model_seed)  # different framework init and global RNG state
        recorder = WeightsAtTrainStart()
        pytorch_lightning.Trainer(
            callbacks=[GradHealth(init="orthogonal", seed=11), recorder], **trainer_kwargs(max_steps=1)
        ).fit(PLSequenceModel())
        snapshots.append(recorder.snapshots[0])
    for name in ("rnn.weight_hh_l0", "rnn.weight_ih_l0", "rnn.bias_ih_l0"):
        assert torch.equal(snapshots[0][name], snapshots[1][name])


def test_default_seed_follows_seed_everything(monkeypatch):
    monkeypatch.setenv("PL_GLOBAL_SEED", "0")  # seed_everything sets it; restored after the test
    snapshots = []
    for _ in range(2):
        pytorch_lightning.seed_everything(3, verbose=False)
        recorder = WeightsAtTrainStart()
        pytorch_lightning.Trainer(
            callbacks=[GradHealth(init="glorot"), recorder], **trainer_kwargs(max_steps=1)
        ).fit(PLSequenceModel())
        snapshots.append(recorder.snapshots[0])
    assert all(torch.equal(snapshots[0][name], snapshots[1][name]) for name in snapshots[0])


def test_the_init_table_is_printed_once_and_kept_on_the_callback(caplog, seeded):
    # Lightning's console handler sits on the "pytorch_lightning" logger, which may not propagate
    lightning_logger = logging.getLogger("pytorch_lightning")
    lightning_logger.addHandler(caplog.handler)
    callback = GradHealth(init="orthogonal", chrono_t_max=50)
    try:
        pytorch_lightning.Trainer(callbacks=[callback], **trainer_kwargs()).fit(PLSequenceModel())
    finally:
        lightning_logger.removeHandler(caplog.handler)
    printed = caplog.text
    assert printed.count("GradHealth: initialized 4 parameters of 1 layers") == 1
    assert "rnn.l0  weight_hh_l0  recurrent  i,f,g,o  orthogonal" in printed
    assert "rnn.l0  bias_ih_l0    bias       i,f,g,o  chrono T_max=50" in printed
    assert [r.role for r in callback.init_report] == ["input", "recurrent", "bias", "bias"]


class FeedForward(PLSequenceModel):
    def __init__(self) -> None:
        super().__init__(build=lambda: nn.Sequential(nn.Flatten(), nn.Linear(18, 8)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(x))


def test_model_without_recurrent_layer_gets_one_warning_and_trains_untouched(seeded):
    model, recorder = FeedForward(), WeightsAtTrainStart()
    before = weights(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = pytorch_lightning.Trainer(callbacks=[GradHealth(init="orthogonal"), recorder], **trainer_kwargs())
        trainer.fit(model)
    ours = [w for w in caught if "GradHealth found no recurrent layer" in str(w.message)]
    assert len(ours) == 1 and "FeedForward" in str(ours[0].message)
    assert trainer.global_step == 3
    assert all(torch.equal(before[name], value) for name, value in recorder.snapshots[0].items())


def test_a_pattern_that_matches_nothing_stops_before_any_step_and_leaves_weights_alone(seeded):
    model = PLSequenceModel()
    before = weights(model)
    trainer = pytorch_lightning.Trainer(callbacks=[GradHealth(init="orthogonal", exclude=["encoder"])], **trainer_kwargs())
    with pytest.raises(ValueError, match="exclude pattern 'encoder' matches no module"):
        trainer.fit(model)
    assert trainer.global_step == 0
    assert all(torch.equal(before[name], value) for name, value in weights(model).items())


@pytest.mark.parametrize(
    "arguments, message",
    [
        ({"init": "orthogonl"}, "Did you mean 'orthogonal'?"),
        ({"init": "orthogonal", "gain": -2.0}, "gain must be a finite number > 0"),
        ({"init": "orthogonal", "custom": {"cell.W_hh": 0}}, "gate count must be an integer >= 1"),
        ({"init": "orthogonal", "seed": -1}, "seed must be None or an integer"),
    ],
)
def test_bad_arguments_fail_at_construction(arguments, message):
    with pytest.raises(ValueError, match=message.replace("?", r"\?").replace(">", ".")):
        GradHealth(**arguments)


def test_a_resumed_run_continues_the_heatmap_counters_and_warm_starts(tmp_path, seeded):
    first = GradHealth(init="orthogonal", log_every_n_steps=2)
    trainer = pytorch_lightning.Trainer(callbacks=[first], **trainer_kwargs(max_steps=4))
    trainer.fit(PLSequenceModel())
    checkpoint_path = tmp_path / "run.ckpt"
    trainer.save_checkpoint(checkpoint_path)

    resumed = GradHealth(init="orthogonal", log_every_n_steps=2)
    pytorch_lightning.Trainer(callbacks=[resumed], **trainer_kwargs(max_steps=7)).fit(
        PLSequenceModel(), ckpt_path=checkpoint_path
    )
    assert [step for step, _ in resumed.timestep_history["rnn.l0"]] == [0, 2, 4, 6]
    saved = torch.load(checkpoint_path, weights_only=False)["callbacks"]["GradHealth"]
    for before, after in zip(first.timestep_history["rnn.l0"], resumed.timestep_history["rnn.l0"][:2]):
        assert before[0] == after[0] and (before[1] == after[1]).all()
    assert set(saved["spectra"]["sigma_max"]) == {"rnn.weight_hh_l0"}
    assert saved["gradients"]["clip_suggester"]["count"] == 2  # steps 0 and 2 were logged without clipping
    assert resumed.clip_suggester.state_dict()["count"] == 4  # ... and the resumed run adds 4 and 6
