"""What the spectral passes add to training: cheap pass, full pass and picture vs. one training step.

For each hidden size H, an ``nn.LSTM(32, H)`` (its ``weight_hh_l0``: 4 gate blocks, float32) is
trained on the reference workload (T = 100, batch 64, forward + backward + Adam step), and
interleaved with its steps, in the same process, the script times on that LSTM's ``weight_hh``:

- the cheap pass, :class:`~lightning_gradhealth.spectra.SigmaMaxTracker` (warm);
- the full pass, :func:`~lightning_gradhealth.spectra.full_spectrum`;
- the picture, :func:`~lightning_gradhealth.figures.eigenvalue_image`, drawn at every full pass.

Medians over the repeats give the overhead of a schedule: the cheap pass every
``--log-every-n-steps`` steps, the full pass and the picture every ``--full-every`` logging steps.
The last column is the smallest ``--full-every`` that keeps the total within ``--budget``
percent.

Usage::

    python benchmarks/spectra.py --quick
    python benchmarks/spectra.py --sizes 512 1024 --repeats 7 --threads 1
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import time
from typing import Callable

import torch
from torch import nn

from lightning_gradhealth.figures import eigenvalue_image
from lightning_gradhealth.spectra import SigmaMaxTracker, full_spectrum

INPUT_SIZE, SEQ_LEN, BATCH = 32, 100, 64
LSTM_GATES = ("i", "f", "g", "o")


def timed(function: Callable[[], object], device: torch.device) -> float:
    """Wall-clock seconds of one call, the device's queue drained on both sides."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    function()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def benchmark_size(hidden: int, repeats: int, time_training: bool, device: torch.device) -> dict[str, float]:
    """Median seconds of a training step, a cheap pass, a full pass and a picture at one hidden size."""
    torch.manual_seed(0)
    lstm = nn.LSTM(INPUT_SIZE, hidden).to(device)
    head = nn.Linear(hidden, 1).to(device)
    optimizer = torch.optim.Adam([*lstm.parameters(), *head.parameters()], lr=1e-3)
    inputs = torch.randn(SEQ_LEN, BATCH, INPUT_SIZE, device=device)
    targets = torch.randn(BATCH, 1, device=device)
    weight_hh = lstm.weight_hh_l0

    def training_step() -> None:
        optimizer.zero_grad(set_to_none=True)
        outputs, _ = lstm(inputs)
        nn.functional.mse_loss(head(outputs[-1]), targets).backward()
        optimizer.step()

    tracker = SigmaMaxTracker()
    tracker(weight_hh, gates=4)  # the cold start happens once per fit: not timed
    if time_training:
        training_step()  # warm-up: allocator, first-call dispatch
    times: dict[str, list[float]] = {"step": [], "cheap": [], "full": [], "picture": []}
    for _ in range(repeats):
        if time_training:
            times["step"].append(timed(training_step, device))
        times["cheap"].append(timed(lambda: tracker(weight_hh, gates=4), device))
        spectrum = full_spectrum(weight_hh, gates=4)
        times["full"].append(timed(lambda: full_spectrum(weight_hh, gates=4), device))
        times["picture"].append(timed(lambda: eigenvalue_image(spectrum.eigenvalues, LSTM_GATES), device))
    return {name: statistics.median(values) if values else math.nan for name, values in times.items()}


def schedule_overhead(
    medians: dict[str, float], log_every_n_steps: int, full_every: int, budget_percent: float
) -> tuple[float, float, float]:
    """Percent added by the cheap pass, by full pass + picture, and the smallest full interval within budget.

    The interval is in logging steps; ``inf`` when the cheap pass alone exceeds the budget.
    """
    step, full = medians["step"], medians["full"] + medians["picture"]
    cheap_percent = 100 * medians["cheap"] / (log_every_n_steps * step)
    full_percent = 100 * full / (log_every_n_steps * full_every * step)
    # per logging interval: budget - cheap pass is left; the full pass must fit in k of them
    left_for_full = budget_percent / 100 * log_every_n_steps * step - medians["cheap"]
    needed = math.ceil(full / left_for_full) if left_for_full > 0 else math.inf
    return cheap_percent, full_percent, needed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 repeats; at H >= 2048 one repeat and no training step")
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 256, 512, 1024, 2048])
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per size (medians are printed)")
    parser.add_argument("--log-every-n-steps", type=int, default=50, help="cheap pass interval, in training steps")
    parser.add_argument("--full-every", type=int, default=20, help="full pass interval, in logging steps (GradHealth's default)")
    parser.add_argument("--budget", type=float, default=1.0, help="overhead target in percent of training time")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--device", default="cpu", help="cpu (the reference workload) or e.g. cuda")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    repeats = 3 if args.quick else args.repeats

    full_interval = args.log_every_n_steps * args.full_every
    quick_note = " (quick: 1 at H >= 2048, no training step there)" if args.quick else ""
    print(
        f"torch {torch.__version__}, {device}, {torch.get_num_threads()} threads, {platform.machine()}; "
        f"LSTM({INPUT_SIZE}, H), T={SEQ_LEN}, batch {BATCH}, Adam; weight_hh float32, 4 gates, math in float64"
    )
    print(
        f"schedule: cheap pass every {args.log_every_n_steps} steps, full pass + picture every "
        f"{args.full_every} logging steps ({full_interval} steps); medians of {repeats} repeats{quick_note}\n"
    )
    header = (
        f"{'H':>5} {'train step':>11} {'cheap pass':>11} {'full pass':>10} {'picture':>8} "
        f"{'cheap %':>8} {'full %':>7} {'total %':>8}  {f'full every (logs) for <={args.budget:g}%':>28}"
    )
    print(header)
    print("-" * len(header))
    for hidden in args.sizes:
        big = args.quick and hidden >= 2048
        medians = benchmark_size(hidden, 1 if big else repeats, time_training=not big, device=device)
        cheap_percent, full_percent, needed = schedule_overhead(
            medians, args.log_every_n_steps, args.full_every, args.budget
        )
        step = "-" if big else f"{medians['step'] * 1e3:9.0f}ms"
        percents = (
            f"{'-':>8} {'-':>7} {'-':>8}  {'-':>28}"
            if big
            else f"{cheap_percent:8.3f} {full_percent:7.3f} {cheap_percent + full_percent:8.3f}  "
            f"{needed if math.isfinite(needed) else 'never':>28}"
        )
        print(
            f"{hidden:>5} {step:>11} {medians['cheap'] * 1e3:9.2f}ms {medians['full'] * 1e3:8.0f}ms "
            f"{medians['picture'] * 1e3:6.0f}ms {percents}",
            flush=True,
        )


if __name__ == "__main__":
    main()
