"""GradHealth in every configuration a team's training template uses, run for real: 2-process
DDP over gloo, FSDP on CPU, ``torch.compile``, gradient accumulation, manual optimization with two
optimizers, epochs with validation and the sanity check, a second ``fit`` on the same Trainer,
``validate``/``test``/``predict`` alone, hooks after fit and after a failed fit, and a real
checkpoint resume. Measurements are checked against the hand-unrolled autograd reference
(tests/reference_rnn.py); everything else against what the run does without GradHealth.
"""

from __future__ import annotations

import copy
import csv
import importlib.util
import os
import pickle
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any, Optional

import pytest
import pytorch_lightning
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger
from torch import Tensor, nn

from conftest import PLSequenceModel, tensorboard_events, trainer_kwargs, weights
from lightning_gradhealth import GradHealth
from reference_rnn import reference_norms, unrolled

TESTS = Path(__file__).parent
SCRIPTS = TESTS / "scripts"
REPO = TESTS.parent

Batch = tuple[Tensor, Tensor]


# ----------------------------------------------------------------------------------------------
# helpers


def _subprocess_env() -> dict[str, str]:
    """The environment of a multi-process run: this checkout first on the path, one thread per rank,
    and none of Lightning's ``PL_*`` variables an earlier in-process test may have left (a
    ``PL_GLOBAL_SEED`` from ``seed_everything`` would reseed every rank at DDP set-up)."""
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH", "")]))
    inherited = {name: value for name, value in os.environ.items() if not name.startswith("PL_")}
    return {**inherited, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}


def _script(name: str) -> Any:
    """The module tests/scripts/<name>.py, imported without touching ``sys.path``."""
    spec = importlib.util.spec_from_file_location(f"scripts_{name}", SCRIPTS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _cell_type(layer: nn.Module) -> str:
    """The reference's name for the cell equations of ``layer`` (fused layer or cell)."""
    if isinstance(layer, (nn.LSTM, nn.LSTMCell)):
        return "lstm"
    if isinstance(layer, (nn.GRU, nn.GRUCell)):
        return "gru"
    return "rnn_" + getattr(layer, "nonlinearity", "tanh")


def _unroll(layer: nn.Module, x_batch_first: Tensor) -> tuple[Tensor, dict[str, list[Tensor]], dict[str, list[Any]]]:
    """The reference unrolled over ``x`` (batch first) from zero initial states: the output
    sequence (time-major) and the retained states by layer/direction key ("l0", "l0_reverse", ...)."""
    directions = 2 if getattr(layer, "bidirectional", False) else 1
    layers = getattr(layer, "num_layers", 1)
    shape = (layers * directions, x_batch_first.shape[0], layer.hidden_size)
    c0 = torch.zeros(shape) if _cell_type(layer) == "lstm" else None
    output, _, _, states, cells = unrolled(layer, _cell_type(layer), x_batch_first.transpose(0, 1), torch.zeros(shape), c0)
    return output, states, cells


def _norms(
    prefix: str, states: dict[str, list[Tensor]], cells: dict[str, list[Any]], cell_module: bool = False
) -> dict[str, Tensor]:
    """Reference norms under GradHealth's keys: ``<module>.<layer key>`` for fused layers, the
    module's own name for a cell; LSTM cell states under the same key plus ``.cell``."""
    norms: dict[str, Tensor] = {}
    for key, tensors in states.items():
        name = prefix if cell_module else f"{prefix}.{key}"
        norms[name] = reference_norms(tensors)
        if cells[key][0] is not None:
            norms[name + ".cell"] = reference_norms(cells[key])
    return norms


def reference_for(model: nn.Module, batch: Batch, loss_divisor: float = 1.0) -> dict[str, Tensor]:
    """||dL/dh_t|| from the hand-unrolled reference for the conftest model's loss on ``batch``
    (the last state through ``model.head``, MSE), divided by ``loss_divisor`` as Lightning does
    with gradient accumulation. ``model.rnn`` may be a fused layer or a cell run over the sequence."""
    model = copy.deepcopy(model)
    x, y = batch
    output, states, cells = _unroll(model.rnn, x)
    loss = nn.functional.mse_loss(model.head(output[-1]), y) / loss_divisor
    loss.backward()
    return _norms("rnn", states, cells, cell_module=isinstance(model.rnn, nn.RNNCellBase))


def assert_norms_equal(measured: dict[str, Tensor], expected: dict[str, Tensor], rtol: float = 1e-5) -> None:
    """Same keys, same values (float32 relative error below ``rtol``)."""
    assert set(measured) == set(expected)
    for key, values in expected.items():
        torch.testing.assert_close(measured[key], values, rtol=rtol, atol=0, msg=key)


def hook_snapshot(model: nn.Module) -> dict[str, Any]:
    """Every hook a module, a parameter or torch's global registries can hold, by identity."""
    module_hooks = (
        "_forward_hooks",
        "_forward_hooks_with_kwargs",
        "_forward_hooks_always_called",
        "_forward_pre_hooks",
        "_forward_pre_hooks_with_kwargs",
        "_backward_hooks",
        "_backward_pre_hooks",
        "_state_dict_hooks",
        "_state_dict_pre_hooks",
        "_load_state_dict_pre_hooks",
        "_load_state_dict_post_hooks",
    )
    snapshot: dict[str, Any] = {
        f"{name}:{attr}": list(getattr(module, attr, {}).items())
        for name, module in model.named_modules()
        for attr in module_hooks
    }
    for name, param in model.named_parameters():
        snapshot[f"{name}:tensor_hooks"] = list((param._backward_hooks or {}).items())
        snapshot[f"{name}:post_accumulate_hooks"] = list((getattr(param, "_post_accumulate_grad_hooks", None) or {}).items())
    from torch.nn.modules import module as module_module

    for attr in ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks", "_global_backward_pre_hooks"):
        snapshot[f"global:{attr}"] = list(getattr(module_module, attr).items())
    return snapshot


class StepRecorder(pytorch_lightning.Callback):
    """At the start of every training batch: the optimizer step it belongs to, the batch, and the
    weights it runs with (``state_dict`` copies, safe under ``torch.compile``)."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, Any, dict[str, Tensor]]] = []

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        state = {name: value.detach().clone() for name, value in pl_module.state_dict().items()}
        self.seen.append((trainer.fit_loop.epoch_loop._batches_that_stepped, [t.clone() for t in batch], state))

    def first_batch_of_step(self, step: int) -> tuple[Any, dict[str, Tensor]]:
        """The first micro-batch of optimizer step ``step`` and the weights before it."""
        batch, state = next((batch, state) for seen_step, batch, state in self.seen if seen_step == step)
        return batch, state


def model_with(state: dict[str, Tensor], build: Any, model_class: type = PLSequenceModel, **kwargs: Any) -> nn.Module:
    """A fresh eager model of ``model_class`` holding the recorded weights ``state``."""
    model = model_class(build=build, **kwargs)
    model.load_state_dict(state)
    return model


def _stacked_lstm() -> nn.Module:
    """The recurrent layer of most tests: a 2-layer LSTM, batch first."""
    return nn.LSTM(3, 8, num_layers=2, batch_first=True)


# ----------------------------------------------------------------------------------------------
# 1. DDP: 2 processes, gloo, CPU


def test_ddp_two_processes_rank0_alone_writes_ranks_stay_identical_and_each_measures_its_own_batch(tmp_path: Path) -> None:
    """Under real 2-process DDP (gloo, CPU), with the probe and full spectra on logging steps,
    ``clip="norm"`` and ``on_nonfinite="skip"`` then ``"warn"`` with a NaN loss on rank 1 only:
    nothing hangs (timeout) or fails; init is identical on both ranks and drawn from rank 0's seed;
    the skipped step is skipped on both ranks, so the weights stay identical; only rank 0 prints
    the init table, the report and the warnings and writes event files; and the dL/dh_t each rank
    measures is that of its own batch, equal to the unrolled reference on it."""
    run = subprocess.run(
        [sys.executable, str(SCRIPTS / "ddp_integration.py"), str(tmp_path)],
        env=_subprocess_env(), capture_output=True, text=True, timeout=150,
    )
    rank1_output = (tmp_path / "rank1.out").read_text() if (tmp_path / "rank1.out").exists() else ""
    assert run.returncode == 0, run.stderr[-3000:] + "\n--- rank 1 ---\n" + rank1_output[-3000:]
    rank0_output = run.stdout + run.stderr

    # only rank 0 talks: init table, reports and warnings once per fit; rank 1's output was captured
    assert "rank 1 finished" in rank1_output and "rank 0 finished" in rank0_output
    assert rank0_output.count("GradHealth: initialized 8 parameters of 2 layers (seed 100)") == 1
    assert rank0_output.count("GradHealth health report") == 2
    assert rank0_output.count("skipped the optimizer step at step 1") == 1
    assert "GradHealth" not in rank1_output

    fits = {
        fit: [torch.load(tmp_path / f"{fit}_rank{rank}.pt", weights_only=False) for rank in (0, 1)] for fit in ("skip", "warn")
    }
    rank0, rank1 = fits["skip"]
    # init: identical on both ranks (each started from its own torch seed), rank 0's seed, orthogonal gates
    assert rank0["init_seed"] == rank1["init_seed"] == 100
    assert len(rank0["init_parameters"]) == len(rank1["init_parameters"]) == 8
    for name, value in rank0["weights_at_start"].items():
        assert torch.equal(value, rank1["weights_at_start"][name]), name
    for block in rank0["weights_at_start"]["rnn.weight_hh_l1"].double().chunk(4):
        torch.testing.assert_close(block @ block.T, torch.eye(8, dtype=torch.float64), atol=1e-6, rtol=0)
    # skip: rank 1's NaN reached rank 0 through the all-reduce; both skipped, both stayed identical and finite
    for result in (rank0, rank1):
        assert (result["global_step"], result["skipped_steps"], result["nonfinite_steps"], result["clip_steps"]) == (4, 1, 1, 3)
        assert result["history_steps"]["rnn.l0"] == [0, 2] and result["spectra"] == ["rnn.weight_hh_l0", "rnn.weight_hh_l1"]
    for name, value in rank0["final_weights"].items():
        assert torch.equal(value, rank1["final_weights"][name]) and bool(value.isfinite().all()), name
    # each rank measures dL/dh_t of its own loss on its own batch (DistributedSampler: different batches)
    assert not torch.equal(rank0["probed_batch"][0], rank1["probed_batch"][0])
    build_lstm = _script("ddp_integration").build_lstm
    for result in (rank0, rank1):
        model = model_with(result["weights_before_probed_step"], build_lstm)
        assert_norms_equal(result["timestep_grad_norms"], reference_for(model, result["probed_batch"]))

    # warn: every step from 1 on has NaN gradients; the run goes on to max_steps on both ranks and counts them
    for result in fits["warn"]:
        assert (result["global_step"], result["nonfinite_steps"], result["skipped_steps"]) == (3, 2, 0)
        assert result["history_steps"]["rnn.l0"] == [0, 1, 2]
    for name, value in fits["warn"][0]["final_weights"].items():
        torch.testing.assert_close(value, fits["warn"][1]["final_weights"][name], equal_nan=True, rtol=0, atol=0)

    # event files: one per fit, all written by rank 0's process
    event_files = sorted((tmp_path / "tb").rglob("events.out.tfevents.*"))
    assert [path.parent.parent.name for path in event_files] == ["skip", "warn"]
    assert {int(path.name.split(".")[-2]) for path in event_files} == {rank0["pid"]}
    assert rank1["pid"] != rank0["pid"]
    events = tensorboard_events(tmp_path / "tb" / "skip" / "version_0")
    assert [e.step for e in events.Scalars("gradhealth/rnn.l0/1_transmission")] == [0, 2]
    assert [(e.step, e.value) for e in events.Scalars("gradhealth/nonfinite/skipped_steps")] == [(0, 0.0), (2, 1.0)]
    assert [image.step for image in events.Images("gradhealth/rnn.l1/eigenvalues")] == [2, 4]  # a full pass, the end of fit
    assert {"gradhealth/config/text_summary", "gradhealth/report/text_summary"} <= set(events.Tags()["tensors"])


# ----------------------------------------------------------------------------------------------
# 2. FSDP on CPU


def test_lightnings_fsdp_strategy_refuses_a_cpu_accelerator() -> None:
    """Stock ``Trainer(strategy="fsdp", accelerator="cpu")`` is refused by Lightning itself
    before GradHealth is involved (what the FSDP test below works around)."""
    with pytest.raises(ValueError, match="The strategy `fsdp` requires a GPU accelerator"):
        pytorch_lightning.Trainer(strategy="fsdp", **trainer_kwargs(devices=2, callbacks=[GradHealth()]))


def test_fsdp_on_cpu_gradhealth_never_fails_the_run_and_measures_whole_parameters(tmp_path: Path) -> None:
    """Under FSDP (2 CPU processes, gloo; Lightning's FSDPStrategy with ``device_id=cpu`` passed
    to FullyShardedDataParallel, see tests/scripts/fsdp_cpu.py) the parameters callbacks see
    outside forward and backward are flat 1-D shards (``use_orig_params=True``). Every
    configuration a template uses must train to ``max_steps``: measuring only, with init, and
    with ``clip="norm"`` and ``on_nonfinite="skip"``. And what GradHealth reports must be of the
    whole model: each rank's dL/dh_t equals the reference on its own batch, spectra exist, init
    makes every gate block of the whole matrix orthogonal, and clipping bounds the norm of the
    gradient over all shards."""
    run = subprocess.run(
        [sys.executable, str(SCRIPTS / "fsdp_cpu.py"), str(tmp_path)],
        env=_subprocess_env(), capture_output=True, text=True, timeout=200,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    results = {
        name: [torch.load(tmp_path / f"{name}_rank{rank}.pt", weights_only=False) for rank in (0, 1)]
        for name in ("measure", "init", "clip")
    }
    outcomes = {name: ranks[0]["error"] or f"ok, {ranks[0]['global_step']} steps" for name, ranks in results.items()}
    assert outcomes == {name: "ok, 3 steps" for name in ("measure", "init", "clip")}

    build_lstm = _script("fsdp_cpu").build_lstm
    # the parameters really are sharded: rank 0 holds part of weight_hh_l0 as a flat vector
    assert len(results["measure"][0]["shapes_at_train_start"]["rnn.weight_hh_l0"]) == 1
    for result in results["measure"]:
        model = model_with(result["weights_before_probed_step"], build_lstm)
        assert_norms_equal(result["timestep_grad_norms"], reference_for(model, result["probed_batch"]))
        assert set(result["spectra"]) == {"rnn.weight_hh_l0"} and bool(result["spectra"]["rnn.weight_hh_l0"].isfinite().all())
        assert not [notice for notice in result["notices"] if "cannot measure" in notice]
    for result in results["init"]:
        assert result["init_parameters"] == ["rnn.weight_ih_l0", "rnn.weight_hh_l0", "rnn.bias_ih_l0", "rnn.bias_hh_l0"]
        for block in result["weights_at_start"]["rnn.weight_hh_l0"].double().chunk(4):
            torch.testing.assert_close(block @ block.T, torch.eye(8, dtype=torch.float64), atol=1e-6, rtol=0)
    norms = [result["grad_norms_after_clipping"] for result in results["clip"]]
    assert norms[0] == norms[1] and len(norms[0]) == 3
    assert all(norm <= 0.01 * (1 + 1e-4) for norm in norms[0])


# ----------------------------------------------------------------------------------------------
# 3. torch.compile


class GRUCellLoop(PLSequenceModel):
    """The test model with an ``nn.GRUCell`` called in a Python loop over time."""

    def __init__(self, build: Any = None) -> None:
        super().__init__(build=lambda: nn.GRUCell(3, 8))

    def forward(self, x: Tensor) -> Tensor:
        h = x.new_zeros(x.shape[0], 8)
        for t in range(x.shape[1]):
            h = self.rnn(x[:, t], h)
        return self.head(h)


COMPILE_BACKENDS = [
    "aot_eager",
    pytest.param(
        "inductor",
        marks=pytest.mark.skipif(
            not os.environ.get("GRADHEALTH_TEST_INDUCTOR"),
            reason="inductor: its first compile in a process takes 13-36 s on 2 shared CPU cores (C++ code "
            "generation and compilation), aot_eager 2-7 s; set GRADHEALTH_TEST_INDUCTOR=1 to run it",
        ),
    ),
]


@pytest.mark.parametrize("backend", COMPILE_BACKENDS)
@pytest.mark.parametrize(
    "model_class, how, keys",
    [
        (PLSequenceModel, "torch.compile(model)", {"rnn.l0", "rnn.l0.cell", "rnn.l1", "rnn.l1.cell"}),
        (PLSequenceModel, "model.compile()", {"rnn.l0", "rnn.l0.cell", "rnn.l1", "rnn.l1.cell"}),
        (GRUCellLoop, "torch.compile(model)", {"rnn"}),
    ],
)
def test_compiled_model_is_measured_under_the_plain_keys_as_the_eager_reference(
    model_class: type, how: str, keys: set[str], backend: str
) -> None:
    """``trainer.fit(torch.compile(model))`` (Lightning unwraps it and compiles the step methods)
    and ``model.compile()`` (compiles ``__call__``) train for real (Dynamo compiles frames), and
    GradHealth measures every layer under the module names of the uncompiled model (no
    ``_orig_mod.`` prefix): the fused LSTM (which Dynamo runs eagerly) and a ``GRUCell`` loop traced
    into the compiled graph alike, equal to the eager unrolled reference; no notice, no failure."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = model_class(build=_stacked_lstm)
    counter = CompileCounterWithBackend(backend)
    recorder, health = StepRecorder(), GradHealth(log_every_n_steps=2, full_every_n_steps=2)
    trainer = pytorch_lightning.Trainer(callbacks=[recorder, health], **trainer_kwargs(max_steps=3))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if how == "model.compile()":
            model.compile(backend=counter)
            trainer.fit(model)
        else:
            trainer.fit(torch.compile(model, backend=counter))
    assert counter.frame_count >= 1  # Dynamo really compiled
    notices = [str(w.message) for w in caught if "GradHealth" in str(w.message) and "TensorBoard" not in str(w.message)]
    assert notices == []
    assert set(health.timestep_grad_norms) == keys
    assert [step for step, _ in health.timestep_history[sorted(keys)[0]]] == [0, 2]
    batch, state = recorder.first_batch_of_step(2)
    assert_norms_equal(health.timestep_grad_norms, reference_for(model_with(state, _stacked_lstm, model_class), batch))
    assert set(health.spectra) == ({"rnn.weight_hh"} if model_class is GRUCellLoop else {"rnn.weight_hh_l0", "rnn.weight_hh_l1"})
    assert hook_snapshot(model)["rnn:_forward_hooks"] == []


# ----------------------------------------------------------------------------------------------
# 4. accumulation, manual optimization, epochs with validation, repeated fits, evaluation alone


class GradsAtOptimizerStep(pytorch_lightning.Callback):
    """Copies of every gradient, and which optimizer steps, at each ``on_before_optimizer_step``."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, dict[str, Tensor]]] = []

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        index = next(i for i, candidate in enumerate(trainer.optimizers) if candidate is optimizer)
        grads = {name: p.grad.clone() for name, p in pl_module.named_parameters() if p.grad is not None}
        self.calls.append((index, grads))


def _clip_reference(grads: dict[str, Tensor], names: set[str], clip_val: float) -> dict[str, Tensor]:
    """``torch.nn.utils.clip_grad_norm_`` applied to the gradients of ``names`` only."""
    params = {name: nn.Parameter(torch.zeros_like(grad)) for name, grad in grads.items() if name in names}
    for name, param in params.items():
        param.grad = grads[name].clone()
    torch.nn.utils.clip_grad_norm_(list(params.values()), clip_val)
    return {**grads, **{name: param.grad for name, param in params.items()}}


def test_accumulate_3_with_max_steps_measures_the_first_micro_batch_and_clips_once_per_window() -> None:
    """``accumulate_grad_batches=3`` with ``max_steps=3`` over epochs of 4 batches: Lightning steps
    after batches 0-2, after batch 3 (the epoch's end closes a short window) and after batches
    0-2 of the next epoch. Each step is measured on its first micro-batch with the loss divided by
    3, as Lightning divides it, also in the short window (reference); clipping runs once per
    window on the accumulated gradients as ``clip_grad_norm_`` would; the history is indexed by
    optimizer step."""
    torch.manual_seed(0)
    before, after, recorder = GradsAtOptimizerStep(), GradsAtOptimizerStep(), StepRecorder()
    health = GradHealth(log_every_n_steps=1, clip="norm", clip_val=0.01)
    trainer = pytorch_lightning.Trainer(
        callbacks=[recorder, before, health, after],
        **trainer_kwargs(max_steps=3, accumulate_grad_batches=3, max_epochs=-1),
    )
    trainer.fit(PLSequenceModel(build=_stacked_lstm))
    assert trainer.global_step == 3
    assert [step for step, _, _ in recorder.seen] == [0, 0, 0, 1, 2, 2, 2]
    assert [step for step, _ in health.timestep_history["rnn.l1.cell"]] == [0, 1, 2]
    batch, state = recorder.first_batch_of_step(2)
    assert_norms_equal(health.timestep_grad_norms, reference_for(model_with(state, _stacked_lstm), batch, loss_divisor=3))
    batch, state = recorder.first_batch_of_step(1)
    short_window = {key: torch.from_numpy(rows[1][1]) for key, rows in health.timestep_history.items()}
    assert_norms_equal(short_window, reference_for(model_with(state, _stacked_lstm), batch, loss_divisor=3))
    assert len(before.calls) == len(after.calls) == 3 and health.monitor.clip_steps == 3
    for (_, unclipped), (_, clipped) in zip(before.calls, after.calls):
        expected = _clip_reference(unclipped, set(unclipped), 0.01)
        for name, grad in expected.items():
            torch.testing.assert_close(clipped[name], grad, rtol=1e-6, atol=1e-9, msg=name)


class SequenceGAN(pytorch_lightning.LightningModule):
    """Two recurrent networks, each with its own optimizer, trained GAN-style by hand: an LSTM
    generator maps noise sequences to sequences, a GRU discriminator scores sequences. Per
    batch: the generator step (its loss runs through the discriminator), then the
    discriminator step on real and detached fake sequences."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.generator = nn.ModuleDict({"rnn": nn.LSTM(3, 8, batch_first=True), "head": nn.Linear(8, 3)})
        self.discriminator = nn.ModuleDict({"rnn": nn.GRU(3, 8, batch_first=True), "head": nn.Linear(8, 1)})

    @staticmethod
    def noise(batch_idx: int, like: Tensor) -> Tensor:
        return torch.randn(like.shape, generator=torch.Generator().manual_seed(batch_idx))

    def generate(self, z: Tensor) -> Tensor:
        return self.generator["head"](self.generator["rnn"](z)[0])

    def score(self, x: Tensor) -> Tensor:
        return self.discriminator["head"](self.discriminator["rnn"](x)[0][:, -1])

    @staticmethod
    def generator_loss(scores: Tensor) -> Tensor:
        return nn.functional.binary_cross_entropy_with_logits(scores, torch.ones_like(scores))

    def training_step(self, batch: Batch, batch_idx: int) -> None:
        generator_optimizer, discriminator_optimizer = self.optimizers()
        real, _ = batch
        fake = self.generate(self.noise(batch_idx, real))
        generator_optimizer.zero_grad()
        self.manual_backward(self.generator_loss(self.score(fake)))
        generator_optimizer.step()
        real_scores, fake_scores = self.score(real), self.score(fake.detach())
        discriminator_loss = nn.functional.binary_cross_entropy_with_logits(
            real_scores, torch.ones_like(real_scores)
        ) + nn.functional.binary_cross_entropy_with_logits(fake_scores, torch.zeros_like(fake_scores))
        discriminator_optimizer.zero_grad()
        self.manual_backward(discriminator_loss)
        discriminator_optimizer.step()

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        return [
            torch.optim.SGD(self.generator.parameters(), lr=0.1),
            torch.optim.SGD(self.discriminator.parameters(), lr=0.1),
        ]

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        return PLSequenceModel().train_dataloader()


def test_manual_optimization_with_two_optimizers_clips_each_optimizers_parameters_and_measures_both_networks() -> None:
    """A GAN-style module with two recurrent networks and two optimizers stepped by hand with
    ``clip="norm"``: every ``optimizer.step()`` clips exactly that optimizer's parameters as
    ``clip_grad_norm_`` does (the other network's gradients are left as they are), and the probe
    measures both networks' layers for the generator loss, the first one backpropagated in the
    sampled step, equal to the unrolled reference. Each optimizer's norms and clip statistics are
    logged under its own name, at every logging step."""
    torch.manual_seed(0)
    before, after, recorder = GradsAtOptimizerStep(), GradsAtOptimizerStep(), StepRecorder()
    health = GradHealth(log_every_n_steps=2, clip="norm", clip_val=0.01)
    model = SequenceGAN()
    logger = CSVLogger(tempfile.mkdtemp(), name="gan")
    trainer = pytorch_lightning.Trainer(
        callbacks=[recorder, before, health, after], **trainer_kwargs(max_steps=6, logger=logger)
    )
    trainer.fit(model)
    with open(Path(logger.log_dir) / "metrics.csv") as metrics_file:
        rows = list(csv.DictReader(metrics_file))
    for index in (0, 1):
        for tag in ("grad_norm/optimizer_{}/total", "grad_norm/optimizer_{}/total_clipped", "clip/optimizer_{}/coefficient"):
            logged = [int(row["step"]) for row in rows if row.get("gradhealth/" + tag.format(index))]
            assert logged == [0, 2], tag.format(index)  # batches 0 and 2 of 3 (6 optimizer steps)
    assert not any(row.get("gradhealth/grad_norm/total") for row in rows)
    assert len(recorder.seen) == 3 and [index for index, _ in before.calls] == [0, 1] * 3
    assert health.monitor.clip_steps == 6
    names = [{f"{net}.{name}" for name, _ in getattr(model, net).named_parameters()} for net in ("generator", "discriminator")]
    for (index, unclipped), (_, clipped) in zip(before.calls, after.calls):
        expected = _clip_reference(unclipped, names[index], 0.01)
        for name, grad in expected.items():
            torch.testing.assert_close(clipped[name], grad, rtol=1e-6, atol=1e-9, msg=name)
        assert any(not torch.equal(unclipped[name], clipped[name]) for name in names[index])

    assert [step for step, _ in health.timestep_history["generator.rnn.l0"]] == [0, 2]
    batch, state = recorder.first_batch_of_step(2)
    reference = SequenceGAN()
    reference.load_state_dict(state)
    real, _ = batch
    output, g_states, g_cells = _unroll(reference.generator["rnn"], reference.noise(2, real))
    fake = reference.generator["head"](output).transpose(0, 1)
    scores_seq, d_states, d_cells = _unroll(reference.discriminator["rnn"], fake)
    reference.generator_loss(reference.discriminator["head"](scores_seq[-1])).backward()
    expected = {**_norms("generator.rnn", g_states, g_cells), **_norms("discriminator.rnn", d_states, d_cells)}
    assert_norms_equal(health.timestep_grad_norms, expected)


class WithValidation(PLSequenceModel):
    """The test model with validation on sequences of another length (9 steps, batches of 5),
    computed with gradients enabled, as gradient-based validation metrics do; it notes whether
    anything hooked into the recurrent layer's output during validation."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.validation_outputs_hooked: list[bool] = []

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        x, _ = batch
        with torch.enable_grad():
            output, _ = self.rnn(x.clone().requires_grad_())
            assert output.requires_grad
            self.validation_outputs_hooked.append(bool(output._backward_hooks))
            output.sum().backward()

    def val_dataloader(self) -> torch.utils.data.DataLoader:
        x = torch.randn(10, 9, 3, generator=torch.Generator().manual_seed(1))
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x[:, :1, 0]), batch_size=5)


def test_max_epochs_with_limited_batches_validation_and_sanity_check_probe_training_batches_only() -> None:
    """``max_epochs=3`` with ``limit_train_batches=2``, validation every epoch and a sanity check:
    the step count runs on across epochs (history at steps 0, 2, 4 of 6), the measurement is the
    training batch's (reference, T = 6) and never a validation batch's (T = 9), and nothing hooks
    into a validation forward pass even with gradients enabled."""
    torch.manual_seed(0)
    recorder, health = StepRecorder(), GradHealth(log_every_n_steps=2)
    model = WithValidation(build=_stacked_lstm)
    trainer = pytorch_lightning.Trainer(
        callbacks=[recorder, health],
        **trainer_kwargs(
            max_steps=-1, max_epochs=3, limit_train_batches=2, limit_val_batches=2, num_sanity_val_steps=2, inference_mode=False
        ),
    )
    trainer.fit(model)
    assert trainer.global_step == 6 and trainer.current_epoch == 3
    assert len(model.validation_outputs_hooked) == 2 + 3 * 2 and not any(model.validation_outputs_hooked)
    assert [step for step, _ in health.timestep_history["rnn.l0"]] == [0, 2, 4]
    batch, state = recorder.first_batch_of_step(4)
    assert_norms_equal(health.timestep_grad_norms, reference_for(model_with(state, _stacked_lstm), batch))
    assert health.health_report is not None and health.health_report.step == 6


def test_a_second_fit_on_the_same_trainer_keeps_the_weights_and_measures_again() -> None:
    """``trainer.fit`` twice on the same Trainer and model with ``GradHealth(init=...)``: the
    second fit starts from the weights the first one ended with (no second init), goes on
    counting steps, and measures again, equal to the reference on its own batches."""
    torch.manual_seed(0)
    recorder, health = StepRecorder(), GradHealth(init="orthogonal", log_every_n_steps=1)
    model = PLSequenceModel(build=_stacked_lstm)
    trainer = pytorch_lightning.Trainer(callbacks=[recorder, health], **trainer_kwargs(max_steps=3, max_epochs=-1))
    trainer.fit(model)
    after_first = weights(model)
    init_report = list(health.init_report)
    trainer.fit_loop.epoch_loop.max_steps = 6
    trainer.fit(model)
    assert trainer.global_step == 6
    second_fit_start = next(state for step, _, state in recorder.seen if step == 3)
    assert all(torch.equal(second_fit_start[name], value) for name, value in after_first.items())
    assert health.init_report == init_report
    assert [step for step, _ in health.timestep_history["rnn.l0"]] == [0, 1, 2, 3, 4, 5]
    batch, state = recorder.first_batch_of_step(5)
    assert_norms_equal(health.timestep_grad_norms, reference_for(model_with(state, _stacked_lstm), batch))
    assert health.health_report is not None and health.health_report.step == 6


class EvaluationModel(WithValidation):
    """The test model with test and predict steps too."""

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        self.log("test_loss", self.training_step(batch, batch_idx))

    def test_dataloader(self) -> torch.utils.data.DataLoader:
        return self.val_dataloader()

    def predict_step(self, batch: Batch, batch_idx: int) -> Tensor:
        return self(batch[0])

    def predict_dataloader(self) -> torch.utils.data.DataLoader:
        return self.val_dataloader()


def test_validate_test_and_predict_alone_change_no_weight_and_leave_no_hook() -> None:
    """``trainer.validate``, ``test`` and ``predict`` with GradHealth(init=..., clip=...) attached
    and no fit: they run, no weight changes (init belongs to fit), no hook is left, and GradHealth
    holds no measurement and no report."""
    torch.manual_seed(0)
    model, health = EvaluationModel(build=_stacked_lstm), GradHealth(init="orthogonal", clip="norm", clip_val=1.0)
    before_weights, before_hooks = weights(model), hook_snapshot(model)
    trainer = pytorch_lightning.Trainer(callbacks=[health], **trainer_kwargs(limit_val_batches=1, inference_mode=False))
    trainer.validate(model, verbose=False)
    trainer.test(model, verbose=False)
    predictions = trainer.predict(model)
    assert len(predictions) == 2 and predictions[0].shape == (5, 1)
    assert all(torch.equal(before_weights[name], value) for name, value in weights(model).items())
    assert hook_snapshot(model) == before_hooks
    assert not health.init_applied and health.init_report == [] and health.health_report is None
    assert health.timestep_grad_norms == {} and health.spectra == {}


@pytest.mark.parametrize("precision", ["bf16-true", "16-true"])
def test_half_precision_weights_multi_layer_layers_are_measured(precision: str) -> None:
    """``precision="bf16-true"`` / ``"16-true"`` (weights themselves in bf16/fp16) with a 2-layer
    LSTM: every layer is measured, without a notice, and agrees with the float32 reference on the
    same (rounded) weights and batch to the precision's rounding (2%)."""
    torch.manual_seed(0)
    recorder, health = StepRecorder(), GradHealth(log_every_n_steps=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pytorch_lightning.Trainer(callbacks=[recorder, health], **trainer_kwargs(max_steps=3, precision=precision)).fit(
            PLSequenceModel(build=_stacked_lstm)
        )
    assert not [str(w.message) for w in caught if "cannot measure" in str(w.message)]
    batch, state = recorder.first_batch_of_step(2)
    model = model_with({name: value.float() for name, value in state.items()}, _stacked_lstm)
    assert_norms_equal(health.timestep_grad_norms, reference_for(model, [tensor.float() for tensor in batch]), rtol=2e-2)


# ----------------------------------------------------------------------------------------------
# 5. hooks after fit


class UserHook:
    """A picklable forward hook of the user's own, which must survive GradHealth."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, module: nn.Module, args: Any, output: Any) -> None:
        self.calls += 1


def _assert_clean_after_fit(model: nn.Module, before: dict[str, Any], health: GradHealth) -> None:
    """The model holds exactly the hooks of ``before``; model and callback pickle and deep-copy."""
    assert hook_snapshot(model) == before
    clone = pickle.loads(pickle.dumps(model))
    assert all(torch.equal(value, weights(clone)[name]) for name, value in weights(model).items())
    copy.deepcopy(model)
    restored = pickle.loads(pickle.dumps(health))
    assert restored.state_dict().keys() == health.state_dict().keys()
    copy.deepcopy(health)


@pytest.mark.parametrize("clip", [None, "norm"])
def test_after_fit_no_hook_of_ours_is_left_and_model_and_callback_pickle(clip: Optional[str]) -> None:
    """After a fit, every module, parameter and torch's global hook registries hold exactly the
    hooks they held before (a user's own forward hook included, still firing); the model and
    the callback pickle and deep-copy."""
    torch.manual_seed(0)
    model = PLSequenceModel(build=_stacked_lstm)
    user_hook = UserHook()
    model.rnn.register_forward_hook(user_hook)
    before = hook_snapshot(model)
    health = GradHealth(init="orthogonal", log_every_n_steps=1, full_every_n_steps=2, clip=clip, clip_val=1.0 if clip else None)
    pytorch_lightning.Trainer(callbacks=[health], **trainer_kwargs(max_steps=3)).fit(model)
    assert user_hook.calls == 3 and health.timestep_grad_norms
    _assert_clean_after_fit(model, before, health)


class FailsInTrainingStep(PLSequenceModel):
    """Raises after its forward pass on batch ``fail_at``, a probed step: captures are live."""

    fail_at = 2

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        loss = super().training_step(batch, batch_idx)
        if batch_idx == self.fail_at:
            raise RuntimeError("user error in training_step")
        return loss


def test_a_fit_that_raises_in_training_step_leaves_no_hook_and_the_users_exception() -> None:
    """An exception in ``training_step`` on a probed step (forward captured, tensor hooks set)
    reaches the caller unchanged, and afterwards no hook of ours is left: model and callback
    pickle and deep-copy, and the same callback fits again."""
    torch.manual_seed(0)
    model, health = FailsInTrainingStep(build=_stacked_lstm), GradHealth(log_every_n_steps=1)
    before = hook_snapshot(model)
    with pytest.raises(RuntimeError, match="user error in training_step"):
        pytorch_lightning.Trainer(callbacks=[health], **trainer_kwargs(max_steps=5)).fit(model)
    _assert_clean_after_fit(model, before, health)
    model.fail_at = -1
    pytorch_lightning.Trainer(callbacks=[health], **trainer_kwargs(max_steps=2)).fit(model)
    assert [step for step, _ in health.timestep_history["rnn.l0"]] == [0, 1]


def test_lightnings_weight_averaging_callback_and_gradhealth_work_together() -> None:
    """Lightning's ``WeightAveraging`` (an EMA here) copies the model in ``setup``, before
    GradHealth attaches: the fit measures as usual, the averaged copy carries no hook of ours and
    pickles, and the model ends with the averaged weights, hook-free."""
    from pytorch_lightning.callbacks import WeightAveraging
    from torch.optim.swa_utils import get_ema_avg_fn

    torch.manual_seed(0)
    model, health = PLSequenceModel(build=_stacked_lstm), GradHealth(init="orthogonal", log_every_n_steps=1)
    before = hook_snapshot(model)
    averaging = WeightAveraging(avg_fn=get_ema_avg_fn(0.9))
    pytorch_lightning.Trainer(callbacks=[health, averaging], **trainer_kwargs(max_steps=3)).fit(model)
    assert [step for step, _ in health.timestep_history["rnn.l0"]] == [0, 1, 2]
    average = averaging._average_model.module
    assert all(torch.equal(value, weights(average)[name]) for name, value in weights(model).items())
    assert hook_snapshot(average) == hook_snapshot(copy.deepcopy(PLSequenceModel(build=_stacked_lstm)))
    pickle.dumps(average)  # the AveragedModel itself holds torch's EMA closure, which never pickles
    _assert_clean_after_fit(model, before, health)


class EMACopyAtTrainStart(pytorch_lightning.Callback):
    """A hand-written EMA callback as found in templates: it deep-copies the model when training
    starts (after every ``on_fit_start``) and averages into the copy after each batch."""

    def __init__(self) -> None:
        self.average: Optional[nn.Module] = None

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self.average = copy.deepcopy(pl_module)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        assert self.average is not None
        with torch.no_grad():
            for average, current in zip(self.average.parameters(), pl_module.parameters()):
                average.lerp_(current, 0.1)


def test_a_copy_of_the_model_made_during_fit_is_hook_free_and_picklable_after_fit() -> None:
    """A deep copy of the model made while GradHealth is attached (an EMA callback copying in
    ``on_train_start``; a teacher copied during fit is the same) must not keep GradHealth's hooks
    after fit: ``torch.save``/``pickle`` of the copy at the end of a run must work."""
    torch.manual_seed(0)
    model, health, ema = PLSequenceModel(build=_stacked_lstm), GradHealth(log_every_n_steps=1), EMACopyAtTrainStart()
    pytorch_lightning.Trainer(callbacks=[health, ema], **trainer_kwargs(max_steps=2)).fit(model)
    assert ema.average is not None and health.timestep_grad_norms
    assert hook_snapshot(ema.average) == hook_snapshot(copy.deepcopy(PLSequenceModel(build=_stacked_lstm)))
    pickle.dumps(ema.average)


# ----------------------------------------------------------------------------------------------
# 6. checkpoint resume


class NaNGradient(torch.autograd.Function):
    """Identity forward; NaN gradient backward."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        return grad * float("nan")


class NaNGradientAtStep3(PLSequenceModel):
    """The test model with a spare parameter whose gradient is NaN at global step 3 only, so the
    step is non-finite but the weights the loss uses stay finite under ``on_nonfinite="warn"``."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.spare = nn.Parameter(torch.zeros(2))

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        loss = super().training_step(batch, batch_idx)
        if self.trainer.global_step == 3:
            loss = loss + 0 * NaNGradient.apply(self.spare).sum()
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=0.01)


def _run(
    tmp_path: Path, name: str, on_nonfinite: str, max_steps: int, ckpt_path: Optional[Path] = None
) -> tuple[GradHealth, Path]:
    """One fit of :class:`NaNGradientAtStep3` with checkpoints every 4 steps and a CSV logger,
    from scratch or resumed from ``ckpt_path``; returns the callback and the metrics file."""
    torch.manual_seed(0)
    health = GradHealth(
        init="orthogonal", log_every_n_steps=2, full_every_n_steps=4, clip="norm", clip_val=0.05, on_nonfinite=on_nonfinite
    )
    logger = CSVLogger(tmp_path, name=name, version=0)
    checkpoints = ModelCheckpoint(tmp_path / name, every_n_train_steps=4, save_top_k=-1, filename="{step}")
    trainer = pytorch_lightning.Trainer(
        callbacks=[health, checkpoints], **trainer_kwargs(max_steps=max_steps, logger=logger, enable_checkpointing=True)
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(NaNGradientAtStep3(build=_stacked_lstm), ckpt_path=ckpt_path)
    logger.save()
    return health, Path(logger.experiment.metrics_file_path)


def _logged(metrics_file: Path, tag: str) -> list[tuple[int, float]]:
    """``(step, value)`` of every row of a CSVLogger metrics file that holds ``tag``."""
    return [(int(row["step"]), float(row[tag])) for row in csv.DictReader(open(metrics_file)) if row.get(tag)]


def _same(a: Any, b: Any) -> bool:
    """Deep equality of nested dicts/lists/tuples of tensors and Python values (NaN equals NaN)."""
    if isinstance(a, Tensor):
        return a.shape == b.shape and torch.equal(a.nan_to_num(12345.0), b.nan_to_num(12345.0))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[key], b[key]) for key in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b or (a != a and b != b)


@pytest.mark.parametrize("on_nonfinite", ["skip", "warn"])
def test_a_run_resumed_from_a_mid_run_checkpoint_is_indistinguishable_from_the_uninterrupted_run(
    tmp_path: Path, on_nonfinite: str
) -> None:
    """A run checkpointed mid-way by ``ModelCheckpoint(every_n_train_steps=4)`` (step 2 was logged
    with the warm-started ``sigma_max``, step 3 had NaN gradients and was not logged) and resumed
    from that checkpoint ends in exactly the state of the uninterrupted run: heatmap history,
    start-of-run spectra, NaN/Inf and clip counters, clip-threshold statistics and the
    ``sigma_max`` warm starts (``GradHealth.state_dict()``), and it logs the same ``sigma_max``,
    NaN/Inf count and clipped fraction on the steps after the resume."""
    uninterrupted, uninterrupted_metrics = _run(tmp_path, "uninterrupted", on_nonfinite, max_steps=8)
    checkpoint = tmp_path / "uninterrupted" / "step=4.ckpt"
    assert checkpoint.exists()
    resumed, resumed_metrics = _run(tmp_path, "resumed", on_nonfinite, max_steps=8, ckpt_path=checkpoint)

    assert uninterrupted.nonfinite_steps == 1 and uninterrupted.skipped_steps == (on_nonfinite == "skip")
    assert (resumed.nonfinite_steps, resumed.skipped_steps) == (uninterrupted.nonfinite_steps, uninterrupted.skipped_steps)
    assert resumed.init_report == [] and resumed.init_applied
    state, expected = resumed.state_dict(), uninterrupted.state_dict()
    assert state.keys() == expected.keys()
    for key in expected:
        assert _same(state[key], expected[key]), key
    for tag in ("gradhealth/rnn.l1/5_sigma_max/f", "gradhealth/nonfinite/steps", "gradhealth/clip/clipped_steps_fraction"):
        after_resume = [(step, value) for step, value in _logged(uninterrupted_metrics, tag) if step >= 4]
        assert _logged(resumed_metrics, tag) == after_resume, tag
    assert resumed.health_report is not None and uninterrupted.health_report is not None
    assert resumed.health_report.format() == uninterrupted.health_report.format()
