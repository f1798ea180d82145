"""Clipping and non-finite detection against independent references: torch.nn.utils' clip
functions, a per-row loop of the AGC paper's formula, and norms of concatenated gradients."""

from __future__ import annotations

import collections
import functools
import math
from typing import Any, Callable

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from lightning_gradhealth.clipping import (
    CLIP_MODES,
    ClipStats,
    ClipThresholdSuggester,
    clip_grads_,
    clip_grads_adaptive_,
    clip_grads_by_norm_,
    clip_grads_by_value_,
    grad_norms,
    group_grad_norms,
    nonfinite_grads,
    validate_clip_args,
)


class Net(nn.Module):
    """Parameters of every shape clipping meets: LSTM matrices and biases, a conv kernel (3-D),
    a scalar, and an unused layer whose gradients stay ``None``."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(3, 5, num_layers=2, bidirectional=True)
        self.conv = nn.Conv1d(10, 4, kernel_size=2)
        self.temperature = nn.Parameter(torch.tensor(0.7))
        self.unused = nn.Linear(2, 2)
        with torch.no_grad():
            self.lstm.bias_ih_l0.zero_()  # a zero unit: AGC's eps floor decides

    def loss(self, x: torch.Tensor) -> torch.Tensor:
        out = self.lstm(x)[0]  # (T, N, 10)
        return self.conv(out.permute(1, 2, 0)).pow(2).sum() * self.temperature


@functools.cache
def _grads(scale: float) -> dict[str, torch.Tensor]:
    """Gradients of one backward pass, computed once per scale (keeps the file fast)."""
    net = _seeded_net()
    (scale * net.loss(torch.randn(7, 2, 3, generator=torch.Generator().manual_seed(1)))).backward()
    return {name: p.grad for name, p in net.named_parameters() if p.grad is not None}


def _seeded_net() -> Net:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return Net()


def net_with_grads(scale: float = 1.0) -> Net:
    """A fresh copy of the same net with the same gradients: identical inputs for ours and torch's."""
    net = _seeded_net()
    for name, grad in _grads(scale).items():
        net.get_parameter(name).grad = grad.clone()
    return net


def grads_of(module: nn.Module) -> list[torch.Tensor]:
    return [p.grad.clone() for p in module.parameters() if p.grad is not None]


def total_norm_reference(module: nn.Module, norm_type: float) -> torch.Tensor:
    flat = torch.cat([p.grad.double().flatten() for p in module.parameters() if p.grad is not None])
    return torch.linalg.vector_norm(flat, norm_type)


def assert_same_grads(ours: nn.Module, reference: nn.Module, **tolerance: Any) -> None:
    for (name, p), q in zip(ours.named_parameters(), reference.parameters()):
        if q.grad is None:
            assert p.grad is None, name
        else:
            torch.testing.assert_close(p.grad, q.grad, msg=name, **tolerance)


# ---------------------------------------------------------------------------------- by norm


@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf])
@pytest.mark.parametrize("threshold_over_norm", [0.1, 0.9, 10.0])
def test_clip_by_norm_equals_torch_clip_grad_norm(norm_type, threshold_over_norm):
    ours = net_with_grads()
    reference = net_with_grads()
    max_norm = threshold_over_norm * total_norm_reference(ours, norm_type).item()

    stats = clip_grads_by_norm_(ours.parameters(), max_norm, norm_type)
    torch_norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), max_norm, norm_type)

    assert_same_grads(ours, reference, rtol=0, atol=0)
    torch.testing.assert_close(stats.norm_before, torch_norm, rtol=0, atol=0)
    expected_coefficient = min(1.0, max_norm / (torch_norm.item() + 1e-6))
    assert stats.coefficient.item() == pytest.approx(expected_coefficient, rel=1e-6)
    assert stats.norm_after.item() == pytest.approx(total_norm_reference(ours, norm_type).item(), rel=1e-5)
    assert bool(stats.clipped) == (threshold_over_norm < 1)
    assert stats.clipped_fraction.item() == float(threshold_over_norm < 1)


def test_clip_by_norm_skips_missing_grads_and_handles_none_at_all():
    net = net_with_grads()
    assert net.unused.weight.grad is None
    clip_grads_by_norm_(net.parameters(), 1e-3)
    assert net.unused.weight.grad is None

    stats = clip_grads_by_norm_(Net().parameters(), 1.0)
    assert stats.to_floats() == {
        "norm_before": 0.0, "norm_after": 0.0, "coefficient": 1.0, "clipped_fraction": 0.0, "clipped": 0.0
    }


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_grads_have_float32_norms_that_do_not_overflow(dtype):
    big = nn.Parameter(torch.zeros(4, dtype=dtype))
    big.grad = torch.full((4,), 40960.0, dtype=dtype)  # norm 81920: above float16's maximum 65504
    small = nn.Parameter(torch.zeros(3))
    small.grad = torch.tensor([1.0, 2.0, 2.0])
    reference_norm = math.hypot(81920.0, 3.0)
    torch.testing.assert_close(grad_norms([big, small]), torch.tensor([81920.0, 3.0]), rtol=1e-3, atol=0)

    stats = clip_grads_by_norm_([big, small], max_norm=1.0)

    assert stats.norm_before.dtype == torch.float32
    assert stats.norm_before.item() == pytest.approx(reference_norm, rel=1e-3)
    assert big.grad.dtype == dtype
    torch.testing.assert_close(big.grad.float(), torch.full((4,), 40960.0 / reference_norm), rtol=1e-2, atol=0)
    torch.testing.assert_close(small.grad, torch.tensor([1.0, 2.0, 2.0]) / reference_norm, rtol=1e-3, atol=0)


# --------------------------------------------------------------------------------- by value


@pytest.mark.parametrize("clip_value", [1e-3, 0.05, 1e6])
def test_clip_by_value_equals_torch_clip_grad_value(clip_value):
    ours = net_with_grads()
    reference = net_with_grads()
    flat = torch.cat([g.flatten() for g in grads_of(ours)])

    stats = clip_grads_by_value_(ours.parameters(), clip_value)
    torch.nn.utils.clip_grad_value_(reference.parameters(), clip_value)

    assert_same_grads(ours, reference, rtol=0, atol=0)
    clipped_fraction = (flat.abs() > clip_value).double().mean().item()
    assert stats.clipped_fraction.item() == pytest.approx(clipped_fraction, rel=1e-6)
    assert bool(stats.clipped) == (clipped_fraction > 0)
    norm_after = total_norm_reference(ours, 2.0).item()
    assert stats.norm_before.item() == pytest.approx(flat.double().norm().item(), rel=1e-5)
    assert stats.norm_after.item() == pytest.approx(norm_after, rel=1e-5)
    assert stats.coefficient.item() == pytest.approx(norm_after / flat.double().norm().item(), rel=1e-5)


# -------------------------------------------------------------------------------------- AGC


def agc_reference_(parameters: list[nn.Parameter], clip_factor: float, eps: float, norm_type: float) -> float:
    """Brock et al. (2021), eq. 3, one unit at a time: a row of a weight, a whole bias or scalar.
    Returns the fraction of units clipped."""
    clipped, units = 0, 0
    for p in parameters:
        if p.grad is None:
            continue
        rows = [(p.detach()[i], p.grad[i]) for i in range(p.shape[0])] if p.dim() >= 2 else [(p.detach(), p.grad)]
        for weight, grad in rows:
            weight_norm = max(torch.linalg.vector_norm(weight.double(), norm_type).item(), eps)
            grad_norm = torch.linalg.vector_norm(grad.double(), norm_type).item()
            units += 1
            if grad_norm / weight_norm > clip_factor:
                grad.mul_(clip_factor * weight_norm / grad_norm)
                clipped += 1
    return clipped / units


@pytest.mark.parametrize("norm_type", [2.0, math.inf])
@pytest.mark.parametrize("clip_factor", [1e-3, 0.05, 1e4])
def test_agc_equals_a_per_row_reference_of_the_paper_formula(clip_factor, norm_type):
    ours = net_with_grads(scale=0.2)
    reference = net_with_grads(scale=0.2)

    stats = clip_grads_adaptive_(ours.parameters(), clip_factor, eps=1e-3, norm_type=norm_type)
    with torch.no_grad():
        clipped_fraction = agc_reference_(list(reference.parameters()), clip_factor, 1e-3, norm_type)

    assert_same_grads(ours, reference, rtol=1e-5, atol=1e-7)
    assert stats.clipped_fraction.item() == pytest.approx(clipped_fraction)  # 0.72, 0.14 or 0
    assert bool(stats.clipped) == (clipped_fraction > 0)
    norm_before = total_norm_reference(net_with_grads(scale=0.2), norm_type).item()
    norm_after = total_norm_reference(ours, norm_type).item()
    assert stats.norm_before.item() == pytest.approx(norm_before, rel=1e-5)
    assert stats.norm_after.item() == pytest.approx(norm_after, rel=1e-5)
    assert stats.coefficient.item() == pytest.approx(norm_after / norm_before, rel=1e-5)


def test_agc_treats_a_bias_as_one_unit_and_floors_zero_weights_at_eps():
    bias = nn.Parameter(torch.zeros(3))
    bias.grad = torch.tensor([1.0, 0.0, 0.0])
    clip_grads_adaptive_([bias], clip_factor=0.5, eps=1e-3)  # max norm 0.5 * 1e-3, for the whole vector
    torch.testing.assert_close(bias.grad, torch.tensor([5e-4, 0.0, 0.0]))


# --------------------------------------------------------------------------- norms by group


@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf])
def test_group_grad_norms_equal_the_norm_of_each_group_concatenated(norm_type):
    net = net_with_grads()
    named = dict(net.named_parameters())
    groups = {
        f"l{layer}{suffix}": [p for name, p in named.items() if name.endswith(f"_l{layer}{suffix}")]
        for layer in (0, 1) for suffix in ("", "_reverse")
    }
    groups["head"] = [net.conv.weight, net.conv.bias, net.temperature, net.unused.weight]
    groups["no grads"] = [net.unused.weight, net.unused.bias]
    groups["empty"] = []

    norms = group_grad_norms(groups, norm_type)

    assert norms.shape == (len(groups),)
    for norm, (key, members) in zip(norms, groups.items()):
        flat = [p.grad.flatten() for p in members if p.grad is not None]
        expected = torch.linalg.vector_norm(torch.cat(flat), norm_type) if flat else torch.tensor(0.0)
        torch.testing.assert_close(norm, expected, msg=key)


def test_grad_norms_are_aligned_with_the_parameters():
    net = net_with_grads()
    parameters = list(net.parameters())
    norms = grad_norms(parameters, 1.0)
    expected = [p.grad.abs().sum() if p.grad is not None else torch.tensor(0.0) for p in parameters]
    torch.testing.assert_close(norms, torch.stack(expected))


# ------------------------------------------------------------------------ non-finite grads


def test_nonfinite_grads_finds_exactly_the_nan_and_inf_parameters():
    net = net_with_grads()
    parameters = list(net.parameters())
    poisoned = {1: float("nan"), 4: float("inf"), 6: -float("inf")}
    for index, value in poisoned.items():
        parameters[index].grad.view(-1)[-1] = value
    parameters[2].grad.view(-1)[0] = 1e30  # finite, but its square overflows float32
    half = nn.Parameter(torch.zeros(2, dtype=torch.float16))
    half.grad = torch.tensor([1.0, float("inf")], dtype=torch.float16)

    mask = nonfinite_grads(parameters + [half])

    assert mask.dtype == torch.bool
    assert mask.nonzero().flatten().tolist() == sorted(poisoned) + [len(parameters)]


def test_nonfinite_grads_is_exact_where_the_fast_norm_overflows():
    """Finite gradients whose squares leave float32's range (float32 and bfloat16) are not flagged,
    next to a NaN that is."""
    big32 = nn.Parameter(torch.zeros(3))
    big32.grad = torch.tensor([1e25, -1e25, 1.0])
    big16 = nn.Parameter(torch.zeros(2, dtype=torch.bfloat16))
    big16.grad = torch.tensor([1e30, 2.0], dtype=torch.bfloat16)
    small = nn.Parameter(torch.zeros(2))
    small.grad = torch.tensor([float("nan"), 0.0])

    assert nonfinite_grads([big32, big16]).tolist() == [False, False]
    assert nonfinite_grads([big32, small, big16]).tolist() == [False, True, False]


@pytest.mark.parametrize("bad_value", [float("nan"), float("inf")])
def test_clipping_nonfinite_grads_does_not_crash_and_spreads_nothing(bad_value):
    net = net_with_grads()
    net.lstm.weight_hh_l0.grad[0, 0] = bad_value
    before = {name: p.grad.clone() for name, p in net.named_parameters() if p.grad is not None}

    stats = clip_grads_by_norm_(net.parameters(), 1e-3)  # total norm non-finite: nothing scaled
    assert not math.isfinite(stats.norm_before.item())
    assert stats.to_floats()["clipped"] == 0.0 and stats.coefficient.item() == 1.0
    for name, p in net.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(p.grad, before[name], equal_nan=True, msg=name)

    stats = clip_grads_adaptive_(net.parameters(), 1e-3)  # only the bad unit is left unscaled
    assert not math.isfinite(stats.norm_before.item()) and bool(stats.clipped)
    grad = net.lstm.weight_hh_l0.grad
    torch.testing.assert_close(grad[0], before["lstm.weight_hh_l0"][0], equal_nan=True)
    finite_rows = nn.Parameter(net.lstm.weight_hh_l0.detach()[1:].clone())
    finite_rows.grad = before["lstm.weight_hh_l0"][1:].clone()
    with torch.no_grad():
        agc_reference_([finite_rows], 1e-3, 1e-3, 2.0)
    torch.testing.assert_close(grad[1:], finite_rows.grad)

    clip_grads_by_value_(net.parameters(), 1e-4)  # as torch: NaN stays, inf becomes the bound
    expected = bad_value if math.isnan(bad_value) else 1e-4
    torch.testing.assert_close(grad[0, 0], torch.tensor(expected), equal_nan=True)


# ----------------------------------------------------------------------------- no host sync


NONFINITE: Callable[[list], Any] = nonfinite_grads


class _CountOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        self.calls[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(
    "call",
    [
        lambda ps: clip_grads_by_norm_(ps, 0.1),
        lambda ps: clip_grads_by_value_(ps, 0.01),
        lambda ps: clip_grads_adaptive_(ps, 0.01),
        NONFINITE,
        lambda ps: group_grad_norms({"a": ps[:2], "b": ps[2:]}),
        lambda ps: ClipThresholdSuggester().update(grad_norms(ps).sum()),
    ],
    ids=["norm", "value", "agc", "nonfinite", "groups", "suggester"],
)
def test_no_host_sync_and_one_fused_norm_for_all_parameters(call: Callable[[list], Any]):
    parameters = list(net_with_grads().parameters())
    with _CountOps() as ops:
        call(parameters)
    # what .item(), bool() and .tolist() call; the NaN/Inf check reads one flag on the CPU, where
    # a read waits for nothing, to skip its float64 pass when all is finite
    syncs = 1 if call is NONFINITE and parameters[0].device.type == "cpu" else 0
    assert ops.calls["aten._local_scalar_dense"] == syncs
    assert ops.calls["aten._foreach_norm"] <= 3  # value: norm before, clamped count, norm after


# --------------------------------------------------------------------------------- dispatch


@pytest.mark.parametrize(
    "clip, function", [("norm", clip_grads_by_norm_), ("value", clip_grads_by_value_), ("agc", clip_grads_adaptive_)]
)
def test_clip_grads_dispatches_to_the_mode(clip, function):
    ours, reference = net_with_grads(), net_with_grads()
    stats = clip_grads_(ours.parameters(), clip, 0.01)
    expected = function(reference.parameters(), 0.01)
    assert isinstance(stats, ClipStats)
    assert stats.to_floats() == expected.to_floats()
    assert_same_grads(ours, reference, rtol=0, atol=0)
    assert set(CLIP_MODES) == {"norm", "value", "agc"}


# ---------------------------------------------------------------------- threshold suggestion


def _fed(norms: list[float], **kwargs: Any) -> ClipThresholdSuggester:
    suggester = ClipThresholdSuggester(**kwargs)
    for norm in norms:
        suggester.update(torch.tensor(norm))
    return suggester


def _float32(norms: np.ndarray) -> np.ndarray:
    """The norms as the suggester keeps them (float32), for the numpy reference."""
    return norms.astype(np.float32).astype(np.float64)


def test_threshold_suggester_is_numpys_median_of_the_finite_norms_and_huge_outliers_barely_move_it():
    rng = np.random.default_rng(0)
    norms = rng.lognormal(mean=3.0, sigma=0.5, size=300)  # about 20, as a ReLU RNN's usual steps
    norms[[40, 41, 42, 200, 299]] = [2.07e9, 7.8e3, 1.3e6, 5e8, 1e12]  # one exploding stretch, and more
    fed = [*norms[:100], math.nan, *norms[100:250], math.inf, *norms[250:]]
    suggester = _fed(fed, min_updates=300)
    finite = _float32(norms)
    assert suggester.suggest() == pytest.approx(np.median(finite), rel=1e-12)
    assert suggester.suggest() < 2 * np.median(norms[norms < 1e3])  # the outliers do not drive it
    assert np.mean(norms) > 1e9  # where the mean would have gone
    assert suggester.state_dict()["count"] == 300


@pytest.mark.parametrize(
    "percentile, multiple, window", [(90.0, 1.0, 1000), (10.0, 2.0, 1000), (75.0, 1.5, 64), (0, 1, 7), (100, 1, 7)]
)
def test_threshold_suggester_is_numpys_percentile_of_the_trailing_window(percentile, multiple, window):
    norms = np.random.default_rng(1).lognormal(mean=0.0, sigma=2.0, size=250)
    suggester = _fed(list(norms), multiple=multiple, percentile=percentile, window=window, min_updates=min(window, 5))
    expected = multiple * np.percentile(_float32(norms[-window:]), percentile)
    assert suggester.suggest() == pytest.approx(expected, rel=1e-12)


def test_threshold_suggester_waits_for_enough_finite_norms_in_its_window():
    suggester = _fed([1.0, 2.0, math.nan, 3.0], min_updates=4, window=5)
    assert suggester.suggest() is None  # three finite norms
    suggester.update(torch.tensor(4.0, dtype=torch.float64))
    assert suggester.suggest() == 2.5
    suggester.update(torch.tensor(math.inf))  # 1.0 leaves the window, an Inf takes the place
    assert suggester.suggest() is None


def test_threshold_suggester_state_round_trips_and_goes_on_like_the_original():
    norms = list(np.random.default_rng(2).lognormal(size=40))
    original = _fed(norms[:30] + [math.nan], window=16, min_updates=10)
    restored = ClipThresholdSuggester(window=16, min_updates=10)
    restored.load_state_dict(original.state_dict())
    assert restored.state_dict()["count"] == 30
    np.testing.assert_equal(restored.state_dict()["norms"], [*_float32(np.array(norms[15:30])), math.nan])  # NaN held a place
    for suggester in (original, restored):
        for norm in norms[30:]:
            suggester.update(torch.tensor(norm))
    window = _float32(np.array(norms[25:]))  # the latest 16 updates: 5 norms, the NaN, 10 norms
    assert restored.suggest() == original.suggest() == pytest.approx(np.median(window), rel=1e-12)

    shorter = ClipThresholdSuggester(window=4, min_updates=4)
    shorter.load_state_dict(original.state_dict())  # keeps the latest norms of a longer window
    assert shorter.state_dict()["norms"] == original.state_dict()["norms"][-4:] == list(_float32(np.array(norms[-4:])))


def test_threshold_suggester_loads_the_earlier_running_mean_state():
    suggester = ClipThresholdSuggester(min_updates=2)
    suggester.load_state_dict({"count": 250, "mean": 12.5})  # what the running-mean suggester saved
    assert suggester.state_dict() == {"count": 250, "norms": []}
    assert suggester.suggest() is None  # a mean is not a median: the window refills
    for norm in (3.0, 1.0, 2.0):
        suggester.update(torch.tensor(norm))
    assert suggester.suggest() == 2.0 and suggester.state_dict()["count"] == 253


@pytest.mark.parametrize(
    "state",
    [
        {"count": 1},
        {"count": -1, "norms": []},
        {"count": 1, "norms": [1.0, 2.0]},
        {"count": 1, "norms": [1.0, 2.0, math.nan]},
        {"count": 2, "norms": [1.0, "2"]},
        {"count": math.inf, "mean": 1.0},
        {"count": 2, "mean": math.nan},
        {"count": 1.5, "norms": [1.0]},
    ],
)
def test_threshold_suggester_refuses_a_malformed_state_and_keeps_its_own(state):
    suggester = _fed([1.0, 2.0], min_updates=1)
    with pytest.raises(ValueError, match="expected"):
        suggester.load_state_dict(state)
    assert suggester.state_dict() == {"count": 2, "norms": [1.0, 2.0]}


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"multiple": 0.0}, "multiple"),
        ({"multiple": math.inf}, "multiple"),
        ({"min_updates": 0}, "min_updates"),
        ({"min_updates": 11, "window": 10}, "min_updates"),
        ({"percentile": 101}, "percentile"),
        ({"percentile": math.nan}, "percentile"),
        ({"window": 0}, "window"),
        ({"window": 10.0}, "window"),
    ],
)
def test_threshold_suggester_rejects_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=f"^{name} must be"):
        ClipThresholdSuggester(**kwargs)


# -------------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "clip, clip_val, norm_type, expected",
    [
        (None, None, 2, (None, None, 2.0)),
        ("norm", 1, 2.0, ("norm", 1.0, 2.0)),
        ("VALUE", 0.5, 1, ("value", 0.5, 1.0)),
        ("agc", 0.01, math.inf, ("agc", 0.01, math.inf)),
        ("norm", 1.0, "inf", ("norm", 1.0, math.inf)),
    ],
)
def test_validate_clip_args_accepts_and_normalizes(clip, clip_val, norm_type, expected):
    assert validate_clip_args(clip, clip_val, norm_type) == expected


@pytest.mark.parametrize(
    "clip, clip_val, norm_type, message",
    [
        (
            "nrom", 1.0, 2.0,
            r"Unknown clip mode 'nrom'\. Did you mean 'norm'\? Valid values: None, 'norm', 'value', 'agc'\.",
        ),
        ("adaptive", 1.0, 2.0, r"Unknown clip mode 'adaptive'\..*Valid values: None, 'norm', 'value', 'agc'"),
        (True, 1.0, 2.0, r"Unknown clip mode True"),
        ("norm", None, 2.0, r"clip='norm' needs clip_val, the maximum total gradient norm, as a finite number > 0"),
        ("value", 0.0, 2.0, r"clip='value' needs clip_val.*finite number > 0; got 0\.0"),
        ("agc", -0.01, 2.0, r"clip='agc' needs clip_val, AGC's lambda"),
        ("norm", math.inf, 2.0, r"finite number > 0; got inf"),
        ("norm", float("nan"), 2.0, r"finite number > 0; got nan"),
        ("norm", True, 2.0, r"got True"),
        ("norm", "1.0", 2.0, r"got '1\.0'"),
        (None, 1.0, 2.0, r"clip_val=1\.0 has no effect without clip; pass clip='norm', 'value' or 'agc'"),
        ("norm", 1.0, 0, r"norm_type must be a number > 0 or math\.inf \(or 'inf'\), got 0"),
        ("norm", 1.0, -2.0, r"norm_type must be .* got -2\.0"),
        ("norm", 1.0, "two", r"norm_type must be .* got 'two'"),
        ("norm", 1.0, float("nan"), r"norm_type must be .* got nan"),
    ],
)
def test_validate_clip_args_says_what_is_allowed(clip, clip_val, norm_type, message):
    with pytest.raises(ValueError, match=message):
        validate_clip_args(clip, clip_val, norm_type)
