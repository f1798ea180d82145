"""Whether a recurrent layer's weights are as a fresh init left them, or were trained or loaded.

``GradHealth(init=...)`` must never overwrite weights a user trained or loaded (a pretrained
encoder, ``load_from_checkpoint`` then ``fit``, a forecasting library's ``load`` then ``fit``).
No flag records how a tensor got its values: a deep copy or a pickle resets the version counter
that ``load_state_dict`` and optimizer steps bump. The values themselves are the evidence. A
fresh init leaves a pattern that training destroys:

- a uniform draw fills ``[-a, a]`` for one of the standard bounds ``a`` (PyTorch's default for
  recurrent layers, ``1/sqrt(hidden_size)``; ``nn.Linear``'s, ``1/sqrt(fan_in)``; Glorot's, whole
  or per gate; He's; GradHealth's small-uniform baseline). No entry lies beyond ``a``, the
  largest lies within ``a * EDGE / n`` of it, and the empirical distribution is uniform
  (Kolmogorov-Smirnov distance at most :data:`KS_CRITICAL` / sqrt(n)). Training moves the
  entries near the edge: outward, beyond the bound, or inward, leaving a gap at the edge;
- an orthogonal (or identity) init, per gate block or whole, scales every vector by the same
  factor, ``||B v|| = c ||v||``, to float precision (:data:`ORTHOGONAL_RTOL`); training breaks
  that at the first step;
- a bias of constant gate blocks (zeros, a forget bias of 1), or a chrono bias
  (``b_i = -b_f``).

A parameter that matches none of these patterns was trained or loaded, or was drawn from an
unbounded distribution (a normal init, GradHealth's ``"he"`` and ``"glorot_normal"`` included),
which cannot be told from lightly trained weights. Either way GradHealth keeps it: the safe
side. A layer that was loaded but never trained (a checkpoint saved right after init) still
matches its pattern: initializing it again loses nothing.

Examples:
    >>> import torch
    >>> _ = torch.manual_seed(0)
    >>> lstm = torch.nn.LSTM(8, 32)
    >>> trained_modules(lstm)
    {}
    >>> with torch.no_grad():  # one small step of training
    ...     _ = lstm.weight_hh_l0.add_(0.01 * torch.randn_like(lstm.weight_hh_l0))
    >>> print(trained_modules(lstm)[""])
    weight_hh_l0: 77 entries beyond PyTorch's default bound 0.177 (max |w| 0.197); no other fresh-init pattern
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Iterable, Optional, Sequence

import torch
from torch import Tensor, nn

from lightning_gradhealth.layers import WeightRecord, find_recurrent_weights

__all__ = [
    "EDGE",
    "KS_CRITICAL",
    "ORTHOGONAL_RTOL",
    "OTHER_BOUND_MIN_ENTRIES",
    "fresh_pattern",
    "frozen_parameters",
    "trained_modules",
    "uniform_bounds",
]

KS_CRITICAL = 2.6
"""A fresh uniform draw of n entries has a Kolmogorov-Smirnov distance to its distribution
below ``KS_CRITICAL / sqrt(n)`` except with probability about ``2 exp(-2 KS_CRITICAL^2)`` = 3e-6."""

EDGE = 13.0
"""A fresh uniform draw of n entries reaches within ``bound * EDGE / n`` of its bound except with
probability ``exp(-EDGE)`` = 2e-6: training that moves the entries inward (weight decay, a loss
that shrinks the states) leaves a gap at the edge."""

OTHER_BOUND_MIN_ENTRIES = 650
"""Below this many entries (``EDGE / 0.02``) the test at the edge allows more than 2% of slack, so
a draw of a bound other than PyTorch's default is accepted in a module whose biases kept the
default only from a matrix at least this large."""

ORTHOGONAL_RTOL = 2e-5
"""How far ``||B v|| / ||v||`` may vary over random ``v`` for a block counted as orthogonal up
to scale: float32 rounding gives about 1e-6, one optimizer step of 1e-4 already more than this."""

_DEFAULT_DRAW = "uniform draw, PyTorch's default"
_KS_SAMPLE = 20_000  # entries the uniformity test looks at (a fixed random subset of large tensors)
_PROBES = 8  # random vectors of the orthogonality test


def uniform_bounds(record: WeightRecord, uniform_scale: Optional[float] = None) -> dict[str, float]:
    """The bounds ``a`` of the standard uniform inits that could have drawn ``record``'s tensor.

    Examples:
        >>> lstm = torch.nn.LSTM(8, 32)
        >>> record = [r for r in find_recurrent_weights(lstm) if r.param_name == "weight_hh_l0"][0]
        >>> {name: round(bound, 3) for name, bound in uniform_bounds(record).items()}["PyTorch's default"]
        0.177
    """
    tensor = record.tensor
    if record.cell_type == "linear":  # nn.Linear draws weight and bias from U(-1/sqrt(in_features), ...)
        default = 1.0 / math.sqrt(max(record.fans.fan_in, 1))
    else:  # a recurrent module draws every parameter from U(-1/sqrt(hidden_size), ...)
        default = 1.0 / math.sqrt(tensor.shape[1] if record.projection else tensor.shape[0] // len(record.gates))
    bounds = {"PyTorch's default": default}
    if tensor.dim() == 2:
        rows, cols = tensor.shape
        fan_in, fan_out = record.fans
        bounds.update(
            {
                "nn.Linear's default": 1.0 / math.sqrt(cols),
                "Glorot uniform": math.sqrt(6.0 / (rows + cols)),
                "Glorot uniform per gate": math.sqrt(6.0 / (fan_in + fan_out)),
                "He uniform": math.sqrt(6.0 / cols),
            }
        )
    if uniform_scale is not None:
        bounds["GradHealth's uniform"] = uniform_scale
    return bounds


def _sample(values: Tensor, generator: torch.Generator) -> Tensor:
    """``values``, or :data:`_KS_SAMPLE` of them drawn at random when there are more (the
    uniformity test needs no more)."""
    if values.numel() <= _KS_SAMPLE:
        return values
    return values[torch.randint(values.numel(), (_KS_SAMPLE,), generator=generator).to(values.device)]


def _is_uniform_draw(largest: float, count: int, sample: Tensor, bound: float, eps: float) -> bool:
    """Whether ``count`` values whose largest magnitude is ``largest`` could be a fresh draw of
    ``U(-bound, bound)``: none beyond the bound (up to rounding); the largest within
    ``bound * EDGE / count`` of it, as all but ``exp(-EDGE)`` of fresh draws are; and a
    Kolmogorov-Smirnov distance of ``sample`` (float64, flat) below the critical one."""
    # the draw is rounded to the tensor's dtype: up to one unit of the last place either side of the bound
    if bound <= 0 or largest > bound * (1 + 2 * eps) + 1e-12 or largest < bound * (1 - EDGE / count - 2 * eps):
        return False
    quantiles = ((sample / bound + 1) / 2).sort().values
    n = quantiles.numel()
    ranks = torch.arange(1, n + 1, dtype=quantiles.dtype, device=quantiles.device) / n
    distance = torch.maximum(ranks - quantiles, quantiles - (ranks - 1 / n)).max().item()
    return distance <= KS_CRITICAL / math.sqrt(n)


def _is_orthogonal_up_to_scale(block: Tensor, generator: torch.Generator, eps: float) -> bool:
    """Whether ``block`` scales every vector by the same factor (orthonormal columns, or rows
    when it is wide), to :data:`ORTHOGONAL_RTOL`, or 64 units of the last place of the dtype
    it was stored in (``eps``); random probes, no decomposition."""
    matrix = block if block.shape[0] >= block.shape[1] else block.T
    if matrix.shape[1] < 2:  # one column scales every (1-D) vector alike: no evidence either way
        return False
    probes = torch.randn(matrix.shape[1], _PROBES, generator=generator, dtype=torch.float64).to(matrix.device)
    ratios = torch.linalg.vector_norm(matrix @ probes, dim=0) / torch.linalg.vector_norm(probes, dim=0)
    largest = ratios.max().item()
    return largest > 0 and (largest - ratios.min().item()) <= max(ORTHOGONAL_RTOL, 64 * eps) * largest


def _enough_beyond(values: Tensor, default: float, bound: float) -> bool:
    """For a draw of ``U(-bound, bound)`` wider than PyTorch's default ``U(-default, default)``:
    whether enough entries lie beyond ``default``. A fresh draw puts a fraction
    ``p = 1 - default / bound`` there; default-initialized weights that training pushed a little
    beyond their bound put only a few. Refused below ``n p - 4 sqrt(n p (1 - p))``."""
    if bound <= default:
        return True
    n, p = values.numel(), 1 - default / bound
    return int((values.abs() > default).sum()) >= n * p - 4 * math.sqrt(n * p * (1 - p))


def fresh_pattern(record: WeightRecord, uniform_scale: Optional[float] = None) -> tuple[Optional[str], str]:
    """The fresh-init pattern ``record``'s values match, or ``None`` and what rules them out.

    Returns:
        ``(pattern, evidence)``: e.g. ``("uniform draw, PyTorch's default bound 0.177", "")``, or
        ``(None, "... entries beyond PyTorch's default bound ...")``.
    """
    tensor = record.tensor.detach()
    if tensor.is_meta or tensor.dim() == 0 or not tensor.is_floating_point():
        return None, "no values to judge (a meta, 0-d or integer tensor)"
    values = tensor.flatten().double()
    if values.numel() == 0:
        return "empty", ""
    if not torch.isfinite(values).all():
        return None, "non-finite values"
    blocks = values.view(len(record.gates), -1) if tensor.shape[0] % len(record.gates) == 0 else values.view(1, -1)
    if blocks.shape[1] >= 2 and bool((blocks == blocks[:, :1]).all()):  # one entry per block is constant by itself
        return "constant gate blocks", ""
    if record.role == "bias" and len(record.gates) == 4 and torch.equal(blocks[0], -blocks[1]):
        return "chrono bias (b_i = -b_f)", ""
    generator = torch.Generator().manual_seed(0)
    if tensor.dim() == 2:
        gates = len(record.gates) if tensor.shape[0] % len(record.gates) == 0 else 1
        matrix = values.view(tensor.shape)
        stored_eps = torch.finfo(tensor.dtype).eps
        if all(_is_orthogonal_up_to_scale(block, generator, stored_eps) for block in matrix.chunk(gates, dim=0)):
            return "orthogonal gate blocks (up to scale)", ""
        if _is_orthogonal_up_to_scale(matrix, generator, stored_eps):
            return "orthogonal (up to scale)", ""
    sample = _sample(values, generator)
    eps = torch.finfo(tensor.dtype).eps
    bounds = uniform_bounds(record, uniform_scale)
    largest = values.abs().max().item()
    default = bounds["PyTorch's default"]
    # a custom matrix has no construction init to expect, and few entries cannot tell a uniform draw from others
    if record.cell_type == "custom" and values.numel() < OTHER_BOUND_MIN_ENTRIES:
        bounds = {}
    for name, bound in bounds.items():
        if _is_uniform_draw(largest, values.numel(), sample, bound, eps) and _enough_beyond(values, default, bound):
            return f"uniform draw, {name} bound {bound:.3g}", ""  # PyTorch's default first: see _DEFAULT_DRAW
    beyond = int((values.abs() > default * (1 + 2 * eps)).sum())
    if not bounds:
        evidence = f"a custom matrix of {values.numel()} entries: too few to recognise a uniform draw"
    elif beyond:
        evidence = f"{beyond} entries beyond PyTorch's default bound {default:.3g} (max |w| {largest:.3g})"
    else:
        evidence = f"within PyTorch's default bound {default:.3g} but not a uniform draw of it"
    return None, f"{evidence}; no other fresh-init pattern"


def trained_modules(
    model: nn.Module,
    custom: Optional[dict[str, int]] = None,
    *,
    records: Optional[Iterable[WeightRecord]] = None,
    uniform_scale: Optional[float] = None,
) -> dict[str, str]:
    """The recurrent modules of ``model`` holding a parameter that matches no fresh-init pattern
    (:func:`fresh_pattern`): ``{module name: evidence}``, the evidence naming the first such
    parameter. A module is judged whole: its layers were trained or loaded together.

    Args:
        model: the model whose recurrent layers (and ``custom`` matrices) to look at.
        custom: ``{glob: gates}`` of custom recurrent matrices, as ``InitConfig.custom``.
        records: the weight records to judge instead of finding them again.
        uniform_scale: the bound of GradHealth's ``"uniform"`` scheme, if it may have drawn them.
    """
    judged: dict[str, str] = {}
    found = list(records) if records is not None else find_recurrent_weights(model, custom or {})
    by_module: dict[str, list[WeightRecord]] = defaultdict(list)
    for record in found:
        by_module[record.module_name].append(record)
    for module_name, module_records in by_module.items():
        patterns = {}
        for record in module_records:
            pattern, evidence = fresh_pattern(record, uniform_scale)
            if pattern is None:
                judged[module_name] = f"{record.param_name}: {evidence}"
                break
            patterns[record.param_name] = (record, pattern)
        else:
            evidence = _inconsistent_draw(list(patterns.values())) or _pooled_default_evidence(
                [record for record, pattern in patterns.values() if pattern.startswith(_DEFAULT_DRAW)]
            )
            if evidence:
                judged[module_name] = evidence
    return judged


def _inconsistent_draw(patterns: Sequence[tuple[WeightRecord, str]]) -> str:
    """A module whose biases were not re-initialized (they are not constant or chrono) kept
    PyTorch's default init; then a matrix that passes as a draw of another, wider bound only
    because it has too few entries (fewer than :data:`OTHER_BOUND_MIN_ENTRIES`) for the test
    at the edge to be tight is more likely default weights that training pushed past their
    bound. Returns that evidence, or ``""``."""
    biases_reinitialized = all(
        pattern in ("constant gate blocks", "chrono bias (b_i = -b_f)") for record, pattern in patterns if record.role == "bias"
    )
    if biases_reinitialized:
        return ""
    for record, pattern in patterns:
        count = record.tensor.numel()
        if pattern.startswith("uniform draw") and not pattern.startswith(_DEFAULT_DRAW) and count < OTHER_BOUND_MIN_ENTRIES:
            return (
                f"{record.param_name}: passes as a {pattern.removeprefix('uniform draw, ')} draw, but its {count} entries "
                "cannot tell that from default weights trained past their bound, and the biases kept PyTorch's default"
            )
    return ""


def _pooled_default_evidence(records: Sequence[WeightRecord]) -> str:
    """PyTorch's default draws every parameter of a recurrent module from one ``U(-k, k)``: test
    the parameters that each pass as such a draw together, which sees a smaller gap at the edge
    (small layers, lightly trained). Returns what rules the pooled draw out, or ``""``."""
    if len(records) < 2:
        return ""
    values = torch.cat([record.tensor.detach().flatten().double() for record in records])
    bound = uniform_bounds(records[0])["PyTorch's default"]
    eps = max(torch.finfo(record.tensor.dtype).eps for record in records)
    sample = _sample(values, torch.Generator().manual_seed(0))
    largest = values.abs().max().item()
    if _is_uniform_draw(largest, values.numel(), sample, bound, eps):
        return ""
    names = ", ".join(record.param_name for record in records)
    return (
        f"{names}: together not one draw of PyTorch's default U(-{bound:.3g}, {bound:.3g}) "
        f"(max |w| {largest:.3g} of {values.numel()} entries); no other fresh-init pattern"
    )


def frozen_parameters(records: Sequence[WeightRecord]) -> list[str]:
    """The full names of the parameters among ``records`` that do not train (``requires_grad=False``)."""
    return [record.full_name for record in records if not record.tensor.requires_grad]
