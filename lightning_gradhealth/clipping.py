"""Gradient clipping (by global norm, by value, adaptive) and non-finite gradient detection.

Pure torch, meant for ``on_before_optimizer_step``, where gradients are complete (accumulation
done) and AMP-unscaled. Every function reads ``p.grad`` of the parameters it is given, skips
parameters without a gradient, and works on whatever device and dtype each gradient has.

Cost: norms use torch's multi-tensor kernels (``torch._foreach_norm``), one call per
(device, dtype) group as ``torch.nn.utils.clip_grad_norm_`` does, and scaling uses
``torch._foreach_mul_``. No norm or clipping function synchronizes with the host: results are
tensors, and the caller decides when to read them (:meth:`ClipStats.to_floats` reads all of them
in one sync). The NaN/Inf check does not either, but on the CPU, where a read waits for nothing.
Norms of float16 / bfloat16 gradients are accumulated in float32.

Non-finite gradients: clipping never raises and never spreads a NaN or Inf to finite
gradients. By norm, a non-finite total norm leaves every gradient as it is; AGC leaves each
unit whose gradient norm is non-finite as it is and clips the others; by value clamps ``±inf``
to ``±clip_value`` and leaves NaN, as ``clip_grad_value_`` does. ``ClipStats.norm_before`` is
then non-finite. Run :func:`nonfinite_grads` first: the policy (warn, skip, raise) is the
caller's.

Examples:
    >>> import torch
    >>> from lightning_gradhealth.clipping import clip_grads_, grad_norms, nonfinite_grads
    >>> lstm = torch.nn.LSTM(4, 8)
    >>> lstm(torch.randn(5, 2, 4))[0].pow(2).sum().backward()
    >>> parameters = list(lstm.parameters())
    >>> bool(nonfinite_grads(parameters).any())          # the one sync to know all is well
    False
    >>> stats = clip_grads_(parameters, "norm", clip_val=1e-3)
    >>> stats.to_floats()["clipped"]
    1.0
    >>> bool(torch.linalg.vector_norm(grad_norms(parameters)) <= 1e-3)
    True
"""

from __future__ import annotations

import difflib
import math
import numbers
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, Optional

import torch
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence

from lightning_gradhealth.defaults import CLIP_SUGGESTION_MIN_NORMS

__all__ = [
    "CLIP_MODES",
    "CLIP_SUGGESTION_WINDOW",
    "ClipStats",
    "ClipThresholdSuggester",
    "clip_grads_",
    "clip_grads_adaptive_",
    "clip_grads_by_norm_",
    "clip_grads_by_value_",
    "grad_norms",
    "group_grad_norms",
    "nonfinite_grads",
    "validate_clip_args",
]

CLIP_MODES: tuple[str, ...] = ("norm", "value", "agc")
"""Accepted values of ``clip`` besides ``None`` (no clipping)."""

_CLIP_VAL_MEANINGS: dict[str, str] = {
    "norm": "the maximum total gradient norm",
    "value": "the maximum absolute gradient value",
    "agc": "AGC's lambda, the maximum ratio of gradient norm to weight norm per unit",
}

_NORM_EPS = 1e-6
"""Added to the total norm in the clip coefficient, as ``torch.nn.utils.clip_grad_norm_`` does."""


@dataclass(frozen=True)
class ClipStats:
    """What one clipping call did, as 0-d tensors on the gradients' device (no host sync).

    All norms are the ``norm_type``-norm of all gradients viewed as one vector.

    Attributes:
        norm_before: total gradient norm before clipping; non-finite if any gradient is.
        norm_after: total gradient norm after clipping. By norm it is
            ``coefficient * norm_before``; by AGC it is computed from the rescaled unit norms; by
            value it is measured again after the clamp.
        coefficient: the factor the total norm was multiplied by, ``norm_after / norm_before``.
            By norm this is exactly the applied multiplier ``min(1, c / (norm_before + 1e-6))``
            (torch's); 1 when ``norm_before`` is 0 or non-finite, since nothing is then scaled.
        clipped_fraction: the share of the gradient that was changed. By norm 1 or 0 (all
            gradients are scaled together); by value the fraction of elements with
            ``|g| > clip_value``; by AGC the fraction of units (rows, see
            :func:`clip_grads_adaptive_`) that were rescaled.
        clipped: bool, whether any gradient was changed.
    """

    norm_before: Tensor
    norm_after: Tensor
    coefficient: Tensor
    clipped_fraction: Tensor
    clipped: Tensor

    def to_floats(self) -> dict[str, float]:
        """All fields as Python floats (``clipped`` as 0.0 / 1.0), with one host sync.

        Examples:
            >>> one = torch.tensor(1.0)
            >>> ClipStats(one, one, one, 0 * one, one < 0).to_floats()["clipped"]
            0.0
        """
        names = [field.name for field in fields(self)]
        values = torch.stack([getattr(self, name).to(self.norm_before) for name in names])
        return dict(zip(names, values.tolist()))


def validate_clip_args(
    clip: Optional[str], clip_val: Optional[float], norm_type: float | str = 2.0
) -> tuple[Optional[str], Optional[float], float]:
    """Check the clipping arguments of the callback and return them normalized.

    ``clip`` is ``None`` or one of :data:`CLIP_MODES` (any case); ``clip_val`` is a finite
    number > 0 when ``clip`` is set and ``None`` when it is not; ``norm_type`` is a number
    > 0, ``math.inf`` or the string ``"inf"`` (as torch accepts).

    Returns:
        ``(clip, clip_val, norm_type)`` with ``clip`` lower case, ``clip_val`` and
        ``norm_type`` as floats.

    Raises:
        ValueError: with a message that says what is allowed.

    Examples:
        >>> validate_clip_args("Norm", 1, "inf")
        ('norm', 1.0, inf)
        >>> validate_clip_args("nrom", 1.0)
        Traceback (most recent call last):
        ...
        ValueError: Unknown clip mode 'nrom'. Did you mean 'norm'? Valid values: None, 'norm', 'value', 'agc'.
    """
    if isinstance(norm_type, str) and norm_type.strip().lower() in ("inf", "+inf"):
        norm_type = math.inf
    if not _is_real(norm_type) or not norm_type > 0:
        raise ValueError(f"norm_type must be a number > 0 or math.inf (or 'inf'), got {norm_type!r}.")
    if clip is None:
        if clip_val is not None:
            raise ValueError(
                f"clip_val={clip_val!r} has no effect without clip; pass clip='norm', 'value' or 'agc', "
                "or leave clip_val=None."
            )
        return None, None, float(norm_type)
    if not isinstance(clip, str) or clip.lower() not in CLIP_MODES:
        closest = difflib.get_close_matches(str(clip).lower(), CLIP_MODES, n=1)
        hint = f" Did you mean {closest[0]!r}?" if closest else ""
        valid = ", ".join(repr(mode) for mode in CLIP_MODES)
        raise ValueError(f"Unknown clip mode {clip!r}.{hint} Valid values: None, {valid}.")
    if not _is_real(clip_val) or not math.isfinite(clip_val) or not clip_val > 0:
        raise ValueError(
            f"clip={clip.lower()!r} needs clip_val, {_CLIP_VAL_MEANINGS[clip.lower()]}, as a finite "
            f"number > 0; got {clip_val!r}."
        )
    return clip.lower(), float(clip_val), float(norm_type)


def _is_real(value: Any) -> bool:
    """Whether ``value`` is a real number and not a bool (``True`` is an ``int`` in Python)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and not math.isnan(value)


def _has_grad(parameter: Tensor) -> bool:
    """Whether ``parameter`` has a non-empty gradient (an empty one has norm 0 and nothing to clip)."""
    return parameter.grad is not None and parameter.grad.numel() > 0


def _with_grads(parameters: Iterable[Tensor]) -> list[Tensor]:
    """The parameters that have a non-empty gradient, in order."""
    return [p for p in parameters if _has_grad(p)]


def _accumulation_dtype(dtype: torch.dtype) -> Optional[torch.dtype]:
    """float32 for floating dtypes narrower than 32 bits (float16, bfloat16), else ``None``: keep."""
    return torch.float32 if dtype.is_floating_point and dtype.itemsize < 4 else None


def _group_by_device_and_dtype(tensors: Sequence[Tensor]) -> dict[tuple[torch.device, torch.dtype], list[int]]:
    """Indices of ``tensors`` per (device, dtype), the unit of one multi-tensor kernel call."""
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for index, tensor in enumerate(tensors):
        groups.setdefault((tensor.device, tensor.dtype), []).append(index)
    return groups


def _fused_norms(tensors: Sequence[Tensor], norm_type: float) -> list[Tensor]:
    """The ``norm_type``-norm of each tensor (0-d, on the first tensor's device), in order: one
    ``torch._foreach_norm`` call per (device, dtype) group."""
    norms: dict[int, Tensor] = {}
    for (_, dtype), indices in _group_by_device_and_dtype(tensors).items():
        group_norms = torch._foreach_norm([tensors[i] for i in indices], norm_type, dtype=_accumulation_dtype(dtype))
        norms.update(zip(indices, group_norms))
    device = tensors[0].device
    return [norms[index].to(device) for index in range(len(tensors))]


def _total_norm(tensors: Sequence[Tensor], norm_type: float) -> Tensor:
    """The ``norm_type``-norm of all ``tensors`` viewed as one vector: the norm of their norms."""
    return torch.linalg.vector_norm(torch.stack(_fused_norms(tensors, norm_type)), norm_type)


def _foreach_mul_by_device_and_dtype_(tensors: Sequence[Tensor], factors: Sequence[Tensor]) -> None:
    """``tensors[i] *= factors[i]`` (broadcasting), one ``torch._foreach_mul_`` per (device, dtype)."""
    for (device, _), indices in _group_by_device_and_dtype(tensors).items():
        torch._foreach_mul_([tensors[i] for i in indices], [factors[i].to(device) for i in indices])


@torch.no_grad()
def grad_norms(parameters: Sequence[Tensor], norm_type: float = 2.0) -> Tensor:
    r"""The gradient norm of each parameter, in one fused call: a 1-D tensor aligned with ``parameters``.

    Entry ``i`` is :math:`\lVert \nabla p_i \rVert_{\text{norm\_type}}`, 0 where ``p_i.grad``
    is ``None``. The total norm of all gradients is the norm of this vector.

    Examples:
        >>> a, b, c = torch.ones(3, requires_grad=True), torch.ones(2, requires_grad=True), torch.ones(1)
        >>> (a.sum() * 2 + b.sum()).backward()
        >>> norms = grad_norms([a, b, c])
        >>> norms
        tensor([3.4641, 1.4142, 0.0000])
        >>> torch.linalg.vector_norm(norms)          # total norm, as clip_grad_norm_ returns it
        tensor(3.7417)
    """
    parameters = list(parameters)
    with_grads = _with_grads(parameters)
    if not with_grads:
        device = parameters[0].device if parameters else None
        return torch.zeros(len(parameters), device=device)
    norms = iter(_fused_norms([p.grad for p in with_grads], norm_type))
    zero = torch.zeros((), device=with_grads[0].grad.device)
    return torch.stack([next(norms) if _has_grad(p) else zero for p in parameters])


@torch.no_grad()
def group_grad_norms(groups: Mapping[str, Sequence[Tensor]], norm_type: float = 2.0) -> Tensor:
    """The gradient norm of each named group of parameters, e.g. one group per recurrent layer.

    One fused norm call over all parameters of all groups, then each group's norm is the norm
    of its members' norms (zero-padded into one matrix, one reduction). Entry ``k`` belongs to
    the ``k``-th key of ``groups``; a group without gradients has norm 0.

    Examples:
        >>> rnn = torch.nn.RNN(3, 4, num_layers=2)
        >>> rnn(torch.randn(6, 1, 3))[0].sum().backward()
        >>> layers = {f"l{k}": [p for n, p in rnn.named_parameters() if n.endswith(f"_l{k}")] for k in (0, 1)}
        >>> norms = group_grad_norms(layers)
        >>> reference = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in layers["l1"]]))
        >>> torch.allclose(norms[1], reference)
        True
        >>> logged = dict(zip(layers, norms.tolist()))   # one sync for all groups
    """
    members = [list(group) for group in groups.values()]
    per_parameter = grad_norms([p for group in members for p in group], norm_type)
    if per_parameter.numel() == 0:
        return torch.zeros(len(members))
    per_group = pad_sequence(list(per_parameter.split([len(group) for group in members])), batch_first=True)
    return torch.linalg.vector_norm(per_group, norm_type, dim=1)


@torch.no_grad()
def nonfinite_grads(parameters: Sequence[Tensor]) -> Tensor:
    r"""A bool tensor aligned with ``parameters``: True where the gradient holds a NaN or an Inf.

    A gradient is finite exactly when its 2-norm accumulated in float64 is: squares of float32,
    float16 or bfloat16 values cannot overflow float64 (a float64 gradient with entries beyond
    1e150 would be flagged). A missing gradient counts as finite. ``bool(mask.any())`` is the one
    host sync that tells whether anything is wrong; only then is ``mask.nonzero()`` needed to
    name the offenders. See :func:`_finite_grads` for how the check is kept cheap on each device.

    Examples:
        >>> weight, bias = torch.ones(2, 2, requires_grad=True), torch.ones(2, requires_grad=True)
        >>> weight.grad, bias.grad = torch.ones(2, 2), torch.tensor([1.0, float("nan")])
        >>> mask = nonfinite_grads([weight, bias])
        >>> mask
        tensor([False,  True])
        >>> [name for name, bad in zip(["weight", "bias"], mask.tolist()) if bad]
        ['bias']
    """
    parameters = list(parameters)
    positions = [index for index, p in enumerate(parameters) if _has_grad(p)]
    if not positions:
        return torch.zeros(len(parameters), dtype=torch.bool, device=parameters[0].device if parameters else None)
    grads = [parameters[index].grad for index in positions]
    device = grads[0].device
    groups = list(_group_by_device_and_dtype(grads).values())
    finite = torch.cat([_finite_grads([grads[i] for i in indices]).to(device) for indices in groups])
    if len(positions) == len(parameters) and len(groups) == 1:
        return ~finite
    flagged = torch.zeros(len(parameters), dtype=torch.bool, device=device)
    order = [positions[i] for indices in groups for i in indices]
    flagged[order] = ~finite
    return flagged


def _finite_grads(grads: list[Tensor]) -> Tensor:
    """Whether each gradient of one (device, dtype) group is finite: its float64 2-norm is.

    On an accelerator this is one fused float64 norm, no host sync. On the CPU, where a sync is
    free and a float64 multi-tensor norm costs about 5x one in the gradients' own precision
    (0.67 against 0.13 ms for the reference LSTM's gradients), the norm is taken in the
    gradients' precision first: a finite result proves the gradient finite; only a gradient
    whose norm comes out NaN or Inf there (a NaN or Inf in it, or squares beyond float32's range)
    is checked again in float64.
    """
    if grads[0].device.type != "cpu":
        return torch.stack(torch._foreach_norm(grads, 2, dtype=torch.float64)).isfinite()
    finite = torch.stack(torch._foreach_norm(grads, 2, dtype=_accumulation_dtype(grads[0].dtype))).isfinite()
    if bool(finite.all()):
        return finite
    suspects = (~finite).nonzero().flatten().tolist()
    exact = torch._foreach_norm([grads[i] for i in suspects], 2, dtype=torch.float64)
    finite[suspects] = torch.stack(exact).isfinite()
    return finite


def _stats_without_grads(parameters: Sequence[Tensor]) -> ClipStats:
    """Statistics of a call that had no gradient to clip: all norms 0, nothing clipped."""
    zero = torch.zeros((), device=parameters[0].device if parameters else None)
    return ClipStats(zero, zero, torch.ones_like(zero), zero, zero > 0)


def _norm_ratio(norm_after: Tensor, norm_before: Tensor) -> Tensor:
    """``norm_after / norm_before``, and 1 where the ratio is undefined (before 0 or non-finite)."""
    defined = torch.isfinite(norm_before) & (norm_before > 0)
    return torch.where(defined, norm_after / torch.where(defined, norm_before, 1.0), 1.0)


@torch.no_grad()
def clip_grads_by_norm_(
    parameters: Iterable[Tensor],
    max_norm: float,
    norm_type: float = 2.0,
    reduce_norm: Optional[Callable[[Tensor], Tensor]] = None,
) -> ClipStats:
    r"""Rescale all gradients together so that their total norm is at most ``max_norm``.

    Pascanu, Mikolov & Bengio (2013), "On the difficulty of training recurrent neural networks":
    with :math:`g` all gradients as one vector, if :math:`\lVert g \rVert > c` then
    :math:`g \leftarrow c\, g / \lVert g \rVert`. As in ``torch.nn.utils.clip_grad_norm_``, the
    applied factor is :math:`\min(1, c / (\lVert g \rVert + 10^{-6}))`, and the gradients equal
    the ones it gives. Unlike it, a non-finite total norm leaves every gradient unscaled (torch
    would multiply by NaN or 0 and turn every gradient into NaN or 0).

    Args:
        parameters: parameters whose ``.grad`` is clipped in place (``None`` grads are skipped).
        max_norm: the threshold :math:`c`.
        norm_type: the p of the p-norm, ``math.inf`` for the max-norm.
        reduce_norm: turns this process's total norm into the norm over every process holding
            a shard of the gradients (FSDP); it is called on every process, also one without
            gradients (its local norm is then 0).

    Examples:
        >>> p = torch.zeros(2, requires_grad=True)
        >>> p.grad = torch.tensor([3.0, 4.0])
        >>> stats = clip_grads_by_norm_([p], max_norm=1.0)
        >>> p.grad, stats.norm_before, stats.clipped
        (tensor([0.6000, 0.8000]), tensor(5.), tensor(True))
    """
    parameters = list(parameters)
    with_grads = _with_grads(parameters)
    if not with_grads and reduce_norm is None:
        return _stats_without_grads(parameters)
    grads = [p.grad for p in with_grads]
    if grads:
        norm_before = _total_norm(grads, norm_type)
    else:
        norm_before = torch.zeros((), device=parameters[0].device if parameters else None)
    if reduce_norm is not None:
        norm_before = reduce_norm(norm_before)
    coefficient = torch.clamp(max_norm / (norm_before + _NORM_EPS), max=1.0)
    coefficient = torch.where(torch.isfinite(norm_before), coefficient, 1.0)
    if grads:
        _foreach_mul_by_device_and_dtype_(grads, [coefficient] * len(grads))
    clipped = coefficient < 1.0
    return ClipStats(norm_before, norm_before * coefficient, coefficient, clipped.to(norm_before.dtype), clipped)


@torch.no_grad()
def clip_grads_by_value_(parameters: Iterable[Tensor], clip_value: float, norm_type: float = 2.0) -> ClipStats:
    r"""Clamp every gradient element to :math:`[-c, c]`, as ``torch.nn.utils.clip_grad_value_``.

    :math:`g_j \leftarrow \max(-c, \min(c, g_j))` element-wise (Mikolov 2012 clipped this way;
    Pascanu et al. 2013 argue for the norm, which keeps the gradient's direction). ``±inf``
    becomes ``±c`` and NaN stays NaN. ``norm_type`` only chooses the norm of the statistics.

    Examples:
        >>> p = torch.zeros(4, requires_grad=True)
        >>> p.grad = torch.tensor([-3.0, 0.5, 1.0, 2.0])
        >>> stats = clip_grads_by_value_([p], clip_value=1.0)
        >>> p.grad, stats.clipped_fraction
        (tensor([-1.0000,  0.5000,  1.0000,  1.0000]), tensor(0.5000))
    """
    parameters = list(parameters)
    with_grads = _with_grads(parameters)
    if not with_grads:
        return _stats_without_grads(parameters)
    grads = [p.grad for p in with_grads]
    device = grads[0].device
    norm_before = _total_norm(grads, norm_type)
    clipped_count = torch.zeros((), device=device)
    for (_, dtype), indices in _group_by_device_and_dtype(grads).items():
        group = [grads[i] for i in indices]
        excess = torch._foreach_abs(group)  # max(|g| - c, 0) is nonzero exactly where g is clamped
        torch._foreach_sub_(excess, clip_value)
        torch._foreach_clamp_min_(excess, 0.0)
        counts = torch._foreach_norm(excess, 0, dtype=_accumulation_dtype(dtype))
        clipped_count = clipped_count + torch.stack(counts).sum().to(device)
        torch._foreach_clamp_min_(group, -clip_value)
        torch._foreach_clamp_max_(group, clip_value)
    norm_after = _total_norm(grads, norm_type)
    clipped_fraction = clipped_count / sum(grad.numel() for grad in grads)
    return ClipStats(
        norm_before, norm_after, _norm_ratio(norm_after, norm_before), clipped_fraction, clipped_count > 0
    )


def _unit_norms(tensor: Tensor, norm_type: float) -> Tensor:
    """Norm of each unit of ``tensor`` as a 1-D float tensor: one per row (dim 0) of a tensor of
    2 or more dims; a vector or a scalar is one unit."""
    accumulate = _accumulation_dtype(tensor.dtype)
    if tensor.dim() <= 1:
        return torch.linalg.vector_norm(tensor, norm_type, dtype=accumulate).reshape(1)
    return torch.linalg.vector_norm(tensor, norm_type, dim=tuple(range(1, tensor.dim())), dtype=accumulate)


def _unit_shape(tensor: Tensor) -> tuple[int, ...]:
    """Shape that broadcasts one factor per unit (see :func:`_unit_norms`) over ``tensor``."""
    if tensor.dim() <= 1:
        return (1,) * tensor.dim()
    return (tensor.shape[0],) + (1,) * (tensor.dim() - 1)


@torch.no_grad()
def clip_grads_adaptive_(
    parameters: Iterable[Tensor], clip_factor: float, eps: float = 1e-3, norm_type: float = 2.0
) -> ClipStats:
    r"""Adaptive gradient clipping (AGC), unit-wise: each unit's gradient relative to its weights.

    Brock, De, Smith & Simonyan (2021), "High-Performance Large-Scale Image Recognition Without
    Normalization", eq. 3: for each unit :math:`i` with weights :math:`W_i` and gradient
    :math:`G_i`,

    .. math::
        G_i \leftarrow \lambda \frac{\max(\lVert W_i \rVert, \epsilon)}{\lVert G_i \rVert} G_i
        \quad \text{if} \quad \frac{\lVert G_i \rVert}{\max(\lVert W_i \rVert, \epsilon)} > \lambda .

    A unit is a row (output unit): ``W[i]`` of a weight of 2 or more dims, in PyTorch's
    ``(out, in, ...)`` layout; so each gate unit of an LSTM's ``(4H, H)`` matrix is one unit.
    A vector (bias, gain) or a scalar is ONE unit, as in the authors' JAX code (``unitwise_norm``
    takes the norm over the whole vector) and timm's ``adaptive_clip_grad``. The paper uses
    :math:`\lambda` around 0.01 to 0.16 (smaller for larger batches) and leaves the final linear
    layer unclipped: pass the parameters without it to clip the same way.

    Unit norms are computed per parameter without any host sync (no multi-tensor kernel reduces
    rows); the decisions for all units are made in one vectorized step and applied with
    ``torch._foreach_mul_``. A unit whose gradient or weight norm is non-finite is left as it is.

    Args:
        parameters: parameters whose ``.grad`` is clipped in place (``None`` grads are skipped).
        clip_factor: :math:`\lambda`.
        eps: :math:`\epsilon`, the floor of the weight norm, so that zero-initialized units
            (biases) can still move.
        norm_type: the p of the unit norms (the paper: 2, the Frobenius norm).

    Examples:
        >>> w = torch.tensor([[3.0, 4.0], [1.0, 0.0]], requires_grad=True)
        >>> w.grad = torch.tensor([[0.0, 1.0], [0.0, 0.001]])
        >>> stats = clip_grads_adaptive_([w], clip_factor=0.1)   # row 0: 1 / 5 > 0.1; row 1 kept
        >>> w.grad
        tensor([[0.0000, 0.5000],
                [0.0000, 0.0010]])
        >>> stats.clipped_fraction
        tensor(0.5000)
    """
    parameters = list(parameters)
    with_grads = _with_grads(parameters)
    if not with_grads:
        return _stats_without_grads(parameters)
    grads = [p.grad for p in with_grads]
    device = grads[0].device
    grad_norm = torch.cat([_unit_norms(grad, norm_type).to(device) for grad in grads])
    weight_norm = torch.cat([_unit_norms(p.detach(), norm_type).to(device) for p in with_grads])
    max_norm = clip_factor * weight_norm.clamp_min(eps)
    clip_mask = (grad_norm > max_norm) & torch.isfinite(grad_norm) & torch.isfinite(max_norm)
    scale = torch.where(clip_mask, max_norm / torch.where(clip_mask, grad_norm, 1.0), 1.0)
    units_per_grad = [math.prod(_unit_shape(grad)) for grad in grads]
    factors = [factor.reshape(_unit_shape(grad)) for factor, grad in zip(scale.split(units_per_grad), grads)]
    _foreach_mul_by_device_and_dtype_(grads, factors)
    norm_before = torch.linalg.vector_norm(grad_norm, norm_type)
    norm_after = torch.linalg.vector_norm(grad_norm * scale, norm_type)
    return ClipStats(
        norm_before,
        norm_after,
        _norm_ratio(norm_after, norm_before),
        clip_mask.to(grad_norm.dtype).mean(),
        clip_mask.any(),
    )


def clip_grads_(
    parameters: Iterable[Tensor],
    clip: str,
    clip_val: float,
    norm_type: float = 2.0,
    eps: float = 1e-3,
    reduce_norm: Optional[Callable[[Tensor], Tensor]] = None,
) -> ClipStats:
    """Clip in place with the mode named ``clip`` (one of :data:`CLIP_MODES`); ``clip_val`` is
    the max norm, the max absolute value, or AGC's lambda. ``eps`` is used by AGC only;
    ``reduce_norm`` by ``"norm"`` only (see :func:`clip_grads_by_norm_`).

    Validate the arguments once with :func:`validate_clip_args`; this dispatcher assumes them valid.

    Examples:
        >>> p = torch.zeros(2, requires_grad=True)
        >>> p.grad = torch.tensor([3.0, -4.0])
        >>> clip_grads_([p], "value", 2.0).norm_after
        tensor(2.8284)
    """
    if clip == "norm":
        return clip_grads_by_norm_(parameters, clip_val, norm_type, reduce_norm)
    if clip == "value":
        return clip_grads_by_value_(parameters, clip_val, norm_type)
    if clip == "agc":
        return clip_grads_adaptive_(parameters, clip_val, eps, norm_type)
    raise ValueError(f"Unknown clip mode {clip!r}; valid values: {', '.join(map(repr, CLIP_MODES))}.")


CLIP_SUGGESTION_WINDOW = 1000
"""How many of the latest gradient norms :class:`ClipThresholdSuggester` keeps: the trailing
window its percentile is taken over (with ``clip``, the last 1000 optimizer steps; without it,
the last 1000 logging steps)."""


class ClipThresholdSuggester:
    r"""Suggests the ``clip_val`` of clipping by norm: a percentile of the latest gradient norms.

    Pascanu, Mikolov & Bengio (2013), section 3.2: "One good heuristic for setting this threshold
    is to look at statistics on the average norm over a sufficiently large number of updates";
    they also note that training is not very sensitive to it and works well even for rather
    small thresholds. The average here is the median, not the mean: gradient norms of recurrent
    networks are heavy-tailed, and a few exploding steps move the mean by orders of magnitude and
    the median hardly at all. (The ReLU RNN of ``examples/compare_inits.py`` from the identity
    init, seeds 0 to 2: 6 to 9 of its 1000 norms exceed 1e3, up to 3e10; the median is 33 to 43,
    the mean 1e4 to 3e7.) With :math:`x_1, \dots, x_n` the finite norms among the latest
    ``window`` updates, sorted, and :math:`q` = ``percentile``, the suggestion is

    .. math::
        \text{multiple} \cdot \operatorname{percentile}_q(x), \qquad
        \operatorname{percentile}_q(x) = x_{\lfloor h \rfloor} + (h - \lfloor h \rfloor)
        (x_{\lfloor h \rfloor + 1} - x_{\lfloor h \rfloor}), \quad h = 1 + (n - 1)\,q / 100,

    numpy's default (linear) percentile. The defaults, ``percentile=50`` (the median) and
    ``multiple=1``, clip about half of the steps of a run whose norms stay as they were; a
    higher ``percentile`` (say 90) clips only the largest tenth, and stays robust as long as the
    outliers are fewer than ``100 - percentile`` percent of the window. The window
    (:data:`CLIP_SUGGESTION_WINDOW` norms by default) follows the run as its norms change; a
    suggestion is made once ``min_updates`` finite norms are in it
    (:data:`~lightning_gradhealth.defaults.CLIP_SUGGESTION_MIN_NORMS` by default: our reading of
    "sufficiently large").

    Feed it the unclipped norms (``ClipStats.norm_before``). :meth:`update` writes the norm into
    a ring buffer on the norm's device and never syncs; a non-finite norm takes its place in the
    window but is not counted (norms are kept in float32: one beyond its range counts as
    non-finite). :meth:`suggest` reads the window once (one sync). The state is plain Python
    numbers, for checkpoints.

    Args:
        multiple: factor applied to the percentile; a finite number > 0.
        min_updates: finite norms needed in the window before a suggestion; an integer in
            ``[1, window]``.
        percentile: :math:`q`, in ``[0, 100]``.
        window: how many of the latest updates the percentile is taken over; an integer >= 1.

    Raises:
        ValueError: an argument outside the range given above, named in the message.

    Examples:
        >>> suggester = ClipThresholdSuggester(min_updates=3)
        >>> for norm in [1.0, 2.0, float("inf"), 3.0, 1e9]:
        ...     suggester.update(torch.tensor(norm))
        >>> suggester.suggest()           # median(1, 2, 3, 1e9): one huge norm barely moves it
        2.5
        >>> suggester.state_dict()
        {'count': 4, 'norms': [1.0, 2.0, nan, 3.0, 1000000000.0]}
        >>> upper = ClipThresholdSuggester(percentile=75, window=5, min_updates=5)
        >>> for norm in range(1, 8):     # the window keeps the latest five: 3 .. 7
        ...     upper.update(torch.tensor(float(norm)))
        >>> upper.suggest()               # numpy.percentile([3, 4, 5, 6, 7], 75)
        6.0
    """

    def __init__(
        self,
        multiple: float = 1.0,
        min_updates: int = CLIP_SUGGESTION_MIN_NORMS,
        *,
        percentile: float = 50.0,
        window: int = CLIP_SUGGESTION_WINDOW,
    ) -> None:
        if not _is_real(multiple) or not math.isfinite(multiple) or not multiple > 0:
            raise ValueError(f"multiple must be a finite number > 0, got {multiple!r}")
        if not _is_real(percentile) or not 0 <= percentile <= 100:
            raise ValueError(f"percentile must be a number in [0, 100] (50: the median), got {percentile!r}")
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"window must be an integer >= 1 (how many of the latest norms are kept), got {window!r}")
        self.multiple = float(multiple)
        self.percentile = float(percentile)
        self.window = window
        self.min_updates = min_updates
        self._norms = torch.full((window,), math.nan, dtype=torch.float32)  # ring buffer: update k writes slot k % window
        self._updates = 0  # updates so far, finite or not: where the next one goes
        self._count = torch.zeros((), dtype=torch.int64)  # finite norms so far, on the norms' device

    @property
    def min_updates(self) -> int:
        """Finite norms needed in the window before :meth:`suggest` gives a value."""
        return self._min_updates

    @min_updates.setter
    def min_updates(self, min_updates: int) -> None:
        if isinstance(min_updates, bool) or not isinstance(min_updates, int) or not 1 <= min_updates <= self.window:
            raise ValueError(
                f"min_updates must be an integer in [1, window={self.window}] (finite norms needed for a suggestion), "
                f"got {min_updates!r}"
            )
        self._min_updates = min_updates

    @torch.no_grad()
    def update(self, norm: Tensor) -> None:
        """Add one observed total gradient norm (a 0-d tensor on any device); no host sync."""
        norm = norm.detach().to(torch.float32).reshape(())
        if self._norms.device != norm.device:
            self._norms, self._count = self._norms.to(norm.device), self._count.to(norm.device)
        finite = torch.isfinite(norm)
        self._norms[self._updates % self.window] = torch.where(finite, norm, math.nan)
        self._count = self._count + finite
        self._updates += 1

    def suggest(self) -> Optional[float]:
        """``multiple`` times the ``percentile``-th percentile of the finite norms in the window, or
        ``None`` while fewer than ``min_updates`` of them are there (one sync)."""
        norms = torch.tensor(self._window_norms(), dtype=torch.float64)
        if norms.numel() < self.min_updates:
            return None
        return self.multiple * float(torch.quantile(norms, self.percentile / 100))

    def _window(self) -> list[float]:
        """The norms in the window, oldest first, NaN for a non-finite one (one sync)."""
        kept = min(self._updates, self.window)
        order = [(self._updates - kept + offset) % self.window for offset in range(kept)]
        return self._norms[order].tolist()

    def _window_norms(self) -> list[float]:
        """The finite norms in the window, oldest first (one sync)."""
        return [norm for norm in self._window() if math.isfinite(norm)]

    def state_dict(self) -> dict[str, Any]:
        """The number of finite norms seen and the window, oldest first, NaN for a non-finite
        norm (it held a place), as Python numbers (two syncs)."""
        return {"count": int(self._count), "norms": self._window()}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`; the next :meth:`update` moves the state to the norm's device.

        A window longer than this suggester's keeps its latest norms. A state of the earlier
        running-mean suggester (``{"count", "mean"}``) keeps its count; a mean cannot be turned
        into a percentile, so the window starts empty and fills with the norms seen from here on.

        Raises:
            ValueError: a count that is not an integer >= 0, norms that are not numbers, or
                more finite norms than ``count``; nothing is changed then.
        """
        count = state_dict["count"]
        if not _is_real(count) or not math.isfinite(count) or count != int(count) or count < 0:
            raise ValueError(f"expected an integer count >= 0, got {count!r}")
        if "norms" in state_dict:
            norms = list(state_dict["norms"])
        elif _is_real(state_dict.get("mean")) and math.isfinite(state_dict["mean"]):
            norms = []
        else:
            raise ValueError(f"expected 'norms' (or the earlier 'mean'), got keys {sorted(state_dict)}")
        if not all(isinstance(norm, numbers.Real) and not isinstance(norm, bool) for norm in norms):
            raise ValueError(f"expected the norms as numbers (NaN for a non-finite one), got {norms!r}")
        if sum(math.isfinite(norm) for norm in norms) > count:
            raise ValueError(f"expected at most count={count} finite norms, got {norms!r}")
        kept = [float(norm) if math.isfinite(norm) else math.nan for norm in norms[-self.window :]]
        self._norms = torch.full((self.window,), math.nan, dtype=torch.float32)
        self._norms[: len(kept)] = torch.tensor(kept, dtype=torch.float32)
        self._updates = len(kept)
        self._count = torch.tensor(int(count))
