"""Clipping and non-finite gradient handling inside real Lightning fits."""

from __future__ import annotations

import copy
import csv
import warnings

import numpy as np
import pytest
import pytorch_lightning
import torch
from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.plugins.precision import MixedPrecision
from torch import nn

from conftest import PLManualSequenceModel, PLSequenceModel, trainer_kwargs
from lightning_gradhealth import GradHealth, NonFiniteGradientError


class GradsBeforeStep(pytorch_lightning.Callback):
    """Copies every gradient in on_before_optimizer_step (placed before or after GradHealth)."""

    def __init__(self) -> None:
        self.grads: list[dict[str, torch.Tensor]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.grads.append({n: p.grad.clone() for n, p in pl_module.named_parameters() if p.grad is not None})


@pytest.mark.parametrize("clip, clip_val", [("norm", 0.05), ("value", 0.01)])
def test_clipping_with_accumulation_applies_once_per_window_as_torchs_reference(clip, clip_val):
    torch.manual_seed(0)
    before, after = GradsBeforeStep(), GradsBeforeStep()
    health = GradHealth(clip=clip, clip_val=clip_val)
    trainer = pytorch_lightning.Trainer(
        callbacks=[before, health, after], **trainer_kwargs(max_steps=3, accumulate_grad_batches=4)
    )
    trainer.fit(PLSequenceModel())
    assert len(before.grads) == len(after.grads) == 3  # once per window of 4 micro-batches
    for unclipped, clipped in zip(before.grads, after.grads):
        reference = {name: torch.nn.Parameter(torch.zeros_like(g)) for name, g in unclipped.items()}
        for name, param in reference.items():
            param.grad = unclipped[name].clone()
        if clip == "norm":
            torch.nn.utils.clip_grad_norm_(reference.values(), clip_val)
        else:
            torch.nn.utils.clip_grad_value_(reference.values(), clip_val)
        for name, param in reference.items():
            torch.testing.assert_close(clipped[name], param.grad, rtol=1e-6, atol=1e-9, msg=name)
    assert any(not torch.equal(before.grads[0][n], after.grads[0][n]) for n in before.grads[0])


def test_logged_norms_tell_the_truth_before_and_after_clipping(tmp_path):
    torch.manual_seed(0)
    before = GradsBeforeStep()
    health = GradHealth(clip="norm", clip_val=0.05, log_every_n_steps=1)
    logger = CSVLogger(tmp_path, name="run")
    pytorch_lightning.Trainer(callbacks=[before, health], **trainer_kwargs(max_steps=3, logger=logger)).fit(PLSequenceModel())
    logger.save()
    rows = [row for row in csv.DictReader(open(logger.experiment.metrics_file_path)) if row.get("gradhealth/grad_norm/total")]
    assert [int(row["step"]) for row in rows] == [0, 1, 2]
    for row, grads in zip(rows, before.grads):
        true_norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads.values()])).item()
        assert float(row["gradhealth/grad_norm/total"]) == pytest.approx(true_norm, rel=1e-5)
        assert float(row["gradhealth/grad_norm/total_clipped"]) == pytest.approx(min(true_norm, 0.05), rel=1e-4)
        assert float(row["gradhealth/clip/clipped_steps_fraction"]) == (1.0 if true_norm > 0.05 else 0.0)
        layer = torch.linalg.vector_norm(torch.stack([g.norm() for n, g in grads.items() if n.startswith("rnn.")]))
        assert float(row["gradhealth/rnn.l0/weight_grad_norm"]) == pytest.approx(layer.item(), rel=1e-5)


def test_logged_norm_under_16_mixed_is_the_unscaled_norm():
    """A real GradScaler (init scale 2**12) on CPU: the logged norm is the true, unscaled one."""
    norms = []
    for plugins in ([], [MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=4096.0))]):
        torch.manual_seed(0)
        health = GradHealth(clip="norm", clip_val=100.0)
        pytorch_lightning.Trainer(callbacks=[health], plugins=plugins, **trainer_kwargs(max_steps=1)).fit(
            PLSequenceModel(build=lambda: nn.GRU(3, 8, batch_first=True))
        )
        norms.append(health.latest_clip_stats.norm_before.item())
    assert norms[1] == pytest.approx(norms[0], rel=2e-2)  # fp16 forward vs fp32, same scale of magnitude
    assert norms[1] < 100


def test_trainer_clipping_and_gradhealth_clipping_together_fail_at_fit_start_and_name_the_fix():
    model = PLSequenceModel()
    before = copy.deepcopy(model.state_dict())
    trainer = pytorch_lightning.Trainer(
        callbacks=[GradHealth(clip="norm", clip_val=1.0)], **trainer_kwargs(gradient_clip_val=0.5)
    )
    with pytest.raises(ValueError, match=r"Remove one: Trainer\(gradient_clip_val=None\), or GradHealth\(clip=None\)"):
        trainer.fit(model)
    assert trainer.global_step == 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_trainer_clipping_alone_is_left_to_the_trainer_and_logged_before_it_clips(tmp_path):
    torch.manual_seed(0)
    before, after = GradsBeforeStep(), GradsBeforeStep()
    health, logger = GradHealth(log_every_n_steps=1), CSVLogger(tmp_path, name="run")
    pytorch_lightning.Trainer(
        callbacks=[before, health, after], **trainer_kwargs(max_steps=2, gradient_clip_val=1e-3, logger=logger)
    ).fit(PLSequenceModel())
    logger.save()
    # GradHealth does not clip: the gradients it hands on are the ones it received
    assert all(torch.equal(before.grads[0][n], after.grads[0][n]) for n in before.grads[0])
    rows = [r for r in csv.DictReader(open(logger.experiment.metrics_file_path)) if r.get("gradhealth/grad_norm/total")]
    true_norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in before.grads[0].values()])).item()
    assert float(rows[0]["gradhealth/grad_norm/total"]) == pytest.approx(true_norm, rel=1e-5)
    assert true_norm > 1e-2  # well above the Trainer's threshold: the logged norm is the pre-clip one


@pytest.mark.parametrize("algorithm", ["norm", "value"])
def test_the_report_says_the_trainer_clips_at_its_value_and_how_often(algorithm):
    torch.manual_seed(0)
    before, health = GradsBeforeStep(), GradHealth()
    threshold = 0.4 if algorithm == "norm" else 0.35
    trainer_settings = trainer_kwargs(max_steps=8, gradient_clip_val=threshold, gradient_clip_algorithm=algorithm)
    pytorch_lightning.Trainer(callbacks=[before, health], **trainer_settings).fit(PLSequenceModel())
    # torch's own measures of each step's gradients, before the Trainer clipped them
    if algorithm == "norm":
        measures = [float(torch.nn.utils.get_total_norm(list(grads.values()))) for grads in before.grads]
    else:
        measures = [max(float(g.abs().max()) for g in grads.values()) for grads in before.grads]
    expected = sum(measure > threshold for measure in measures) / len(measures)
    assert 0 < expected < 1  # some steps clipped, some not
    report = health.health_report
    assert report.clipped_fraction == pytest.approx(expected)
    who = f"the Trainer (gradient_clip_val={threshold:g}, gradient_clip_algorithm={algorithm!r})"
    footer = f"clipping: by {who}, on {expected:.1%}"
    assert footer in report.format()


class NaNAtStep(PLSequenceModel):
    """Its loss becomes NaN at batch ``bad_batch``."""

    bad_batch = 2

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * float("nan") if batch_idx == self.bad_batch else loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.01, weight_decay=0.1)


class Snapshots(pytorch_lightning.Callback):
    """Weights and optimizer state at the start of each batch."""

    def __init__(self) -> None:
        self.states: list[tuple[dict, dict]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        optimizer = trainer.optimizers[0]
        self.states.append((copy.deepcopy(pl_module.state_dict()), copy.deepcopy(optimizer.state_dict())))


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def test_skip_leaves_weights_and_optimizer_state_bit_for_bit_and_training_goes_on():
    torch.manual_seed(0)
    snapshots, health = Snapshots(), GradHealth(on_nonfinite="skip")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = pytorch_lightning.Trainer(callbacks=[snapshots, health], **trainer_kwargs(max_steps=4))
        trainer.fit(NaNAtStep())
    (weights_before, optimizer_before), (weights_after, optimizer_after) = snapshots.states[2], snapshots.states[3]
    assert _same(weights_before, weights_after) and _same(optimizer_before, optimizer_after)
    assert not _same(snapshots.states[1][0], snapshots.states[2][0])  # normal steps do update
    assert health.skipped_steps == health.nonfinite_steps == 1
    assert all(torch.isfinite(p).all() for p in trainer.lightning_module.parameters())
    assert sum("skipped the optimizer step at step 2" in str(w.message) for w in caught) == 1


def test_raise_stops_before_the_step_and_names_parameters_and_step():
    torch.manual_seed(0)
    model = NaNAtStep()
    trainer = pytorch_lightning.Trainer(callbacks=[GradHealth(on_nonfinite="raise")], **trainer_kwargs(max_steps=4))
    with pytest.raises(NonFiniteGradientError, match=r"at step 2 in 6 parameters: rnn\.weight_ih_l0, rnn\.weight_hh_l0"):
        trainer.fit(model)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert not model.rnn._forward_hooks  # hooks removed on the exception


def test_warn_names_the_parameters_once_and_counts_every_step():
    torch.manual_seed(0)

    class NaNFromStep2(NaNAtStep):
        def training_step(self, batch, batch_idx):
            loss = PLSequenceModel.training_step(self, batch, batch_idx)
            return loss * float("nan") if batch_idx >= 2 else loss

    health = GradHealth(on_nonfinite="warn")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pytorch_lightning.Trainer(callbacks=[health], **trainer_kwargs(max_steps=4)).fit(NaNFromStep2())
    ours = [str(w.message) for w in caught if "non-finite gradients" in str(w.message)]
    assert len(ours) == 1 and "in 6 parameters by step 4: rnn.weight_ih_l0" in ours[0] and "head.weight and 1 more" in ours[0]
    assert health.nonfinite_steps == 2


def test_clipping_in_manual_optimization():
    torch.manual_seed(0)
    after, health = GradsBeforeStep(), GradHealth(clip="norm", clip_val=0.01)
    pytorch_lightning.Trainer(callbacks=[health, after], **trainer_kwargs(max_steps=2)).fit(
        PLManualSequenceModel(loss_multiplier=100)
    )
    for grads in after.grads:
        assert torch.linalg.vector_norm(torch.stack([g.norm() for g in grads.values()])).item() == pytest.approx(0.01, rel=1e-4)


class ClipsItself(PLManualSequenceModel):
    """Manual optimization that clips with Lightning's ``clip_gradients`` before each step, and
    keeps the true norm (before its clipping) of every step as the reference."""

    def __init__(self) -> None:
        super().__init__(loss_multiplier=10.0)
        self.true_norms: list[float] = []

    def training_step(self, batch, batch_idx) -> None:
        optimizer = self.optimizers()
        optimizer.zero_grad()
        x, y = batch
        self.manual_backward(nn.functional.mse_loss(self(x), y) * self.loss_multiplier)
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        self.true_norms.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))
        self.clip_gradients(optimizer, gradient_clip_val=0.25, gradient_clip_algorithm="norm")
        optimizer.step()


def test_manual_optimization_that_clips_itself_logs_the_true_norm_before_its_clipping(tmp_path):
    torch.manual_seed(0)
    model, logger = ClipsItself(), CSVLogger(tmp_path, name="run")
    health = GradHealth(log_every_n_steps=1)
    pytorch_lightning.Trainer(callbacks=[health], **trainer_kwargs(max_steps=3, logger=logger)).fit(model)
    logger.save()
    rows = [r for r in csv.DictReader(open(logger.experiment.metrics_file_path)) if r.get("gradhealth/grad_norm/total")]
    logged = [float(row["gradhealth/grad_norm/total"]) for row in rows]
    assert max(model.true_norms) > 0.25  # the model's own clipping did change the gradients
    assert logged == pytest.approx(model.true_norms, rel=1e-5)


class TruncatedBPTT(PLManualSequenceModel):
    """Truncated BPTT: each batch of 12 steps runs as 3 chunks of 4, each with its own backward,
    ``clip_gradients`` and optimizer step, the state carried over detached. Keeps the true norm
    (before its clipping) of the first chunk of every batch, by batch."""

    chunk, chunks = 4, 3

    def __init__(self) -> None:
        super().__init__(loss_multiplier=10.0, seq_len=12)
        self.first_chunk_norms: list[float] = []

    def training_step(self, batch, batch_idx) -> None:
        optimizer, (x, y), state = self.optimizers(), batch, None
        for index in range(self.chunks):
            out, state = self.rnn(x[:, index * self.chunk : (index + 1) * self.chunk], state)
            state = tuple(s.detach() for s in state)
            optimizer.zero_grad()
            self.manual_backward(nn.functional.mse_loss(self.head(out[:, -1]), y) * self.loss_multiplier)
            if index == 0:
                grads = [p.grad for p in self.parameters() if p.grad is not None]
                self.first_chunk_norms.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))
            self.clip_gradients(optimizer, gradient_clip_val=0.05, gradient_clip_algorithm="norm")
            optimizer.step()


def test_truncated_bptt_logs_at_lightnings_step_and_counts_every_optimizer_step(tmp_path):
    """Several optimizer steps per batch: GradHealth logs on Lightning's step axis (batches, as
    ``self.log`` does), the first optimizer step of a sampled batch, with its true norm; the report
    counts the optimizer steps and names the training step's own clipping."""
    torch.manual_seed(0)
    model, logger = TruncatedBPTT(), CSVLogger(tmp_path, name="run")
    health = GradHealth(log_every_n_steps=2)
    trainer = pytorch_lightning.Trainer(callbacks=[health], **trainer_kwargs(max_steps=-1, max_epochs=2, logger=logger))
    trainer.fit(model)
    logger.save()
    rows = [r for r in csv.DictReader(open(logger.experiment.metrics_file_path)) if r.get("gradhealth/grad_norm/total")]
    assert [int(row["step"]) for row in rows] == [0, 2, 4, 6]  # 8 batches of 3 optimizer steps each
    assert [float(row["gradhealth/grad_norm/total"]) for row in rows] == pytest.approx(model.first_chunk_norms[::2], rel=1e-5)
    assert health.timestep_grad_norms["rnn.l0"].shape == (TruncatedBPTT.chunk,)  # the first chunk, as it ran
    report = health.health_report
    assert trainer.global_step == 24 and report.step == 8 and report.optimizer_steps == 24
    assert report.format().startswith("GradHealth health report at step 8 (24 optimizer steps)")
    assert min(model.first_chunk_norms[::2]) > 0.05  # the model's own clipping clipped every sampled step
    assert report.caller_clipping == (4, 4) and "clipping: by the training step on 4 of 4 sampled steps" in report.format()


def test_truncated_bptt_clipped_by_gradhealth_counts_every_optimizer_step():
    torch.manual_seed(0)
    model = TruncatedBPTT()
    model.clip_gradients = lambda *args, **kwargs: None  # GradHealth clips instead
    health = GradHealth(clip="norm", clip_val=1e-4)
    trainer = pytorch_lightning.Trainer(callbacks=[health], **trainer_kwargs(max_steps=-1, max_epochs=2))
    trainer.fit(model)
    assert health.monitor.gradient_tracker.clip_steps == trainer.global_step == 24
    assert health.health_report.clipped_fraction == 1.0 and health.health_report.caller_clipping is None


def test_threshold_suggestion_is_the_median_norm_before_clipping():
    torch.manual_seed(0)
    before, health = GradsBeforeStep(), GradHealth(clip="norm", clip_val=1e6)
    health.clip_suggester.min_updates = 5
    pytorch_lightning.Trainer(callbacks=[before, health], **trainer_kwargs(max_steps=8, max_epochs=-1)).fit(PLSequenceModel())
    norms = [torch.linalg.vector_norm(torch.stack([g.norm() for g in grads.values()])).item() for grads in before.grads]
    assert health.suggested_clip_val == pytest.approx(float(np.median(norms)), rel=1e-5)


@pytest.mark.parametrize(
    "arguments, message",
    [
        ({"clip": "nrom", "clip_val": 1.0}, "Did you mean 'norm'?"),
        ({"clip": "norm"}, "needs clip_val"),
        ({"clip": "agc", "clip_val": -1.0}, "needs clip_val"),
        ({"clip_val": 1.0}, "has no effect without clip"),
        ({"on_nonfinite": "ignore"}, "on_nonfinite must be one of 'warn', 'skip', 'raise'"),
    ],
)
def test_bad_clipping_arguments_fail_at_construction(arguments, message):
    with pytest.raises(ValueError, match=message.replace("?", r"\?").replace("(", r"\(")):
        GradHealth(**arguments)
