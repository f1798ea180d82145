"""How GradHealth reaches the other processes of a sharded run.

Under FSDP each process holds flat 1-D shards of every parameter and gradient outside forward
and backward (``use_orig_params=True``, Lightning's default). The engine then needs two
operations, given to it as one :class:`Distributed` at attach time: whole parameters for the
probe and the spectra, and all-reduces for gradient norms and the NaN/Inf decision. Without
sharding, :class:`Distributed` ``()`` does nothing.
"""

from __future__ import annotations

import functools
import math
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Optional

from torch import Tensor, nn

__all__ = ["Distributed", "all_reduce", "fsdp_root", "sharded", "whole_parameters"]


@dataclass(frozen=True)
class Distributed:
    """How the engine reaches the other processes of a sharded run (FSDP), given at attach time.

    Attributes:
        full_parameters: a context manager factory under which every parameter is whole (the
            probe and the spectra run inside it on logging steps, on every process at once).
        all_reduce: ``all_reduce(tensor, op)``, ``op`` ``"sum"`` or ``"max"`` over all processes,
            so gradient norms, the clipping norm and the NaN/Inf decision cover the whole model;
            ``None`` when every process holds whole gradients.
    """

    full_parameters: Callable[[], ContextManager[Any]] = nullcontext
    all_reduce: Optional[Callable[[Tensor, str], Tensor]] = None

    def global_norms(self, norms: Tensor, norm_type: float) -> Tensor:
        """This process's ``norm_type``-norms as the norms over all processes (unchanged without ``all_reduce``)."""
        if self.all_reduce is None:
            return norms
        if math.isinf(norm_type):
            return self.all_reduce(norms.clone(), "max")
        return self.all_reduce(norms.pow(norm_type), "sum").pow(1 / norm_type)


def fsdp_root(model: Optional[nn.Module]) -> Optional[nn.Module]:
    """``model`` if it is a ``FullyShardedDataParallel`` root (the strategy's wrapped model), else ``None``."""
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # a torch build without distributed support
        return None
    return model if isinstance(model, FullyShardedDataParallel) else None


def whole_parameters(root: Optional[nn.Module], writeback: bool = False) -> ContextManager[Any]:
    """Every parameter whole on every process for the duration (FSDP; a collective, so every
    process enters it at the same point); nothing without FSDP."""
    if root is None:
        return nullcontext()
    from torch.distributed.fsdp import FullyShardedDataParallel

    return FullyShardedDataParallel.summon_full_params(root, writeback=writeback)


def all_reduce(tensor: Tensor, op: str) -> Tensor:
    """In-place sum or max of ``tensor`` over all processes."""
    import torch.distributed as dist

    dist.all_reduce(tensor, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return tensor


def sharded(root: nn.Module) -> Distributed:
    """The operations of an FSDP run whose root module is ``root``."""
    return Distributed(functools.partial(whole_parameters, root), all_reduce)
