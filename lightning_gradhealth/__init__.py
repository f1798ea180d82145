"""lightning-gradhealth: gradient health for recurrent networks trained with PyTorch Lightning.

Examples:
    >>> from lightning_gradhealth import GradHealth
    >>> callback = GradHealth(init="orthogonal")
"""

from lightning_gradhealth.callback import GradHealth
from lightning_gradhealth.initialize import InitConfig, InitRecord, initialize_
from lightning_gradhealth.inits import SCHEME_NAMES
from lightning_gradhealth.layers import WeightRecord, find_recurrent_weights

__all__ = [
    "GradHealth",
    "InitConfig",
    "InitRecord",
    "SCHEME_NAMES",
    "WeightRecord",
    "find_recurrent_weights",
    "initialize_",
]
__version__ = "0.1.0"
