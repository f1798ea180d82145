"""lightning-gradhealth: gradient health for recurrent networks trained with PyTorch Lightning.

Everything a user imports is here: the callback, the engine for loops without Lightning, the
settings, and the types of what they return.

Examples:
    >>> from lightning_gradhealth import GradHealth
    >>> callback = GradHealth(init="orthogonal")
"""

from lightning_gradhealth.callback import GradHealth
from lightning_gradhealth.clipping import ClipStats, ClipThresholdSuggester
from lightning_gradhealth.config import MonitorConfig
from lightning_gradhealth.distributed import Distributed
from lightning_gradhealth.health import HealthReport, LayerHealth, SpectrumSummary, TimestepSummary
from lightning_gradhealth.inits import SCHEME_NAMES
from lightning_gradhealth.keys import LayerKey
from lightning_gradhealth.layers import WeightRecord, find_recurrent_weights
from lightning_gradhealth.model_init import InitConfig, InitRecord, format_init_report, initialize_
from lightning_gradhealth.monitor import GradHealthMonitor
from lightning_gradhealth.output import EigenvalueChart, Picture, StepOutput, TimestepCurve, TimestepHeatmap
from lightning_gradhealth.spectra import MatrixSpectrum
from lightning_gradhealth.tensorboard import write_step_output
from lightning_gradhealth.trackers import NonFiniteGradientError

__all__ = [
    "ClipStats",
    "ClipThresholdSuggester",
    "Distributed",
    "EigenvalueChart",
    "GradHealth",
    "GradHealthMonitor",
    "HealthReport",
    "InitConfig",
    "InitRecord",
    "LayerHealth",
    "LayerKey",
    "MatrixSpectrum",
    "MonitorConfig",
    "NonFiniteGradientError",
    "Picture",
    "SCHEME_NAMES",
    "SpectrumSummary",
    "StepOutput",
    "TimestepCurve",
    "TimestepHeatmap",
    "TimestepSummary",
    "WeightRecord",
    "find_recurrent_weights",
    "format_init_report",
    "initialize_",
    "write_step_output",
]
__version__ = "0.1.0"
