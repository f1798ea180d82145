"""Per-timestep gradient norms against a hand-unrolled autograd reference (tests/reference_rnn.py)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from lightning_gradhealth.bptt import (
    BACKWARD_BY_CELL_TYPE,
    CellWeights,
    backward_through_time,
    fused_timestep_grads,
    reverse_padded,
)
from lightning_gradhealth.probe import TimestepProbe, preferred_replay
from reference_rnn import reference_norms, unrolled

LAYERS = {
    "rnn_tanh": lambda **kw: nn.RNN(4, 5, **kw),
    "rnn_relu": lambda **kw: nn.RNN(4, 5, nonlinearity="relu", **kw),
    "lstm": lambda **kw: nn.LSTM(4, 5, **kw),
    "lstm_proj": lambda **kw: nn.LSTM(4, 5, proj_size=3, **kw),
    "gru": lambda **kw: nn.GRU(4, 5, **kw),
}
CELL_TYPE = {"rnn_tanh": "rnn_tanh", "rnn_relu": "rnn_relu", "lstm": "lstm", "lstm_proj": "lstm", "gru": "gru"}


def _loss(output, h_n, c_n, through: str, seed: int = 0):
    """A loss with fixed random weights on the output sequence, the final states, or both."""
    generator = torch.Generator().manual_seed(seed)
    loss = torch.zeros(())
    if through in ("output", "both"):
        loss = loss + (output * torch.randn(output.shape, generator=generator)).sum() + (output**2).sum()
    if through in ("final", "both"):
        loss = loss + (h_n * torch.randn(h_n.shape, generator=generator)).sum()
        if c_n is not None:
            loss = loss + (c_n * torch.randn(c_n.shape, generator=generator)).sum()
    return loss


def _check(name: str, *, num_layers=2, bidirectional=True, batch_first=False, packed=False, initial=True,
           through="both", steps=7, batch=3, replay="recursion"):
    torch.manual_seed(0)
    layer = LAYERS[name](num_layers=num_layers, bidirectional=bidirectional, batch_first=batch_first)
    directions = 2 if bidirectional else 1
    width = layer.proj_size if isinstance(layer, nn.LSTM) and layer.proj_size else 5
    x = torch.randn(steps, batch, 4)
    lengths = torch.tensor([steps, 3, 5][:batch]) if packed else None
    h0 = torch.randn(num_layers * directions, batch, width) if initial else torch.zeros(num_layers * directions, batch, width)
    c0 = None
    if isinstance(layer, nn.LSTM):
        c0 = torch.randn(num_layers * directions, batch, 5) if initial else torch.zeros(num_layers * directions, batch, 5)

    # the reference
    ref_out, ref_h, ref_c, states, cells = unrolled(layer, CELL_TYPE[name], x, h0, c0, lengths)
    _loss(ref_out, ref_h, ref_c, through).backward()
    layer.zero_grad()

    # the real fused call, watched by the probe
    probe = TimestepProbe(nn.ModuleDict({"enc": layer}), replay=replay)
    probe.attach()
    probe.arm()
    call_input = x.transpose(0, 1) if batch_first else x
    if packed:
        call_input = pack_padded_sequence(call_input, lengths, batch_first=batch_first, enforce_sorted=False)
    hx = None if not initial else (h0 if c0 is None else (h0, c0))
    output, finals = layer(call_input, hx)
    h_n, c_n = finals if isinstance(finals, tuple) else (finals, None)
    if packed:
        output = torch.nn.utils.rnn.pad_packed_sequence(output, batch_first=batch_first)[0]
    if batch_first:
        output = output.transpose(0, 1)
    torch.testing.assert_close(output, ref_out, atol=1e-5, rtol=1e-5)  # the reference is the same network
    _loss(output, h_n, c_n, through).backward()
    norms = probe.compute().norms_by_name
    probe.detach()
    assert probe.replays_run == {"enc": {replay}}

    expected_keys = {f"enc.l{layer}" + s for layer in range(num_layers) for s in (["", "_reverse"] if bidirectional else [""])}
    if c0 is not None:
        expected_keys |= {key + ".cell" for key in expected_keys}
    assert set(norms) == expected_keys
    for key, values in norms.items():
        layer_key = key.split(".")[1]
        reference = reference_norms((cells if key.endswith(".cell") else states)[layer_key], lengths)
        assert values.shape == (steps,)
        torch.testing.assert_close(values, reference, rtol=1e-5, atol=1e-6 * reference.max().item(), msg=key)
    return norms


REPLAYS = ["recursion", "kernel"]


@pytest.mark.parametrize("replay", REPLAYS)
@pytest.mark.parametrize("through", ["output", "final", "both"])
@pytest.mark.parametrize("name", LAYERS)
def test_two_layer_bidirectional_matches_the_unrolled_reference(name, through, replay):
    _check(name, through=through, replay=replay)


@pytest.mark.parametrize("replay", REPLAYS)
@pytest.mark.parametrize("name", LAYERS)
def test_packed_sequences_with_varying_lengths_use_each_sequences_own_steps(name, replay):
    norms = _check(name, packed=True, replay=replay)
    assert norms["enc.l0"][-1] > 0  # the longest sequence reaches the last step


@pytest.mark.parametrize("replay", REPLAYS)
@pytest.mark.parametrize("name", LAYERS)
def test_batch_first_without_initial_states(name, replay):
    _check(name, batch_first=True, initial=False, through="output", replay=replay)


@pytest.mark.parametrize("replay", REPLAYS)
@pytest.mark.parametrize("name", ["lstm", "gru"])
def test_single_layer_unidirectional_with_packed_batch_first_input(name, replay):
    _check(name, num_layers=1, bidirectional=False, batch_first=True, packed=True, replay=replay)


@pytest.mark.parametrize("replay", REPLAYS)
def test_three_layers_deep(replay):
    _check("lstm_proj", num_layers=3, replay=replay)


@pytest.mark.parametrize("name", LAYERS)
def test_the_kernel_replay_matches_the_unrolled_reference_over_a_long_sequence(name):
    _check(name, num_layers=1, bidirectional=False, steps=300, batch=2, replay="kernel")


def test_irnn_with_identity_recurrence_passes_the_gradient_unchanged():
    # relu cell, identity recurrent matrix, non-negative inputs and weights, zero biases, loss on
    # the last step only: dL/dh_t = dL/dh_{t+1} for every t, so the norm is the same at every step
    rnn = nn.RNN(3, 6, nonlinearity="relu")
    with torch.no_grad():
        rnn.weight_hh_l0.copy_(torch.eye(6))
        rnn.weight_ih_l0.uniform_(0, 1)
        rnn.bias_ih_l0.zero_()
        rnn.bias_hh_l0.zero_()
    probe = TimestepProbe(nn.ModuleDict({"irnn": rnn}))
    probe.attach()
    probe.arm()
    output, _ = rnn(torch.rand(50, 4, 3) + 0.1)
    (output[-1] * torch.arange(1.0, 7.0)).sum().backward()
    norms = probe.compute().norms_by_name["irnn.l0"]
    torch.testing.assert_close(norms, torch.full((50,), norms[0].item()), rtol=1e-6, atol=0)


def test_unbatched_input():
    torch.manual_seed(0)
    gru = nn.GRU(4, 5)
    x = torch.randn(6, 4)
    _, _, _, states, _ = unrolled(gru, "gru", x[:, None], torch.zeros(1, 1, 5), None)
    ref_loss = sum((s**2).sum() for s in states["l0"])
    ref_loss.backward()
    probe = TimestepProbe(nn.ModuleDict({"g": gru}))
    probe.attach()
    probe.arm()
    (gru(x)[0] ** 2).sum().backward()
    torch.testing.assert_close(probe.compute().norms_by_name["g.l0"], reference_norms(states["l0"]), rtol=1e-5, atol=0)


@pytest.mark.parametrize("cell_class", [nn.RNNCell, nn.LSTMCell, nn.GRUCell])
def test_cells_in_a_user_loop_match_the_unrolled_reference(cell_class):
    torch.manual_seed(0)
    cell = cell_class(4, 5)
    cell_type = {nn.RNNCell: "rnn_tanh", nn.LSTMCell: "lstm", nn.GRUCell: "gru"}[cell_class]
    x = torch.randn(8, 3, 4)
    h0, c0 = torch.randn(1, 3, 5), (torch.randn(1, 3, 5) if cell_class is nn.LSTMCell else None)
    ref_out, _, _, states, cells = unrolled(cell, cell_type, x, h0, c0)
    (ref_out[-1] ** 2).sum().backward(retain_graph=True)
    (ref_out[2] * 3).sum().backward()  # a second backward pass accumulates, as it does in the loop below

    probe = TimestepProbe(nn.ModuleDict({"decoder": nn.ModuleDict({"cell": cell})}))
    probe.attach()
    probe.arm()
    h, c, outputs = h0[0], (None if c0 is None else c0[0]), []
    for t in range(8):
        h, c = cell(x[t], (h, c)) if c is not None else (cell(x[t], h), None)
        outputs.append(h)
    (outputs[-1] ** 2).sum().backward(retain_graph=True)
    (outputs[2] * 3).sum().backward()
    norms = probe.compute().norms_by_name
    torch.testing.assert_close(norms["decoder.cell"], reference_norms(states["l0"]), rtol=1e-5, atol=0)
    if c0 is not None:
        torch.testing.assert_close(norms["decoder.cell.cell"], reference_norms(cells["l0"]), rtol=1e-5, atol=0)


def test_custom_marked_cell_returning_a_tuple():
    class MyCell(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = nn.GRUCell(2, 3)

        def forward(self, x, h):
            h = self.inner(x, h)
            return h, h.sum()

    model = nn.ModuleDict({"mine": MyCell()})
    probe = TimestepProbe(model, custom_cells=["mine"])
    probe.attach()
    probe.arm()
    h, retained = torch.zeros(1, 3), []
    for _ in range(4):
        h, _ = model["mine"](torch.randn(1, 2), h)
        h.retain_grad()
        retained.append(h)
    h.pow(2).sum().backward()
    norms = probe.compute().norms_by_name
    torch.testing.assert_close(norms["mine"], torch.stack([t.grad.norm() for t in retained]))
    assert "mine.inner" in norms  # the built-in cell inside is measured too


def test_custom_cell_pattern_that_matches_nothing_is_rejected():
    with pytest.raises(ValueError, match="custom_cells pattern 'decoder' matches no module"):
        TimestepProbe(nn.ModuleDict({"rnn": nn.GRU(2, 2)}), custom_cells=["decoder"])


def test_grad_scale_divides_the_norms():
    torch.manual_seed(0)
    lstm = nn.LSTM(2, 3)
    probe = TimestepProbe(nn.ModuleDict({"rnn": lstm}))
    x = torch.randn(5, 2, 2)
    norms = []
    for scale in (1.0, 1024.0):
        probe.attach()
        probe.arm()
        (lstm(x)[0].sum() * scale).backward()
        norms.append(probe.compute(grad_scale=scale).norms_by_name["rnn.l0"])
    torch.testing.assert_close(norms[0], norms[1])


def test_probe_is_inert_until_armed_and_holds_nothing_after_compute():
    lstm = nn.LSTM(2, 3)
    probe = TimestepProbe(nn.ModuleDict({"rnn": lstm}))
    probe.attach()
    output, _ = lstm(torch.randn(4, 1, 2))
    assert not probe.has_captures and not output._backward_hooks
    probe.arm()
    output, _ = lstm(torch.randn(4, 1, 2))
    assert probe.has_captures
    output.sum().backward()
    probe.compute()
    assert not probe.has_captures and not probe.armed
    probe.detach()
    assert not lstm._forward_hooks


def test_reverse_padded_is_its_own_inverse_on_valid_steps():
    x = torch.randn(6, 3, 2)
    lengths = torch.tensor([6, 2, 4])
    twice = reverse_padded(reverse_padded(x, lengths), lengths)
    valid = (torch.arange(6)[:, None] < lengths[None])[..., None]
    torch.testing.assert_close(twice, x * valid)


def test_one_backward_function_per_cell_type_and_unknown_types_are_named():
    assert set(BACKWARD_BY_CELL_TYPE) == {"rnn_tanh", "rnn_relu", "gru", "lstm"}
    weights = CellWeights(torch.zeros(5, 4), torch.zeros(5, 5))
    x, states = torch.zeros(3, 2, 4), torch.zeros(3, 2, 5)
    with pytest.raises(ValueError, match="unknown cell type 'lstm_peephole'") as raised:
        backward_through_time("lstm_peephole", weights, x, states, torch.zeros(2, 5), states)
    assert all(repr(cell_type) in str(raised.value) for cell_type in ("rnn_tanh", "rnn_relu", "gru", "lstm"))


def test_a_chaotic_layer_whose_kernel_replay_drifts_is_measured_by_the_recursion():
    # a tanh RNN with gain 3 amplifies rounding: run in float64 and measured in float32, the
    # kernel's free-running float32 states leave the layer's after a few dozen steps, while the
    # recursion starts every step from the captured state
    torch.manual_seed(0)
    rnn = nn.RNN(8, 64).double()
    with torch.no_grad():
        rnn.weight_hh_l0.normal_(0, 3 / 64**0.5)
    x = torch.randn(300, 4, 8, dtype=torch.float64)
    states = rnn(x)[0].detach().float()
    rnn.float()
    direct = torch.randn(states.shape)
    arguments = (rnn, x.float(), torch.zeros(1, 4, 64))
    drifting = fused_timestep_grads(*arguments, output_grad=direct, outputs=states, replay="kernel", tolerance=math.inf)[0, False]
    assert drifting.replay == "kernel" and float(drifting.residual) > 0.1
    measured = fused_timestep_grads(*arguments, output_grad=direct, outputs=states, replay="kernel")[0, False]
    by_recursion = fused_timestep_grads(*arguments, output_grad=direct, outputs=states, replay="recursion")[0, False]
    assert measured.replay == "recursion" and float(measured.residual) < 1e-4
    torch.testing.assert_close(measured.state, by_recursion.state, rtol=0, atol=0)


def test_auto_runs_the_replay_preferred_on_the_weights_device_and_both_give_the_same_norms():
    torch.manual_seed(0)
    gru = nn.GRU(4, 16)
    x = torch.randn(40, 3, 4)
    norms = {}
    for replay in ("auto", "recursion", "kernel"):
        probe = TimestepProbe(nn.ModuleDict({"gru": gru}), replay=replay)
        probe.attach()
        probe.arm()
        output, _ = gru(x)
        probe.disarm()
        (output**2).sum().backward()
        norms[replay] = probe.compute().norms_by_name["gru.l0"]
        probe.detach()
        assert probe.replays_run == {"gru": {preferred_replay("cpu") if replay == "auto" else replay}}
    torch.testing.assert_close(norms["auto"], norms["recursion"], rtol=0, atol=0)
    torch.testing.assert_close(norms["kernel"], norms["recursion"], rtol=1e-5, atol=0)


def test_unknown_replays_are_named_with_the_valid_ones():
    with pytest.raises(ValueError, match="'auto', 'recursion', 'kernel'"):
        TimestepProbe(nn.ModuleDict({"gru": nn.GRU(4, 16)}), replay="fused")
