"""Initialization schemes for recurrent weight matrices, in the style of ``torch.nn.init``.

Every scheme is a small in-place function on one 2-D tensor. A recurrent weight stacks one
block per gate along its rows (PyTorch's layout: LSTM ``i, f, g, o``; GRU ``r, z, n``), and
each scheme is applied to every gate block separately: ``gates=4`` on an LSTM's
``weight_hh`` (shape ``(4H, H)``) gives four independent ``(H, H)`` draws. Applying
orthogonal init to the whole ``(4H, H)`` matrix instead leaves each gate block far from
orthogonal (spectral radius about 0.5 at H = 256), which is the mistake this module avoids.

Random numbers are drawn on the CPU from ``generator`` (or the global generator) and then
copied into the tensor on its own device and dtype, so a seeded generator gives the same
weights on every device and every process.

Examples:
    >>> import torch
    >>> from lightning_gradhealth.inits import orthogonal_
    >>> lstm = torch.nn.LSTM(8, 16)
    >>> _ = orthogonal_(lstm.weight_hh_l0, gates=4)
    >>> block = lstm.weight_hh_l0.detach()[16:32]          # the forget gate
    >>> torch.allclose(block @ block.T, torch.eye(16), atol=1e-5)
    True
"""

from __future__ import annotations

import difflib
import math
from typing import Callable, NamedTuple, Optional

import torch
from torch import Tensor

from lightning_gradhealth._validation import optional_string

__all__ = [
    "Fans",
    "SCHEME_NAMES",
    "glorot_normal_",
    "glorot_uniform_",
    "he_normal_",
    "identity_",
    "init_scheme_",
    "orthogonal_",
    "resolve_scheme",
    "small_uniform_",
]


class Fans(NamedTuple):
    """Fan-in and fan-out of ONE gate block.

    For a recurrent cell the RNN fan rule treats the cell as one affine map of the
    concatenated ``[x_t, h_{t-1}]``: ``fan_in = input_size + hidden_size`` and
    ``fan_out = hidden_size``, for the input-to-hidden and the hidden-to-hidden block alike.
    """

    fan_in: int
    fan_out: int


def _gate_blocks(tensor: Tensor, gates: int) -> list[Tensor]:
    """Views of ``tensor``'s ``gates`` row blocks; raises if ``gates`` does not divide the rows."""
    if tensor.dim() != 2:
        raise ValueError(f"expected a 2-D weight matrix, got shape {tuple(tensor.shape)}")
    if gates < 1 or tensor.shape[0] % gates:
        raise ValueError(
            f"gates={gates} does not divide the {tensor.shape[0]} rows of a weight of shape "
            f"{tuple(tensor.shape)}; the gate count must be a positive divisor of the row count"
        )
    return list(tensor.chunk(gates, dim=0))


def _write_blocks(
    tensor: Tensor, gates: int, draw: Callable[[int, int, int], Tensor]
) -> Tensor:
    """Fill each gate block of ``tensor`` with ``draw(gate_index, rows, cols)`` (a CPU tensor)."""
    with torch.no_grad():
        for gate_index, block in enumerate(_gate_blocks(tensor, gates)):
            values = draw(gate_index, block.shape[0], block.shape[1])
            block.copy_(values.to(device=block.device, dtype=block.dtype))
    return tensor


def _default_fans(tensor: Tensor, gates: int) -> Fans:
    """Fans of one gate block read off its shape: ``fan_in = cols``, ``fan_out = rows / gates``."""
    return Fans(fan_in=tensor.shape[1], fan_out=tensor.shape[0] // max(gates, 1))


def orthogonal_(
    tensor: Tensor,
    gain: float = 1.0,
    gates: int = 1,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    r"""Fill each gate block with a Haar-distributed (semi-)orthogonal matrix times ``gain``.

    A Gaussian matrix ``A`` (rows :math:`\ge` cols, transposed otherwise) is factored as
    ``A = QR`` and ``Q`` is multiplied by ``sign(diag(R))``; the sign correction makes ``Q``
    uniformly (Haar) distributed (Mezzadri 2007), as used for RNNs by Saxe et al. (2014).
    Every block ``W`` then satisfies :math:`W W^\top = \mathrm{gain}^2 I` (rows :math:`\le`
    cols) or :math:`W^\top W = \mathrm{gain}^2 I` (rows :math:`\ge` cols): all singular
    values equal ``gain``.

    Args:
        tensor: a 2-D weight, gate blocks stacked along the rows.
        gain: the common singular value of every block.
        gates: number of gate blocks (LSTM 4, GRU 3, plain RNN 1).
        generator: a CPU generator for reproducible draws.

    Examples:
        >>> w = torch.empty(6, 3)
        >>> _ = orthogonal_(w, gates=2)
        >>> torch.allclose(w[:3] @ w[:3].T, torch.eye(3), atol=1e-6)
        True
    """

    def draw(_: int, rows: int, cols: int) -> Tensor:
        tall = max(rows, cols), min(rows, cols)
        gaussian = torch.randn(tall, generator=generator, dtype=torch.float64)
        q, r = torch.linalg.qr(gaussian)
        q = q * torch.sign(torch.diagonal(r)).masked_fill(torch.diagonal(r) == 0, 1.0)
        return gain * (q if rows >= cols else q.T)

    return _write_blocks(tensor, gates, draw)


def glorot_uniform_(
    tensor: Tensor,
    gain: float = 1.0,
    gates: int = 1,
    fans: Optional[Fans] = None,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    r"""Glorot & Bengio (2010) uniform init of each gate block.

    :math:`W \sim U[-a, a]` with :math:`a = \mathrm{gain}\sqrt{6 / (\mathrm{fan\_in} + \mathrm{fan\_out})}`,
    so that :math:`\mathrm{Var}(W) = \mathrm{gain}^2 \cdot 2 / (\mathrm{fan\_in} + \mathrm{fan\_out})`.

    Args:
        tensor: a 2-D weight, gate blocks stacked along the rows.
        gain: multiplier of the bound.
        gates: number of gate blocks.
        fans: fans of one block; default ``(cols, rows / gates)``. For recurrent cells pass the
            RNN fan rule (see :class:`Fans`).
        generator: a CPU generator for reproducible draws.

    Examples:
        >>> w = torch.empty(12, 4)
        >>> _ = glorot_uniform_(w, gates=4, fans=Fans(fan_in=7, fan_out=3))
        >>> bool(w.abs().max() <= math.sqrt(6 / 10))
        True
    """
    fan_in, fan_out = fans or _default_fans(tensor, gates)
    bound = gain * math.sqrt(6.0 / (fan_in + fan_out))
    return _write_blocks(
        tensor,
        gates,
        lambda _, rows, cols: (torch.rand(rows, cols, generator=generator) * 2 - 1) * bound,
    )


def glorot_normal_(
    tensor: Tensor,
    gain: float = 1.0,
    gates: int = 1,
    fans: Optional[Fans] = None,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    r"""Glorot & Bengio (2010) normal init of each gate block.

    :math:`W \sim N(0, \sigma^2)` with :math:`\sigma = \mathrm{gain}\sqrt{2 / (\mathrm{fan\_in} + \mathrm{fan\_out})}`.

    Args:
        tensor: a 2-D weight, gate blocks stacked along the rows.
        gain: multiplier of the standard deviation.
        gates: number of gate blocks.
        fans: fans of one block; default ``(cols, rows / gates)``.
        generator: a CPU generator for reproducible draws.

    Examples:
        >>> w = torch.empty(300, 200)
        >>> _ = glorot_normal_(w)
        >>> round(w.std().item(), 2)
        0.06
    """
    fan_in, fan_out = fans or _default_fans(tensor, gates)
    std = gain * math.sqrt(2.0 / (fan_in + fan_out))
    return _write_blocks(
        tensor, gates, lambda _, rows, cols: torch.randn(rows, cols, generator=generator) * std
    )


def he_normal_(
    tensor: Tensor,
    gain: float = 1.0,
    gates: int = 1,
    fans: Optional[Fans] = None,
    nonlinearities: tuple[str, ...] = ("relu",),
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    r"""He et al. (2015) normal init of each gate block, with the gate's own nonlinearity gain.

    :math:`W \sim N(0, \sigma^2)` with :math:`\sigma = \mathrm{gain} \cdot g / \sqrt{\mathrm{fan\_in}}`,
    where :math:`g` is ``torch.nn.init.calculate_gain`` of the block's nonlinearity:
    :math:`\sqrt 2` for ReLU (He's setting), 5/3 for tanh, 1 for sigmoid and linear maps.

    Args:
        tensor: a 2-D weight, gate blocks stacked along the rows.
        gain: extra multiplier of the standard deviation.
        gates: number of gate blocks.
        fans: fans of one block; default ``(cols, rows / gates)``.
        nonlinearities: one name per gate block (or one name for all), e.g.
            ``("sigmoid", "sigmoid", "tanh", "sigmoid")`` for an LSTM.
        generator: a CPU generator for reproducible draws.

    Examples:
        >>> w = torch.empty(400, 200)
        >>> _ = he_normal_(w)
        >>> round(w.std().item(), 1)   # sqrt(2 / 200)
        0.1
    """
    fan_in = (fans or _default_fans(tensor, gates)).fan_in
    if len(nonlinearities) not in (1, gates):
        raise ValueError(f"expected 1 or {gates} nonlinearities, got {len(nonlinearities)}")
    per_gate = nonlinearities if len(nonlinearities) == gates else nonlinearities * gates
    stds = [gain * torch.nn.init.calculate_gain(name) / math.sqrt(fan_in) for name in per_gate]
    return _write_blocks(
        tensor,
        gates,
        lambda gate, rows, cols: torch.randn(rows, cols, generator=generator) * stds[gate],
    )


def identity_(tensor: Tensor, gain: float = 1.0, gates: int = 1) -> Tensor:
    r"""Set each gate block to ``gain`` times the identity (IRNN, Le, Jaitly & Hinton 2015).

    A non-square block gets ones on its main diagonal and zeros elsewhere. With ReLU units
    and zero biases the recurrence then copies the hidden state: :math:`h_t = h_{t-1} + W x_t`.

    Examples:
        >>> w = torch.empty(2, 2)
        >>> identity_(w, gain=0.5)
        tensor([[0.5000, 0.0000],
                [0.0000, 0.5000]])
    """
    return _write_blocks(tensor, gates, lambda _, rows, cols: gain * torch.eye(rows, cols))


def small_uniform_(
    tensor: Tensor,
    scale: float = 0.01,
    gates: int = 1,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    r"""The naive baseline :math:`W \sim U[-\mathrm{scale}, \mathrm{scale}]`, default scale 0.01.

    Kept for comparisons: with small weights the recurrent Jacobian has a spectral radius far
    below 1, and gradients through time vanish geometrically (Pascanu et al. 2013).

    Examples:
        >>> w = torch.empty(64, 64)
        >>> bool(small_uniform_(w).abs().max() <= 0.01)
        True
    """
    return _write_blocks(
        tensor,
        gates,
        lambda _, rows, cols: (torch.rand(rows, cols, generator=generator) * 2 - 1) * scale,
    )


_CANONICAL_NAMES: dict[str, str] = {
    "orthogonal": "orthogonal",
    "glorot": "glorot",
    "xavier": "glorot",
    "glorot_normal": "glorot_normal",
    "he": "he",
    "kaiming": "he",
    "identity": "identity",
    "uniform": "uniform",
}

SCHEME_NAMES: tuple[str, ...] = tuple(_CANONICAL_NAMES)
"""Every accepted scheme name, aliases included (``None`` also means: keep the framework's init)."""


def resolve_scheme(name: Optional[str], argument: str = "init") -> Optional[str]:
    """Canonical name of a scheme (``"xavier"`` -> ``"glorot"``), ``None`` kept as ``None``.

    Raises:
        TypeError: ``name`` is neither a string nor ``None``; the message names ``argument``.
        ValueError: for an unknown name; the message lists the valid names and the closest one.

    Examples:
        >>> resolve_scheme("kaiming")
        'he'
    """
    valid = ", ".join(repr(n) for n in SCHEME_NAMES)
    scheme = optional_string(argument, name, f"a scheme name ({valid}) or None")
    if scheme is None:
        return None
    if scheme.lower() in _CANONICAL_NAMES:
        return _CANONICAL_NAMES[scheme.lower()]
    closest = difflib.get_close_matches(scheme.lower(), SCHEME_NAMES, n=1)
    hint = f" Did you mean {closest[0]!r}?" if closest else ""
    raise ValueError(f"Unknown {argument} scheme {scheme!r}.{hint} Valid names: {valid} or None.")


def init_scheme_(
    tensor: Tensor,
    scheme: str,
    *,
    gain: float = 1.0,
    gates: int = 1,
    fans: Optional[Fans] = None,
    nonlinearities: tuple[str, ...] = ("relu",),
    uniform_scale: float = 0.01,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """Apply the scheme named ``scheme`` (any name of :data:`SCHEME_NAMES`) per gate block.

    ``gain`` scales every scheme but ``"uniform"``, whose range is ``uniform_scale``;
    ``fans`` is used by Glorot and He, ``nonlinearities`` by He.

    Examples:
        >>> w = torch.empty(8, 2)
        >>> _ = init_scheme_(w, "xavier", gates=4, fans=Fans(4, 2))
    """
    canonical = resolve_scheme(scheme)
    if canonical == "orthogonal":
        return orthogonal_(tensor, gain, gates, generator)
    if canonical == "glorot":
        return glorot_uniform_(tensor, gain, gates, fans, generator)
    if canonical == "glorot_normal":
        return glorot_normal_(tensor, gain, gates, fans, generator)
    if canonical == "he":
        return he_normal_(tensor, gain, gates, fans, nonlinearities, generator)
    if canonical == "identity":
        return identity_(tensor, gain, gates)
    return small_uniform_(tensor, uniform_scale, gates, generator)
