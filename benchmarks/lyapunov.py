"""Cost of the Lyapunov exponents against the gradient probe's, on the reference LSTM.

On ``nn.LSTM(32, 256, batch_first=True)``, T = 100, batch 64, one forward call is captured (input,
initial states, output sequence, a gradient on the outputs), and on that same data the script
times, interleaved, median of the repeats:

- the probe's replay, :func:`~lightning_gradhealth.bptt.fused_timestep_grads`;
- the top-k exponents, :func:`~lightning_gradhealth.lyapunov.fused_lyapunov_exponents` at the
  default ``k = 8``, for several ``max_sequences`` (the default, :data:`MAX_SEQUENCES`, first).

The goal is exponents at most half the probe's time at the defaults. Each sequence costs ``k``
Jacobian-vector products per step (a ``(k, H_out) x (H_out, 4H)`` product on the LSTM), ``k``
times the probe's one vector-Jacobian product per sequence, so the cost is set by how many
sequences are averaged. It also prints how far the sampled average is from the whole batch's,
and how far float32 is from float64, to show what the sample gives up (and that nothing else does).

What was chosen, and why (2 CPU threads, torch 2.13): the probe's replay takes about 105 ms on a
quiet machine; the exponents take 43 ms over 4 sequences (0.40 x), 61 ms over 8 (0.56 x, over the
goal), 124 ms over 16 and 370 ms over all 64. The ``(32 x 256) x (256 x 1024)`` Jacobian-vector
product of each step is most of it; the Householder QR of each step costs about 5 ms in all, so
orthonormalizing only every few steps would save little and would lose the smallest of the k
exponents when they spread widely (the columns of an unorthonormalized product align). Hence
``MAX_SEQUENCES = 4``: the average over 4 evenly spaced sequences differs from the whole batch's by
1.1e-3 on exponents near -0.48. On a loaded machine the probe's large matrix products slow down
more than the exponents' small ones, and the ratios fall (0.24 to 0.3 x for 4 sequences).

Usage::

    python benchmarks/lyapunov.py            # 11 repeats
    python benchmarks/lyapunov.py --quick    # 3 repeats
    python benchmarks/lyapunov.py --threads 1 --sequences 8 4 16
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import time
from typing import Callable

import torch
from torch import nn

from lightning_gradhealth.bptt import fused_timestep_grads
from lightning_gradhealth.lyapunov import MAX_SEQUENCES, fused_lyapunov_exponents

INPUT_SIZE, HIDDEN, STEPS, BATCH, K = 32, 256, 100, 64, 8


def captured_call(dtype: torch.dtype = torch.float32) -> tuple[nn.LSTM, dict[str, torch.Tensor]]:
    """The reference LSTM and what a probe captures of one call, time-major."""
    torch.manual_seed(0)
    lstm = nn.LSTM(INPUT_SIZE, HIDDEN, batch_first=True).to(dtype)
    inputs = torch.randn(BATCH, STEPS, INPUT_SIZE, dtype=dtype)
    with torch.no_grad():
        outputs, _ = lstm(inputs)
    data = dict(
        inputs=inputs.transpose(0, 1),
        initial_states=torch.zeros(1, BATCH, HIDDEN, dtype=dtype),
        initial_cells=torch.zeros(1, BATCH, HIDDEN, dtype=dtype),
        outputs=outputs.transpose(0, 1),
        output_grad=torch.randn(STEPS, BATCH, HIDDEN, dtype=dtype) / (STEPS * BATCH),
    )
    return lstm, data


def exponents(lstm: nn.LSTM, data: dict[str, torch.Tensor], max_sequences: int | None) -> torch.Tensor:
    """The top-K exponents of the captured call."""
    (result,) = fused_lyapunov_exponents(
        lstm, data["inputs"], data["initial_states"], data["initial_cells"], outputs=data["outputs"], k=K,
        max_sequences=max_sequences,
    ).values()
    return result


def interleaved_medians(functions: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds of each function over ``repeats`` rounds (after one warm-up round), one call each per round."""
    times: dict[str, list[float]] = {name: [] for name in functions}
    for repeat in range(repeats + 1):
        for name, function in functions.items():
            start = time.perf_counter()
            function()
            if repeat:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 repeats instead of --repeats")
    parser.add_argument("--repeats", type=int, default=11, help="timed rounds (after one warm-up round)")
    parser.add_argument("--sequences", type=int, nargs="+", default=[MAX_SEQUENCES, *sorted({8, 16, BATCH} - {MAX_SEQUENCES})],
                        help="max_sequences values to time (the first is compared with the goal)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    arguments = parser.parse_args()
    repeats = 3 if arguments.quick else arguments.repeats
    if arguments.threads:
        torch.set_num_threads(arguments.threads)

    lstm, data = captured_call()
    functions: dict[str, Callable[[], object]] = {
        "probe (fused_timestep_grads)": lambda: fused_timestep_grads(
            lstm, data["inputs"], data["initial_states"], data["initial_cells"], data["output_grad"], outputs=data["outputs"]
        ),
    }
    sequence_counts = list(dict.fromkeys(arguments.sequences))

    def label(sequences: int) -> str:
        return f"exponents, k={K}, max_sequences={sequences}"

    for sequences in sequence_counts:
        functions[label(sequences)] = lambda sequences=sequences: exponents(lstm, data, sequences)
    medians = interleaved_medians(functions, repeats)

    print(f"nn.LSTM({INPUT_SIZE}, {HIDDEN}), T={STEPS}, batch {BATCH}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}; median of {repeats}")
    whole_batch = exponents(lstm, data, None)
    probe = medians.pop("probe (fused_timestep_grads)")
    print(f"  {'probe (fused_timestep_grads)':42s} {probe * 1e3:8.1f} ms")
    for sequences in sequence_counts:
        seconds, error = medians[label(sequences)], (exponents(lstm, data, sequences) - whole_batch).abs().max()
        print(f"  {label(sequences):42s} {seconds * 1e3:8.1f} ms   {seconds / probe:5.2f} x probe   "
              f"max |difference| from the whole batch's {error:.1e}")
    ratio = medians[label(sequence_counts[0])] / probe
    verdict = "met" if ratio <= 0.5 else "NOT met"
    print(f"goal (exponents <= 0.5 x probe at max_sequences={sequence_counts[0]}): {verdict} ({ratio:.2f})")

    double_lstm, double_data = copy.deepcopy(lstm).double(), {name: value.double() for name, value in data.items()}
    in_double = exponents(double_lstm, double_data, None)
    print(f"top-{K} exponents of the whole batch: {[round(value, 4) for value in whole_batch.tolist()]}")
    print(f"float32 vs float64, max |difference|: {(whole_batch.double() - in_double).abs().max():.1e}")


if __name__ == "__main__":
    main()
