"""GradHealthMonitor without Lightning's Trainer: a plain PyTorch loop and a Lightning Fabric loop,
checked against the unrolled autograd reference, torch's clip_grad_norm_ and TensorBoard's reader."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from lightning.fabric import Fabric
from torch import nn
from torch.utils.tensorboard import SummaryWriter

from conftest import tensorboard_events
from lightning_gradhealth import GradHealthMonitor, write_step_output
from reference_rnn import reference_norms, unrolled


class Regressor(nn.Module):
    """A 2-layer GRU and a linear read-out of its last output."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.GRU(3, 6, num_layers=2)
        self.head = nn.Linear(6, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(x)[0][-1])


def _batches(count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    return [(torch.randn(7, 4, 3, generator=generator), torch.randn(4, 1, generator=generator)) for _ in range(count)]


def _reference(model: Regressor, batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, torch.Tensor]:
    x, y = batch
    output, _, _, states, _ = unrolled(model.rnn, "gru", x, torch.zeros(2, 4, 6), None)
    nn.functional.mse_loss(model.head(output[-1]), y).backward()
    return {f"rnn.{key}": reference_norms(tensors) for key, tensors in states.items()}


def _hook_counts(model: nn.Module) -> list[int]:
    return [len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules()]


def test_a_plain_pytorch_loop_gets_the_exact_norms_torch_clipping_and_a_tensorboard_log(tmp_path):
    torch.manual_seed(0)
    model = Regressor()
    hooks_before = _hook_counts(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = GradHealthMonitor(log_every_n_steps=2, full_every_n_steps=2, clip="norm", clip_val=0.05)
    monitor.attach(model)
    writer = SummaryWriter(str(tmp_path))
    for step, batch in enumerate(_batches(5)):
        before = copy.deepcopy(model)
        monitor.start_step(step)
        loss = nn.functional.mse_loss(model(batch[0]), batch[1])
        monitor.stop_capture()
        loss.backward()
        expected = [nn.Parameter(p.detach().clone()) for p in model.parameters()]
        for copied, param in zip(expected, model.parameters()):
            copied.grad = param.grad.clone()
        torch.nn.utils.clip_grad_norm_(expected, 0.05, foreach=False)
        output = monitor.before_optimizer_step(step, list(model.parameters()))
        write_step_output(writer, output, step)
        for param, copied in zip(model.parameters(), expected):
            torch.testing.assert_close(param.grad, copied.grad)
        assert bool(output.scalars) == (step % 2 == 0) and not output.skip_step
        optimizer.step()
        optimizer.zero_grad()
    writer.close()
    expected = _reference(before, batch)  # step 4 is the last sampled step
    assert set(monitor.timestep_grad_norms) == set(expected)
    for key, values in expected.items():
        torch.testing.assert_close(monitor.timestep_grad_norms[key], values, rtol=1e-5, atol=1e-8)
    report = monitor.finish(step)
    assert [layer.layer for layer in report.layers] == ["rnn.l0", "rnn.l1"] and report.clipped_fraction == 1.0
    monitor.detach()
    assert _hook_counts(model) == hooks_before
    pickle.dumps(model)
    events = tensorboard_events(tmp_path)
    assert {"gradhealth/rnn.l1/1_transmission", "gradhealth/rnn.l0/5_sigma_max/r", "gradhealth/grad_norm/total_clipped"} <= set(
        events.Tags()["scalars"]
    )
    assert "gradhealth/rnn.l0/eigenvalues" in events.Tags()["images"]
    assert [event.step for event in events.Scalars("gradhealth/rnn.l1/1_transmission")] == [0, 2, 4]


def test_a_fabric_loop_is_measured_through_the_module_it_wraps():
    torch.manual_seed(0)
    fabric = Fabric(accelerator="cpu", devices=1)
    model = Regressor()
    module, optimizer = fabric.setup(model, torch.optim.SGD(model.parameters(), lr=0.1))
    monitor = GradHealthMonitor(log_every_n_steps=1)
    monitor.attach(model)
    batch = _batches(1)[0]
    before = copy.deepcopy(model)
    monitor.start_step(0)
    loss = nn.functional.mse_loss(module(batch[0]), batch[1])
    monitor.stop_capture()
    fabric.backward(loss)
    monitor.before_optimizer_step(0, list(model.parameters()))
    optimizer.step()
    monitor.detach()
    for key, values in _reference(before, batch).items():
        torch.testing.assert_close(monitor.timestep_grad_norms[key], values, rtol=1e-5, atol=1e-8)


def test_bad_settings_fail_at_construction_with_what_is_allowed():
    with pytest.raises(ValueError, match="on_nonfinite must be one of 'warn', 'skip', 'raise'"):
        GradHealthMonitor(on_nonfinite="ignore")
    with pytest.raises(ValueError, match="log_every_n_steps"):
        GradHealthMonitor(log_every_n_steps=0)


def test_the_heatmap_history_is_thinned_keeping_the_first_and_the_newest_rows():
    torch.manual_seed(0)
    model = Regressor()
    monitor = GradHealthMonitor(log_every_n_steps=1)
    monitor.timestep_tracker.history_size = 4
    monitor.attach(model)
    for step, (x, y) in enumerate(_batches(9)):
        monitor.start_step(step)
        loss = nn.functional.mse_loss(model(x), y)
        monitor.stop_capture()
        loss.backward()
        monitor.before_optimizer_step(step, list(model.parameters()))
        model.zero_grad()
        steps = [row_step for row_step, _ in monitor.timestep_history["rnn.l0"]]
        assert steps[0] == 0 and steps[-1] == step and len(steps) <= monitor.timestep_tracker.history_size
    monitor.detach()
