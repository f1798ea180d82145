"""Tensor-level init schemes against independent references (numpy.linalg and the papers' formulas)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lightning_gradhealth.inits import (
    SCHEME_NAMES,
    Fans,
    glorot_normal_,
    glorot_uniform_,
    he_normal_,
    identity_,
    init_scheme_,
    orthogonal_,
    resolve_scheme,
    small_uniform_,
)


@pytest.mark.parametrize("shape, gates", [((64, 16), 4), ((48, 16), 3), ((16, 16), 1), ((12, 40), 3), ((40, 12), 1)])
@pytest.mark.parametrize("gain", [1.0, 0.5, 2.0])
def test_orthogonal_every_gate_block_has_all_singular_values_equal_to_gain(shape, gates, gain):
    weight = torch.empty(shape)
    orthogonal_(weight, gain=gain, gates=gates, generator=torch.Generator().manual_seed(0))
    for block in np.split(weight.numpy().astype(np.float64), gates, axis=0):
        singular_values = np.linalg.svd(block, compute_uv=False)
        np.testing.assert_allclose(singular_values, gain, atol=1e-5)
        small_gram = block @ block.T if block.shape[0] <= block.shape[1] else block.T @ block
        np.testing.assert_allclose(small_gram, gain**2 * np.eye(min(block.shape)), atol=1e-5)


def test_orthogonal_gate_blocks_are_independent_draws():
    weight = orthogonal_(torch.empty(32, 8), gates=4, generator=torch.Generator().manual_seed(0))
    blocks = weight.chunk(4)
    assert all(not torch.allclose(blocks[0], other) for other in blocks[1:])


def test_orthogonal_is_haar_distributed():
    # For a Haar-random Q in O(n), every entry has mean 0 and variance 1/n, and det(Q) is +1 or -1
    # with probability 1/2 each. Plain QR without the sign correction fails the first check: the
    # sign convention of diag(R) biases the diagonal of Q (its mean is about -0.2 at n = 6).
    n, draws = 6, 4000
    generator = torch.Generator().manual_seed(1)
    samples = torch.stack([orthogonal_(torch.empty(n, n), generator=generator) for _ in range(draws)])
    diagonal = samples.diagonal(dim1=1, dim2=2)
    assert abs(diagonal.mean().item()) < 4 / math.sqrt(draws * n * n)
    assert samples.var(dim=0).mean().item() == pytest.approx(1 / n, rel=0.05)
    positive_det = (torch.linalg.det(samples.double()) > 0).double().mean().item()
    assert positive_det == pytest.approx(0.5, abs=0.05)


def test_glorot_uniform_bound_and_variance_follow_glorot_bengio():
    fans = Fans(fan_in=300, fan_out=200)
    weight = glorot_uniform_(torch.empty(4 * 200, 500), gates=4, fans=fans, generator=torch.Generator().manual_seed(0))
    bound = math.sqrt(6 / (300 + 200))
    assert weight.abs().max().item() <= bound
    assert weight.abs().max().item() > 0.999 * bound
    for block in weight.chunk(4):
        assert block.var().item() == pytest.approx(2 / (300 + 200), rel=0.02)
        assert abs(block.mean().item()) < 4 * math.sqrt(bound**2 / 3 / block.numel())


def test_glorot_normal_std_follows_glorot_bengio_with_gain():
    weight = glorot_normal_(torch.empty(600, 400), gain=1.5, fans=Fans(250, 150), generator=torch.Generator().manual_seed(0))
    assert weight.std().item() == pytest.approx(1.5 * math.sqrt(2 / 400), rel=0.02)


def test_he_normal_uses_fan_in_and_each_gates_nonlinearity_gain():
    nonlinearities = ("sigmoid", "sigmoid", "tanh", "relu")
    weight = he_normal_(
        torch.empty(4 * 300, 200), gates=4, fans=Fans(fan_in=500, fan_out=300),
        nonlinearities=nonlinearities, generator=torch.Generator().manual_seed(0),
    )
    expected_gains = [1.0, 1.0, 5 / 3, math.sqrt(2)]
    for block, gain in zip(weight.chunk(4), expected_gains):
        assert block.std().item() == pytest.approx(gain / math.sqrt(500), rel=0.02)


def test_he_normal_rejects_a_nonlinearity_count_that_fits_neither_one_nor_every_gate():
    with pytest.raises(ValueError, match="expected 1 or 4 nonlinearities"):
        he_normal_(torch.empty(8, 2), gates=4, nonlinearities=("relu", "tanh"))


def test_identity_is_exact_per_gate_block_including_rectangular_blocks():
    weight = identity_(torch.full((12, 4), 7.0), gain=0.9, gates=3)
    np.testing.assert_array_equal(weight.numpy(), np.tile(0.9 * np.eye(4, dtype=np.float32), (3, 1)))
    wide = identity_(torch.full((2, 3), 7.0))
    np.testing.assert_array_equal(wide.numpy(), np.eye(2, 3, dtype=np.float32))


def test_small_uniform_stays_in_its_range_and_fills_it():
    weight = small_uniform_(torch.empty(200, 200), scale=0.02, generator=torch.Generator().manual_seed(0))
    assert weight.abs().max().item() <= 0.02
    assert weight.var().item() == pytest.approx(0.02**2 / 3, rel=0.03)


def test_same_generator_seed_gives_the_same_weights_and_another_seed_does_not():
    for name in ("orthogonal", "glorot", "glorot_normal", "he", "uniform"):
        first, second, other = (
            init_scheme_(torch.empty(8, 4), name, gates=2, generator=torch.Generator().manual_seed(seed))
            for seed in (5, 5, 6)
        )
        assert torch.equal(first, second), name
        assert not torch.equal(first, other), name


def test_schemes_keep_the_tensors_dtype_and_storage():
    weight = torch.nn.Parameter(torch.zeros(8, 4, dtype=torch.float64))
    pointer = weight.data_ptr()
    init_scheme_(weight, "orthogonal", gates=2)
    assert weight.dtype == torch.float64 and weight.data_ptr() == pointer and weight.requires_grad


def test_gate_count_that_does_not_divide_the_rows_is_rejected():
    with pytest.raises(ValueError, match="gates=3 does not divide the 8 rows"):
        orthogonal_(torch.empty(8, 4), gates=3)


def test_resolve_scheme_accepts_aliases_and_names_the_closest_valid_name():
    assert resolve_scheme("xavier") == "glorot"
    assert resolve_scheme("Kaiming") == "he"
    assert resolve_scheme(None) is None
    assert set(SCHEME_NAMES) >= {"orthogonal", "glorot", "xavier", "glorot_normal", "he", "kaiming", "identity", "uniform"}
    with pytest.raises(ValueError) as error:
        resolve_scheme("orthogonl")
    message = str(error.value)
    assert "Did you mean 'orthogonal'?" in message
    assert all(repr(name) in message for name in SCHEME_NAMES)
