"""GradHealth against other ways of watching gradients: training time, interleaved in one process.

Two workloads (``--workload``), each trained by a real ``pytorch_lightning.Trainer`` (on CUDA when
there is a GPU, cuDNN's fused layers; else on the CPU; ``--accelerator`` chooses) with a
``TensorBoardLogger`` writing to a temporary directory, MSE loss on the last step through a linear
head, Adam:

- ``lstm`` (the reference): ``nn.LSTM(32, 256)``, batch-first, T = 100, batch 64;
- ``gru``: ``nn.GRU(32, 512, num_layers=2)``, batch-first, T = 200, batch 64.

The table's rows:

1. no monitoring;
2. no monitoring again, on a second Trainer: the benchmark's resolution. Its ratio to row 1 would
   be 1 but for noise and for what makes one Trainer run faster than another in the same
   process; rows 3 and 4 are worth that much less than their three decimals;
3. ``GradHealth()`` at its defaults under Lightning's ``log_every_n_steps=50``: ``sigma_max`` and
   the gradient norms every 50 steps, the dL/dh_t probe every ``PROBE_EVERY_N_LOGS`` x 50 steps
   (step 0 included), full spectra, histograms and pictures every ``FULL_EVERY_N_LOGS`` x 50
   steps (with the probe); goal: at most 1.01x;
4. probe every step, ``GradHealth(log_every_n_steps=1)``: the probe and ``sigma_max`` on every
   step, full passes on their default schedule (every ``FULL_EVERY_N_LOGS`` steps); goal: at most
   2x on the reference LSTM;

and, for ``lstm`` only, the alternatives:

5. ``GradHealth(log_every_n_steps=1, full_every_n_steps=1, clip="norm", clip_val=1.0)``: all of
   it, clipping included, on every step;
6. Lightning's ``grad_norm``: ``self.log_dict(grad_norm(self, norm_type=2))`` in the module's
   ``on_before_optimizer_step``, ``Trainer(log_every_n_steps=1)``;
7. TensorBoard histograms of every parameter's gradient and of every parameter on every step
   (``writer.add_histogram``, 12 histograms a step).

How it measures. Each variant has one Trainer that lives for the whole run, in its own thread; the
threads take turns, one training step per turn, so only one runs at a time and the variants' steps
are interleaved step by step: a burst of load on the shared machine hits all of them alike. A
round gives each variant one window of consecutive steps, spread evenly over the round
(:func:`measure` says in which order). A step's time runs from its ``on_train_batch_start`` to
that of the variant's next step, the hand-over left out, so it holds everything the loop does
(data, forward, backward, callbacks, Lightning's logging, optimizer); each window ends with a
flush of the variant's TensorBoard writer, so each variant pays for writing its own events. All
threads allocate from one malloc arena, as the one thread of a real training run does
(:func:`_one_malloc_arena`). Left out, for every variant alike: Trainer start-up, step 0 (shown
once, apart) and the first round (warm-up). Each round gives every row's ms/step over ms/step
without monitoring; the table shows medians over the rounds.

Rows 3 and 4 mix kinds of steps at rates no window of a run this short can hold (one full pass
in 2000 steps), so each kind is timed on its own Trainer, every round, and weighted by how often
the schedule runs it (the package's own ``Schedule``, over one period of full passes):

- other steps: ``GradHealth(log_every_n_steps=10**9)`` after step 0 (a counter check and the
  NaN/Inf check), ``window`` steps a round, as many as without monitoring;
- logging steps without the probe: ``GradHealth(log_every_n_steps=1, probe_every_n_steps=10**9,
  full_every_n_steps=10**9)`` (``sigma_max``, gradient norms, their scalars);
- probe steps without the Lyapunov exponents: ``GradHealth(log_every_n_steps=1,
  full_every_n_steps=10**9, lyapunov_k=0)``;
- probe steps that take the exponents: from ``GradHealth(log_every_n_steps=1,
  full_every_n_steps=10**9)``, whose probe takes them every ``PROBE_EVERY_N_LOGS`` = 8 steps,
  timed in windows of 8 steps (each holds one such step): 8 x its ms/step less 7 probe steps;
- full passes: ``GradHealth(log_every_n_steps=1, full_every_n_steps=1)`` (probe, full spectra,
  histograms, pictures).

Usage:
    python benchmarks/alternatives.py                    # reference LSTM, 8 rounds, about 10 minutes on 2 cores
    python benchmarks/alternatives.py --workload gru     # 2 x 512 GRU, T = 200: about 5 minutes a round
    python benchmarks/alternatives.py --quick            # a smoke check: one round, shortest windows
"""

from __future__ import annotations

import argparse
import ctypes
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
from lightning_gradhealth.defaults import PROBE_EVERY_N_LOGS
from lightning_gradhealth.trackers import Schedule

TRAINER_LOG_EVERY = 50  # Lightning's default log_every_n_steps, the interval GradHealth() takes up
NEVER = 10**9  # an interval no run here reaches


@dataclass(frozen=True)
class Workload:
    """A recurrent layer and its data; ``window``: steps a round of the variants timed on plain steps."""

    label: str
    build: Callable[[], nn.Module]
    input_size: int
    hidden: int
    seq_len: int
    batch: int
    window: int
    alternatives: bool


WORKLOADS = {
    "lstm": Workload(
        "LSTM 1 x 256, input 32, T = 100, batch 64",
        lambda: nn.LSTM(32, 256, batch_first=True),
        32,
        256,
        100,
        64,
        window=40,
        alternatives=True,
    ),
    "gru": Workload(
        "GRU 2 x 512, input 32, T = 200, batch 64",
        lambda: nn.GRU(32, 512, num_layers=2, batch_first=True),
        32,
        512,
        200,
        64,
        window=8,
        alternatives=False,
    ),
}


class _Sequences(pl.LightningModule):
    """The workload's recurrent layer, a linear head on the last step, MSE, Adam."""

    def __init__(self, workload: Workload) -> None:
        super().__init__()
        self.rnn = workload.build()
        self.head = nn.Linear(workload.hidden, 1)

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

    def __init__(self, workload: Workload, length: int, distinct: int = 8) -> None:
        x = torch.randn(distinct, workload.batch, workload.seq_len, workload.input_size)
        self.pool = [(x[i], x[i, :, -1, :1].clone()) for i in range(distinct)]
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.pool[index % len(self.pool)]


@dataclass(frozen=True)
class Variant:
    """One way of training: what it adds to the plain Trainer, and its steps per round.

    ``window`` is ``None`` for the workload's window, else a fixed number of steps; either must
    divide the workload's window.
    """

    label: str
    window: Optional[int] = None
    callbacks: Callable[[], list[pl.Callback]] = list
    module: type[_Sequences] = _Sequences
    trainer_log_every: int = TRAINER_LOG_EVERY
    alternative: bool = False

    def steps_per_turn(self, workload: Workload, quick: bool) -> int:
        """Steps per round: the window; with ``quick`` 2."""
        return 2 if quick else (self.window or workload.window)


VARIANTS = {
    "none": Variant("no monitoring"),
    "again": Variant("no monitoring, a second Trainer (the benchmark's resolution)"),
    "other": Variant("GradHealth(), its other steps", callbacks=lambda: [GradHealth(log_every_n_steps=NEVER)]),
    "logging": Variant(
        "GradHealth(), its logging steps without the probe",
        4,
        lambda: [GradHealth(log_every_n_steps=1, probe_every_n_steps=NEVER, full_every_n_steps=NEVER)],
    ),
    "probe": Variant(
        "GradHealth(), its probe steps without the exponents",
        4,
        lambda: [GradHealth(log_every_n_steps=1, full_every_n_steps=NEVER, lyapunov_k=0)],
    ),
    "probe_1_in_8": Variant(
        "GradHealth(), probe steps, the exponents on 1 in 8",
        PROBE_EVERY_N_LOGS,
        lambda: [GradHealth(log_every_n_steps=1, full_every_n_steps=NEVER)],
    ),
    "full": Variant("GradHealth(), its full passes", 2, lambda: [GradHealth(log_every_n_steps=1, full_every_n_steps=1)]),
    "everything": Variant(
        '`GradHealth(log_every_n_steps=1, full_every_n_steps=1, clip="norm", clip_val=1.0)`',
        4,
        lambda: [GradHealth(log_every_n_steps=1, full_every_n_steps=1, clip="norm", clip_val=1.0)],
        alternative=True,
    ),
    "grad_norm": Variant(
        "Lightning `grad_norm` logged every step", 20, module=_SequencesWithGradNorm, trainer_log_every=1, alternative=True
    ),
    "histograms": Variant(
        "TensorBoard histograms of all gradients and weights every step", 8, lambda: [_Histograms()], alternative=True
    ),
}


def step_mix(schedule: Schedule, period: int) -> dict[str, int]:
    """How many steps of each kind (``other``, ``logging``, ``probe``, ``exponents``: a probe
    step that takes the Lyapunov exponents, ``full``) ``schedule`` runs over ``period`` steps (a
    multiple of its full interval).

    Examples:
        >>> schedule = Schedule(log_every_n_steps=5, full_every_n_steps=20, probe_every_n_steps=10)
        >>> schedule.resolve()
        >>> step_mix(schedule, 20)
        {'other': 16, 'logging': 2, 'probe': 0, 'exponents': 1, 'full': 1}
    """
    mix = dict.fromkeys(("other", "logging", "probe", "exponents", "full"), 0)
    for step in range(period):
        plan = schedule.update(step, optimizer="")
        probe = "exponents" if plan.exponents else "probe"
        kind = "full" if plan.full else probe if plan.probe else "logging" if plan.measure else "other"
        mix[kind] += 1
    schedule.reset()
    return mix


def _resolved(log_every_n_steps: Optional[int]) -> Schedule:
    """The schedule of ``GradHealth(log_every_n_steps=...)`` under Lightning's default interval."""
    schedule = Schedule(log_every_n_steps)
    schedule.resolve(TRAINER_LOG_EVERY)
    return schedule


DEFAULTS, EVERY_STEP = _resolved(None), _resolved(1)
COMPOSITES = {
    "default": (
        f"`GradHealth()` (defaults: `sigma_max` every {DEFAULTS.log_every_n_steps} steps, probe every "
        f"{DEFAULTS.probe_every_n_steps}, full pass every {DEFAULTS.full_every_n_steps})",
        step_mix(DEFAULTS, DEFAULTS.full_every_n_steps),
    ),
    "every_step": (
        f"`GradHealth(log_every_n_steps=1)` (probe every step, full pass every {EVERY_STEP.full_every_n_steps})",
        step_mix(EVERY_STEP, EVERY_STEP.full_every_n_steps),
    ),
}


class _Runner(pl.Callback):
    """Runs one variant's ``trainer.fit`` in a thread, one step per turn, timing each step.

    Step ``s`` lasts from ``on_train_batch_start`` of step ``s`` to that of step ``s + 1``, less
    the wait for the turn in between. Window ``k`` (k >= 0) holds steps ``1 + k * window`` to
    ``(k + 1) * window``; its last step includes a flush of the TensorBoard writer.
    """

    def __init__(
        self, workload: Workload, variant: Variant, window: int, windows: int, logdir: str, name: str, accelerator: str
    ) -> None:
        self.workload, self.variant, self.window, self.windows = workload, variant, window, windows
        self.logdir, self.name, self.accelerator = logdir, name, accelerator
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
                accelerator=self.accelerator,
                devices=1,
                log_every_n_steps=self.variant.trainer_log_every,
            )
            loader = torch.utils.data.DataLoader(_Batches(self.workload, steps), batch_size=None)
            trainer.fit(self.variant.module(self.workload), loader)
        except BaseException as error:  # handed to the scheduler's thread
            self.error = error
        finally:
            self._paused.set()

    def on_train_batch_start(self, trainer: pl.Trainer, *args: object) -> None:
        if self.accelerator == "cuda":  # the step's kernels are done when its time is read
            torch.cuda.synchronize()
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

    def window_ms(self, index: int) -> float:
        """Mean ms per step of window ``index`` (0-based)."""
        first = 1 + index * self.window
        return sum(self.step_times[step] for step in range(first, first + self.window)) / self.window * 1e3


def _one_malloc_arena() -> None:
    """Make every thread allocate from glibc's main malloc arena (``mallopt(M_ARENA_MAX, 1)``),
    before any runner thread starts. By default glibc gives threads arenas of their own, and
    the LSTM's step (tens of MB of activations, freed and allocated again every step) then
    runs up to 20% faster or slower depending on the thread that runs it. Elsewhere than glibc
    nothing is done."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_arena_max = -8  # from glibc's malloc.h
    libc.mallopt(m_arena_max, 1)


def _warm_up(workload: Workload, logdir: str, accelerator: str) -> None:
    """A short unmonitored fit, so that no variant's step 0 pays for the process's first kernels."""
    trainer = pl.Trainer(
        max_steps=3,
        logger=pl.loggers.TensorBoardLogger(logdir, name="warm-up"),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator=accelerator,
        devices=1,
    )
    trainer.fit(_Sequences(workload), torch.utils.data.DataLoader(_Batches(workload, 3), batch_size=None))


GROUP = ("none", "again", "other")  # the plain steps, whose ratio weighs most: back to back, in turns


def measure(
    workload: Workload, rounds: int, quick: bool, logdir: str, accelerator: str = "cpu"
) -> tuple[dict[str, _Runner], list[float]]:
    """Run every variant of ``workload`` for ``rounds`` windows, interleaved step by step; return
    the runners and each round's seconds.

    A round has as many slots as the longest window; a variant with a window of ``w`` steps runs
    one step in every ``slots / w`` slots. A slot runs its other variants, in an order that flips
    from one slot to the next, then the :data:`GROUP`, in an order that rotates. Every measured
    step follows a plain step: one of an unmeasured buffer Trainer before each variant and before
    the group, the group's previous member after that. Some variants slow down whatever step runs
    right after theirs (TensorBoard histograms: +40 ms on the next LSTM step, whoever's it is),
    and a plain step between them keeps that off the variant that happens to come next.
    """
    _warm_up(workload, logdir, accelerator)
    chosen = {key: variant for key, variant in VARIANTS.items() if workload.alternatives or not variant.alternative}
    runners = {
        key: _Runner(workload, variant, variant.steps_per_turn(workload, quick), rounds, logdir, key, accelerator)
        for key, variant in chosen.items()
    }
    slots = max(runner.window for runner in runners.values())
    group, others = [runners[key] for key in GROUP], [runner for key, runner in runners.items() if key not in GROUP]
    buffer_turns = slots + sum(runner.window for runner in others)  # per round
    buffer = _Runner(workload, Variant("buffer"), buffer_turns, rounds, logdir, "buffer", accelerator)
    for runner in [buffer, *runners.values()]:
        runner.turn()
    round_seconds = []
    for _ in range(rounds):
        start = time.perf_counter()
        for slot in range(slots):
            order = 1 if slot % 2 == 0 else -1
            for runner in others[::order]:
                if slot % (slots // runner.window) == 0:
                    buffer.turn()
                    runner.turn()
            buffer.turn()
            for runner in group[slot % len(group) :] + group[: slot % len(group)]:
                runner.turn()
        round_seconds.append(time.perf_counter() - start)
    for runner in [buffer, *runners.values()]:
        runner.finish()
    return runners, round_seconds


def per_step_ms(runners: dict[str, _Runner], round_index: int) -> dict[str, float]:
    """ms per step of every variant in one round, and of each composite: its kinds of steps
    weighted by how often its schedule runs them."""
    ms = {key: runner.window_ms(round_index) for key, runner in runners.items()}
    ms["exponents"] = PROBE_EVERY_N_LOGS * ms["probe_1_in_8"] - (PROBE_EVERY_N_LOGS - 1) * ms["probe"]
    for key, (_, mix) in COMPOSITES.items():
        ms[key] = sum(count * ms[kind] for kind, count in mix.items()) / sum(mix.values())
    ms["default_without_full"] = ms["default"] - COMPOSITES["default"][1]["full"] * (ms["full"] - ms["exponents"]) / sum(
        COMPOSITES["default"][1].values()
    )
    return ms


def machine(accelerator: str = "cpu") -> str:
    """CPU model, cores, torch and Lightning versions, threads; the GPU when it runs there."""
    model = platform.processor() or platform.machine()
    with open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    gpu = f", on {torch.cuda.get_device_name()} (cuDNN {torch.backends.cudnn.version()})" if accelerator == "cuda" else ""
    return (
        f"{model}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"pytorch-lightning {pl.__version__}{gpu}"
    )


def report(runners: dict[str, _Runner], warm_up_rounds: int) -> None:
    """Print the markdown table: medians over the measured rounds, ratios taken within each round."""
    measured = range(warm_up_rounds, runners["none"].windows)
    per_round = [per_step_ms(runners, index) for index in measured]

    def median(key: str) -> float:
        return statistics.median(values[key] for values in per_round)

    def ratios(key: str) -> list[float]:
        return [values[key] / values["none"] for values in per_round]

    # (row, label, the runner whose step 0 is the row's): a composite's step 0 is that of its first kind of step
    rows = [("none", "no monitoring", "none"), ("again", VARIANTS["again"].label, "again")]
    rows += [("default", COMPOSITES["default"][0], "other")]
    rows += [("every_step", COMPOSITES["every_step"][0], "probe")]
    rows += [(key, VARIANTS[key].label, key) for key in ("everything", "grad_norm", "histograms") if key in runners]
    print("| variant | ms/step | x no monitoring (median) | range over rounds | step 0 (once, not included) |")
    print("|---|---|---|---|---|")
    for key, label, step_0_of in rows:
        spread = "-" if key == "none" else f"{min(ratios(key)):.3f}-{max(ratios(key)):.3f}"
        step_0 = runners[step_0_of].step_times[0] * 1e3
        print(f"| {label} | {median(key):.1f} | {statistics.median(ratios(key)):.3f}x | {spread} | {step_0:.0f} ms |")
    print()
    kinds = ("none", "again", "other", "logging", "probe", "exponents", "full")
    kinds = ", ".join(f"{kind} {median(kind):.1f}" for kind in kinds)
    mix = ", ".join(f"{count} {kind}" for kind, count in COMPOSITES["default"][1].items())
    print(f"ms per step by kind (medians): {kinds}")
    print(
        f"GradHealth() per {DEFAULTS.full_every_n_steps} steps: {mix}; without the full pass's share: "
        f"{statistics.median(ratios('default_without_full')):.3f}x; probe step / plain step: "
        f"{statistics.median(ratios('probe')):.2f}x, with the exponents {statistics.median(ratios('exponents')):.2f}x"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", choices=sorted(WORKLOADS), default="lstm", help="default: lstm, the reference")
    parser.add_argument("--quick", action="store_true", help="one round, no warm-up round, shortest windows: a smoke check")
    parser.add_argument("--rounds", type=int, default=8, help="measured rounds, after one warm-up round (default 8)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument(
        "--accelerator",
        choices=["cpu", "cuda"],
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="where the Trainers run (default: cuda when present, else cpu); on cuda a step's time ends after a synchronize",
    )
    args = parser.parse_args()
    if args.accelerator == "cuda" and not torch.cuda.is_available():
        parser.error("--accelerator cuda: torch finds no CUDA device here")
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    for name in ("pytorch_lightning", "lightning.pytorch"):
        logging.getLogger(name).setLevel(logging.ERROR)
    torch.manual_seed(0)
    _one_malloc_arena()
    workload = WORKLOADS[args.workload]
    warm_up_rounds, rounds = (0, 1) if args.quick else (1, args.rounds)
    print(machine(args.accelerator))
    print(f"{workload.label}, Adam, TensorBoardLogger; {rounds} measured rounds after {warm_up_rounds} warm-up round")
    print()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as logdir:
        runners, round_seconds = measure(workload, warm_up_rounds + rounds, args.quick, logdir, args.accelerator)
    windows = ", ".join(f"{key} {runner.window}" for key, runner in runners.items())
    print(f"steps per round: {windows}\n")
    report(runners, warm_up_rounds)
    print(f"\nwall time {time.perf_counter() - start:.0f} s, {statistics.median(round_seconds):.0f} s per round")


if __name__ == "__main__":
    main()
