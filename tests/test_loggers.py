"""GradHealth with the loggers users actually configure: scalars reach every Lightning logger,
histograms, pictures and text reach every TensorBoard logger, and nothing else is needed.

Every case is a real short fit (tiny LSTM, logging every step, full spectra and pictures at
steps 0 and 2) with real loggers writing real files, read back with the CSV module and
TensorBoard's own event reader.
"""

from __future__ import annotations

import csv
import logging
import math
import warnings
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch
import lightning.pytorch.loggers
import pytest
import pytorch_lightning
import torch
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger
from torch import nn

from conftest import LSequenceModel, PLSequenceModel, tensorboard_events, trainer_kwargs
from lightning_gradhealth import GradHealth

STEPS = 4
NO_TENSORBOARD = "no TensorBoard logger"
REPORT_HEADING = "GradHealth health report"
# logged on every step (scalars) and on the full passes at steps 0 and 2 (spectra; pictures from
# step 2 on: step 0 is numbers only); the spectra also at the end of fit (step 4), with pictures
EVERY_STEP = (
    "gradhealth/rnn.l0/1_transmission",
    "gradhealth/rnn.l0/2_horizon",
    "gradhealth/rnn.l0/5_sigma_max/i",
    "gradhealth/grad_norm/total",
    "gradhealth/rnn.l0/weight_grad_norm",
)
FULL_PASS = ("gradhealth/rnn.l0/4_spectral_radius/i", "gradhealth/rnn.l0/orth_error/f")
HISTOGRAMS = ("gradhealth/rnn.l0/singular_values/i", "gradhealth/rnn.l0/eigenvalue_moduli/o")
IMAGES = ("gradhealth/rnn.l0/eigenvalues", "gradhealth/rnn.l0/timestep_grad_norms", "gradhealth/rnn.l0/timestep_heatmap")
# the loggers rank_zero_info / rank_zero_warn / a module logger may write to, in either namespace
_LOGGER_NAMES = ("pytorch_lightning", "lightning", "lightning_fabric", "lightning_utilities", "lightning_gradhealth")


@dataclass
class Fit:
    """What one fit left behind: the trainer, the callback, and every message it emitted."""

    trainer: Any
    health: GradHealth
    warnings: list[str] = field(default_factory=list)
    log_messages: list[str] = field(default_factory=list)

    def messages(self, containing: str) -> list[str]:
        """Warnings and log records that contain ``containing``."""
        return [message for message in self.warnings + self.log_messages if containing in message]


@contextmanager
def _recorded_log_messages() -> Iterator[list[str]]:
    """Every record that reaches the Lightning or GradHealth loggers at their own levels.

    A handler on each logger directly, so the capture holds whatever their ``propagate``
    setting (Lightning turns it off when the root logger had no handler at import) and
    whichever namespace set ``rank_zero_info``'s logger last. Levels are left alone: a message
    recorded here is one a user sees.
    """
    records: dict[int, logging.LogRecord] = {}

    class Recorder(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.setdefault(id(record), record)

    recorder = Recorder()
    loggers = [logging.getLogger(name) for name in _LOGGER_NAMES]
    for logger in loggers:
        logger.addHandler(recorder)
    messages: list[str] = []
    try:
        yield messages
    finally:
        for logger in loggers:
            logger.removeHandler(recorder)
        messages.extend(record.getMessage() for record in records.values())


def _fit(loggers: Any, namespace: Any = pytorch_lightning) -> Fit:
    """A short real fit with ``loggers`` (``False``, one logger or a list), recording every
    warning and every Lightning / GradHealth log message."""
    torch.manual_seed(0)
    health = GradHealth(init="orthogonal", log_every_n_steps=1, full_every_n_steps=2)
    model_class = LSequenceModel if namespace is lightning.pytorch else PLSequenceModel
    model = model_class(build=lambda: nn.LSTM(3, 8, batch_first=True))
    trainer = namespace.Trainer(callbacks=[health], **trainer_kwargs(max_steps=STEPS, logger=loggers, log_every_n_steps=1))
    with warnings.catch_warnings(record=True) as caught, _recorded_log_messages() as log_messages:
        warnings.simplefilter("always")
        trainer.fit(model)
    fit = Fit(trainer, health, [str(w.message) for w in caught])
    fit.log_messages = log_messages
    assert trainer.global_step == STEPS
    return fit


def _csv_series(log_dir: str | Path) -> dict[str, dict[int, float]]:
    """``{metric: {step: value}}`` from a CSVLogger's ``metrics.csv``."""
    series: dict[str, dict[int, float]] = {}
    with open(Path(log_dir) / "metrics.csv", newline="") as file:
        for row in csv.DictReader(file):
            step = int(row["step"])
            for name, value in row.items():
                if name != "step" and value not in ("", None):
                    series.setdefault(name, {})[step] = float(value)
    return series


def _event_series(log_dir: str | Path) -> tuple[dict[str, dict[int, float]], dict[str, list[str]]]:
    """``{scalar tag: {step: value}}`` and the tags by kind, from a TensorBoard run directory."""
    events = tensorboard_events(log_dir)
    tags = events.Tags()
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in tags["scalars"]}, tags


def _steps_of(tag: str) -> list[int]:
    """The steps an every-step tag is logged at: every step, and a spectral one also at the end of fit."""
    return list(range(STEPS)) + ([STEPS] if "sigma_max" in tag else [])


def _assert_tensorboard_run_is_complete(log_dir: str | Path) -> dict[str, dict[int, float]]:
    """Scalars on every step, spectra, histograms and pictures on the full passes; the scalars."""
    scalars, tags = _event_series(log_dir)
    for tag in EVERY_STEP:
        assert sorted(scalars[tag]) == _steps_of(tag), tag
    for tag in FULL_PASS:
        assert sorted(scalars[tag]) == [0, 2, STEPS], tag
    assert set(HISTOGRAMS) <= set(tags["histograms"])
    assert set(IMAGES) <= set(tags["images"])
    events = tensorboard_events(log_dir)
    assert [image.step for image in events.Images("gradhealth/rnn.l0/eigenvalues")] == [2, STEPS]
    return scalars


def _assert_no_repeated_gradhealth_message(fit: Fit) -> None:
    """No GradHealth warning or log message appears twice."""
    ours = Counter(message for message in fit.warnings + fit.log_messages if message.startswith("GradHealth"))
    assert all(count == 1 for count in ours.values()), ours.most_common(3)


@pytest.fixture(scope="module")
def csv_only(tmp_path_factory: pytest.TempPathFactory) -> tuple[Fit, CSVLogger]:
    """One fit with a CSVLogger as the only logger."""
    logger = CSVLogger(tmp_path_factory.mktemp("csv_only"), name="csv")
    return _fit(logger), logger


@pytest.fixture(scope="module")
def no_logger() -> Fit:
    """One fit with ``logger=False``."""
    return _fit(False)


def test_csv_logger_alone_gets_every_scalar(csv_only: tuple[Fit, CSVLogger]) -> None:
    """Without TensorBoard the run does not fail, and every GradHealth scalar still reaches a
    CSVLogger's metrics.csv at its step: per-timestep and sigma_max every step, full spectra on
    the full passes, all finite."""
    _, logger = csv_only
    series = _csv_series(logger.log_dir)
    for tag in EVERY_STEP:
        assert sorted(series[tag]) == _steps_of(tag), tag
    for tag in FULL_PASS:
        assert sorted(series[tag]) == [0, 2, STEPS], tag
    assert all(math.isfinite(value) for tag in EVERY_STEP + FULL_PASS for value in series[tag].values())
    assert series["gradhealth/rnn.l0/5_sigma_max/i"][0] == pytest.approx(1.0, abs=1e-5)  # orthogonal init
    assert not any(name.endswith(("singular_values", "eigenvalue_moduli", "eigenvalues", "heatmap")) for name in series)


def test_csv_logger_alone_gets_one_no_tensorboard_notice(csv_only: tuple[Fit, CSVLogger]) -> None:
    """Without a TensorBoard logger GradHealth says once, over a whole fit with several full
    passes, that histograms, pictures and text are not written; no GradHealth message repeats."""
    fit, _ = csv_only
    notices = fit.messages(NO_TENSORBOARD)
    assert len(notices) == 1, notices
    assert notices[0].startswith("GradHealth") and "CSVLogger" in notices[0]
    _assert_no_repeated_gradhealth_message(fit)


def test_csv_and_tensorboard_loggers_get_the_same_scalars_and_tensorboard_the_pictures(tmp_path: Path) -> None:
    """With a CSVLogger and a TensorBoardLogger together, both hold the same GradHealth scalars
    at the same steps (equal up to TensorBoard's float32), the TensorBoard run also holds the
    histograms and pictures, and there is no missing-TensorBoard notice."""
    csv_logger = CSVLogger(tmp_path, name="csv")
    tensorboard_logger = TensorBoardLogger(tmp_path, name="tb")
    fit = _fit([csv_logger, tensorboard_logger])
    scalars = _assert_tensorboard_run_is_complete(tensorboard_logger.log_dir)
    series = _csv_series(csv_logger.log_dir)
    ours = {tag for tag in scalars if tag.startswith("gradhealth/")}
    assert ours == {name for name in series if name.startswith("gradhealth/")}
    for tag in ours:
        assert scalars[tag] == pytest.approx(series[tag], rel=1e-6, nan_ok=True), tag
    assert not fit.messages(NO_TENSORBOARD)


def test_two_tensorboard_loggers_each_get_scalars_histograms_and_pictures(tmp_path: Path) -> None:
    """Two TensorBoardLoggers both get everything: the same scalars, the histograms and the
    pictures, each in its own event file."""
    first, second = TensorBoardLogger(tmp_path, name="first"), TensorBoardLogger(tmp_path, name="second")
    fit = _fit([first, second])
    assert Path(first.log_dir) != Path(second.log_dir)
    scalars_first = _assert_tensorboard_run_is_complete(first.log_dir)
    scalars_second = _assert_tensorboard_run_is_complete(second.log_dir)
    ours = [tag for tag in scalars_first if tag.startswith("gradhealth/")]
    assert {tag: scalars_first[tag] for tag in ours} == {tag: scalars_second[tag] for tag in ours}
    for kind in ("histograms", "images"):
        assert tensorboard_events(first.log_dir).Tags()[kind] == tensorboard_events(second.log_dir).Tags()[kind]
    assert not fit.messages(NO_TENSORBOARD)


def test_without_a_logger_training_runs_and_says_little(no_logger: Fit) -> None:
    """``logger=False``: the fit runs to its last step with every measurement made (the
    callback still holds the latest per-timestep norms and spectra), says at most once that
    nothing goes to TensorBoard, and repeats no GradHealth message."""
    fit = no_logger
    assert fit.trainer.loggers == []
    assert fit.health.timestep_grad_norms["rnn.l0"].shape == (6,)
    assert "rnn.weight_hh_l0" in fit.health.spectra
    assert len(fit.messages(NO_TENSORBOARD)) <= 1
    _assert_no_repeated_gradhealth_message(fit)


def test_without_a_logger_the_health_report_still_prints(no_logger: Fit) -> None:
    """``logger=False``: the end-of-fit health report is still printed on rank 0 (through
    Lightning's ``rank_zero_info``), exactly once, opening with its heading."""
    reports = [message for message in no_logger.log_messages if message.startswith(REPORT_HEADING)]
    assert len(reports) == 1, no_logger.log_messages
    assert "rnn.l0" in reports[0]


def test_lightning_pytorch_namespace_tensorboard_logger_gets_pictures(tmp_path: Path) -> None:
    """The ``lightning.pytorch`` Trainer with ``lightning.pytorch.loggers.TensorBoardLogger``
    (a distinct class from ``pytorch_lightning``'s) is recognized as TensorBoard: its run gets
    the scalars, histograms and pictures, and there is no missing-TensorBoard notice."""
    logger = lightning.pytorch.loggers.TensorBoardLogger(tmp_path, name="lightning")
    assert not isinstance(logger, TensorBoardLogger)
    fit = _fit(logger, namespace=lightning.pytorch)
    _assert_tensorboard_run_is_complete(logger.log_dir)
    assert not fit.messages(NO_TENSORBOARD)
