"""Spectral metrics of recurrent weights against independent references: numpy.linalg and exactly known matrices."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lightning_gradhealth.inits import orthogonal_
from lightning_gradhealth.spectra import (
    SigmaMaxState,
    SigmaMaxTracker,
    estimate_sigma_max,
    full_spectrum,
)

PHI = (1 + math.sqrt(5)) / 2


def numpy_reference(block: np.ndarray, unit_circle_tolerance: float) -> dict[str, object]:
    """Every metric of one block straight from its definition, with numpy.linalg."""
    rows, cols = block.shape
    singular_values = np.linalg.svd(block, compute_uv=False)
    gram = block.T @ block if rows >= cols else block @ block.T
    reference: dict[str, object] = {
        "singular_values": singular_values,
        "sigma_max": singular_values[0],
        "sigma_min": singular_values[-1],
        "condition": np.linalg.cond(block, 2),
        "orth_error": np.linalg.norm(gram - np.eye(min(rows, cols)), "fro") / math.sqrt(min(rows, cols)),
        "eigenvalues": None,
        "spectral_radius": math.nan,
        "outside_unit_circle": math.nan,
    }
    if rows == cols:
        eigenvalues = np.linalg.eigvals(block)
        reference["eigenvalues"] = eigenvalues
        reference["spectral_radius"] = np.abs(eigenvalues).max()
        reference["outside_unit_circle"] = np.mean(np.abs(eigenvalues) > 1 + unit_circle_tolerance)
    return reference


def assert_same_eigenvalues(actual: np.ndarray, expected: np.ndarray, atol: float) -> None:
    """Equal as multisets: every eigenvalue has a partner within ``atol``, both ways."""
    distances = np.abs(actual[:, None] - expected[None, :])
    assert distances.min(axis=1).max() < atol
    assert distances.min(axis=0).max() < atol
    np.testing.assert_allclose(np.sort(np.abs(actual)), np.sort(np.abs(expected)), atol=atol)


def assert_block_matches(spectrum, gate: int, reference: dict[str, object], rtol: float = 1e-10) -> None:
    for name in ("sigma_max", "sigma_min", "condition", "orth_error", "spectral_radius", "outside_unit_circle"):
        np.testing.assert_allclose(getattr(spectrum, name)[gate].item(), reference[name], rtol=rtol, atol=1e-12, err_msg=name)
    np.testing.assert_allclose(spectrum.singular_values[gate].numpy(), reference["singular_values"], rtol=rtol, atol=1e-12)
    if reference["eigenvalues"] is None:
        assert spectrum.eigenvalues is None
    else:
        assert_same_eigenvalues(spectrum.eigenvalues[gate].numpy(), reference["eigenvalues"], atol=1e-9)


@pytest.mark.parametrize(
    "shape, gates",
    [((4 * 12, 12), 4), ((3 * 10, 10), 3), ((16, 16), 1), ((6, 16), 1), ((2 * 9, 5), 2)],
    ids=["lstm", "gru", "rnn", "projection_wide", "tall_blocks"],
)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_full_spectrum_matches_numpy_on_random_gate_blocks(shape, gates, dtype):
    generator = torch.Generator().manual_seed(sum(shape) + gates)
    weight = (torch.randn(shape, generator=generator, dtype=torch.float64) / math.sqrt(shape[1])).to(dtype)
    spectrum = full_spectrum(weight, gates=gates)
    tolerance = max(torch.finfo(dtype).eps, 1e-8)
    assert spectrum.finite.tolist() == [True] * gates
    for gate, block in enumerate(np.split(weight.double().numpy(), gates, axis=0)):
        assert_block_matches(spectrum, gate, numpy_reference(block, tolerance))
    if spectrum.eigenvalues is not None:
        moduli = spectrum.eigenvalues.abs()
        assert torch.all(moduli[:, :-1] >= moduli[:, 1:]), "eigenvalues sorted by decreasing modulus"
        assert spectrum.eigenvalues.dtype == torch.complex128
    assert spectrum.sigma_max.dtype == torch.float64


def test_fibonacci_matrix():
    spectrum = full_spectrum(torch.tensor([[1.0, 1.0], [1.0, 0.0]], dtype=torch.float64))
    torch.testing.assert_close(spectrum.eigenvalues[0], torch.tensor([PHI, -1 / PHI], dtype=torch.complex128))
    torch.testing.assert_close(spectrum.singular_values[0], torch.tensor([PHI, 1 / PHI], dtype=torch.float64))
    assert spectrum.spectral_radius.item() == pytest.approx(PHI, rel=1e-14)
    assert spectrum.sigma_max.item() == pytest.approx(PHI, rel=1e-14)
    assert spectrum.condition.item() == pytest.approx(PHI**2, rel=1e-14)
    # W^T W - I = [[1, 1], [1, 0]]: Frobenius norm sqrt(3), over sqrt(2)
    assert spectrum.orth_error.item() == pytest.approx(math.sqrt(3 / 2), rel=1e-14)
    assert spectrum.outside_unit_circle.item() == 0.5


def test_rotation_by_90_degrees():
    spectrum = full_spectrum(torch.tensor([[0.0, -1.0], [1.0, 0.0]]))
    assert_same_eigenvalues(spectrum.eigenvalues[0].numpy(), np.array([1j, -1j]), atol=1e-15)
    torch.testing.assert_close(spectrum.singular_values, torch.ones(1, 2, dtype=torch.float64))
    assert spectrum.spectral_radius.item() == pytest.approx(1.0, abs=1e-15)
    assert spectrum.orth_error.item() == pytest.approx(0.0, abs=1e-15)
    assert spectrum.condition.item() == pytest.approx(1.0, abs=1e-15)
    assert spectrum.outside_unit_circle.item() == 0.0


@pytest.mark.parametrize("scale", [0.5, 1.0, 2.0, -3.0, 0.0])
def test_scaled_identity(scale):
    spectrum = full_spectrum(scale * torch.eye(5, dtype=torch.float64))
    torch.testing.assert_close(spectrum.singular_values, torch.full((1, 5), abs(scale), dtype=torch.float64))
    assert spectrum.spectral_radius.item() == pytest.approx(abs(scale), abs=1e-15)
    assert spectrum.orth_error.item() == pytest.approx(abs(scale**2 - 1), abs=1e-14)
    assert spectrum.outside_unit_circle.item() == (1.0 if abs(scale) > 1 else 0.0)
    assert spectrum.condition.item() == (math.inf if scale == 0 else pytest.approx(1.0))


def test_per_gate_orthogonal_init_has_unit_spectrum_and_whole_matrix_init_does_not():
    hidden = 64
    per_gate = orthogonal_(torch.empty(4 * hidden, hidden), gates=4, generator=torch.Generator().manual_seed(0))
    spectrum = full_spectrum(per_gate, gates=4)
    torch.testing.assert_close(spectrum.singular_values, torch.ones(4, hidden, dtype=torch.float64), atol=1e-6, rtol=0)
    torch.testing.assert_close(spectrum.eigenvalues.abs(), torch.ones(4, hidden, dtype=torch.float64), atol=1e-6, rtol=0)
    assert spectrum.orth_error.max().item() < 1e-6
    assert spectrum.outside_unit_circle.tolist() == [0.0] * 4

    whole = torch.nn.init.orthogonal_(torch.empty(4 * hidden, hidden), generator=torch.Generator().manual_seed(0))
    contrast = full_spectrum(whole, gates=4)
    assert contrast.spectral_radius.max().item() < 0.8
    assert contrast.sigma_min.max().item() < 0.1
    assert contrast.orth_error.min().item() > 0.5
    assert contrast.outside_unit_circle.tolist() == [0.0] * 4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_weights_are_measured_in_float64_from_their_rounded_values(dtype):
    hidden = 16
    weight = orthogonal_(torch.empty(4 * hidden, hidden, dtype=dtype), gates=4, generator=torch.Generator().manual_seed(1))
    spectrum = full_spectrum(weight, gates=4)
    tolerance = torch.finfo(dtype).eps
    for gate, block in enumerate(np.split(weight.double().numpy(), 4, axis=0)):
        assert_block_matches(spectrum, gate, numpy_reference(block, tolerance))
    assert spectrum.orth_error.min().item() > 1e-5, "the rounding of the weights shows"
    assert spectrum.outside_unit_circle.tolist() == [0.0] * 4, "rounding is not counted as growth"


def test_nonfinite_gate_blocks_get_nan_metrics_and_the_others_real_ones(monkeypatch):
    hidden = 8
    weight = torch.randn(4 * hidden, hidden, generator=torch.Generator().manual_seed(2))
    weight[hidden + 3, 2] = math.nan
    weight[3 * hidden, 0] = math.inf
    for name in ("svdvals", "eigvals", "qr", "eigh"):
        original = getattr(torch.linalg, name)

        def checked(blocks, *args, _original=original, **kwargs):
            assert torch.isfinite(blocks).all(), "linalg must never see non-finite data"
            return _original(blocks, *args, **kwargs)

        monkeypatch.setattr(torch.linalg, name, checked)

    spectrum = full_spectrum(weight, gates=4)
    assert spectrum.finite.tolist() == [True, False, True, False]
    for name in ("sigma_max", "sigma_min", "condition", "spectral_radius", "orth_error", "outside_unit_circle"):
        assert getattr(spectrum, name)[[1, 3]].isnan().all(), name
    assert spectrum.singular_values[[1, 3]].isnan().all()
    assert spectrum.eigenvalues[[1, 3]].isnan().all()
    blocks = np.split(weight.double().numpy(), 4, axis=0)
    for gate in (0, 2):
        assert_block_matches(spectrum, gate, numpy_reference(blocks[gate], torch.finfo(torch.float32).eps))

    sigma_max, _ = estimate_sigma_max(weight, gates=4, generator=torch.Generator().manual_seed(0))
    assert sigma_max.isnan().tolist() == [False, True, False, True]
    assert full_spectrum(torch.full((3, 3), math.nan)).sigma_max.isnan().all()


def test_no_autograd_graph_and_results_on_the_weights_device():
    weight = torch.nn.Parameter(torch.randn(12, 4))
    with torch.enable_grad():
        spectrum = full_spectrum(weight, gates=3)
        sigma_max = SigmaMaxTracker()(weight, gates=3)
    for tensor in (spectrum.sigma_max, spectrum.eigenvalues, spectrum.singular_values, sigma_max):
        assert not tensor.requires_grad and tensor.grad_fn is None
        assert tensor.device == weight.device
    assert weight.grad is None


@pytest.mark.parametrize("shape, gates", [((4 * 16, 16), 5), ((10, 10), 3), ((10, 10), 0), ((16,), 1), ((0, 4), 1)])
def test_bad_shapes_and_gate_counts_are_rejected(shape, gates):
    with pytest.raises(ValueError):
        full_spectrum(torch.zeros(shape), gates=gates)


def numpy_sigma_max(weight: torch.Tensor, gates: int) -> np.ndarray:
    blocks = np.split(weight.double().numpy(), gates, axis=0)
    return np.array([np.linalg.svd(block, compute_uv=False)[0] for block in blocks])


def test_tracker_converges_to_numpy_sigma_max_on_a_fixed_matrix_from_below():
    weight = torch.randn(4 * 32, 32, generator=torch.Generator().manual_seed(3)) / math.sqrt(32)
    expected = numpy_sigma_max(weight, 4)
    tracker = SigmaMaxTracker()
    for _ in range(4):
        estimate = tracker(weight, gates=4).numpy()
        assert np.all(estimate <= expected * (1 + 1e-12)), "a Ritz value is a lower bound"
    np.testing.assert_allclose(estimate, expected, rtol=1e-5)


def test_tracker_follows_a_slowly_drifting_matrix():
    generator = torch.Generator().manual_seed(4)
    start = torch.randn(4 * 32, 32, generator=generator, dtype=torch.float64) / math.sqrt(32)
    drift = torch.randn(4 * 32, 32, generator=generator, dtype=torch.float64) / math.sqrt(32)
    tracker = SigmaMaxTracker()
    for step in range(12):
        weight = start + 1e-3 * step * drift
        estimate = tracker(weight, gates=4).numpy()
        if step >= 3:
            np.testing.assert_allclose(estimate, numpy_sigma_max(weight, 4), rtol=1e-5)


def test_tracker_state_dict_round_trip_continues_exactly():
    weight = torch.randn(3 * 24, 24, generator=torch.Generator().manual_seed(5))
    tracker = SigmaMaxTracker(iterations=1)
    assert tracker.state_dict() == {}
    tracker(weight, gates=3)
    saved = tracker.state_dict()
    assert set(saved) == {"right_vectors", "search_directions"}
    for tensor in saved.values():
        assert tensor.shape == (3, 24) and tensor.dtype == torch.float64 and tensor.device.type == "cpu"

    restored = SigmaMaxTracker(iterations=1)
    restored.load_state_dict(saved)
    torch.testing.assert_close(restored(weight, gates=3), tracker(weight, gates=3), rtol=0, atol=0)
    torch.testing.assert_close(restored.state_dict(), tracker.state_dict(), rtol=0, atol=0)

    restored.load_state_dict({})
    assert restored.state_dict() == {}
    with pytest.raises(ValueError):
        restored.load_state_dict({"right_vectors": saved["right_vectors"]})


def test_tracker_restarts_when_the_shape_changes_and_survives_nonfinite_weights():
    tracker = SigmaMaxTracker()
    tracker(torch.randn(4 * 8, 8), gates=4)
    gru = torch.randn(3 * 12, 12, generator=torch.Generator().manual_seed(6))
    for _ in range(3):
        estimate = tracker(gru, gates=3)
    np.testing.assert_allclose(estimate.numpy(), numpy_sigma_max(gru, 3), rtol=1e-6)

    state_before = tracker.state_dict()
    broken = gru.clone()
    broken[0, 0] = math.nan
    assert tracker(broken, gates=3).isnan().tolist() == [True, False, False]
    torch.testing.assert_close(tracker.state_dict()["right_vectors"][0], state_before["right_vectors"][0])
    np.testing.assert_allclose(tracker(gru, gates=3).numpy(), numpy_sigma_max(gru, 3), rtol=1e-6)


def test_zero_matrix_gives_zero_and_the_estimate_recovers_afterwards():
    tracker = SigmaMaxTracker()
    assert tracker(torch.zeros(6, 3), gates=2).tolist() == [0.0, 0.0]
    weight = torch.diag(torch.tensor([2.0, 1.0, 0.5])).repeat(2, 1)
    torch.testing.assert_close(tracker(weight, gates=2), torch.full((2,), 2.0, dtype=torch.float64))


def test_estimate_sigma_max_rejects_bad_arguments():
    weight = torch.randn(8, 4)
    with pytest.raises(ValueError, match="iterations"):
        estimate_sigma_max(weight, gates=2, iterations=0)
    state = SigmaMaxState(torch.ones(2, 5), torch.zeros(2, 5))
    with pytest.raises(ValueError, match="does not fit"):
        estimate_sigma_max(weight, gates=2, state=state)
    with pytest.raises(ValueError):
        SigmaMaxTracker(iterations=0)


def test_blocks_spread_over_threads_give_the_values_of_one_batched_call_bit_for_bit():
    weight = torch.randn(4 * 48, 48, generator=torch.Generator().manual_seed(5))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        batched = full_spectrum(weight, gates=4)
        torch.set_num_threads(4)
        spread = full_spectrum(weight, gates=4)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(batched.singular_values, spread.singular_values)
    assert torch.equal(batched.eigenvalues, spread.eigenvalues)
