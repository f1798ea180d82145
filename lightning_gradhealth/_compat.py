"""One callback class for both Lightning namespaces.

``pytorch_lightning`` and ``lightning.pytorch`` are two copies of the same code with distinct
classes: LightningCLI accepts a callback only if it subclasses its own namespace's
``Callback``. :class:`CallbackBase` derives from the ``Callback`` class of every installed
namespace, so ``GradHealth``, built on it, serves both Trainers and both CLIs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytorch_lightning

CALLBACK_BASES: tuple[type, ...] = (pytorch_lightning.Callback,)
try:
    import lightning.pytorch
except ImportError:  # the `lightning` package is optional
    pass
else:
    CALLBACK_BASES += (lightning.pytorch.Callback,)

if TYPE_CHECKING:
    CallbackBase = pytorch_lightning.Callback
else:

    class CallbackBase(*CALLBACK_BASES):
        """A ``Callback`` of every installed Lightning namespace."""
