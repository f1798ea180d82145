"""Which steps are measured, probed and fully measured: the schedule alone, and inside a real fit."""

from __future__ import annotations

from typing import Any

import pytest
import pytorch_lightning
import torch
from pytorch_lightning.loggers.logger import Logger

from conftest import PLSequenceModel, trainer_kwargs
from lightning_gradhealth import GradHealth, GradHealthMonitor
from lightning_gradhealth.defaults import FULL_EVERY_N_LOGS, PROBE_EVERY_N_LOGS
from lightning_gradhealth.trackers import Schedule


def _resolved(fallback: int, **requested: Any) -> Schedule:
    schedule = Schedule(**requested)
    schedule.resolve(fallback)
    return schedule


def test_with_the_trainers_interval_the_probe_runs_every_probe_every_n_logs_logging_steps():
    schedule = _resolved(50)
    assert (schedule.log_every_n_steps, schedule.probe_every_n_steps, schedule.full_every_n_steps) == (
        50, PROBE_EVERY_N_LOGS * 50, FULL_EVERY_N_LOGS * 50
    )
    end = 3 * FULL_EVERY_N_LOGS * 50
    plans = {step: schedule.update(step, optimizer="") for step in range(0, end + 1, 50)}
    assert [step for step, plan in plans.items() if plan.probe] == list(range(0, end + 1, PROBE_EVERY_N_LOGS * 50))
    assert [step for step, plan in plans.items() if plan.full] == list(range(0, end + 1, FULL_EVERY_N_LOGS * 50))
    assert all(plan.measure and plan.log_gradients for plan in plans.values())  # sigma_max on every logging step
    assert FULL_EVERY_N_LOGS % PROBE_EVERY_N_LOGS == 0  # every default full pass is a probe step anyway


def test_an_interval_given_to_gradhealth_is_that_of_the_probe_too():
    schedule = _resolved(50, log_every_n_steps=1)
    assert (schedule.log_every_n_steps, schedule.probe_every_n_steps, schedule.full_every_n_steps) == (1, 1, FULL_EVERY_N_LOGS)
    assert all(schedule.is_probe_step(step) for step in range(100))


def test_a_probe_interval_is_rounded_up_against_the_trainers_and_full_passes_always_probe():
    schedule = _resolved(50, probe_every_n_steps=120)
    assert schedule.probe_every_n_steps == 150
    schedule = _resolved(10, probe_every_n_steps=20, full_every_n_steps=30)
    assert [step for step in range(0, 100, 10) if schedule.is_probe_step(step)] == [0, 20, 30, 40, 60, 80, 90]
    rare = _resolved(10, probe_every_n_steps=1000, full_every_n_steps=50)  # rarer than the full passes
    assert [step for step in range(0, 200, 10) if rare.is_probe_step(step)] == [0, 50, 100, 150]


def test_only_the_first_optimizer_of_a_step_probes_and_steps_off_the_schedule_do_nothing():
    schedule = _resolved(2, probe_every_n_steps=4)
    first, second = schedule.update(4, optimizer="optimizer_0"), schedule.update(4, optimizer="optimizer_1")
    assert (first.probe, first.log_gradients) == (True, True) and (second.probe, second.log_gradients) == (False, True)
    assert schedule.update(2, optimizer="optimizer_0").probe is False
    assert schedule.update(3, optimizer="optimizer_0") == schedule.update(3, optimizer="optimizer_1")
    assert not schedule.update(5, optimizer="optimizer_0").measure


def test_a_probe_interval_not_a_multiple_of_the_logging_interval_fails_at_construction():
    for build in (GradHealth, GradHealthMonitor):
        with pytest.raises(ValueError, match="probe_every_n_steps=6 must be a multiple of log_every_n_steps=4: the probe runs"):
            build(log_every_n_steps=4, probe_every_n_steps=6)
    with pytest.raises(ValueError, match="probe_every_n_steps must be None or an integer >= 1, got -50"):
        GradHealth(probe_every_n_steps=-50)


class _MetricSteps(Logger):
    """A logger that keeps, per metric name, the steps it was logged at."""

    def __init__(self) -> None:
        super().__init__()
        self.steps: dict[str, list[int]] = {}

    @property
    def name(self) -> str:
        return "metric-steps"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        for name in metrics:
            self.steps.setdefault(name, []).append(step)


class _Captures(pytorch_lightning.Callback):
    """Whether GradHealth's probe held a capture after each step's backward pass."""

    def __init__(self, health: GradHealth) -> None:
        self.health, self.held = health, {}

    def on_after_backward(self, trainer: Any, pl_module: Any) -> None:
        self.held[trainer.global_step] = self.health.monitor._probe.has_captures


def test_by_default_a_fit_probes_step_0_and_every_few_logging_steps_and_logs_sigma_max_on_every_one():
    torch.manual_seed(0)
    every, probe_every = 2, 2 * PROBE_EVERY_N_LOGS  # the Trainer's logging interval, and the probe's from it
    health, logger = GradHealth(), _MetricSteps()
    captures = _Captures(health)
    steps = 2 * probe_every + 1
    trainer = pytorch_lightning.Trainer(
        callbacks=[health, captures], **trainer_kwargs(max_steps=steps, logger=logger, log_every_n_steps=every)
    )
    trainer.fit(PLSequenceModel())
    logging_steps, probe_steps = list(range(0, steps, every)), [0, probe_every, 2 * probe_every]
    assert health._configuration()["probe_every_n_steps"] == probe_every
    assert [step for step, _ in health.timestep_history["rnn.l0"]] == probe_steps
    assert logger.steps["gradhealth/rnn.l0/1_transmission"] == probe_steps
    for gate in "ifgo":  # and the final spectra's at the end of fit
        assert logger.steps[f"gradhealth/rnn.l0/5_sigma_max/{gate}"] == [*logging_steps, steps]
    # nothing is captured on the logging steps that are not probed
    assert [step for step, held in captures.held.items() if held] == probe_steps


def test_gradhealth_with_its_own_logging_interval_probes_on_every_logging_step():
    torch.manual_seed(0)
    health = GradHealth(log_every_n_steps=1)
    pytorch_lightning.Trainer(callbacks=[health], **trainer_kwargs(max_steps=3)).fit(PLSequenceModel())
    assert [step for step, _ in health.timestep_history["rnn.l0"]] == [0, 1, 2]
