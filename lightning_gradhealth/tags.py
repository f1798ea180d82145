"""Every TensorBoard tag GradHealth writes, defined once.

The measuring parts build their scalar, histogram and picture tags with these functions, and the
custom-scalars layout matches them with the patterns below, so a tag cannot be renamed in one
place and missed in the other. All tags live under ``gradhealth/``:

- ``gradhealth/<layer>/<name>``: per layer and direction (``<layer>`` is the layer key, e.g.
  ``rnn.l0_reverse``): the per-timestep summaries (:data:`TIMESTEP_SCALARS`), ``saturation``,
  ``weight_grad_norm``, ``nonfinite_weight_blocks``, the Lyapunov exponents
  (:data:`LYAPUNOV_MAX`, :data:`LYAPUNOV`) and the pictures;
- ``gradhealth/<layer>/<name>/<gate>``: per gate block of a hidden-to-hidden matrix, the
  spectral scalars (:data:`SPECTRUM_SCALARS`) and histograms; the gate comes last, so the
  gates of one quantity sort side by side;
- ``gradhealth/grad_norm[/<optimizer>]/<name>`` and ``gradhealth/clip[/<optimizer>]/<name>``:
  gradient norms and clipping, per optimizer when there are several;
- ``gradhealth/nonfinite/<name>``, ``gradhealth/config`` and ``gradhealth/report``.

Order. TensorBoard's Scalars and Time Series pages put every tag whose first path component is
``gradhealth`` in one card group and sort it by name, with digits and ``/`` before letters
(numbers compared as numbers). The key charts of a layer (:data:`KEY_CHARTS`) therefore carry
their rank as a prefix (``1_transmission``, ``2_horizon``, ``3_lyapunov_max``,
``4_spectral_radius``, ``5_sigma_max``): within the group the tags come layer by layer, each
layer's key charts first and in that order, then its other tags by name. :func:`tag_name` gives
the name a quantity is written under.

Examples:
    >>> from lightning_gradhealth.keys import LayerKey
    >>> layer_tag(LayerKey("rnn", 0), "transmission"), gate_tag(LayerKey("rnn", 0), "f", "sigma_max")
    ('gradhealth/rnn.l0/1_transmission', 'gradhealth/rnn.l0/5_sigma_max/f')
    >>> gate_tag(LayerKey("rnn", 0), "f", "condition")
    'gradhealth/rnn.l0/condition/f'
    >>> clip_tag("coefficient", optimizer="optimizer_1")
    'gradhealth/clip/optimizer_1/coefficient'
"""

from __future__ import annotations

import re

from lightning_gradhealth.keys import LayerKey

__all__ = [
    "CONFIG",
    "KEY_CHARTS",
    "LYAPUNOV",
    "LYAPUNOV_MAX",
    "NONFINITE_SKIPPED_STEPS",
    "NONFINITE_STEPS",
    "REPORT",
    "ROOT",
    "SPECTRUM_SCALARS",
    "TIMESTEP_SCALARS",
    "clip_tag",
    "exact_pattern",
    "gate_pattern",
    "gate_tag",
    "grad_norm_tag",
    "layer_pattern",
    "layer_tag",
    "optimizer_pattern",
    "tag_name",
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

KEY_CHARTS = ("transmission", "horizon", LYAPUNOV_MAX, "spectral_radius", "sigma_max")
"""The quantities each layer's tags start with, in this order: the gradient through time
(transmission, horizon), the largest Lyapunov exponent lambda_1, then the spectra that bound it."""


def tag_name(name: str) -> str:
    """The name a quantity is written under: a key chart's rank in :data:`KEY_CHARTS`, from 1,
    then ``_`` and the quantity (so it sorts first in its layer); any other quantity as it is.

    Examples:
        >>> tag_name("horizon"), tag_name("rate_per_step")
        ('2_horizon', 'rate_per_step')
    """
    return f"{KEY_CHARTS.index(name) + 1}_{name}" if name in KEY_CHARTS else name


def layer_tag(key: LayerKey, name: str) -> str:
    """The tag of a per-layer value, e.g. ``gradhealth/rnn.l0/1_transmission`` (see :func:`tag_name`)."""
    return f"{ROOT}/{key}/{tag_name(name)}"


def gate_tag(key: LayerKey, gate: str, name: str) -> str:
    """The tag of a per-gate-block value, e.g. ``gradhealth/rnn.l0/5_sigma_max/f`` (see :func:`tag_name`)."""
    return f"{ROOT}/{key}/{tag_name(name)}/{gate}"


def _section(section: str, optimizer: str) -> str:
    return f"{ROOT}/{section}" + (f"/{optimizer}" if optimizer else "")


def grad_norm_tag(name: str, optimizer: str = "") -> str:
    """The tag of a gradient norm (``total``, ``total_clipped``), per optimizer when several step."""
    return f"{_section('grad_norm', optimizer)}/{name}"


def clip_tag(name: str, optimizer: str = "") -> str:
    """The tag of a clipping statistic (``coefficient``, ``clipped_steps_fraction``)."""
    return f"{_section('clip', optimizer)}/{name}"


def exact_pattern(tag: str) -> str:
    """A regular expression matching exactly ``tag``, e.g. :data:`NONFINITE_STEPS`."""
    return f"^{re.escape(tag)}$"


def layer_pattern(key: LayerKey, name: str) -> str:
    """A regular expression matching exactly :func:`layer_tag` ``(key, name)``."""
    return exact_pattern(layer_tag(key, name))


def gate_pattern(key: LayerKey, name: str) -> str:
    """A regular expression matching :func:`gate_tag` ``(key, gate, name)`` for every gate."""
    return f"^{re.escape(f'{ROOT}/{key}/{tag_name(name)}/')}[^/]+$"


def optimizer_pattern(section: str, name: str) -> str:
    """A regular expression matching one quantity of a section (``grad_norm``, ``clip``) for every
    optimizer: :func:`grad_norm_tag` / :func:`clip_tag` ``(name)`` and ``(name, optimizer)``.

    Examples:
        >>> bool(re.match(optimizer_pattern("grad_norm", "total"), grad_norm_tag("total", "optimizer_1")))
        True
        >>> bool(re.match(optimizer_pattern("grad_norm", "total"), grad_norm_tag("total_clipped")))
        False
    """
    return f"^{re.escape(f'{ROOT}/{section}/')}(?:[^/]+/)?{re.escape(name)}$"
