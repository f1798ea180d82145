"""Exact wherever the layer really runs: the probe measures the fused kernel's own call, however
the module's forward reached it (a subclass that packs its batch), every call of a module run
several times in one step, and a stack with inter-layer dropout as it ran; a replay that does not
reproduce the layer's states reports nothing and says why. Each case against the unrolled
autograd reference."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional

import pytest
import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence
from torch.overrides import _get_current_function_mode_stack

from lightning_gradhealth.bptt import state_residual
from lightning_gradhealth.probe import TimestepProbe
from reference_rnn import reference_norms, unrolled

LENGTHS = torch.tensor([12, 9, 5, 3])


@contextmanager
def armed_probe(rnn: nn.Module, replay: str = "auto") -> Iterator[TimestepProbe]:
    """A probe attached to ``rnn`` (named ``"rnn"``), armed for the forward passes in the block."""
    probe = TimestepProbe(nn.ModuleDict({"rnn": rnn}), replay=replay)
    probe.attach()
    probe.arm()
    yield probe
    probe.disarm()


class PackingLSTM(nn.LSTM):
    """As some forecasting libraries write it: the layer packs its own padded batch."""

    def forward(self, x: Tensor, hx: Optional[tuple[Tensor, Tensor]] = None, lengths: Optional[Tensor] = None):
        packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        output, state = super().forward(packed, hx)
        return pad_packed_sequence(output, batch_first=True, total_length=x.shape[1])[0], state


class PackingGRU(nn.GRU):
    def forward(self, x: Tensor, hx: Optional[Tensor] = None, lengths: Optional[Tensor] = None):
        packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        output, state = super().forward(packed, hx)
        return pad_packed_sequence(output, batch_first=True, total_length=x.shape[1])[0], state


def _assert_matches(measured: dict[str, Tensor], states: dict, cells: dict, name: str, lengths=None, call: str = "") -> None:
    for layer_key, tensors in states.items():
        key = f"{name}.{layer_key}{call}"
        torch.testing.assert_close(measured[key], reference_norms(tensors, lengths), rtol=1e-5, atol=1e-7, msg=key)
        if cells.get(layer_key) and cells[layer_key][0] is not None:
            reference = reference_norms(cells[layer_key], lengths)
            torch.testing.assert_close(measured[key + ".cell"], reference, rtol=1e-5, atol=1e-7, msg=key + ".cell")


@pytest.mark.parametrize(
    "build, cell_type",
    [
        (lambda: PackingLSTM(3, 6, batch_first=True), "lstm"),
        (lambda: PackingGRU(3, 5, num_layers=2, bidirectional=True, batch_first=True), "gru"),
    ],
)
@pytest.mark.parametrize("replay", ["recursion", "kernel"])
def test_a_layer_that_packs_its_own_batch_is_measured_on_what_its_kernel_ran(build, cell_type, replay):
    torch.manual_seed(0)
    rnn = build()
    x = torch.randn(4, 12, 3)
    readout = torch.randn(rnn.num_layers * (2 if rnn.bidirectional else 1), 4, rnn.hidden_size)
    with armed_probe(rnn, replay) as probe:
        _, state = rnn(x, lengths=LENGTHS)
    h_n = state[0] if isinstance(state, tuple) else state
    (h_n * readout).sum().backward()
    measured = probe.compute().norms_by_name
    probe.detach()

    rnn.zero_grad()
    layers = rnn.num_layers * (2 if rnn.bidirectional else 1)
    c0 = torch.zeros(layers, 4, rnn.hidden_size) if cell_type == "lstm" else None
    h0 = torch.zeros(layers, 4, rnn.hidden_size)
    _, ref_h, _, states, cells = unrolled(rnn, cell_type, x.transpose(0, 1), h0, c0, LENGTHS)
    (ref_h * readout).sum().backward()
    assert probe.unreproduced == {} and probe.failures == {}
    _assert_matches(measured, states, cells, "rnn", LENGTHS)


@pytest.mark.parametrize("replay", ["recursion", "kernel"])
def test_every_call_of_an_encoder_decoder_lstm_is_measured_with_the_gradient_between_them(replay):
    torch.manual_seed(0)
    rnn = nn.LSTM(3, 6, num_layers=2)
    source, target = torch.randn(7, 4, 3), torch.randn(5, 4, 3)
    with armed_probe(rnn, replay) as probe:
        _, encoded = rnn(source)
        decoded, _ = rnn(target, encoded)
    decoded.pow(2).sum().backward()
    measured = probe.compute().norms_by_name
    probe.detach()

    zeros = torch.zeros(2, 4, 6)
    _, enc_h, enc_c, enc_states, enc_cells = unrolled(rnn, "lstm", source, zeros, zeros)
    ref_decoded, _, _, dec_states, dec_cells = unrolled(rnn, "lstm", target, enc_h, enc_c)
    ref_decoded.pow(2).sum().backward()
    keys = {f"rnn.l{layer}{call}{state}" for layer in (0, 1) for call in ("", ".call1") for state in ("", ".cell")}
    assert set(measured) == keys
    _assert_matches(measured, enc_states, enc_cells, "rnn")  # the encoder, with what flowed back from the decoder
    _assert_matches(measured, dec_states, dec_cells, "rnn", call=".call1")
    assert float(measured["rnn.l1"][-1]) > 0  # the encoder's last state gets its gradient only through the decoder


@pytest.mark.parametrize(
    "build, cell_type",
    [
        (lambda: nn.LSTM(3, 6, num_layers=3, dropout=0.5), "lstm"),
        (lambda: nn.GRU(3, 6, num_layers=2, dropout=0.3, bidirectional=True), "gru"),
        (lambda: nn.RNN(3, 6, num_layers=2, dropout=0.5), "rnn_tanh"),
    ],
)
@pytest.mark.parametrize("replay", ["recursion", "kernel"])
def test_inter_layer_dropout_is_measured_on_the_network_that_ran(build, cell_type, replay):
    torch.manual_seed(0)
    rnn = build().train()
    x = torch.randn(8, 4, 3)
    with armed_probe(rnn, replay) as probe:
        output, _ = rnn(x)
    masks = probe._fused_calls["rnn"].forward[0].dropout_masks  # the masks this step really drew
    assert masks is not None and len(masks) == rnn.num_layers - 1
    output[-1].pow(2).sum().backward()
    measured = probe.compute().norms_by_name
    probe.detach()

    rnn.zero_grad()
    layers = rnn.num_layers * (2 if rnn.bidirectional else 1)
    zeros = torch.zeros(layers, 4, 6)
    c0 = zeros if cell_type == "lstm" else None
    ref_output, _, _, states, cells = unrolled(rnn, cell_type, x, zeros, c0, dropout_masks=masks)
    torch.testing.assert_close(output, ref_output)  # the step that ran is the masked network
    ref_output[-1].pow(2).sum().backward()
    _assert_matches(measured, states, cells, "rnn")
    kept = torch.cat([mask.flatten() for mask in masks])
    assert 0 < float((kept == 0).float().mean()) < 1  # real masks, some units dropped


def test_a_replay_that_does_not_reproduce_the_layer_reports_nothing_and_says_why():
    torch.manual_seed(0)
    rnn = nn.GRU(3, 6)
    with armed_probe(rnn) as probe:
        output, _ = rnn(torch.randn(8, 4, 3))
    capture = probe._fused_calls["rnn"].forward[0]
    capture.inputs = capture.inputs + 0.5  # a capture that is not what the kernel ran
    output.sum().backward()
    result = probe.compute()
    probe.detach()
    assert result.norms == {}
    assert "reproduce" in probe.notices()["unreproduced", "rnn"] and "rnn" in probe.unreproduced


def test_the_replay_of_a_genuine_call_reproduces_the_states_to_float_precision():
    torch.manual_seed(0)
    rnn = nn.LSTM(3, 16, num_layers=2, proj_size=4)
    with armed_probe(rnn) as probe:
        output, _ = rnn(torch.randn(20, 4, 3))
    output.sum().backward()
    capture = probe._fused_calls["rnn"].forward[0]
    residuals = [float(grads.residual) for grads in capture.timestep_grads(rnn).values()]
    probe.release()
    probe.detach()
    assert max(residuals) < 1e-5
    assert float(state_residual(torch.ones(2, 1, 1) * 2.2, torch.ones(2, 1, 1) * 2)) == pytest.approx(0.1)


def test_dropout_of_one_drops_everything_as_the_kernel_does_and_makes_no_nan():
    torch.manual_seed(0)
    rnn = nn.GRU(3, 4, num_layers=2, dropout=1.0).train()
    with armed_probe(rnn) as probe:
        output, _ = rnn(torch.randn(5, 2, 3))
    expected, _ = rnn(torch.randn(5, 2, 3))  # the kernel's own p = 1 run, unwatched
    assert bool(output.isfinite().all()) and bool(expected.isfinite().all())
    output.sum().backward()
    assert set(probe.compute().norms_by_name) == {"rnn.l0", "rnn.l1"}
    probe.detach()


def test_a_spy_left_by_an_interrupted_forward_is_removed_by_detach():
    torch.manual_seed(0)
    rnn = nn.LSTM(3, 4)
    probe = TimestepProbe(nn.ModuleDict({"rnn": rnn}))
    probe.attach()
    probe.arm()

    def interrupt(module, args):
        raise KeyboardInterrupt  # after the probe's pre-hook: its forward hook never runs

    handle = rnn.register_forward_pre_hook(interrupt)
    with pytest.raises(KeyboardInterrupt):
        rnn(torch.randn(5, 2, 3))
    handle.remove()
    probe.detach()
    other = nn.LSTM(3, 4)
    other(torch.randn(5, 2, 3))  # the stale spy is off the mode stack (or, below another mode, records nothing)
    assert probe._fused_calls == {}
    assert not [mode for mode in _get_current_function_mode_stack() if type(mode).__name__ == "_KernelSpy"]


def test_inside_activation_checkpointing_dropout_runs_fused_and_the_step_is_named_not_guessed():
    torch.manual_seed(0)
    rnn = nn.LSTM(3, 4, num_layers=2, dropout=0.5).train()
    with armed_probe(rnn) as probe:
        output = torch.utils.checkpoint.checkpoint(lambda x: rnn(x)[0], torch.randn(6, 2, 3), use_reentrant=False)
    output.sum().backward()  # the recompute matches the forward: both ran the fused kernel
    result = probe.compute()
    probe.detach()
    assert result.norms == {} and "rnn" in probe.unreproduced


def test_a_fused_layer_stepped_in_a_loop_is_measured_on_its_first_calls_and_named_once():
    torch.manual_seed(0)
    rnn = nn.GRU(3, 4)
    with armed_probe(rnn) as probe:
        h, outputs = None, []
        for x_t in torch.randn(12, 1, 2, 3):
            output, h = rnn(x_t, h)
            outputs.append(output)
    torch.cat(outputs).sum().backward()
    measured = probe.compute().norms_by_name
    probe.detach()
    assert set(measured) == {"rnn.l0"} | {f"rnn.l0.call{k}" for k in range(1, 8)}
    assert "ran 12 times" in probe.notices()["many calls", "rnn"]
