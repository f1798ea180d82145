"""lightning-gradhealth: gradient health for recurrent networks trained with PyTorch Lightning.

Examples:
    >>> from lightning_gradhealth import GradHealth
    >>> callback = GradHealth(init="orthogonal")
"""

from lightning_gradhealth.callback import GradHealth
from lightning_gradhealth.health import HealthReport, LayerHealth
from lightning_gradhealth.initialize import InitConfig, InitRecord, initialize_
from lightning_gradhealth.inits import SCHEME_NAMES
from lightning_gradhealth.layers import WeightRecord, find_recurrent_weights
from lightning_gradhealth.monitor import GradHealthMonitor, NonFiniteGradientError, StepOutput
from lightning_gradhealth.tensorboard import write_step_output

__all__ = [
    "GradHealth",
    "GradHealthMonitor",
    "HealthReport",
    "InitConfig",
    "InitRecord",
    "LayerHealth",
    "NonFiniteGradientError",
    "SCHEME_NAMES",
    "StepOutput",
    "WeightRecord",
    "find_recurrent_weights",
    "initialize_",
    "write_step_output",
]
__version__ = "0.1.0"
