"""Spectra of the recurrent matrices in real fits, read back from TensorBoard event files."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import pytorch_lightning
import torch
from pytorch_lightning.loggers import TensorBoardLogger
from torch import nn

from conftest import PLSequenceModel, tensorboard_events, trainer_kwargs
from lightning_gradhealth import GradHealth


def test_a_real_fit_writes_spectral_scalars_histograms_and_the_eigenvalue_picture(tmp_path):
    torch.manual_seed(0)
    logger = TensorBoardLogger(tmp_path, name="run")
    health = GradHealth(init="orthogonal", log_every_n_steps=2, full_every_n_steps=4)
    model = PLSequenceModel(build=lambda: nn.LSTM(3, 8, batch_first=True))
    pytorch_lightning.Trainer(callbacks=[health], **trainer_kwargs(max_steps=5, logger=logger)).fit(model)
    events = tensorboard_events(logger.log_dir)
    tags = events.Tags()
    for gate in "ifgo":  # and at the end of fit (step 5), the final spectra
        assert [e.step for e in events.Scalars(f"gradhealth/rnn.l0/5_sigma_max/{gate}")] == [0, 2, 4, 5]
        for name in ("sigma_min", "condition", "4_spectral_radius", "orth_error", "outside_unit_circle"):
            assert [e.step for e in events.Scalars(f"gradhealth/rnn.l0/{name}/{gate}")] == [0, 4, 5]
        assert f"gradhealth/rnn.l0/singular_values/{gate}" in tags["histograms"]
        assert f"gradhealth/rnn.l0/eigenvalue_moduli/{gate}" in tags["histograms"]
        # step 0 is right after init: orthogonal per gate
        assert events.Scalars(f"gradhealth/rnn.l0/5_sigma_max/{gate}")[0].value == pytest.approx(1.0, abs=1e-5)
        assert events.Scalars(f"gradhealth/rnn.l0/orth_error/{gate}")[0].value == pytest.approx(0.0, abs=1e-5)
    # pictures: none at step 0 (numbers only, right after init), then each full pass and the end of fit
    image = events.Images("gradhealth/rnn.l0/eigenvalues")
    assert [i.step for i in image] == [4, 5] and image[0].width >= 300 and image[0].height >= 300  # one panel, all gates


def test_projections_are_non_square_singular_values_only(tmp_path):
    torch.manual_seed(0)
    logger = TensorBoardLogger(tmp_path, name="run")
    health = GradHealth(init="orthogonal", log_every_n_steps=1, full_every_n_steps=1)
    model = PLSequenceModel(build=lambda: nn.LSTM(3, 8, batch_first=True, proj_size=4), output_width=4)
    pytorch_lightning.Trainer(callbacks=[health], **trainer_kwargs(max_steps=1, logger=logger)).fit(model)
    events = tensorboard_events(logger.log_dir)
    tags = events.Tags()
    # weight_hh gate blocks are 8 x 4 and weight_hr is 4 x 8: singular values, no eigenvalues
    for gate in ("i", "proj"):
        assert events.Scalars(f"gradhealth/rnn.l0/5_sigma_max/{gate}")[0].value == pytest.approx(1.0, abs=1e-5)
        assert f"gradhealth/rnn.l0/singular_values/{gate}" in tags["histograms"]
        assert f"gradhealth/rnn.l0/eigenvalue_moduli/{gate}" not in tags["histograms"]
    assert "gradhealth/rnn.l0/eigenvalues" not in tags["images"]


def test_logged_spectra_equal_numpy_on_the_weights_of_that_step(tmp_path):
    torch.manual_seed(0)

    class Weights(pytorch_lightning.Callback):
        def __init__(self) -> None:
            self.at_step = {}

        def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
            self.at_step[trainer.global_step] = pl_module.rnn.weight_hh_l0.detach().double().numpy().copy()

    logger, weights = TensorBoardLogger(tmp_path, name="run"), Weights()
    health = GradHealth(log_every_n_steps=1, full_every_n_steps=3)
    model = PLSequenceModel(build=lambda: nn.GRU(3, 6, batch_first=True), output_width=6)
    pytorch_lightning.Trainer(callbacks=[weights, health], **trainer_kwargs(max_steps=4, logger=logger)).fit(model)
    events = tensorboard_events(logger.log_dir)
    for step in (0, 3):
        for index, block in enumerate(np.split(weights.at_step[step], 3)):
            gate = "rzn"[index]
            scalar = {e.step: e.value for e in events.Scalars(f"gradhealth/rnn.l0/4_spectral_radius/{gate}")}
            assert scalar[step] == pytest.approx(np.abs(np.linalg.eigvals(block)).max(), rel=1e-5)
            sigma = {e.step: e.value for e in events.Scalars(f"gradhealth/rnn.l0/sigma_min/{gate}")}
            assert sigma[step] == pytest.approx(np.linalg.svd(block, compute_uv=False).min(), rel=1e-5)
    # the cheap pass on the steps between: warm-started sigma_max
    for step in (1, 2):
        for index, block in enumerate(np.split(weights.at_step[step], 3)):
            scalar = {e.step: e.value for e in events.Scalars(f"gradhealth/rnn.l0/5_sigma_max/{'rzn'[index]}")}
            assert scalar[step] == pytest.approx(np.linalg.svd(block, compute_uv=False).max(), rel=1e-3)


def test_frozen_layers_are_measured_and_nonfinite_weights_are_flagged_not_fatal():
    torch.manual_seed(0)

    class Broken(PLSequenceModel):
        def on_fit_start(self) -> None:
            self.rnn.requires_grad_(False)
            with torch.no_grad():
                self.rnn.weight_hh_l0[3, 0] = float("nan")  # in the input gate block

    health = GradHealth(log_every_n_steps=1, full_every_n_steps=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = pytorch_lightning.Trainer(callbacks=[health], **trainer_kwargs(max_steps=3))
        trainer.fit(Broken())
    assert trainer.global_step == 3
    spectrum = health.spectra["rnn.weight_hh_l0"]
    assert spectrum.finite.tolist() == [False, True, True, True]
    assert bool(torch.isnan(spectrum.sigma_max[0])) and bool(torch.isfinite(spectrum.sigma_max[1:]).all())
    ours = [str(w.message) for w in caught if "holds NaN/Inf" in str(w.message)]
    assert len(ours) == 1 and "rnn.weight_hh_l0" in ours[0] and "gate blocks i" in ours[0]
