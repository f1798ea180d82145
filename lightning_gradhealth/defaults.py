"""The numbers that decide what GradHealth measures and when, in one place.

Every threshold and interval the package uses by default is named here, with its reason;
docstrings elsewhere refer to these names instead of repeating the values.
"""

from __future__ import annotations

import torch

__all__ = [
    "CHECKPOINT_FORMAT",
    "CLIP_SUGGESTION_MIN_NORMS",
    "DEFAULT_LOG_EVERY_N_STEPS",
    "EXPLODE_ABOVE",
    "FINAL_PICTURES_AFTER_SECONDS",
    "FULL_EVERY_N_LOGS",
    "HEATMAP_COLUMNS",
    "HISTORY_SIZE",
    "HORIZON_FACTOR",
    "LYAPUNOV_K",
    "MAX_CALLS_MEASURED",
    "MEMORY_STEPS",
    "PROBE_EVERY_N_LOGS",
    "REPLAY_TOLERANCE",
    "SATURATED_TANH",
    "SATURATING_ABOVE",
    "VANISH_BELOW",
    "replay_tolerance",
]

DEFAULT_LOG_EVERY_N_STEPS = 50
"""Measuring interval in optimizer steps when neither the user nor the Trainer gives one
(Lightning's own default ``log_every_n_steps``)."""

PROBE_EVERY_N_LOGS = 8
"""The dL/dh_t probe runs every this many logging steps by default (every 400 steps under
Lightning's default ``log_every_n_steps=50``), when the logging interval comes from the Trainer
or from :data:`DEFAULT_LOG_EVERY_N_STEPS`; an interval given to GradHealth itself is that of
every measurement, the probe included. The reason is its cost: a probed step costs about 2.3
plain steps of the reference LSTM (capture, exact replay and its self-check), against a few
milliseconds for the other logging steps (``sigma_max``, gradient norms) and a fraction of a
millisecond for the other steps (the NaN/Inf check). Probing every logging step cost 1.4% of
training time on its own; every 8th, about 0.4% (``benchmarks/alternatives.py`` measures it). It
divides :data:`FULL_EVERY_N_LOGS`, so every default full pass is a probe step anyway."""

FULL_EVERY_N_LOGS = 40
"""Full passes (every singular value and eigenvalue, histograms, pictures) happen every this many
logging steps by default (every 2000 steps under Lightning's default interval). A full pass of
the reference LSTM costs about 6 plain steps, most of it drawing its three pictures
(matplotlib) and the probe; the warm-started sigma_max iteration of the other logging steps
costs milliseconds (``benchmarks/spectra.py`` measures both). Every 20 logging steps the full
passes alone took 0.55% of training time; every 40, half that."""

HISTORY_SIZE = 256
"""Rows of the per-timestep heatmap kept per layer, at most: rows at a stride of probes that doubles
when they would be more, the first and the latest always kept, so the heatmap spans the whole run
evenly at any length and stays bounded in memory and in checkpoints."""

HEATMAP_COLUMNS = 256
"""Columns of a heatmap row, at most: a probe of T timesteps is kept in bins of the smallest power
of two w with ceil(T / w) <= HEATMAP_COLUMNS, each the largest norm of its bin, so a row takes at
most 4 * HEATMAP_COLUMNS bytes (1 KiB) whatever T. The picture's axes are about 250 pixels wide:
finer columns would not show."""

VANISH_BELOW = 1e-3
"""Gradients through time are "vanishing" when ||dL/dh_first|| / ||dL/dh_last|| falls below this:
three decades lost over the sequence, past which the first steps barely learn."""

EXPLODE_ABOVE = 1e3
"""Gradients through time are "exploding" when that ratio rises above this: three decades gained."""

HORIZON_FACTOR = 1e3
"""The ``horizon`` ends where ||dL/dh_t|| first falls this factor below the last step's."""

SATURATED_TANH = 0.99
"""A tanh unit counts as saturated above this absolute value, where its derivative
``1 - tanh^2`` is below 0.02 and the gradient through it is nearly blocked."""

SATURATING_ABOVE = 0.5
"""The verdict "saturating" is given when more than this fraction of a layer's tanh candidate
units are saturated (see :data:`SATURATED_TANH`)."""

CLIP_SUGGESTION_MIN_NORMS = 100
"""Gradient norms seen before a ``clip_val`` is suggested: our reading of Pascanu et al.'s
"a sufficiently large number of updates"."""

REPLAY_TOLERANCE = 1e-4
"""The replay of a fused layer checks itself: every state it recomputes from the captured input
and the previous captured state must match the state the layer computed to this relative
difference (float32 kernels and the replay differ by about 1e-6), or to 8 units of the last
place of a lower precision the layer ran in (:func:`replay_tolerance`)."""


def replay_tolerance(dtype: torch.dtype, tf32: bool = False) -> float:
    """The self-check's tolerance for states computed in ``dtype``: :data:`REPLAY_TOLERANCE`, or
    8 units of the last place of a half-precision dtype, or of TF32 (10 mantissa bits, what
    cuDNN computes float32 RNNs in on recent NVIDIA GPUs unless
    ``torch.backends.cudnn.allow_tf32`` is off).

    Examples:
        >>> replay_tolerance(torch.float32), replay_tolerance(torch.bfloat16), replay_tolerance(torch.float32, tf32=True)
        (0.0001, 0.0625, 0.0078125)
    """
    eps = 2.0**-10 if tf32 else (torch.finfo(dtype).eps if dtype.is_floating_point else 0.0)
    return max(REPLAY_TOLERANCE, 8 * eps)


MAX_CALLS_MEASURED = 8
"""A fused layer run several times in one step (an encoder and a decoder sharing it) has each call
measured under its own key; a layer stepped once per timestep in a loop would make hundreds of
one-step keys, so at most this many calls per step are measured, and the rest is named once."""

CALLER_CLIPPING_RTOL = 1e-5
"""When the caller gives the gradient norm taken before its own clipping (manual optimization
that calls ``self.clip_gradients``), a sampled step counts as clipped by the caller when the norm
at the optimizer step is lower by more than this relative amount; unscaling AMP gradients in
another order changes it by about 1e-7."""

FINAL_PICTURES_AFTER_SECONDS = 30.0
"""A fit whose training ran at least this long draws its final pictures (eigenvalues, the
gradient-through-time curve and heatmap) at its last step, whatever its length in steps: drawing
costs about 0.2 s a picture, three per layer, and is then a few percent of the fit at most. A
shorter fit ends with its final spectra as numbers only (scalars, histograms), so that a short
forecasting fit and every short refit of a retrain loop do not pay for drawing; a fit that took
a full pass after step 0 draws them whatever its time (``benchmarks/fit_start.py`` measures it)."""

MEMORY_STEPS = 10
"""The fewest steps over which a recurrent layer must keep a gradient within ``vanish_below`` not
to be "vanishing" whatever the task: with the default 1e-3, a layer that loses it faster more
than halves every gradient at every step (2^10 = 1024) and cannot relate even the steps of a
short window. Gated cells at PyTorch's default or orthogonal init keep one 14 to 21 steps, the
small uniform init 2 (:mod:`~lightning_gradhealth.health`)."""

LYAPUNOV_K = 8
"""Lyapunov exponents computed per layer by default: the top few say whether the layer expands
(lambda_1 > 0), forgets (all < 0) and how many directions carry information far (those near 0);
each costs one Jacobian-vector product per step on a few sequences of the batch
(``benchmarks/lyapunov.py``)."""

CHECKPOINT_FORMAT = 1
"""The version of the state GradHealth writes into checkpoints. 0 is the unversioned state of
the releases before it; a resume reads both and names what it cannot restore."""
