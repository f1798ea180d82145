"""An independent reference: recurrent layers unrolled by hand with autograd and ``retain_grad``.

Each timestep is written out from the cell equations in PyTorch's documentation, so the total
derivative dL/dh_t of every state is simply ``h_t.grad`` after ``loss.backward()``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn


def cell_step(cell_type: str, module: nn.Module, suffix: str, x: Tensor, h: Tensor, c: Optional[Tensor], valid: Tensor):
    """One step of the cell equations; returns the new (h, c). Sequences where ``valid`` is
    False keep their cell state (their h is kept by the caller)."""
    w_ih, w_hh = getattr(module, "weight_ih" + suffix), getattr(module, "weight_hh" + suffix)
    b_ih, b_hh = getattr(module, "bias_ih" + suffix, None), getattr(module, "bias_hh" + suffix, None)
    gi = x @ w_ih.T + (b_ih if b_ih is not None else 0)
    gh = h @ w_hh.T + (b_hh if b_hh is not None else 0)
    if cell_type == "rnn_tanh":
        return torch.tanh(gi + gh), None
    if cell_type == "rnn_relu":
        return torch.relu(gi + gh), None
    if cell_type == "gru":
        i_r, i_z, i_n = gi.chunk(3, 1)
        h_r, h_z, h_n = gh.chunk(3, 1)
        r, z = torch.sigmoid(i_r + h_r), torch.sigmoid(i_z + h_z)
        n = torch.tanh(i_n + r * h_n)
        return (1 - z) * n + z * h, None
    i, f, g, o = (gi + gh).chunk(4, 1)
    c_new = torch.where(valid, torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g), c)
    h_new = torch.sigmoid(o) * torch.tanh(c_new)
    w_hr = getattr(module, "weight_hr" + suffix, None)
    return (h_new if w_hr is None else h_new @ w_hr.T), c_new


def unrolled(
    module: nn.Module,
    cell_type: str,
    x: Tensor,
    h0: Tensor,
    c0: Optional[Tensor],
    lengths: Optional[Tensor] = None,
    dropout_masks: Optional[list[Tensor]] = None,
):
    """Run a fused module by hand. ``x`` is time-major ``(T, B, I)``; ``h0``/``c0`` are ``(L*D, B, .)``;
    ``dropout_masks[l]`` (time-major) multiplies layer ``l``'s output before layer ``l + 1`` reads it.

    Returns (output, h_n, c_n, states, cells) where ``states[key]`` is the list of h_t tensors
    (``retain_grad`` set) of layer/direction ``key`` ("l0", "l0_reverse", ...) by input position,
    and ``cells`` the same for LSTM c_t. Steps past a sequence's length keep the previous state.
    """
    steps, batch = x.shape[:2]
    directions = 2 if getattr(module, "bidirectional", False) else 1
    if lengths is None:
        valid = torch.ones(steps, batch, 1, dtype=torch.bool)
    else:
        valid = (torch.arange(steps)[:, None] < lengths[None])[..., None]
    states, cells, finals_h, finals_c = {}, {}, [], []
    layer_input = x
    for layer in range(getattr(module, "num_layers", 1)):
        outputs = []
        for direction in range(directions):
            key = f"l{layer}" + ("_reverse" if direction else "")
            suffix = f"_{key}" if hasattr(module, "num_layers") else ""
            h = h0[layer * directions + direction]
            c = None if c0 is None else c0[layer * directions + direction]
            hs, cs = [None] * steps, [None] * steps
            for t in (range(steps) if direction == 0 else reversed(range(steps))):
                h_new, c = cell_step(cell_type, module, suffix, layer_input[t], h, c, valid[t])
                h = torch.where(valid[t], h_new, h)
                h.retain_grad()
                hs[t] = h
                if c is not None:
                    c.retain_grad()
                    cs[t] = c
            states[key], cells[key] = hs, cs
            finals_h.append(h)
            finals_c.append(c)
            outputs.append(torch.stack(hs) * valid)
        layer_input = torch.cat(outputs, dim=-1)
        if dropout_masks is not None and layer < len(dropout_masks):
            layer_input = layer_input * dropout_masks[layer]
    c_n = torch.stack(finals_c) if c0 is not None else None
    return layer_input, torch.stack(finals_h), c_n, states, cells


def reference_norms(tensors: list[Tensor], lengths: Optional[Tensor] = None) -> Tensor:
    """``(T,)`` Frobenius norms of the ``.grad`` of each state, zero past each sequence's length."""
    grads = torch.stack([t.grad if t.grad is not None else torch.zeros_like(t) for t in tensors])
    if lengths is not None:
        grads = grads * (torch.arange(len(tensors))[:, None] < lengths[None])[..., None]
    return torch.linalg.vector_norm(grads.flatten(1), dim=1)
