r"""Spectra of recurrent weight matrices, one gate block at a time.

Backpropagation through time multiplies the gradient by the hidden-to-hidden matrix once per
step, so the singular values and eigenvalues of each gate block decide whether it vanishes
(everything inside the unit circle) or explodes (:math:`\sigma_{\max} > 1`, eigenvalues
outside the circle), Pascanu, Mikolov & Bengio (2013). A recurrent weight stacks its gate blocks
along the rows in PyTorch's order (LSTM ``i, f, g, o``; GRU ``r, z, n``; one block for a plain
RNN); an LSTM projection ``weight_hr`` of shape ``(P, H)`` is one non-square block.

Two passes, for two schedules:

- :class:`SigmaMaxTracker` (cheap, every logging step): :math:`\sigma_{\max}` of every block by
  a warm-started iteration on :math:`W^\top W`, :math:`O(H^2)` per call.
- :func:`full_spectrum` (:math:`O(H^3)`, now and then): every singular value and eigenvalue, and
  the scalars ``sigma_max``, ``sigma_min``, ``condition``, ``spectral_radius``, ``orth_error``,
  ``outside_unit_circle``. :func:`~lightning_gradhealth.figures.eigenvalue_image` draws its
  eigenvalues for TensorBoard.

All gate blocks of a matrix go through one batched ``torch.linalg`` call. The math runs in
float64 on the weight's own device, under ``torch.no_grad()`` on ``weight.detach()``, whatever
the weight's dtype (bf16 and fp16 are converted exactly). A block holding NaN or Inf never
reaches ``torch.linalg``: its ``finite`` flag is False and its metrics are NaN, while the other
blocks of the same matrix get their real values.

Examples:
    >>> import torch
    >>> from lightning_gradhealth.inits import orthogonal_
    >>> weight_hh = orthogonal_(torch.empty(4 * 8, 8), gates=4)      # an LSTM, H = 8
    >>> spectrum = full_spectrum(weight_hh, gates=4)
    >>> spectrum.singular_values.shape, spectrum.eigenvalues.shape
    (torch.Size([4, 8]), torch.Size([4, 8]))
    >>> torch.allclose(spectrum.spectral_radius, torch.ones(4, dtype=torch.float64))
    True
    >>> SigmaMaxTracker()(weight_hh, gates=4)                        # the cheap pass
    tensor([1.0000, 1.0000, 1.0000, 1.0000], dtype=torch.float64)
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Mapping, NamedTuple, Optional, Sequence

import torch
from torch import Tensor

__all__ = [
    "MatrixSpectrum",
    "SigmaMaxState",
    "SigmaMaxTracker",
    "estimate_sigma_max",
    "full_spectrum",
]


def _float64_blocks(weight: Tensor, gates: int) -> tuple[Tensor, Tensor]:
    """The gate blocks of ``weight`` as one float64 tensor ``[G, rows, cols]`` and their finite flags ``[G]``.

    Blocks holding NaN or Inf are replaced by zeros, so that no linalg routine ever sees them;
    callers overwrite their results with NaN using the flags. A block is finite when the float64
    sum of its entries is: NaN and Inf propagate through the sum, and entries of a float32 or
    narrower weight cannot overflow it (a float64 weight whose entries sum past 1.8e308 counts
    as non-finite). That is 15 times faster than ``isfinite`` over every entry on a CPU. Reading
    the flags back is one host-device synchronization; the linalg calls synchronize anyway.
    """
    if weight.dim() != 2 or 0 in weight.shape:
        raise ValueError(f"expected a non-empty 2-D weight matrix, got shape {tuple(weight.shape)}")
    if gates < 1 or weight.shape[0] % gates:
        raise ValueError(
            f"gates={gates} does not divide the {weight.shape[0]} rows of a weight of shape "
            f"{tuple(weight.shape)}; the gate count must be a positive divisor of the row count"
        )
    blocks = weight.detach().to(torch.float64).reshape(gates, weight.shape[0] // gates, weight.shape[1])
    finite = blocks.sum(dim=(1, 2)).isfinite()
    if not bool(finite.all()):
        blocks = torch.where(finite[:, None, None], blocks, 0.0)
    return blocks, finite


@dataclass(frozen=True)
class MatrixSpectrum:
    r"""Spectral metrics of one recurrent weight matrix, one entry per gate block.

    Every tensor is float64 (``eigenvalues`` complex128) on the weight's device; index ``k``
    is gate block ``k`` in PyTorch's row order. Blocks whose ``finite`` flag is False hold NaN
    everywhere. Non-square blocks (an LSTM's ``weight_hr``) have no eigenvalues: their
    ``spectral_radius`` and ``outside_unit_circle`` are NaN and ``eigenvalues`` is None.

    Attributes:
        finite: ``[G]`` bool, whether the block holds only finite numbers.
        sigma_max: ``[G]`` largest singular value :math:`\sigma_{\max}`, the spectral norm.
        sigma_min: ``[G]`` smallest singular value (of the ``min(rows, cols)`` ones).
        condition: ``[G]`` :math:`\sigma_{\max} / \sigma_{\min}`, ``inf`` when :math:`\sigma_{\min} = 0`.
        spectral_radius: ``[G]`` :math:`\max_i |\lambda_i|`.
        orth_error: ``[G]`` :math:`\|W^\top W - I\|_F / \sqrt{n}` over the Gram matrix of the
            smaller side (:math:`W W^\top` when rows < cols), :math:`n` its size; 0 for an
            orthogonal block, :math:`|c^2 - 1|` for :math:`c I`.
        outside_unit_circle: ``[G]`` fraction of eigenvalues with :math:`|\lambda| > 1 + \mathrm{tol}`.
        singular_values: ``[G, min(rows, cols)]`` all singular values, descending.
        eigenvalues: ``[G, n]`` complex eigenvalues sorted by decreasing modulus, or None.
    """

    finite: Tensor
    sigma_max: Tensor
    sigma_min: Tensor
    condition: Tensor
    spectral_radius: Tensor
    orth_error: Tensor
    outside_unit_circle: Tensor
    singular_values: Tensor
    eigenvalues: Optional[Tensor]


def full_spectrum(
    weight: Tensor, gates: int = 1, unit_circle_tolerance: Optional[float] = None
) -> MatrixSpectrum:
    r"""Every singular value and eigenvalue of each gate block of ``weight``, and their summaries.

    ``torch.linalg.svdvals`` and, for square blocks, ``torch.linalg.eigvals`` of the
    ``[G, rows, cols]`` float64 blocks: :math:`O(G H^3)`, most of it in ``eigvals``, whose LAPACK
    routine runs on one core. On a CPU the blocks are therefore decomposed one by one on
    ``torch.get_num_threads()`` threads (:func:`_per_block`), each block by the same routine a
    batched call runs, so the values are those of the batched call, bit for bit; on other
    devices in one batched call each (``benchmarks/spectra.py`` measures it).
    ``orth_error`` follows from the singular values without another product:
    :math:`\|W^\top W - I\|_F^2 = \sum_i (\sigma_i^2 - 1)^2` over the smaller Gram matrix.

    Rounding puts the eigenvalues of an orthogonal matrix a hair off the unit circle on either
    side (float32 weights: about 1e-8), so ``outside_unit_circle`` counts only moduli above
    ``1 + unit_circle_tolerance``. The default is the machine epsilon of the weight's dtype
    (float32 1.2e-7, fp16 9.8e-4, bf16 7.8e-3), at least 1e-8: the resolution of the stored
    weights near 1.

    Args:
        weight: a 2-D weight, gate blocks stacked along the rows; any float dtype and device.
        gates: number of gate blocks (LSTM 4, GRU 3, plain RNN and ``weight_hr`` 1).
        unit_circle_tolerance: see above.

    Raises:
        ValueError: ``weight`` is not a non-empty 2-D matrix or ``gates`` does not divide its rows.

    Examples:
        >>> fibonacci = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
        >>> spectrum = full_spectrum(fibonacci)
        >>> spectrum.eigenvalues
        tensor([[ 1.6180+0.j, -0.6180+0.j]], dtype=torch.complex128)
        >>> spectrum.spectral_radius, spectrum.outside_unit_circle
        (tensor([1.6180], dtype=torch.float64), tensor([0.5000], dtype=torch.float64))
        >>> full_spectrum(torch.tensor([[0.0, 3.0]])).sigma_max     # a non-square (1, 2) block
        tensor([3.], dtype=torch.float64)
    """
    if unit_circle_tolerance is None:
        unit_circle_tolerance = max(torch.finfo(weight.dtype).eps, 1e-8)
    with torch.no_grad():
        blocks, finite = _float64_blocks(weight, gates)
        square = blocks.shape[1] == blocks.shape[2]
        singular_values, *unsorted = _per_block(blocks, [torch.linalg.svdvals, *([torch.linalg.eigvals] if square else [])])
        sigma_max, sigma_min = singular_values[:, 0], singular_values[:, -1]
        condition = torch.where(sigma_min > 0, sigma_max / sigma_min, math.inf)
        orth_error = (singular_values.square() - 1).square().mean(dim=1).sqrt()
        if square:
            order = unsorted[0].abs().argsort(dim=1, descending=True)
            eigenvalues: Optional[Tensor] = unsorted[0].gather(1, order)
            moduli = eigenvalues.abs()
            spectral_radius = moduli[:, 0]
            outside_unit_circle = (moduli > 1 + unit_circle_tolerance).to(torch.float64).mean(dim=1)
            eigenvalues = eigenvalues.masked_fill(~finite[:, None], complex(math.nan, math.nan))
        else:
            eigenvalues = None
            spectral_radius = torch.full_like(sigma_max, math.nan)
            outside_unit_circle = torch.full_like(sigma_max, math.nan)

        def nan_unless_finite(values: Tensor) -> Tensor:
            return values.masked_fill(~finite.view(-1, *[1] * (values.dim() - 1)), math.nan)

        return MatrixSpectrum(
            finite=finite,
            sigma_max=nan_unless_finite(sigma_max),
            sigma_min=nan_unless_finite(sigma_min),
            condition=nan_unless_finite(condition),
            spectral_radius=nan_unless_finite(spectral_radius),
            orth_error=nan_unless_finite(orth_error),
            outside_unit_circle=nan_unless_finite(outside_unit_circle),
            singular_values=nan_unless_finite(singular_values),
            eigenvalues=eigenvalues,
        )


def _per_block(blocks: Tensor, functions: Sequence[Callable[[Tensor], Tensor]]) -> list[Tensor]:
    """``[function(blocks) for function in functions]``, each a batched linalg function of the
    ``[G, rows, cols]`` blocks, computed block by block on a pool of ``torch.get_num_threads()``
    threads when the blocks are on a CPU and there are several blocks and threads.

    A batched call on a CPU loops over the blocks on one thread, and LAPACK's ``geev`` (behind
    ``eigvals``) hardly uses more: on 2 cores, four 256 x 256 blocks take about 120 ms in one
    batched call and about 80 ms spread over 2 threads (torch releases the GIL in linalg). The
    threads live for one call, so nothing is left behind to break in a forked process.

    Examples:
        >>> blocks = torch.eye(3, dtype=torch.float64).expand(2, 3, 3)
        >>> [values.tolist() for values in _per_block(blocks, [torch.linalg.svdvals])]
        [[[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]]]
    """
    workers = min(torch.get_num_threads(), len(blocks) * len(functions))
    if blocks.device.type != "cpu" or len(blocks) < 2 or workers < 2:
        return [function(blocks) for function in functions]
    with ThreadPoolExecutor(workers, thread_name_prefix="gradhealth-spectra") as pool:
        results = [[pool.submit(function, block) for block in blocks] for function in functions]
        return [torch.stack([result.result() for result in per_block]) for per_block in results]


class SigmaMaxState(NamedTuple):
    """Warm-start state of :func:`estimate_sigma_max`, float64, one row per gate block.

    Attributes:
        right_vectors: ``[G, cols]`` unit estimates of each block's top right singular vector.
        search_directions: ``[G, cols]`` the last step's direction (zeros at the start).
    """

    right_vectors: Tensor
    search_directions: Tensor


def _gram_times(blocks: Tensor, vectors: Tensor) -> Tensor:
    r""":math:`W^\top (W V)` for ``blocks`` ``[G, r, c]`` and ``vectors`` ``[G, c, k]``, never forming :math:`W^\top W`.

    Written as :math:`((W V)^\top W)^\top`: a batched product with a transposed ``[G, r, c]``
    operand is 5 times slower on a CPU (MKL, H = 1024).
    """
    return ((blocks @ vectors).mT @ blocks).mT


def estimate_sigma_max(
    weight: Tensor,
    gates: int = 1,
    state: Optional[SigmaMaxState] = None,
    iterations: int = 2,
    generator: Optional[torch.Generator] = None,
) -> tuple[Tensor, SigmaMaxState]:
    r""":math:`\sigma_{\max}` of each gate block in :math:`O(H^2)`, warm-started from ``state``.

    The top eigenvalue of :math:`A = W^\top W` (:math:`\sigma_{\max}^2`) is found by LOBPCG
    (Knyazev 2001), power iteration made locally optimal: each iteration multiplies the
    3-column basis :math:`[x,\ A x - \rho(x) x,\ p]` (current vector, residual, previous
    direction) by :math:`W` and :math:`W^\top` and takes the best vector of that span by
    Rayleigh-Ritz. A call costs ``1 + iterations`` products of each block with a ``[cols, 3]``
    tensor (memory-bound at these widths, so about the cost of as many matrix-vector products)
    and never forms :math:`W^\top W`. Its estimate is a Ritz value, hence a lower bound:
    :math:`\hat\sigma \le \sigma_{\max}` up to rounding.

    Accuracy, measured on 4 gate blocks of H = 1024 starting from random vectors with 2
    iterations per call: relative error of the worst block after 5 / 10 / 20 / 50 calls

    - PyTorch's default LSTM init :math:`U(\pm 1/\sqrt{H})`, whose top singular values sit at
      the edge of a dense bulk (the slow case): 1e-2 / 2e-3 / 3e-6 / 2e-14;
    - orthogonal plus 10% Gaussian noise: 6e-3 / 3e-3 / 4e-4 / 4e-7;
    - orthogonal plus a rank-one outlier (a separated top singular value): 5e-16 after 5 calls.

    Plain power iteration (2 steps per call) is still 1e-2 / 4e-3 off after 20 / 50 calls on
    the first two (its factor per step, :math:`(\sigma_2 / \sigma_1)^2`, is close to 1 there),
    hence LOBPCG. On a matrix that drifts between calls (H = 256, a random change of 0.1% of
    its norm per call) the error settles at 1e-6 to 1e-5 after 10 calls; with 1% per call, at
    1e-4 to 2e-3.

    The spectral radius has no cheap counterpart here. Power iteration on :math:`W` itself
    does not converge: the largest eigenvalues of a real matrix are usually complex-conjugate
    pairs of equal modulus, with further pairs close behind (H = 512: still 0.5% to 0.8% off
    after 400 products; an 8-step Arnoldi 20-30% off). :math:`\rho(W) \le \sigma_{\max}` bounds
    it from above; :func:`full_spectrum` computes it exactly.

    Args:
        weight: a 2-D weight, gate blocks stacked along the rows; any float dtype and device.
        gates: number of gate blocks.
        state: the state this function returned last time for the same matrix shape, on any
            device; ``None`` starts from random vectors drawn from ``generator`` on the CPU.
        iterations: Rayleigh-Ritz steps, at least 1.
        generator: a CPU generator for the random start.

    Returns:
        ``sigma_max`` ``[G]`` float64 on the weight's device, NaN for blocks holding NaN or Inf
        (their state rows are kept as they were), and the new state.

    Raises:
        ValueError: bad ``weight``/``gates`` (as :func:`full_spectrum`), ``iterations < 1``, or a
            ``state`` whose shape is not ``[gates, cols]``.

    Examples:
        >>> weight = torch.diag(torch.tensor([3.0, 1.0, 0.5]))
        >>> sigma_max, state = estimate_sigma_max(weight, generator=torch.Generator().manual_seed(0))
        >>> sigma_max
        tensor([3.], dtype=torch.float64)
        >>> sigma_max, state = estimate_sigma_max(2 * weight, state=state)   # warm start
        >>> sigma_max
        tensor([6.], dtype=torch.float64)
    """
    if iterations < 1:
        raise ValueError(f"iterations must be at least 1, got {iterations}")
    with torch.no_grad():
        blocks, finite = _float64_blocks(weight, gates)
        state_shape = (gates, blocks.shape[2])
        if state is None:
            start = torch.randn(state_shape, generator=generator, dtype=torch.float64)
            state = SigmaMaxState(start, torch.zeros_like(start))
        elif tuple(state.right_vectors.shape) != state_shape or tuple(state.search_directions.shape) != state_shape:
            raise ValueError(
                f"state of shape {tuple(state.right_vectors.shape)} does not fit a weight of shape "
                f"{tuple(weight.shape)} with gates={gates}; expected {state_shape}, or pass state=None"
            )
        previous_vectors = state.right_vectors.to(blocks).unsqueeze(-1)
        previous_directions = state.search_directions.to(blocks).unsqueeze(-1)
        vectors = previous_vectors / previous_vectors.norm(dim=1, keepdim=True).clamp_min(1e-300)
        directions = previous_directions
        gram_vectors = _gram_times(blocks, vectors)
        for _ in range(iterations):
            rayleigh = (vectors * gram_vectors).sum(dim=1, keepdim=True)
            residuals = gram_vectors - rayleigh * vectors
            # Householder QR: an orthonormal basis even when residual or direction is zero.
            basis = torch.linalg.qr(torch.cat([vectors, residuals, directions], dim=2)).Q
            gram_basis = _gram_times(blocks, basis)
            projected = basis.mT @ gram_basis
            ritz_values, ritz_vectors = torch.linalg.eigh((projected + projected.mT) / 2)
            top = ritz_vectors[..., -1:]
            vectors, gram_vectors = basis @ top, gram_basis @ top
            # basis[..., 0] is +-vectors, so the rest of the step is the new search direction
            directions = basis[..., 1:] @ top[:, 1:]
            directions = directions / directions.norm(dim=1, keepdim=True).clamp_min(1e-300)
        sigma_max = ritz_values[:, -1].clamp_min(0).sqrt().masked_fill(~finite, math.nan)
        keep = finite[:, None, None]
        new_state = SigmaMaxState(
            torch.where(keep, vectors, previous_vectors).squeeze(-1),
            torch.where(keep, directions, previous_directions).squeeze(-1),
        )
        return sigma_max, new_state


class SigmaMaxTracker:
    r"""The cheap pass: :math:`\sigma_{\max}` of every gate block of ONE matrix, warm-started call to call.

    Holds the :class:`SigmaMaxState` of :func:`estimate_sigma_max` for one matrix; keep one
    tracker per recurrent weight. The first call (and the first after a shape change or
    :meth:`reset`) starts from seeded random vectors and runs ``cold_start_iterations`` (H = 1024:
    1e-2 relative error or better on the matrices measured in :func:`estimate_sigma_max`); later
    calls run ``iterations`` and keep refining while the matrix drifts. The state travels in
    checkpoints through :meth:`state_dict` / :meth:`load_state_dict` (CPU tensors). A warm call
    costs :math:`O(G H^2)` (``benchmarks/spectra.py`` measures it).

    Args:
        iterations: Rayleigh-Ritz steps per warm call (each one product with ``[cols, 3]``).
        cold_start_iterations: steps of a call without usable state.
        seed: seed of the random start vectors (the same on every device and process).

    Examples:
        >>> from lightning_gradhealth.inits import orthogonal_
        >>> tracker = SigmaMaxTracker()
        >>> weight_hh = orthogonal_(torch.empty(3 * 16, 16), gain=0.9, gates=3)   # a GRU
        >>> tracker(weight_hh, gates=3)
        tensor([0.9000, 0.9000, 0.9000], dtype=torch.float64)
        >>> sorted(tracker.state_dict())
        ['right_vectors', 'search_directions']
    """

    def __init__(self, iterations: int = 2, cold_start_iterations: int = 10, seed: int = 0) -> None:
        if iterations < 1 or cold_start_iterations < 1:
            raise ValueError(
                f"iterations and cold_start_iterations must be at least 1, got {iterations} and "
                f"{cold_start_iterations}"
            )
        self.iterations = iterations
        self.cold_start_iterations = cold_start_iterations
        self.seed = seed
        self._state: Optional[SigmaMaxState] = None

    def __call__(self, weight: Tensor, gates: int = 1) -> Tensor:
        """``sigma_max`` ``[gates]`` float64 on the weight's device, NaN for non-finite blocks."""
        cold = self._state is None or tuple(self._state.right_vectors.shape) != (gates, weight.shape[-1])
        sigma_max, self._state = estimate_sigma_max(
            weight,
            gates,
            state=None if cold else self._state,
            iterations=self.cold_start_iterations if cold else self.iterations,
            generator=torch.Generator().manual_seed(self.seed) if cold else None,
        )
        return sigma_max

    def reset(self) -> None:
        """Forget the state: the next call starts cold."""
        self._state = None

    def state_dict(self) -> dict[str, Tensor]:
        """CPU copies of the state, or ``{}`` before the first call."""
        if self._state is None:
            return {}
        return {name: tensor.detach().cpu().clone() for name, tensor in self._state._asdict().items()}

    def load_state_dict(self, state_dict: Mapping[str, Tensor]) -> None:
        """Restore a :meth:`state_dict`; ``{}`` resets. The next call moves it to the weight's device.

        Raises:
            ValueError: the keys are not ``right_vectors`` and ``search_directions``, or the two
                tensors are not 2-D of one shape.
        """
        if not state_dict:
            self.reset()
            return
        if set(state_dict) != set(SigmaMaxState._fields):
            raise ValueError(f"expected the keys {list(SigmaMaxState._fields)}, got {sorted(state_dict)}")
        state = SigmaMaxState(**{name: torch.as_tensor(state_dict[name]) for name in SigmaMaxState._fields})
        if state.right_vectors.dim() != 2 or state.right_vectors.shape != state.search_directions.shape:
            raise ValueError(
                "right_vectors and search_directions must be 2-D tensors [gates, cols] of one shape, got "
                f"{tuple(state.right_vectors.shape)} and {tuple(state.search_directions.shape)}"
            )
        self._state = SigmaMaxState(*(tensor.to(torch.float64) for tensor in state))
