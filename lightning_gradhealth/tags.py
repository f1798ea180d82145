"""Every TensorBoard tag GradHealth writes, defined once.

The measuring parts build their scalar, histogram and picture tags with these functions, and the
custom-scalars layout matches them with the patterns below, so a tag cannot be renamed in one
place and missed in the other. All tags live under ``gradhealth/``:

- ``gradhealth/<layer>/<name>``: per layer and direction (``<layer>`` is the layer key, e.g.
  ``rnn.l0_reverse``): the per-timestep summaries (:data:`TIMESTEP_SCALARS`), ``saturation``,
  ``weight_grad_norm``, ``nonfinite_weight_blocks``, the Lyapunov exponents
  (:data:`LYAPUNOV_MAX`, :data:`LYAPUNOV`) and the pictures;
- ``gradhealth/<layer>/<gate>/<name>``: per gate block of a hidden-to-hidden matrix, the
  spectral scalars (:data:`SPECTRUM_SCALARS`) and histograms;
- ``gradhealth/grad_norm[/<optimizer>]/<name>`` and ``gradhealth/clip[/<optimizer>]/<name>``:
  gradient norms and clipping, per optimizer when there are several;
- ``gradhealth/nonfinite/<name>``, ``gradhealth/config`` and ``gradhealth/report``.

Examples:
    >>> from lightning_gradhealth.keys import LayerKey
    >>> layer_tag(LayerKey("rnn", 0), "transmission"), gate_tag(LayerKey("rnn", 0), "f", "sigma_max")
    ('gradhealth/rnn.l0/transmission', 'gradhealth/rnn.l0/f/sigma_max')
    >>> clip_tag("coefficient", optimizer="optimizer_1")
    'gradhealth/clip/optimizer_1/coefficient'
"""

from __future__ import annotations

import re

from lightning_gradhealth.keys import LayerKey

__all__ = [
    "CONFIG",
    "LYAPUNOV",
    "LYAPUNOV_MAX",
    "NONFINITE_SKIPPED_STEPS",
    "NONFINITE_STEPS",
    "REPORT",
    "ROOT",
    "SPECTRUM_SCALARS",
    "TIMESTEP_SCALARS",
    "clip_tag",
    "gate_pattern",
    "gate_tag",
    "grad_norm_tag",
    "layer_pattern",
    "layer_tag",
    "section_pattern",
]

ROOT = "gradhealth"
CONFIG = f"{ROOT}/config"
REPORT = f"{ROOT}/report"
NONFINITE_STEPS = f"{ROOT}/nonfinite/steps"
NONFINITE_SKIPPED_STEPS = f"{ROOT}/nonfinite/skipped_steps"

TIMESTEP_SCALARS = ("transmission", "horizon", "rate_per_step", "dh_norm_first", "dh_norm_last")
"""The per-timestep summaries logged per layer (see :class:`~lightning_gradhealth.health.TimestepSummary`)."""

LYAPUNOV_MAX = "lyapunov_max"
"""The largest Lyapunov exponent of a layer's dynamics (natural log per step), a per-layer scalar."""

LYAPUNOV = "lyapunov"
"""The histogram of a layer's top-k Lyapunov exponents."""

SPECTRUM_SCALARS = ("sigma_max", "sigma_min", "condition", "spectral_radius", "orth_error", "outside_unit_circle")
"""The spectral scalars of a full pass, per gate block (only ``sigma_max`` on the other logging steps)."""


def layer_tag(key: LayerKey, name: str) -> str:
    """The tag of a per-layer value, e.g. ``gradhealth/rnn.l0/transmission``."""
    return f"{ROOT}/{key}/{name}"


def gate_tag(key: LayerKey, gate: str, name: str) -> str:
    """The tag of a per-gate-block value, e.g. ``gradhealth/rnn.l0/f/sigma_max``."""
    return f"{ROOT}/{key}/{gate}/{name}"


def _section(section: str, optimizer: str) -> str:
    return f"{ROOT}/{section}" + (f"/{optimizer}" if optimizer else "")


def grad_norm_tag(name: str, optimizer: str = "") -> str:
    """The tag of a gradient norm (``total``, ``total_clipped``), per optimizer when several step."""
    return f"{_section('grad_norm', optimizer)}/{name}"


def clip_tag(name: str, optimizer: str = "") -> str:
    """The tag of a clipping statistic (``coefficient``, ``clipped_steps_fraction``)."""
    return f"{_section('clip', optimizer)}/{name}"


def layer_pattern(key: LayerKey, name: str) -> str:
    """A regular expression matching exactly :func:`layer_tag` ``(key, name)``."""
    return f"^{re.escape(layer_tag(key, name))}$"


def gate_pattern(key: LayerKey, name: str) -> str:
    """A regular expression matching :func:`gate_tag` ``(key, gate, name)`` for every gate."""
    return f"^{re.escape(f'{ROOT}/{key}/')}[^/]+/{re.escape(name)}$"


def section_pattern(section: str) -> str:
    """A regular expression matching every tag of a section: ``grad_norm``, ``clip`` or ``nonfinite``."""
    return f"^{ROOT}/{section}/"
