"""GradHealth against other ways of watching gradients: training time on CPU, interleaved in one process.

The reference workload (``nn.LSTM(32, 256)``, batch-first, T = 100, batch 64, MSE loss on the last
step through a linear head, Adam) is trained by a real ``pytorch_lightning.Trainer`` on CPU with a
``TensorBoardLogger`` writing to a temporary directory, once per variant:

1. no monitoring;
2. ``GradHealth()``: dL/dh_t probe and ``sigma_max`` every 50 steps (the Trainer's
   ``log_every_n_steps``), full spectra, histograms and pictures every 1000 steps;
3. ``GradHealth(log_every_n_steps=1, full_every_n_steps=1, clip="norm", clip_val=1.0)``: all of it,
   clipping included, on every step;
4. Lightning's ``grad_norm``: ``self.log_dict(grad_norm(self, norm_type=2))`` in the module's
   ``on_before_optimizer_step``, ``Trainer(log_every_n_steps=1)``;
5. TensorBoard histograms of every parameter's gradient and of every parameter on every step
   (``writer.add_histogram``, 6 parameters, 12 histograms a step).

How it measures. Each variant has one Trainer that lives for the whole run, in its own thread; the
threads take turns, one training step per turn, so only one runs at a time and the variants' steps
are interleaved step by step: a burst of load on the shared machine hits all of them alike. A
round gives each variant one window of consecutive steps, spread evenly over the round: 50 steps
(the default schedule's period: 49 plain steps and one sampled step) for no monitoring and the two
GradHealth schedules, fewer for the others, whose steps are all alike (25 for ``grad_norm``, 10 for
histograms, 5 for variant 3). A step's time runs from its ``on_train_batch_start`` to that of the
variant's next step, the hand-over left out, so it holds everything the loop does (data, forward,
backward, callbacks, Lightning's logging, optimizer); each window ends with a flush of the
variant's TensorBoard writer, so each variant pays for writing its own events. Left out, for every
variant alike: Trainer start-up, step 0 (shown once, apart) and the first round (warm-up). Each
round gives every variant's ms/step over ms/step without monitoring; the table shows medians over
the rounds.

The full pass of variant 2 comes once per 1000 steps, beyond any window this run can afford: a
helper, ``GradHealth(full_every_n_steps=50)``, runs the same schedule with the full pass on every
sampled step, and the difference between its sampled step and variant 2's, in the same round, is
added to variant 2's window at 1/20 (one sampled step in 20 is a full one).

Usage:
    python benchmarks/alternatives.py            # 5 to 10 minutes on 2 cores, depending on their load
    python benchmarks/alternatives.py --quick    # a smoke check: one round, about a minute
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import statistics
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import grad_norm
from torch import nn

from lightning_gradhealth import GradHealth

INPUT_SIZE, HIDDEN, SEQ_LEN, BATCH = 32, 256, 100, 64
PERIOD, FULL_EVERY = 50, 1000  # GradHealth()'s sampling interval (the Trainer's) and full-pass interval


class _Sequences(pl.LightningModule):
    """The reference workload: LSTM, linear head on the last step, MSE, Adam."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.LSTM(INPUT_SIZE, HIDDEN, batch_first=True)
        self.head = nn.Linear(HIDDEN, 1)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        states, _ = self.rnn(x)
        return nn.functional.mse_loss(self.head(states[:, -1]), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-3)


class _SequencesWithGradNorm(_Sequences):
    """The workload logging Lightning's ``grad_norm`` the way Lightning's docs show."""

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        self.log_dict(grad_norm(self, norm_type=2))


class _Histograms(pl.Callback):
    """What generic tools do: a TensorBoard histogram of every gradient and every parameter, every step."""

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: object) -> None:
        writer = trainer.logger.experiment
        for name, parameter in pl_module.named_parameters():
            writer.add_histogram(f"gradients/{name}", parameter.grad, trainer.global_step)
            writer.add_histogram(f"weights/{name}", parameter, trainer.global_step)


class _Batches(torch.utils.data.Dataset):
    """``length`` ready-made batches, cycling over a few random ones (no collation, no copies)."""

    def __init__(self, length: int, distinct: int = 8) -> None:
        x = torch.randn(distinct, BATCH, SEQ_LEN, INPUT_SIZE)
        self.pool = [(x[i], x[i, :, -1, :1].clone()) for i in range(distinct)]
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.pool[index % len(self.pool)]


@dataclass
class Variant:
    """One way of training: what it adds to the plain Trainer, and how many steps make one window.

    ``period`` is the length of the variant's schedule (the steps after which it repeats) and
    ``window`` a multiple of it that divides ``PERIOD``: the variant's steps in one round.
    """

    label: str
    period: int
    window: int
    callbacks: Callable[[], list[pl.Callback]] = list
    module: type[_Sequences] = _Sequences
    trainer_log_every: int = PERIOD

    def steps_per_turn(self, quick: bool) -> int:
        """``window``; with ``quick`` one period, at least 2 steps."""
        return max(self.period, 2) if quick else self.window


VARIANTS = {
    "none": Variant("no monitoring", 1, PERIOD),
    "default": Variant("`GradHealth()` (defaults, full pass amortized)", PERIOD, PERIOD, lambda: [GradHealth()]),
    "everything": Variant(
        '`GradHealth(log_every_n_steps=1, full_every_n_steps=1, clip="norm", clip_val=1.0)`',
        1,
        5,
        lambda: [GradHealth(log_every_n_steps=1, full_every_n_steps=1, clip="norm", clip_val=1.0)],
    ),
    "grad_norm": Variant("Lightning `grad_norm` logged every step", 1, 25, module=_SequencesWithGradNorm, trainer_log_every=1),
    "histograms": Variant("TensorBoard histograms of all gradients and weights every step", 1, 10, lambda: [_Histograms()]),
    "full_helper": Variant(
        "`GradHealth(full_every_n_steps=50)` (helper)", PERIOD, PERIOD, lambda: [GradHealth(full_every_n_steps=PERIOD)]
    ),
}
TABLE = ("none", "default", "everything", "grad_norm", "histograms")


class _Runner(pl.Callback):
    """Runs one variant's ``trainer.fit`` in a thread, one step per turn, timing each step.

    Step ``s`` lasts from ``on_train_batch_start`` of step ``s`` to that of step ``s + 1``, less
    the wait for the turn in between. Window ``k`` (k >= 0) holds steps ``1 + k * window`` to
    ``(k + 1) * window``; its last step includes a flush of the TensorBoard writer.
    """

    def __init__(self, variant: Variant, window: int, windows: int, logdir: str, name: str) -> None:
        self.variant, self.window, self.windows, self.logdir, self.name = variant, window, windows, logdir, name
        self.step_times: dict[int, float] = {}
        self.error: Optional[BaseException] = None
        self._go, self._paused = threading.Event(), threading.Event()
        self._last = 0.0
        self._thread = threading.Thread(target=self._fit, name=name, daemon=True)

    def _fit(self) -> None:
        self._go.wait()
        self._go.clear()
        try:
            steps = 1 + self.windows * self.window + 1
            trainer = pl.Trainer(
                max_steps=steps,
                callbacks=[self, *self.variant.callbacks()],
                logger=pl.loggers.TensorBoardLogger(self.logdir, name=self.name),
                enable_checkpointing=False,
                enable_progress_bar=False,
                enable_model_summary=False,
                accelerator="cpu",
                log_every_n_steps=self.variant.trainer_log_every,
            )
            loader = torch.utils.data.DataLoader(_Batches(steps), batch_size=None)
            trainer.fit(self.variant.module(), loader)
        except BaseException as error:  # handed to the scheduler's thread
            self.error = error
        finally:
            self._paused.set()

    def on_train_batch_start(self, trainer: pl.Trainer, *args: object) -> None:
        step = trainer.global_step
        if step == 0:
            self._last = time.perf_counter()
            return
        if (step - 1) % self.window == 0:
            trainer.logger.experiment.flush()
        self.step_times[step - 1] = time.perf_counter() - self._last
        self._paused.set()
        self._go.wait()
        self._go.clear()
        self._last = time.perf_counter()

    def turn(self) -> None:
        """Let the Trainer run one step (the first turn: start-up and step 0)."""
        if self._thread.ident is None:
            self._thread.start()
        self._go.set()
        self._paused.wait()
        self._paused.clear()
        if self.error is not None:
            raise RuntimeError(f"variant {self.name!r} failed") from self.error

    def finish(self) -> None:
        """Let the Trainer run its last step and end."""
        self._go.set()
        self._thread.join()
        if self.error is not None:
            raise RuntimeError(f"variant {self.name!r} failed") from self.error

    def window_seconds(self, index: int) -> float:
        """Seconds of window ``index`` (0-based)."""
        first = 1 + index * self.window
        return sum(self.step_times[step] for step in range(first, first + self.window))


def _warm_up(logdir: str) -> None:
    """A short unmonitored fit, so that no variant's step 0 pays for the process's first LSTM kernels."""
    trainer = pl.Trainer(
        max_steps=3,
        logger=pl.loggers.TensorBoardLogger(logdir, name="warm-up"),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    trainer.fit(_Sequences(), torch.utils.data.DataLoader(_Batches(3), batch_size=None))


def measure(rounds: int, quick: bool, logdir: str) -> tuple[dict[str, _Runner], list[float]]:
    """Run every variant for ``rounds`` windows, interleaved step by step; return the runners and each round's seconds.

    A round has ``PERIOD`` slots; a variant with a window of ``w`` steps runs one step in every
    ``PERIOD / w`` slots. Within a slot the order of the variants flips from one slot to the next.
    """
    _warm_up(logdir)
    runners = [_Runner(variant, variant.steps_per_turn(quick), rounds, logdir, key) for key, variant in VARIANTS.items()]
    for runner in runners:
        runner.turn()
    round_seconds = []
    for _ in range(rounds):
        start = time.perf_counter()
        for slot in range(PERIOD):
            for runner in runners[:: 1 if slot % 2 == 0 else -1]:
                if slot % (PERIOD // runner.window) == 0:
                    runner.turn()
        round_seconds.append(time.perf_counter() - start)
    for runner in runners:
        runner.finish()
    return {runner.name: runner for runner in runners}, round_seconds


def per_step_ms(runners: dict[str, _Runner], round_index: int) -> dict[str, float]:
    """ms per step of every variant of the table in one round; ``default`` with its share of the full pass."""
    ms = {key: runner.window_seconds(round_index) / runner.window * 1e3 for key, runner in runners.items()}
    sampled = (round_index + 1) * PERIOD  # the last step of the round's 50-step window
    full_extra = runners["full_helper"].step_times[sampled] - runners["default"].step_times[sampled]
    ms["default"] += full_extra * 1e3 / FULL_EVERY  # one step in FULL_EVERY is a full one instead of a sampled one
    return ms


def machine() -> str:
    """CPU model, cores, torch and Lightning versions, threads."""
    model = platform.processor() or platform.machine()
    with open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return (
        f"{model}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"pytorch-lightning {pl.__version__}"
    )


def _spread(values: list[float]) -> str:
    return f"{min(values):.3f}-{max(values):.3f}"


def report(runners: dict[str, _Runner], warm_up_rounds: int) -> None:
    """Print the markdown table: medians over the measured rounds, ratios taken within each round."""
    measured = range(warm_up_rounds, runners["none"].windows)
    per_round = [per_step_ms(runners, index) for index in measured]
    print("| variant | ms/step | x no monitoring (median) | range over rounds | step 0 (once, not included) |")
    print("|---|---|---|---|---|")
    for key in TABLE:
        ms = statistics.median(values[key] for values in per_round)
        ratios = [values[key] / values["none"] for values in per_round]
        step_0 = runners[key].step_times[0] * 1e3
        spread = _spread(ratios) if key != "none" else "-"
        print(f"| {VARIANTS[key].label} | {ms:.1f} | {statistics.median(ratios):.3f}x | {spread} | {step_0:.0f} ms |")
    print()
    default, helper = runners["default"], runners["full_helper"]
    sampled = [(index + 1) * PERIOD for index in measured]
    plain = statistics.median(
        default.step_times[step] for index in measured for step in range(1 + index * PERIOD, (index + 1) * PERIOD)
    )
    probe = statistics.median(default.step_times[step] for step in sampled)
    full = statistics.median(helper.step_times[step] for step in sampled)
    none = runners["none"]
    unamortized = statistics.median(
        (default.window_seconds(index) / default.window) / (none.window_seconds(index) / none.window) for index in measured
    )
    print(
        f"GradHealth() per kind of step (medians): other steps {plain * 1e3:.1f} ms, sampled steps {probe * 1e3:.0f} ms, "
        f"a sampled step with the full pass {full * 1e3:.0f} ms (once per {FULL_EVERY} steps); "
        f"without the full pass's share: {unamortized:.3f}x."
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one round, no warm-up round, shortest windows: a smoke check")
    parser.add_argument("--rounds", type=int, default=8, help="measured rounds, after one warm-up round (default 8)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    for name in ("pytorch_lightning", "lightning.pytorch"):
        logging.getLogger(name).setLevel(logging.ERROR)
    torch.manual_seed(0)
    warm_up_rounds, rounds = (0, 1) if args.quick else (1, args.rounds)
    windows = ", ".join(f"{key} {variant.steps_per_turn(args.quick)}" for key, variant in VARIANTS.items())
    print(machine())
    print(
        f"LSTM {INPUT_SIZE}->{HIDDEN}, T={SEQ_LEN}, batch {BATCH}, Adam, TensorBoardLogger; {rounds} measured rounds "
        f"after {warm_up_rounds} warm-up round; steps per window: {windows}"
    )
    print()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as logdir:
        runners, round_seconds = measure(warm_up_rounds + rounds, args.quick, logdir)
    report(runners, warm_up_rounds)
    print(f"\nwall time {time.perf_counter() - start:.0f} s, {statistics.median(round_seconds):.0f} s per round")


if __name__ == "__main__":
    main()
