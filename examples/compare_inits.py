"""The same recurrent network trained from several initializations, side by side in TensorBoard.

By default: the adding problem with T = 100 and a plain ReLU RNN (the IRNN setting of Le, Jaitly &
Hinton 2015), trained from five recurrent inits: orthogonal, identity, Glorot, the naive small
uniform and PyTorch's default. The inits whose spectral radius starts near 1 (orthogonal,
identity, Glorot with the RNN fan rule) learn the task; the small uniform (radius 0.05) and
PyTorch's default (about 0.6) let the gradient vanish over the 100 steps and stay near the
baseline. Only identity carries the gradient back undamped from the first step: with orthogonal
and Glorot the ReLU blocks the gradient of about half the units at every step (GradHealth warns
of some 16 decades lost at step 0) until training raises the radius. GradHealth initializes, clips the gradient norm to
1, and records the gradients through time and the spectra of every run.

Each init is its own TensorBoard run, ``<logdir>/<task>_<cell>_T<T>/<init>`` (a rerun replaces
the run of the same name), and the end prints one row per init: the held-out loss against the
task's baseline, then at the start and at the end of training the gradient transmission, the
largest Lyapunov exponent of the layer's dynamics and the horizon through time, and the spectral
radius of the recurrent matrix.

Usage:
    python examples/compare_inits.py                                  # about 1.5 minutes on 2 CPU cores
    python examples/compare_inits.py --cell lstm --inits orthogonal default
    python examples/compare_inits.py --task copy --cell gru --hidden 128 --lr 3e-3 --seq-len 10 --steps 2000
    python examples/compare_inits.py --smoke                          # a few steps, for tests
"""

from __future__ import annotations

import argparse
import logging
import math
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import pytorch_lightning as pl
import torch

from adding_problem import BASELINE_MSE, AddingData, AddingModel
from copy_task import CopyData, CopyModel, copy_baseline
from lightning_gradhealth import SCHEME_NAMES, GradHealth
from lightning_gradhealth.health import TimestepSummary
from lightning_gradhealth.spectra import full_spectrum

DEFAULT_INITS = ["orthogonal", "identity", "glorot", "uniform", "default"]
GATES = {"rnn": 1, "lstm": 4, "gru": 3}
LAYER = "rnn.l0"  # GradHealth's key of the models' recurrent layer
LIGHTNING_BANNERS = ("GPU available", "TPU available", "HPU available", "💡 Tip", "`Trainer.fit` stopped")


@dataclass(frozen=True)
class Task:
    """What the comparison needs to know about a task."""

    title: str
    build_model: Callable[[argparse.Namespace], pl.LightningModule]
    build_data: Callable[[argparse.Namespace], pl.LightningDataModule]
    held_out_metric: str  # logged by the model's validation_step
    loss_name: str
    baseline: Callable[[int], float]  # the baseline loss as a function of T
    baseline_name: str


TASKS = {
    "adding": Task(
        title="adding problem",
        build_model=lambda args: AddingModel(args.cell, args.hidden, args.nonlinearity, args.lr),
        build_data=lambda args: AddingData(args.seq_len, args.batch_size, args.train_samples, args.seed),
        held_out_metric="val/mse",
        loss_name="MSE",
        baseline=lambda seq_len: BASELINE_MSE,
        baseline_name="always predicting 1",
    ),
    "copy": Task(
        title="copy task",
        build_model=lambda args: CopyModel(args.cell, args.hidden, args.nonlinearity, args.lr),
        build_data=lambda args: CopyData(args.seq_len, args.batch_size, args.train_samples, args.seed),
        held_out_metric="val/cross_entropy",
        loss_name="cross-entropy",
        baseline=copy_baseline,
        baseline_name="the memoryless strategy, 10 ln 8 / (T + 20),",
    ),
}


@dataclass(frozen=True)
class RunResult:
    """One row of the final table: each measurement at the start of training and at its end."""

    init: str
    held_out_loss: float
    transmission: tuple[float, float]
    lyapunov_max: tuple[float, float]
    horizon: tuple[int, int]
    timesteps: int
    spectral_radius: tuple[float, float]
    seconds: float


class _DropLightningBanners(logging.Filter):
    """Drops the Trainer's per-run banners (accelerators, tips) so the runs' reports stay readable."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(LIGHTNING_BANNERS)


def spectral_radius(weight: torch.Tensor, gates: int) -> float:
    """Largest spectral radius over the gate blocks of a recurrent matrix."""
    return float(full_spectrum(weight.detach(), gates).spectral_radius.max())


class StartOfTraining(pl.Callback):
    """Keeps what the comparison shows for the start of training: the spectral radius of the
    recurrent matrix right after GradHealth's init, and GradHealth's first per-timestep summary
    and largest Lyapunov exponent."""

    def __init__(self, health: GradHealth, gates: int) -> None:
        self.health = health
        self.gates = gates
        self.spectral_radius = math.nan
        self.timestep_summary: Optional[TimestepSummary] = None
        self.lyapunov_max = math.nan

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.spectral_radius = spectral_radius(pl_module.rnn.weight_hh_l0, self.gates)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if self.timestep_summary is None:
            self.timestep_summary = self.health.timestep_summaries.get(LAYER)
            self.lyapunov_max = lyapunov_max(self.health)


def lyapunov_max(health: GradHealth) -> float:
    """The largest Lyapunov exponent of the layer at GradHealth's latest probe (NaN before one)."""
    exponents = health.lyapunov_exponents.get(LAYER)
    return math.nan if exponents is None else float(exponents[0])


def train_one(task: Task, init: str, args: argparse.Namespace, run_group: Path) -> RunResult:
    """Train the task's model from ``init`` ("default" keeps PyTorch's) and measure the result."""
    run_dir = run_group / init
    if run_dir.exists():
        shutil.rmtree(run_dir)
    pl.seed_everything(args.seed, verbose=False)  # same data, same order, same draws for every init
    model = task.build_model(args)
    health = GradHealth(init=None if init == "default" else init, clip="norm", clip_val=1.0, log_every_n_steps=args.probe_every)
    start = StartOfTraining(health, GATES[args.cell])
    trainer = pl.Trainer(
        max_steps=args.steps,
        callbacks=[health, start],
        logger=pl.loggers.TensorBoardLogger(run_group.parent, name=run_group.name, version=init, default_hp_metric=False),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=10,
        val_check_interval=args.eval_every,
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
    )
    print(f"\n=== {init} ===", flush=True)
    started = time.perf_counter()
    trainer.fit(model, task.build_data(args))
    seconds = time.perf_counter() - started
    if args.steps % args.eval_every:  # the last evaluation came before the last step
        trainer.validate(model, task.build_data(args), verbose=False)
    first, last = start.timestep_summary, health.timestep_summaries[LAYER]
    return RunResult(
        init=init,
        held_out_loss=float(trainer.callback_metrics[task.held_out_metric]),
        transmission=(first.transmission, last.transmission),
        lyapunov_max=(start.lyapunov_max, lyapunov_max(health)),
        horizon=(first.horizon, last.horizon),
        timesteps=last.steps,
        spectral_radius=(start.spectral_radius, spectral_radius(model.rnn.weight_hh_l0, GATES[args.cell])),
        seconds=seconds,
    )


def _signed(value: float) -> str:
    """``value`` with one decimal and its sign, without a negative zero."""
    text = f"{value:+.1f}"
    return "0.0" if text in ("+0.0", "-0.0") else text


def format_table(results: list[RunResult], baseline: float, loss_name: str, gates: int) -> str:
    """One row per init: held-out loss and its ratio to the baseline, then start -> end of training
    of the transmission, the horizon and the spectral radius, and the training time."""
    radius_header = "spectral radius" if gates == 1 else "spectral radius (max over gates)"
    horizon_header = f"horizon (of {results[0].timesteps})"
    header = ("init", f"held-out {loss_name}", "/ baseline", "transmission", "lambda_1", horizon_header, radius_header, "time")
    rows = [header] + [
        (
            result.init,
            f"{result.held_out_loss:.4f}",
            f"{result.held_out_loss / baseline:.2f}",
            " -> ".join(_signed(value) for value in result.transmission),
            " -> ".join(f"{value:+.3f}" for value in result.lyapunov_max),
            " -> ".join(str(value) for value in result.horizon),
            " -> ".join(f"{value:.2f}" for value in result.spectral_radius),
            f"{result.seconds:.0f} s",
        )
        for result in results
    ]
    widths = [max(len(row[col]) for row in rows) for col in range(len(header))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows)


def main(argv: list[str] | None = None) -> list[RunResult]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=sorted(TASKS), default="adding")
    parser.add_argument(
        "--inits", nargs="+", choices=[*SCHEME_NAMES, "default"], default=DEFAULT_INITS, metavar="INIT",
        help=f"recurrent init schemes to compare, from {', '.join([*SCHEME_NAMES, 'default'])} ('default' keeps PyTorch's)",
    )
    parser.add_argument("--cell", choices=sorted(GATES), default="rnn")
    parser.add_argument("--nonlinearity", choices=["tanh", "relu"], default="relu", help="for --cell rnn")
    parser.add_argument("--seq-len", type=int, default=100, help="T: the adding problem's length, the copy task's delay")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--logdir", default="runs", help="TensorBoard log directory")
    parser.add_argument("--smoke", action="store_true", help="tiny, fast run (used by the tests)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.seq_len, args.hidden, args.steps = 10, 8, 4
    args.train_samples = max(args.steps, 100) * args.batch_size // 4
    args.eval_every = min(100, args.steps)
    args.probe_every = min(20, args.steps)
    for namespace in ("pytorch_lightning", "lightning.pytorch"):  # either may emit, depending on what is installed
        logging.getLogger(f"{namespace}.utilities.rank_zero").addFilter(_DropLightningBanners())
    warnings.filterwarnings("ignore", ".*does not have many workers.*")  # in-memory tensors need no workers
    warnings.filterwarnings("ignore", ".*LeafSpec.*")  # Lightning's own use of a torch API, repeated on every fit

    task = TASKS[args.task]
    cell = f"rnn-{args.nonlinearity}" if args.cell == "rnn" else args.cell
    run_group = Path(args.logdir) / f"{args.task}_{cell}_T{args.seq_len}"
    results = [train_one(task, init, args, run_group) for init in args.inits]

    baseline = task.baseline(args.seq_len)
    print(
        f"\n{task.title}, T = {args.seq_len}, {cell}, hidden {args.hidden}, {args.steps} steps, lr {args.lr}, "
        f"seed {args.seed}; {task.baseline_name} scores {task.loss_name} {baseline:.4f}"
    )
    print(format_table(results, baseline, task.loss_name, GATES[args.cell]))
    print(
        "start -> end of training. transmission: log10 ||dL/dh_0|| / ||dL/dh_T-1||, below 0 the gradient vanishes on "
        "its way back; lambda_1: the largest Lyapunov exponent of the layer's dynamics (natural log per step; "
        "below 0 every perturbation of the state fades, 1/|lambda_1| steps is its horizon; above 0 some grow); "
        "horizon: steps back before the gradient falls 1000x"
    )
    print(f"\nNext: tensorboard --logdir {run_group}")
    return results


if __name__ == "__main__":
    main()
