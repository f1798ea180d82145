"""Cost of the per-timestep gradient probe, and of GradHealth as a whole, on CPU.

Prints, for the reference workload (1-layer LSTM, input 32, hidden 256, T=100, batch 64) and a
2-layer GRU (hidden 512, T=200):
- the probe's own time (capture + exact replay) as a multiple of the layer's forward+backward;
- GradHealth's overhead on a real Lightning training step at default settings (probe every
  ``log_every_n_steps`` = 50 steps, pictures every 500), timed interleaved in one process;
- resident memory over 2,000 probed training steps (it must stay flat).

Usage:
    python benchmarks/timesteps.py            # about 15 minutes on 2 cores
    python benchmarks/timesteps.py --quick    # fewer repeats, smaller memory run
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import time
import warnings

import pytorch_lightning as pl
import torch
from torch import nn

from lightning_gradhealth import GradHealth
from lightning_gradhealth.probe import TimestepProbe

WORKLOADS = {
    "LSTM 1x256, T=100, B=64": dict(kind=nn.LSTM, input_size=32, hidden=256, layers=1, steps=100, batch=64),
    "GRU 2x512, T=200, B=64": dict(kind=nn.GRU, input_size=32, hidden=512, layers=2, steps=200, batch=64),
}


def _layer_and_input(spec: dict) -> tuple[nn.Module, torch.Tensor]:
    layer = spec["kind"](spec["input_size"], spec["hidden"], num_layers=spec["layers"])
    return layer, torch.randn(spec["steps"], spec["batch"], spec["input_size"])


def probe_ratio(spec: dict, repeats: int) -> tuple[float, float]:
    """Median (forward+backward seconds, probe seconds), measured interleaved."""
    layer, x = _layer_and_input(spec)
    model = nn.ModuleDict({"rnn": layer})
    probe = TimestepProbe(model)
    probe.attach()
    plain, probed = [], []
    for repeat in range(repeats + 1):
        start = time.perf_counter()
        output, _ = layer(x)
        output.pow(2).mean().backward()
        plain_time = time.perf_counter() - start

        probe.arm()
        start = time.perf_counter()
        output, _ = layer(x)
        output.pow(2).mean().backward()
        captured_step = time.perf_counter() - start
        start = time.perf_counter()
        probe.compute()
        probe_time = time.perf_counter() - start + max(captured_step - plain_time, 0.0)
        if repeat:  # the first round warms up
            plain.append(plain_time)
            probed.append(probe_time)
    probe.detach()
    return statistics.median(plain), statistics.median(probed)


class _Sequences(pl.LightningModule):
    def __init__(self, spec: dict) -> None:
        super().__init__()
        self.rnn = spec["kind"](spec["input_size"], spec["hidden"], num_layers=spec["layers"], batch_first=True)
        self.head = nn.Linear(spec["hidden"], 1)
        self.spec = spec

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        states, _ = self.rnn(x)
        return nn.functional.mse_loss(self.head(states[:, -1]), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-3)


class _StepTimer(pl.Callback):
    def __init__(self) -> None:
        self.times: list[float] = []
        self._start = 0.0

    def on_train_batch_start(self, *args: object) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, *args: object) -> None:
        self.times.append(time.perf_counter() - self._start)


def _loader(spec: dict, batches: int) -> torch.utils.data.DataLoader:
    x = torch.randn(batches * spec["batch"], spec["steps"], spec["input_size"])
    data = torch.utils.data.TensorDataset(x, x[:, -1, :1])
    return torch.utils.data.DataLoader(data, batch_size=spec["batch"])


def _fit_step_times(spec: dict, steps: int, callbacks: list[pl.Callback], logdir: str) -> list[float]:
    timer = _StepTimer()
    trainer = pl.Trainer(
        max_steps=steps,
        callbacks=[*callbacks, timer],
        logger=pl.loggers.TensorBoardLogger(logdir, name="bench"),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        log_every_n_steps=50,
    )
    trainer.fit(_Sequences(spec), _loader(spec, 64))
    return timer.times


class _TimedGradHealth(GradHealth):
    """GradHealth with a stopwatch around each of its training-step hooks, summed per step."""

    def __init__(self) -> None:
        super().__init__()
        self.per_step: list[float] = []
        for name in ("on_train_batch_start", "on_before_backward", "on_train_batch_end", "on_before_optimizer_step"):
            setattr(self, name, self._timed(name, getattr(self, name)))

    def _timed(self, name: str, hook):  # type: ignore[no-untyped-def]
        def timed(*args: object) -> None:
            if name == "on_train_batch_start":
                self.per_step.append(0.0)
            start = time.perf_counter()
            hook(*args)
            self.per_step[-1] += time.perf_counter() - start

        return timed


def steady_state_overhead(spec: dict, steps: int, logdir: str) -> tuple[float, float, float, float]:
    """GradHealth()'s share of training time over one period of its default schedule.

    One fit of ``steps`` steps times the callback's hooks on each step. Steps are of three
    kinds: step 0 (probe, sigma_max, full spectra and pictures), the other probed steps (every
    50), and the rest. Over the 1000 steps between two full passes there are 1, 19 and 980 of
    them, so the overhead is ``(full + 19 probed + 980 other) / (1000 x training step)``,
    measured in one process and independent of the machine's drift between runs. Left out: the
    forward-pass capture on probed steps (references and tensor hooks), and the forward hooks'
    flag check on the others.

    Returns:
        (overhead, hook seconds at step 0, mean hook seconds on probed steps, on other steps).
    """
    health = _TimedGradHealth()
    step_times = _fit_step_times(spec, steps, [health], logdir)
    probed = [t for step, t in enumerate(health.per_step) if step % 50 == 0 and step > 0]
    other = [t for step, t in enumerate(health.per_step[5:], start=5) if step % 50]
    train_step = statistics.median(t - h for t, h in zip(step_times[5:], health.per_step[5:]))
    full, probe, rest = health.per_step[0], statistics.median(probed), statistics.median(other)
    return (full + 19 * probe + 980 * rest) / (1000 * train_step), full, probe, rest


def callback_overhead(spec: dict, steps: int, rounds: int, logdir: str) -> float:
    """Mean step time with GradHealth() over mean step time without, interleaved fits after a warm-up fit."""
    _fit_step_times(spec, 20, [GradHealth()], logdir)
    without, with_health = [], []
    for _ in range(rounds):
        without += _fit_step_times(spec, steps, [], logdir)[5:]
        with_health += _fit_step_times(spec, steps, [GradHealth()], logdir)[5:]
    return statistics.fmean(with_health) / statistics.fmean(without) - 1


def resident_mib() -> float:
    with open(f"/proc/{os.getpid()}/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class _Memory(pl.Callback):
    def __init__(self, every: int) -> None:
        self.every, self.samples = every, []

    def on_train_batch_end(self, trainer: pl.Trainer, *args: object) -> None:
        if trainer.global_step % self.every == 0:
            self.samples.append((trainer.global_step, resident_mib()))


def memory_over_steps(steps: int, logdir: str) -> list[tuple[int, float]]:
    """RSS while probing EVERY step of a small LSTM for ``steps`` steps."""
    spec = dict(kind=nn.LSTM, input_size=8, hidden=32, layers=2, steps=30, batch=16)
    memory = _Memory(every=steps // 8)
    trainer = pl.Trainer(
        max_steps=steps,
        callbacks=[GradHealth(log_every_n_steps=1, full_every_n_steps=100), memory],
        logger=pl.loggers.TensorBoardLogger(logdir, name="memory"),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        max_epochs=-1,
    )
    trainer.fit(_Sequences(spec), _loader(spec, 100))
    return memory.samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats and steps")
    parser.add_argument("--logdir", default="/tmp/gradhealth-bench")
    parser.add_argument("--parts", default="ratio,overhead,memory", help="comma-separated: ratio, overhead, memory")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU")
    if "ratio" in args.parts:
        print(f"{'workload':28} {'fwd+bwd ms':>11} {'probe ms':>9} {'probe/fb':>9}")
        for name, spec in WORKLOADS.items():
            plain, probed = probe_ratio(spec, repeats=3 if args.quick else 7)
            print(f"{name:28} {plain * 1e3:11.1f} {probed * 1e3:9.1f} {probed / plain:9.2f}x")
        print()
    if "overhead" in args.parts:
        for name, spec in WORKLOADS.items():
            overhead, full, probe, rest = steady_state_overhead(spec, 101 if spec["hidden"] > 256 else 201, args.logdir)
            print(
                f"GradHealth() default, {name}: {overhead * 100:.2f}% of training time "
                f"(hooks: step 0 {full * 1e3:.0f} ms, probed steps {probe * 1e3:.0f} ms, others {rest * 1e3:.2f} ms)"
            )
        spec = WORKLOADS["LSTM 1x256, T=100, B=64"]
        rounds = 1 if args.quick else 3
        overhead = callback_overhead(spec, 160, rounds, args.logdir)
        print(f"  cross-check, interleaved fits with and without it (noisy on a shared machine): {overhead * 100:+.1f}%")
        print()
    if "memory" in args.parts:
        samples = memory_over_steps(800 if args.quick else 2000, args.logdir)
        print("resident memory while probing every step: " + ", ".join(f"step {s}: {m:.0f} MiB" for s, m in samples))


if __name__ == "__main__":
    main()
