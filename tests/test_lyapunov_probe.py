"""The probe's Lyapunov exponents: computed from what it captured on a real step, for fused layers
and for cells in a user loop, keyed like the norms; what it cannot compute is named."""

from __future__ import annotations

import torch
from torch import nn

from lightning_gradhealth.lyapunov import fused_lyapunov_exponents
from lightning_gradhealth.probe import TimestepProbe


def _probed(model: nn.Module, run, **options) -> "tuple":
    probe = TimestepProbe(model, **options)
    probe.attach()
    probe.arm()
    loss = run()
    probe.disarm()
    loss.backward()
    result = probe.compute()
    probe.detach()
    return result, probe


def test_a_fused_stack_has_exponents_for_every_layer_and_direction_equal_to_the_function_on_its_call():
    torch.manual_seed(0)
    lstm = nn.LSTM(3, 8, num_layers=2, bidirectional=True, proj_size=5)
    x = torch.randn(30, 4, 3)
    result, _ = _probed(nn.ModuleDict({"lstm": lstm}), lambda: lstm(x)[0].pow(2).sum(), lyapunov_k=3, lyapunov_warmup=2)
    zeros_h, zeros_c = torch.zeros(4, 4, 5), torch.zeros(4, 4, 8)
    expected = fused_lyapunov_exponents(lstm, x, zeros_h, zeros_c, k=3, warmup=2)
    assert set(result.lyapunov_by_name) == {"lstm.l0", "lstm.l0_reverse", "lstm.l1", "lstm.l1_reverse"}
    for (layer, reverse), exponents in expected.items():
        name = f"lstm.l{layer}" + ("_reverse" if reverse else "")
        torch.testing.assert_close(result.lyapunov_by_name[name], exponents, rtol=1e-5, atol=1e-6)
        assert exponents.shape == (3,) and bool((exponents[:-1] >= exponents[1:]).all())


def test_a_cell_loop_has_the_exponents_of_the_fused_layer_with_the_same_weights():
    torch.manual_seed(0)
    cell, gru = nn.GRUCell(3, 6), nn.GRU(3, 6)
    with torch.no_grad():
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            getattr(gru, f"{name}_l0").copy_(getattr(cell, name))
    x = torch.randn(25, 4, 3)

    def loop() -> torch.Tensor:
        h = None
        for t in range(x.shape[0]):
            h = cell(x[t], h)
        return h.pow(2).sum()

    result, _ = _probed(nn.ModuleDict({"cell": cell}), loop, lyapunov_k=4)
    fused, _ = _probed(nn.ModuleDict({"gru": gru}), lambda: gru(x)[0][-1].pow(2).sum(), lyapunov_k=4)
    torch.testing.assert_close(result.lyapunov_by_name["cell"], fused.lyapunov_by_name["gru.l0"], rtol=1e-5, atol=1e-6)


def test_cells_that_are_no_trajectory_and_sequences_within_the_warmup_are_named():
    torch.manual_seed(0)
    cell = nn.RNNCell(3, 6)
    x = torch.randn(10, 2, 3)

    def with_dropout() -> torch.Tensor:
        h = None
        for t in range(x.shape[0]):
            h = cell(x[t], None if h is None else nn.functional.dropout(h, 0.5))
        return h.sum()

    result, _ = _probed(nn.ModuleDict({"cell": cell}), with_dropout, lyapunov_k=2)
    assert "cell" in result.norms_by_name and result.lyapunov == {}
    (reason,) = result.lyapunov_unmeasured.values()
    assert "another state" in reason

    gru = nn.GRU(3, 4)
    result, _ = _probed(nn.ModuleDict({"gru": gru}), lambda: gru(x)[0].sum(), lyapunov_k=2, lyapunov_warmup=10)
    assert result.lyapunov == {} and "lyapunov_warmup=10" in next(iter(result.lyapunov_unmeasured.values()))


def test_no_exponents_unless_asked():
    gru = nn.GRU(3, 4)
    result, _ = _probed(nn.ModuleDict({"gru": gru}), lambda: gru(torch.randn(5, 2, 3))[0].sum())
    assert result.lyapunov == {} and result.lyapunov_unmeasured == {} and "gru.l0" in result.norms_by_name
