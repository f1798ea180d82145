"""The two exact replays of a fused layer, timed against the layer itself, on CPU or a GPU.

The probe computes dL/dh_t of a fused ``nn.RNN``/``nn.LSTM``/``nn.GRU`` in one of two exact ways
(:func:`lightning_gradhealth.bptt.backward_through_time`):

- ``recursion``: the gates recomputed in one batched product, then the cell's backward recursion
  by hand, a matrix product and a few element-wise kernels per timestep;
- ``kernel``: the layer's own fused kernel run forward and backward once on its gates' input part
  through an identity block, which gives every gate's gradient at every step; then one batched
  product (and for LSTM and GRU an element-wise recursion, one multiply-add per step).

For each cell (RNN tanh, LSTM, GRU, one layer, input 32), T in {100, 1000} and H in {64, 256,
1024}, it times the layer's own forward+backward and each replay on the same captured data
(``fused_timestep_grads``), interleaved round by round, and prints the medians, each replay as a
multiple of the layer's forward+backward, and the faster one. The probe's choice,
:func:`~lightning_gradhealth.probe.preferred_replay`, is by device: what this table shows on a
CPU, and on a GPU what it shows there.

On a CUDA device (the default when one is present) the layer and the kernel replay run through
cuDNN, and every timing waits for the device.

Usage:
    python benchmarks/replay.py                   # the whole grid, about 15 minutes on 2 CPU cores
    python benchmarks/replay.py --quick           # T = 100 and H in {64, 256}, one minute
    python benchmarks/replay.py --device cuda     # on a GPU
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from typing import Callable

import torch
from torch import nn

from lightning_gradhealth.bptt import fused_timestep_grads

CELLS: dict[str, type[nn.RNNBase]] = {"RNN": nn.RNN, "LSTM": nn.LSTM, "GRU": nn.GRU}
INPUT_SIZE = 32


def _wait(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _seconds(run: Callable[[], object], device: torch.device) -> float:
    _wait(device)
    start = time.perf_counter()
    run()
    _wait(device)
    return time.perf_counter() - start


def measure(cell: str, steps: int, hidden: int, batch: int, rounds: int, device: torch.device) -> dict[str, float]:
    """Median seconds of the layer's forward+backward and of each replay, over ``rounds`` after one warm-up."""
    torch.manual_seed(0)
    layer = CELLS[cell](INPUT_SIZE, hidden).to(device)
    x = torch.randn(steps, batch, INPUT_SIZE, device=device)
    initial = torch.zeros(1, batch, hidden, device=device)
    cells = initial if cell == "LSTM" else None
    outputs = layer(x)[0].detach()
    direct = torch.randn_like(outputs)

    def layer_step() -> None:
        output, _ = layer(x.requires_grad_())
        output.backward(direct)

    def replay(kind: str) -> Callable[[], object]:
        return lambda: fused_timestep_grads(layer, x.detach(), initial, cells, direct, outputs=outputs, replay=kind)

    runs = {"layer": layer_step, "recursion": replay("recursion"), "kernel": replay("kernel")}
    times: dict[str, list[float]] = {name: [] for name in runs}
    for round_index in range(rounds + 1):
        for name, run in runs.items():
            seconds = _seconds(run, device)
            if round_index:
                times[name].append(seconds)
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="T = 100 and H in {64, 256} only")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    device = torch.device(args.device)
    steps_grid = (100,) if args.quick else (100, 1000)
    hidden_grid = (64, 256) if args.quick else (64, 256, 1024)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{platform.processor() or 'CPU'}, {torch.get_num_threads()} threads"
    print(f"device: {device.type} ({name}), torch {torch.__version__}, batch {args.batch}, median of {args.rounds} rounds")
    print(f"{'cell':5s} {'T':>5s} {'H':>5s} {'layer fwd+bwd':>14s} {'recursion':>16s} {'kernel':>16s}  faster")
    for cell in CELLS:
        for steps in steps_grid:
            for hidden in hidden_grid:
                medians = measure(cell, steps, hidden, args.batch, args.rounds, device)
                base = medians["layer"]
                faster = min(("recursion", "kernel"), key=medians.__getitem__)
                print(
                    f"{cell:5s} {steps:5d} {hidden:5d} {base * 1e3:11.1f} ms"
                    f" {medians['recursion'] * 1e3:9.1f} ms {medians['recursion'] / base:4.2f}x"
                    f" {medians['kernel'] * 1e3:9.1f} ms {medians['kernel'] / base:4.2f}x  {faster}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
