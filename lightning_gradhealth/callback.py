"""GradHealth: the Lightning callback. It schedules and wires; the math lives in the other modules.

At the start of fit it finds every recurrent layer and, when ``init`` is given, initializes it
once (:mod:`lightning_gradhealth.initialize`).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from pytorch_lightning.utilities.rank_zero import rank_zero_info, rank_zero_warn

from lightning_gradhealth._compat import CallbackBase
from lightning_gradhealth.initialize import InitConfig, InitRecord, apply_init_, format_init_report
from lightning_gradhealth.layers import WeightRecord, find_recurrent_weights

__all__ = ["GradHealth"]


class GradHealth(CallbackBase):
    """Gradient health for recurrent networks: principled init at the start of fit.

    With no arguments it changes no weight, so a team template can enable it for every run,
    fine-tuning included. With ``init`` it initializes every ``nn.RNN``/``nn.LSTM``/``nn.GRU``
    layer (all layers, both directions), every ``nn.RNNCell``/``LSTMCell``/``GRUCell`` and the
    custom matrices you name, per gate block, exactly once: at ``on_fit_start``, after
    ``configure_model`` and before the first optimizer step; never when resuming from a
    checkpoint (``trainer.fit(ckpt_path=...)``) nor on a second ``fit``. Under DDP every rank
    draws from rank 0's seed, so the weights are identical on every rank.

    Args:
        init: scheme of the hidden-to-hidden matrices: ``"orthogonal"``, ``"glorot"``
            (alias ``"xavier"``), ``"glorot_normal"``, ``"he"`` (alias ``"kaiming"``),
            ``"identity"``, ``"uniform"``, or ``None`` to leave every weight as it is.
        input_init: scheme of the input-to-hidden matrices (default Glorot uniform with the RNN
            fan rule, as Keras does); ``None`` keeps the framework's.
        gain: multiplier of ``init`` (the singular value of every gate block for orthogonal).
        forget_bias: effective LSTM forget-gate bias, counted once across ``bias_ih`` and
            ``bias_hh``; all other biases are zeroed.
        chrono_t_max: chrono init of LSTM biases (Tallec & Ollivier 2018) for dependencies up
            to this many steps: ``b_f ~ log U[1, T_max - 1]``, ``b_i = -b_f``.
        uniform_scale: range of the ``"uniform"`` baseline, ``U[-scale, scale]``.
        linear_init: scheme for plain ``nn.Linear`` layers (``"he"`` before ReLUs); ``None``
            leaves them untouched.
        custom: hidden-to-hidden matrices of your own modules: glob pattern over parameter
            names -> gate count (blocks stacked along dim 0), e.g. ``{"cell.W_hh": 4}``.
        exclude: glob patterns over module or parameter names that init leaves alone, e.g.
            pretrained weights loaded before fit: ``["encoder.*"]``.
        seed: seed of the init draws; default ``torch.initial_seed()``, so
            ``seed_everything`` makes the init reproducible. Rank 0's value is used on all ranks.

    Attributes:
        init_report: one :class:`~lightning_gradhealth.InitRecord` per parameter written.
        init_applied: whether init has run for this model (kept in checkpoints).
        init_seed: the seed the init used.
        recurrent_weights: the recurrent weights found at the start of the latest fit.

    Raises:
        ValueError: at construction, for an unknown scheme name (the message lists the valid
            names and the closest match), a negative or non-finite gain, an invalid gate count
            or seed; at the start of fit, before any step, for a ``custom`` or ``exclude``
            pattern that matches nothing or a gate count that does not divide its matrix.

    Example::

        from pytorch_lightning import Trainer
        from lightning_gradhealth import GradHealth

        trainer = Trainer(callbacks=[GradHealth(init="orthogonal", chrono_t_max=200)])
        trainer.fit(model)
    """

    def __init__(
        self,
        init: Optional[str] = None,
        *,
        input_init: Optional[str] = "glorot",
        gain: float = 1.0,
        forget_bias: float = 1.0,
        chrono_t_max: Optional[int] = None,
        uniform_scale: float = 0.01,
        linear_init: Optional[str] = None,
        custom: Optional[dict[str, int]] = None,
        exclude: Optional[list[str]] = None,
        seed: Optional[int] = None,
    ) -> None:
        self.init_config = InitConfig(
            init=init,
            input_init=input_init,
            gain=gain,
            forget_bias=forget_bias,
            chrono_t_max=chrono_t_max,
            uniform_scale=uniform_scale,
            linear_init=linear_init,
            custom=dict(custom) if custom else None,
            exclude=list(exclude) if exclude else None,
        )
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63):
            raise ValueError(f"seed must be None or an integer in [0, 2**63), got {seed!r}")
        self.seed = seed
        self.init_report: list[InitRecord] = []
        self.init_applied = False
        self.init_seed: Optional[int] = None
        self.recurrent_weights: list[WeightRecord] = []

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        """Find the recurrent layers (all exist now, ``configure_model`` included) and initialize them."""
        self.recurrent_weights = find_recurrent_weights(pl_module, self.init_config.custom)
        if not self.recurrent_weights:
            rank_zero_warn(
                f"GradHealth found no recurrent layer (nn.RNN/LSTM/GRU, nn.*Cell or a `custom` pattern) "
                f"in {type(pl_module).__name__}; training proceeds untouched."
            )
        if not self.init_config.changes_weights:
            return
        if self.init_applied:
            rank_zero_info("GradHealth: init already applied to this model; weights left as they are.")
            return
        if trainer.ckpt_path is not None:
            rank_zero_info(f"GradHealth: resuming from {trainer.ckpt_path}; weights come from the checkpoint, no init.")
            return
        seed = self.seed if self.seed is not None else torch.initial_seed()
        seed = trainer.strategy.broadcast(seed, src=0)
        self.init_report = apply_init_(pl_module, self.init_config, torch.Generator().manual_seed(seed))
        self.init_seed, self.init_applied = seed, True
        layers = len({record.layer_key for record in self.init_report})
        rank_zero_info(
            f"GradHealth: initialized {len(self.init_report)} parameters of {layers} layers "
            f"(seed {seed}):\n{format_init_report(self.init_report)}"
        )

    def state_dict(self) -> dict[str, Any]:
        """Whether init was applied, and with which seed, so a resumed run never re-initializes."""
        return {"init_applied": self.init_applied, "init_seed": self.init_seed}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; Lightning calls it before ``on_fit_start`` on resume."""
        self.init_applied = bool(state_dict.get("init_applied", False))
        self.init_seed = state_dict.get("init_seed")
