"""The same recurrent network trained from several initializations, side by side in TensorBoard.

By default: the adding problem with T = 100 and a plain ReLU RNN (the IRNN setting of Le, Jaitly &
Hinton 2015), trained from five recurrent inits: orthogonal, identity, Glorot, the naive small
uniform and PyTorch's default. The inits whose spectral radius starts near 1 (orthogonal,
identity, Glorot with the RNN fan rule) learn the task; PyTorch's default (radius about 0.6)
lets the gradient vanish over the 100 steps and stays near the baseline, and so does the small
uniform (radius 0.05) on most seeds, though on some it learns part of the task. Only identity
carries the gradient back undamped from the first step: with orthogonal and Glorot the ReLU
blocks the gradient of about half the units at every step (GradHealth warns of some 16 decades
lost at step 0) until training raises the radius. GradHealth initializes, clips the gradient
norm to 1, and records the gradients through time and the spectra of every run.

The learned losses depend on the seed, and for one seed on the hardware and the BLAS library
(the same seed is deterministic on one machine): compare inits over several seeds
(``--seeds 0 1 2``), not on one.

Each init and seed is its own TensorBoard run, ``<logdir>/<task>_<cell>_T<T>/<init>_seed<k>``, so
runs of several seeds sit side by side; a rerun of the same init and seed replaces that run only.
After each seed the script prints one row per init: the held-out loss against the task's
baseline, then at the start and at the end of training the gradient transmission, the largest
Lyapunov exponent of the layer's dynamics and the horizon through time, the spectral radius of
the recurrent matrix, and GradHealth's verdict. With several seeds it ends with one row per init
over the seeds: the mean and the range of the held-out loss relative to the baseline, the range
of each measurement, and which seeds got which verdict.

Usage:
    python examples/compare_inits.py                                  # seed 0, about 1.5 minutes on 2 CPU cores
    python examples/compare_inits.py --seeds 0 1 2                    # three seeds, about 4.5 minutes
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
from typing import Any, Callable, Optional, Sequence, TypeVar

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
Item = TypeVar("Item")
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
    """One row of a seed's table: each measurement at the start of training and at its end."""

    init: str
    seed: int
    held_out_loss: float
    timesteps: tuple[TimestepSummary, TimestepSummary]  # GradHealth's summaries of ||dL/dh_t||
    lyapunov_max: tuple[float, float]
    spectral_radius: tuple[float, float]
    verdict: str  # of GradHealth's end-of-fit health report
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


def run_name(init: str, seed: int) -> str:
    """The TensorBoard run of one init and seed, e.g. ``"orthogonal_seed1"``."""
    return f"{init}_seed{seed}"


def train_one(task: Task, init: str, seed: int, args: argparse.Namespace, run_group: Path) -> RunResult:
    """Train the task's model from ``init`` ("default" keeps PyTorch's) on ``seed``'s data and draws,
    and measure the result. Replaces the run of the same init and seed, and no other."""
    run_dir = run_group / run_name(init, seed)
    if run_dir.exists():
        shutil.rmtree(run_dir)
    seed_args = argparse.Namespace(**{**vars(args), "seed": seed})
    pl.seed_everything(seed, verbose=False)  # same data, same order, same draws for every init of one seed
    model = task.build_model(seed_args)
    health = GradHealth(init=None if init == "default" else init, clip="norm", clip_val=1.0, log_every_n_steps=args.probe_every)
    start = StartOfTraining(health, GATES[args.cell])
    trainer = pl.Trainer(
        max_steps=args.steps,
        callbacks=[health, start],
        logger=pl.loggers.TensorBoardLogger(run_group.parent, name=run_group.name, version=run_dir.name, default_hp_metric=False),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=10,
        val_check_interval=args.eval_every,
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
    )
    print(f"\n=== {init}, seed {seed} ===", flush=True)
    started = time.perf_counter()
    trainer.fit(model, task.build_data(seed_args))
    seconds = time.perf_counter() - started
    if args.steps % args.eval_every:  # the last evaluation came before the last step
        trainer.validate(model, task.build_data(seed_args), verbose=False)
    (layer_health,) = [layer for layer in health.health_report.layers if layer.layer == LAYER]
    return RunResult(
        init=init,
        seed=seed,
        held_out_loss=float(trainer.callback_metrics[task.held_out_metric]),
        timesteps=(start.timestep_summary, health.timestep_summaries[LAYER]),
        lyapunov_max=(start.lyapunov_max, lyapunov_max(health)),
        spectral_radius=(start.spectral_radius, spectral_radius(model.rnn.weight_hh_l0, GATES[args.cell])),
        verdict=layer_health.verdict,
        seconds=seconds,
    )


def _signed(value: float) -> str:
    """``value`` with one decimal and its sign, without a negative zero."""
    text = f"{value:+.1f}"
    return "0.0" if text in ("+0.0", "-0.0") else text


def format_transmission(summary: TimestepSummary) -> str:
    """The transmission with one decimal, ``"+0.2"``; ``"<-37.9"`` when it is a bound, not a
    measurement (the first steps' norms underflowed float, as the health report shows it);
    ``"-"`` when there is none (no gradient at the last step, or NaN/Inf).

    Examples:
        >>> from lightning_gradhealth.health import summarize_timesteps
        >>> format_transmission(summarize_timesteps(torch.tensor([0.0, 1e-30, 1.0])))
        '<-37.9'
        >>> format_transmission(summarize_timesteps(torch.tensor([0.01, 0.1, 1.0])))
        '-2.0'
    """
    if math.isnan(summary.transmission):
        return "-"
    return ("<" if summary.transmission_is_bound else "") + _signed(summary.transmission)


def value_range(items: Sequence[Item], value: Callable[[Item], float], text: Callable[[Item], str]) -> str:
    """``"lowest..highest"`` of ``value`` over ``items``, each end written by ``text``; NaN values
    are left out, ``"-"`` when none is left.

    Examples:
        >>> value_range([3.0, math.nan, 1.5], float, "{:.1f}".format)
        '1.5..3.0'
    """
    ordered = sorted((item for item in items if not math.isnan(value(item))), key=value)
    return f"{text(ordered[0])}..{text(ordered[-1])}" if ordered else "-"


def seeds_by_verdict(results: Sequence[RunResult]) -> str:
    """Which seeds got which verdict, e.g. ``"vanishing (0, 2); healthy (1)"``, or ``"healthy (all)"``."""
    seeds: dict[str, list[int]] = {}
    for result in results:
        seeds.setdefault(result.verdict, []).append(result.seed)
    if len(seeds) == 1:
        return f"{results[0].verdict} (all)"
    return "; ".join(f"{verdict} ({', '.join(map(str, verdict_seeds))})" for verdict, verdict_seeds in seeds.items())


def _radius_header(gates: int, moment: str = "") -> str:
    return f"spectral radius{moment}" + ("" if gates == 1 else " (max over gates)")


def _align(rows: list[tuple[str, ...]]) -> str:
    """Rows of cells as left-aligned text columns."""
    widths = [max(len(row[col]) for row in rows) for col in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows)


def format_table(results: list[RunResult], baseline: float, loss_name: str, gates: int) -> str:
    """One row per init of one seed: held-out loss and its ratio to the baseline, then start -> end
    of training of the transmission, lambda_1, the horizon and the spectral radius, the verdict and
    the training time."""
    horizon_header = f"horizon (of {results[0].timesteps[-1].steps})"
    header = (
        "init", f"held-out {loss_name}", "/ baseline", "transmission", "lambda_1", horizon_header, _radius_header(gates),
        "verdict", "time",
    )  # fmt: skip
    rows = [header] + [
        (
            result.init,
            f"{result.held_out_loss:.4f}",
            f"{result.held_out_loss / baseline:.2f}",
            " -> ".join(format_transmission(summary) for summary in result.timesteps),
            " -> ".join(f"{value:+.3f}" for value in result.lyapunov_max),
            " -> ".join(str(summary.horizon) for summary in result.timesteps),
            " -> ".join(f"{value:.2f}" for value in result.spectral_radius),
            result.verdict,
            f"{result.seconds:.0f} s",
        )
        for result in results
    ]
    return _align(rows)


def format_seeds_table(results: list[RunResult], baseline: float, loss_name: str, gates: int) -> str:
    """One row per init over the seeds: the mean and the range (lowest..highest) of the held-out
    loss relative to the baseline, the range at the start and at the end of training of the
    transmission (a bound stays marked as one), the range at the end of lambda_1, the horizon and
    the spectral radius, and the seeds of each verdict."""
    by_init: dict[str, list[RunResult]] = {}
    for result in results:
        by_init.setdefault(result.init, []).append(result)
    steps = results[0].timesteps[-1].steps
    header = (
        "init", f"held-out {loss_name} / baseline", "transmission start", "transmission end", "lambda_1 end",
        f"horizon end (of {steps})", _radius_header(gates, " end"), "verdict (seeds)",
    )  # fmt: skip
    rows = [header]
    for init, runs in by_init.items():
        ratios = [run.held_out_loss / baseline for run in runs]
        rows.append((
            init,
            f"{sum(ratios) / len(ratios):.2f} ({value_range(ratios, float, '{:.2f}'.format)})",
            *(
                value_range([run.timesteps[moment] for run in runs], lambda summary: summary.transmission, format_transmission)
                for moment in (0, 1)
            ),
            value_range([run.lyapunov_max[1] for run in runs], float, "{:+.3f}".format),
            value_range([float(run.timesteps[1].horizon) for run in runs], float, "{:.0f}".format),
            value_range([run.spectral_radius[1] for run in runs], float, "{:.2f}".format),
            seeds_by_verdict(runs),
        ))  # fmt: skip
    return _align(rows)


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
    parser.add_argument(
        "--seeds", "--seed", nargs="+", type=int, default=[0], metavar="SEED",
        help="seeds of the data and the draws, each a run per init (several: a summary over them at the end)",
    )  # fmt: skip
    parser.add_argument("--logdir", default="runs", help="TensorBoard log directory")
    parser.add_argument("--smoke", action="store_true", help="tiny, fast run (used by the tests)")
    args = parser.parse_args(argv)
    if len(set(args.seeds)) < len(args.seeds) or min(args.seeds) < 0:
        parser.error(f"--seeds takes distinct non-negative integers, got {' '.join(map(str, args.seeds))}")
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
    baseline = task.baseline(args.seq_len)
    gates = GATES[args.cell]
    setting = f"{task.title}, T = {args.seq_len}, {cell}, hidden {args.hidden}, {args.steps} steps, lr {args.lr}"
    baseline_text = f"{task.baseline_name} scores {task.loss_name} {baseline:.4f}"
    results = []
    for seed in args.seeds:
        seed_results = [train_one(task, init, seed, args, run_group) for init in args.inits]
        results += seed_results
        print(f"\n{setting}, seed {seed}; {baseline_text}")
        print(format_table(seed_results, baseline, task.loss_name, gates))
    if len(args.seeds) > 1:
        seeds = ", ".join(map(str, args.seeds))
        print(f"\n{setting}, seeds {seeds}: mean (lowest..highest) and ranges over the seeds; {baseline_text}")
        print(format_seeds_table(results, baseline, task.loss_name, gates))
    print(
        "start -> end of training. transmission: log10 ||dL/dh_0|| / ||dL/dh_T-1||, below 0 the gradient vanishes on "
        "its way back ('<': a bound, the first steps' norms underflowed float); lambda_1: the largest Lyapunov exponent "
        "of the layer's dynamics (natural log per step; below 0 every perturbation of the state fades, 1/|lambda_1| "
        "steps is its horizon; above 0 some grow); horizon: steps back before the gradient falls 1000x; verdict: "
        "GradHealth's health report ('short memory': the layer keeps a gradient over 10 steps or more, not the "
        "whole sequence; enough unless the task needs longer dependencies). Learned losses differ with the hardware "
        "and the BLAS library, even for one seed."
    )
    print(f"\nNext: tensorboard --logdir {run_group}")
    return results


if __name__ == "__main__":
    main()
