r"""The probe: captures a training step's recurrent layers and measures :math:`\|\partial L / \partial h_t\|` for every t.

:math:`\partial L/\partial h_t` is the TOTAL derivative: the direct gradient arriving at the
layer's output at step t plus everything that flows back through :math:`h_{t+1}, h_{t+2}, \dots`
A hook on a fused layer's output sees only the direct part, and fused kernels hide the inner
states, so the probe measures in two ways:

- Cells (``nn.RNNCell``, ``nn.LSTMCell``, ``nn.GRUCell``, and custom cells you mark) are called
  once per timestep by your own loop, and autograd accumulates every path into each call's
  output: a tensor hook on ``h_t`` (and ``c_t``) receives the total derivative directly.
- Fused layers (``nn.RNN``, ``nn.LSTM``, ``nn.GRU``): the layer's input, initial states, and the
  gradients arriving at its outputs (the output sequence, ``h_n`` and ``c_n``) are captured
  during the real step (:class:`FusedCapture`); afterwards
  :func:`~lightning_gradhealth.bptt.fused_timestep_grads` runs the exact backward recursion of
  the cell by hand, layer by layer and direction by direction.

Everything is computed on the weights' own device, in float32 (float64 for float64 weights),
under ``torch.no_grad()``; :meth:`TimestepProbe.compute` returns a :class:`ProbeResult` of
``(T,)`` CPU tensors in that dtype, keyed by :class:`~lightning_gradhealth.keys.LayerKey`.

Calls the probe does not measure are named, never dropped in silence: a call with an empty
batch (B = 0) is skipped, and the layer's later calls are measured. Reentrant activation
checkpointing (``torch.utils.checkpoint.checkpoint(fn, x, use_reentrant=True)``) runs its
forward under ``no_grad`` and recomputes it, with gradient, in the backward pass: the probe
captures that recomputation in place of the call (see :meth:`TimestepProbe._place`).

While attached, the probe's hooks live in the watched modules' own hook dicts (``torch.compile``
ignores hooks added after its first call), and the modules pickle without them: ``torch.save``,
``pickle`` and ``copy.deepcopy`` of a watched module, or of a model holding one, made during fit
hold nothing of GradHealth (:class:`_StateWithoutProbe`).

Examples:
    >>> import torch
    >>> lstm = torch.nn.LSTM(3, 8)
    >>> probe = TimestepProbe(torch.nn.ModuleDict({"rnn": lstm}))
    >>> probe.attach(); probe.arm()
    >>> output, _ = lstm(torch.randn(20, 4, 3))
    >>> output[-1].sum().backward()                    # the loss sees only the last step
    >>> result = probe.compute()
    >>> sorted(result.norms_by_name), tuple(result.norms_by_name["rnn.l0"].shape)
    (['rnn.l0', 'rnn.l0.cell'], (20,))
    >>> [str(key) for key in result.saturation]
    ['rnn.l0']
    >>> probe.detach()
"""

from __future__ import annotations

import fnmatch
import math
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Generic, NamedTuple, Optional, Sequence, TypeVar

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pad_packed_sequence, pad_sequence
from torch.overrides import TorchFunctionMode, _get_current_function_mode_stack
from torch.utils.hooks import RemovableHandle

from lightning_gradhealth.bptt import (
    REPLAYS,
    CellWeights,
    Replay,
    TimestepGrads,
    fused_timestep_grads,
    kernel_weights,
    timestep_norms,
)
from lightning_gradhealth.defaults import MAX_CALLS_MEASURED, replay_tolerance
from lightning_gradhealth.keys import LayerKey, by_name
from lightning_gradhealth.layers import cell_type_of, fused_layer_keys
from lightning_gradhealth.lyapunov import fused_lyapunov_exponents, lyapunov_exponents

__all__ = ["ProbeResult", "TimestepProbe", "preferred_replay"]


@dataclass(frozen=True)
class ProbeResult:
    """What :meth:`TimestepProbe.compute` measured on one training step.

    Attributes:
        norms: ``{key: (T,) float tensor on the CPU}``, ||dL/dh_t|| for every t of every
            measured layer and direction (fused layers: ``LayerKey(module, layer, reverse)``;
            cells: ``LayerKey(module)``), and ||dL/dc_t|| of an LSTM's cell state under
            ``key.cell_state``.
        saturation: the fused layers' saturated fractions of the same pass
            (:func:`~lightning_gradhealth.bptt.saturated_fraction`), under the hidden-state
            keys; a ReLU layer and a cell have none.
        unmeasured: ``{key: reason}`` for every watched layer and direction (hidden-state key of
            its first call) that has no norms in this result, the reason a clause such as "its
            call had an empty batch (B = 0): nothing to measure".
        lyapunov: ``{hidden-state key: (k,) float tensor on the CPU}``, the top Lyapunov exponents
            of each measured layer, direction and call
            (:func:`~lightning_gradhealth.lyapunov.fused_lyapunov_exponents`), when the probe
            computes them.
        lyapunov_unmeasured: ``{key: reason}`` of the layers with norms but no exponents.
        exponents_taken: whether this probe took the exponents (``compute(lyapunov=True)``
            with ``lyapunov_k > 0``); when not, the two fields above are empty.
    """

    norms: dict[LayerKey, Tensor]
    saturation: dict[LayerKey, float]
    unmeasured: dict[LayerKey, str] = field(default_factory=dict)
    lyapunov: dict[LayerKey, Tensor] = field(default_factory=dict)
    lyapunov_unmeasured: dict[LayerKey, str] = field(default_factory=dict)
    exponents_taken: bool = False

    @property
    def norms_by_name(self) -> dict[str, Tensor]:
        """:attr:`norms` keyed by the public strings, e.g. ``"encoder.rnn.l1_reverse"`` and
        ``"encoder.rnn.l1_reverse.cell"``."""
        return by_name(self.norms)

    @property
    def lyapunov_by_name(self) -> dict[str, Tensor]:
        """:attr:`lyapunov` keyed by the public strings, e.g. ``"encoder.rnn.l1_reverse"``."""
        return by_name(self.lyapunov)


_KERNELS: dict[Any, str] = {
    torch._VF.lstm: "lstm",
    torch._VF.gru: "gru",
    torch._VF.rnn_tanh: "rnn_tanh",
    torch._VF.rnn_relu: "rnn_relu",
}
"""The fused kernels every ``nn.LSTM``/``nn.GRU``/``nn.RNN`` forward ends in, by cell type."""

_current_autograd_node: Optional[Callable[[], Any]] = getattr(torch._C, "_current_autograd_node", None)
"""The autograd node whose backward is running on this thread (``None`` outside a backward pass)."""

_sequence_nr: Optional[Callable[[], int]] = getattr(torch._C._autograd, "_get_sequence_nr", None)
"""The sequence number the next autograd node created on this thread gets (nodes are numbered in
the order they are created: a node created in a forward pass has a number between that pass's first
and its last)."""


def _in_backward() -> bool:
    """Whether this runs inside a backward pass (activation checkpointing recomputes forwards there)."""
    return _current_autograd_node is not None and _current_autograd_node() is not None


@dataclass
class KernelCall:
    """The arguments of one call of a fused kernel (``torch._VF.lstm`` and its kin), which take
    either a padded input ``(input, hx, weights, has_biases, num_layers, dropout, train,
    bidirectional, batch_first)`` or packed data ``(data, batch_sizes, hx, weights, has_biases,
    num_layers, dropout, train, bidirectional)``."""

    data: Tensor
    batch_sizes: Optional[Tensor]
    hx: tuple[Tensor, ...]
    weights: list[Tensor]
    has_biases: bool
    num_layers: int
    dropout: float
    train: bool
    bidirectional: bool
    batch_first: bool

    @property
    def empty(self) -> bool:
        """Whether the call holds no sequence: batch size 0 (a kernel refuses zero steps)."""
        return self.hx[0].shape[-2] == 0

    @property
    def runs_layer_by_layer(self) -> bool:
        """Whether the spy runs this call one layer at a time with its own dropout masks: a
        stack with inter-layer dropout, whose graph is built now and not recomputed later under
        the kernel's own masks (not inside activation checkpointing, which runs the forward
        without grad or under saved-tensor hooks and replays it with the fused kernel, nor in
        the replay itself, inside the backward pass, which must draw the forward's masks again)."""
        stacked_dropout = self.dropout > 0 and self.train and self.num_layers > 1
        saved_tensor_hooks = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
        if not stacked_dropout or not torch.is_grad_enabled() or saved_tensor_hooks is None or _in_backward():
            return False
        return saved_tensor_hooks(False) is None

    @classmethod
    def parse(cls, args: Sequence[Any]) -> KernelCall:
        """Read a kernel call's positional arguments (``hx`` is a tuple for the LSTM, a tensor otherwise)."""
        packed = isinstance(args[3], (list, tuple))
        data, batch_sizes, rest = (args[0], args[1], args[2:]) if packed else (args[0], None, args[1:])
        hx, weights, has_biases, num_layers, dropout, train, bidirectional = rest[:7]
        batch_first = False if packed else bool(rest[7])
        hx = tuple(hx) if isinstance(hx, (list, tuple)) else (hx,)
        return cls(data, batch_sizes, hx, list(weights), bool(has_biases), int(num_layers), float(dropout), bool(train),
                   bool(bidirectional), batch_first)

    def arguments(self, data: Tensor, hx: tuple[Tensor, ...], weights: list[Tensor]) -> tuple[Any, ...]:
        """The arguments of the same kernel for one layer without dropout, on ``data``."""
        state: Any = hx if len(hx) > 1 else hx[0]
        common = (weights, self.has_biases, 1, 0.0, self.train, self.bidirectional)
        if self.batch_sizes is not None:
            return (data, self.batch_sizes, state, *common)
        return (data, state, *common, self.batch_first)

    def time_major(self, sequence: Tensor, steps: Optional[int] = None) -> Tensor:
        """A sequence tensor of this call (input, output, one of their gradients) as ``(T, B, F)``, zero-padded."""
        if self.batch_sizes is not None:
            return pad_packed_sequence(PackedSequence(sequence, self.batch_sizes), total_length=steps)[0]
        return sequence.transpose(0, 1) if self.batch_first else sequence


def run_layer_by_layer(kernel: Callable[..., Any], call: KernelCall) -> tuple[Any, list[Tensor], list[Tensor]]:
    """Run a stacked call with inter-layer dropout one layer at a time, with explicit masks.

    Each mask is a fresh Bernoulli(1 - p) draw scaled by 1 / (1 - p), as the kernel's own
    dropout is, so the step stays a correct draw of the same model; the masks and every layer's
    output are kept for the replay. Returns the kernel's output tuple, the layers' output
    sequences and the ``num_layers - 1`` masks.
    """
    directions = 2 if call.bidirectional else 1
    per_layer = len(call.weights) // call.num_layers
    layer_input, layer_outputs, masks, finals = call.data, [], [], []
    for layer in range(call.num_layers):
        rows = slice(layer * directions, (layer + 1) * directions)
        weights = call.weights[layer * per_layer : (layer + 1) * per_layer]
        output = kernel(*call.arguments(layer_input, tuple(state[rows] for state in call.hx), weights))
        layer_outputs.append(output[0])
        finals.append(output[1:])
        if layer < call.num_layers - 1:
            keep = 1.0 - call.dropout
            mask = torch.zeros_like(output[0]) if keep <= 0 else torch.empty_like(output[0]).bernoulli_(keep).div_(keep)
            masks.append(mask)
            layer_input = output[0] * mask
    stacked = tuple(torch.cat([final[index] for final in finals]) for index in range(len(finals[0])))
    return (layer_outputs[-1], *stacked), layer_outputs, masks


@dataclass
class FusedCapture:
    """What one kernel call of a fused layer leaves for the probe, time-major and padded.

    The tensors are detached, taken at forward time from what the kernel itself was given and
    returned (after whatever the module's own ``forward`` did: packing, permuting, unsqueezing);
    the three gradients are filled by tensor hooks on the kernel's outputs during the backward
    pass (``None`` where the loss does not depend on that output).

    Attributes:
        call: the kernel call (its arguments, for turning gradients time-major).
        inputs, outputs: ``(T, B, F)`` the call's input and output sequences.
        initial_states, initial_cells: h_0 (and an LSTM's c_0), ``(L * D, B, .)``.
        lengths: ``(B,)`` valid steps per sequence of packed data, else ``None``.
        weights: the kernel's weights that are not the module's own parameters of the same
            name (e.g. weights a wrapper dropped or reparametrized in ``forward``), by name.
        layer_outputs, dropout_masks: every layer's output and the inter-layer dropout masks,
            ``(T, B, F)`` each, when the call ran layer by layer (:func:`run_layer_by_layer`).
        tolerance: the replay's self-check tolerance for the precision the kernel computed in
            (:func:`~lightning_gradhealth.defaults.replay_tolerance`).
    """

    call: KernelCall
    tolerance: float
    inputs: Tensor
    outputs: Tensor
    initial_states: Tensor
    initial_cells: Optional[Tensor]
    lengths: Optional[Tensor]
    weights: dict[str, Tensor]
    layer_outputs: Optional[list[Tensor]] = None
    dropout_masks: Optional[list[Tensor]] = None
    output_grad: Optional[Tensor] = None
    final_state_grad: Optional[Tensor] = None
    final_cell_grad: Optional[Tensor] = None
    handles: list[RemovableHandle] = field(default_factory=list)

    @property
    def received_gradient(self) -> bool:
        """Whether the backward pass reached any of this call's outputs."""
        return any(g is not None for g in (self.output_grad, self.final_state_grad, self.final_cell_grad))

    def timestep_grads(
        self, module: nn.RNNBase, grad_scale: float = 1.0, replay: Replay = "recursion"
    ) -> dict[tuple[int, bool], TimestepGrads]:
        """:func:`~lightning_gradhealth.bptt.fused_timestep_grads` of this call of ``module``:
        ``{(layer, reverse): TimestepGrads}``, gradients divided by ``grad_scale``, by ``replay``."""
        steps = self.inputs.shape[0]
        return fused_timestep_grads(
            module,
            self.inputs,
            self.initial_states,
            self.initial_cells,
            None if self.output_grad is None else self.call.time_major(self.output_grad, steps),
            self.final_state_grad,
            self.final_cell_grad,
            outputs=self.outputs,
            layer_outputs=self.layer_outputs,
            dropout_masks=self.dropout_masks,
            weights={**kernel_weights(module), **self.weights},
            lengths=self.lengths,
            grad_scale=grad_scale,
            replay=replay,
            tolerance=self.tolerance,
        )

    def lyapunov_exponents(self, module: nn.RNNBase, k: int, warmup: int) -> dict[tuple[int, bool], Tensor]:
        """:func:`~lightning_gradhealth.lyapunov.fused_lyapunov_exponents` of this call of ``module``."""
        return fused_lyapunov_exponents(
            module,
            self.inputs,
            self.initial_states,
            self.initial_cells,
            outputs=self.outputs,
            layer_outputs=self.layer_outputs,
            dropout_masks=self.dropout_masks,
            weights={**kernel_weights(module), **self.weights},
            lengths=self.lengths,
            k=k,
            warmup=warmup,
        )

    @property
    def longest(self) -> int:
        """The steps of the longest sequence of the call."""
        return self.inputs.shape[0] if self.lengths is None else int(self.lengths.max())


def _accumulate(capture: FusedCapture, name: str) -> Callable[[Tensor], None]:
    """A tensor hook that adds the incoming gradient into ``capture.<name>`` (it may fire again with retain_graph)."""

    def hook(grad: Optional[Tensor]) -> None:
        if grad is None:  # an output of a multi-output kernel that the loss does not reach
            return
        previous = getattr(capture, name)
        setattr(capture, name, grad.detach() if previous is None else previous + grad.detach())

    return hook


def capture_kernel_call(
    module: nn.RNNBase,
    call: KernelCall,
    output: Sequence[Tensor],
    layer_outputs: Optional[list[Tensor]] = None,
    dropout_masks: Optional[list[Tensor]] = None,
) -> Optional[FusedCapture]:
    """Record one kernel call of ``module`` and hook the gradients of its outputs.

    Returns ``None`` when no output requires grad (nothing will flow back through this call).

    Raises:
        ValueError: the kernel's weights are not those the module declares.
    """
    sequence, final_state, final_cell = output[0], output[1], output[2] if len(output) > 2 else None
    if not (sequence.requires_grad or final_state.requires_grad):
        return None
    names = module._flat_weights_names
    if len(names) != len(call.weights):
        raise ValueError(f"its kernel ran with {len(call.weights)} weights where the module declares {len(names)}")
    steps = None
    inputs = call.time_major(call.data)
    lengths = None
    if call.batch_sizes is not None:
        inputs, lengths = pad_packed_sequence(PackedSequence(call.data, call.batch_sizes))
        steps = inputs.shape[0]

    def detached(sequences: Optional[list[Tensor]]) -> Optional[list[Tensor]]:
        return None if sequences is None else [call.time_major(s.detach(), steps) for s in sequences]

    device = sequence.device.type
    precision = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else sequence.dtype
    tf32 = device == "cuda" and precision == torch.float32 and torch.backends.cudnn.allow_tf32
    capture = FusedCapture(
        call,
        replay_tolerance(precision, tf32=tf32),
        inputs.detach(),
        call.time_major(sequence.detach(), steps),
        call.hx[0].detach(),
        call.hx[1].detach() if len(call.hx) > 1 else None,
        lengths,
        {name: w.detach() for name, w in zip(names, call.weights) if w is not getattr(module, name, None)},
        detached(layer_outputs),
        detached(dropout_masks),
    )
    for tensor, name in ((sequence, "output_grad"), (final_state, "final_state_grad"), (final_cell, "final_cell_grad")):
        if tensor is not None and tensor.requires_grad:
            capture.handles.append(tensor.register_hook(_accumulate(capture, name)))
    return capture


def _ignore_call(call: KernelCall, output: Any, layer_outputs: Optional[list[Tensor]], masks: Optional[list[Tensor]]) -> None:
    """What a spy of a detached probe does with a kernel call: nothing."""


class _KernelSpy(TorchFunctionMode):
    """Active while an armed probe's fused module runs: records the module's calls of its fused
    kernel, however its ``forward`` reached them, and runs a stack with inter-layer dropout layer
    by layer (:func:`run_layer_by_layer`) so that the replay knows the masks."""

    def __init__(
        self,
        record: Callable[[KernelCall, Any, Optional[list[Tensor]], Optional[list[Tensor]]], None],
        fail: Callable[[Exception], None],
    ) -> None:
        super().__init__()
        self.record, self.fail = record, fail

    def __torch_function__(self, func: Any, types: Any, args: Sequence[Any] = (), kwargs: Optional[dict[str, Any]] = None) -> Any:
        kwargs = kwargs or {}
        if func not in _KERNELS:
            return func(*args, **kwargs)
        try:  # a measurement must never stop the user's training: any surprise runs the kernel as called
            if kwargs:
                raise ValueError("its kernel was called with keyword arguments")
            call = KernelCall.parse(args)
            if call.runs_layer_by_layer:
                output, layer_outputs, masks = run_layer_by_layer(func, call)
                self.record(call, output, layer_outputs, masks)
                return output
        except Exception as error:
            self.fail(error)
            return func(*args, **kwargs)
        output = func(*args)
        self.record(call, output, None, None)
        return output


class _ProbeHook:
    """The probe's forward hook on one module. Its type marks the probe's entries in the module's
    hook dicts, which the module's pickled or copied state leaves out (:class:`_StateWithoutProbe`)."""

    def __init__(self, hook: Callable[..., None]) -> None:
        self.hook = hook

    def __call__(self, *args: Any) -> None:
        return self.hook(*args)


_FORWARD_HOOK_DICTS = (
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
)
"""A module's forward hooks and their flags, each dict keyed by hook id (``torch.nn.Module``)."""


def _probe_hook_ids(module: nn.Module) -> set[int]:
    """The ids of the probe hooks (:class:`_ProbeHook`) ``module`` holds, of any probe."""
    hooks = (*module._forward_pre_hooks.items(), *module._forward_hooks.items())
    return {hook_id for hook_id, hook in hooks if isinstance(hook, _ProbeHook)}


class _StateWithoutProbe:
    """A watched module's ``__getstate__`` while a probe is attached, set on the module itself:
    the state the module's class gives (or an instance-level ``__getstate__`` found there), less
    the probe hooks' entries in its forward-hook dicts and less itself.

    ``pickle``, ``torch.save`` and ``copy.deepcopy`` of the module, or of any module holding it,
    take its state from ``__getstate__``; so a snapshot or a copy made during fit (an EMA model, a
    user's ``torch.save(pl_module)``) holds nothing of GradHealth: it loads where the package is
    not installed, and runs with no hook of ours. The module's other hooks, and the handles that
    remove them, are untouched: their dicts are the same objects.
    """

    def __init__(self, module: nn.Module, previous: Optional[Callable[[], Any]]) -> None:
        self.module = weakref.ref(module)
        self.previous = previous

    def __call__(self) -> Any:
        module = self.module()
        state = self.previous() if self.previous is not None else type(module).__getstate__(module)
        if not isinstance(state, dict):
            return state
        state = {name: value for name, value in state.items() if name != "__getstate__"}
        ours = _probe_hook_ids(module)
        for name in _FORWARD_HOOK_DICTS:
            hooks = state.get(name)
            if hooks is not None and not ours.isdisjoint(hooks):
                state[name] = OrderedDict((hook_id, hook) for hook_id, hook in hooks.items() if hook_id not in ours)
        return state


def _pickle_without_probe(module: nn.Module) -> None:
    """Give ``module`` a :class:`_StateWithoutProbe` (once, whatever the number of probes)."""
    current = module.__dict__.get("__getstate__")
    if not isinstance(current, _StateWithoutProbe):
        module.__dict__["__getstate__"] = _StateWithoutProbe(module, current)


def _pickle_as_before(module: nn.Module) -> None:
    """Take :func:`_pickle_without_probe` back, once ``module`` holds no probe hook."""
    current = module.__dict__.get("__getstate__")
    if isinstance(current, _StateWithoutProbe) and not _probe_hook_ids(module):
        if current.previous is None:
            del module.__dict__["__getstate__"]
        else:
            module.__dict__["__getstate__"] = current.previous


class _Place(NamedTuple):
    """Where a captured call goes among its module's calls of the step.

    Attributes:
        backward_node: ``None`` for a call of the forward pass, which goes where it ran; for a
            reentrant activation checkpoint's recomputation in the backward pass, the sequence
            number of that checkpoint's backward node (the order of the checkpoints).
        arrival: the order of recomputations within one checkpoint.
    """

    backward_node: Optional[int]
    arrival: int


_FORWARD = _Place(None, 0)
"""The place of every captured call of the forward pass: where it runs."""

Item = TypeVar("Item")


@dataclass
class _Calls(Generic[Item]):
    """One module's captured calls over one step.

    ``forward`` holds what was captured of each call of the forward pass in the order they ran,
    and ``None`` for a call that ran without gradient (reentrant activation checkpointing may
    recompute it in the backward pass); ``recomputed`` holds ``(backward node, arrival, item)``
    of each recomputation captured there, ``awaiting`` counts the calls still waiting for theirs.
    """

    forward: list[Optional[Item]] = field(default_factory=list)
    recomputed: list[tuple[int, int, Item]] = field(default_factory=list)
    awaiting: int = 0

    def add(self, place: _Place, item: Item) -> None:
        if place.backward_node is None:
            self.forward.append(item)
        else:
            self.recomputed.append((place.backward_node, place.arrival, item))

    def in_forward_order(self) -> Optional[list[Optional[Item]]]:
        """``forward`` with every call that ran without gradient replaced by its recomputation:
        the k-th recomputation, in the order of the checkpoints (backward pass runs them last to
        first) and then of arrival, fills the k-th such call. ``None`` when some calls were
        recomputed but not all of them: which call each one replays is then unknown."""
        if not self.recomputed:
            return list(self.forward)
        gaps = [position for position, item in enumerate(self.forward) if item is None]
        if len(gaps) != len(self.recomputed):
            return None
        placed = list(self.forward)
        for position, (_, _, item) in zip(gaps, sorted(self.recomputed, key=lambda recomputed: recomputed[:2])):
            placed[position] = item
        return placed


class _CellStep(NamedTuple):
    """One call of a built-in cell, detached, kept for its Lyapunov exponents: its input, the
    state it was given (``(h, c)`` for an LSTM cell) and the state it returned."""

    input: Tensor
    given: tuple[Tensor, ...]
    returned: tuple[Tensor, ...]


@dataclass
class _CellCalls(_Calls[int]):
    """One cell module's calls over one step; each captured call is an entry of the gradient
    lists, ``state_grads[entry]`` (and ``cell_grads[entry]``): ``None`` until a gradient arrives
    (it stays ``None`` if the loss does not depend on that output)."""

    state_grads: list[Optional[Tensor]] = field(default_factory=list)
    cell_grads: list[Optional[Tensor]] = field(default_factory=list)
    handles: list[RemovableHandle] = field(default_factory=list)
    has_elements: bool = False
    steps: list[_CellStep] = field(default_factory=list)



def preferred_replay(device_type: str) -> Replay:
    """The faster of the two exact replays of a fused layer on a device of ``device_type``, as
    ``benchmarks/replay.py`` measures them against each other.

    On a CPU the recursion: the kernel replay's identity block makes its input projection a
    ``(G H) x (G H)`` product over every step, which costs more than the recursion's per-step
    products save (an LSTM at H = 256, T = 100: about 4x the recursion). On a CUDA device the
    kernel replay: cuDNN runs the whole sequence in a few kernels where the recursion launches
    several per timestep; this choice follows from that count and was not measured here (no GPU
    was available to this project; the benchmark measures it where one is).

    The choice depends on nothing that changes between runs, so a rerun or a resumed run
    measures with the same replay and gives the same numbers to the last bit.

    Examples:
        >>> preferred_replay("cpu"), preferred_replay("cuda")
        ('recursion', 'kernel')
    """
    return "kernel" if device_type == "cuda" else "recursion"


class TimestepProbe:
    """Measures ||dL/dh_t|| for every recurrent layer of a model on the steps you arm it for.

    ``attach`` registers one forward hook per recurrent module; while the probe is not armed
    the hooks return at once, and they hold no tensor. ``arm()`` before a forward pass makes
    them capture that pass (every call of a cell, one call per timestep; every call of a fused
    layer, of which the first that the loss reaches is measured); ``disarm()`` before the
    backward pass (activation checkpointing replays forwards there); after the backward pass,
    ``compute()`` returns the norms (a :class:`ProbeResult`) and releases everything captured. A module the probe
    cannot measure (a subclass whose calls differ from the built-in layer's, say) is left out
    and named in :attr:`failures`: a measurement never stops training.

    A watched module pickles and deep-copies without the probe's hooks while they are attached
    (:class:`_StateWithoutProbe`): a copy made during fit measures nothing and carries nothing.

    Args:
        model: the module tree to watch.
        custom_cells: glob patterns over module names of your own cells: modules called once
            per timestep whose output is ``h_t`` or a tuple ``(h_t, c_t, ...)``.
        replay: how fused layers are replayed: ``"auto"`` (the faster exact replay on the
            weights' device, :func:`preferred_replay`), ``"recursion"`` or ``"kernel"``.
        lyapunov_k: how many Lyapunov exponents of each measured layer to compute
            (:mod:`~lightning_gradhealth.lyapunov`); 0: none.
        lyapunov_warmup: leading steps of each sequence whose growth the exponents do not count.

    Attributes:
        fused: ``{module name: module}`` of the fused ``nn.RNN``/``nn.LSTM``/``nn.GRU`` watched.
        cells: ``{module name: module}`` of the cells watched (built-in and custom).
        armed: whether the hooks capture the calls they see.
        unreproduced: ``{module name: reason}`` of the fused modules whose replay did not
            reproduce their states in some step (that step's measurement of them was dropped).
        many_calls: ``{module name: calls}`` of the fused modules that ran more than
            :data:`~lightning_gradhealth.defaults.MAX_CALLS_MEASURED` times in a step.
        empty_batches: names of the modules called with an empty batch (B = 0) in some step
            (those calls were skipped; the module's other calls were measured).
        failures: ``{module name: reason}`` of the modules the probe could not measure.
        replays_run: ``{module name: replays}``: which replays computed each fused module's
            layers so far (``"recursion"`` also where a kernel replay drifted and was redone).

    Raises:
        ValueError: a ``custom_cells`` pattern matches no module, or an unknown ``replay``.
    """

    def __init__(
        self,
        model: nn.Module,
        custom_cells: Sequence[str] = (),
        replay: str = "auto",
        lyapunov_k: int = 0,
        lyapunov_warmup: int = 0,
    ) -> None:
        if replay not in ("auto", *REPLAYS):
            raise ValueError(f"unknown replay {replay!r}; expected 'auto', {', '.join(map(repr, REPLAYS))}")
        self.replay = replay
        self.replays_run: dict[str, set[str]] = {}
        self.lyapunov_k = lyapunov_k
        self.lyapunov_warmup = lyapunov_warmup
        module_names = [name for name, _ in model.named_modules()]
        for pattern in custom_cells:
            if not fnmatch.filter(module_names, pattern):
                raise ValueError(f"custom_cells pattern {pattern!r} matches no module of the model")
        self.fused: dict[str, nn.RNNBase] = {}
        self.cells: dict[str, nn.Module] = {}
        for name, module in model.named_modules():
            if isinstance(module, nn.RNNBase):
                self.fused[name] = module
            elif isinstance(module, nn.RNNCellBase) or any(fnmatch.fnmatchcase(name, p) for p in custom_cells):
                self.cells[name] = module
        self.armed = False
        self.failures: dict[str, str] = {}
        self.unreproduced: dict[str, str] = {}
        self.many_calls: dict[str, int] = {}
        self.empty_batches: set[str] = set()
        self._fused_calls: dict[str, _Calls[FusedCapture]] = {}
        self._spies: dict[str, list[Optional[_KernelSpy]]] = {}
        self._cell_calls: dict[str, _CellCalls] = {}
        self._handles: list[RemovableHandle] = []
        self._armed_span: tuple[float, float] = (math.inf, math.inf)  # sequence numbers of the armed forward pass
        self._awaiting = 0  # calls without gradient that may be recomputed (all modules)
        self._arrivals = 0
        self._left_out: dict[str, str] = {}  # why a module's call was not measured this step

    @property
    def layer_keys(self) -> list[LayerKey]:
        """The hidden-state keys of every fused layer and direction (model order), then of every cell."""
        fused = [key for name, module in self.fused.items() for key in fused_layer_keys(name, module)]
        return fused + [LayerKey(name) for name in self.cells]

    def attach(self) -> None:
        """Register the forward hooks (idempotent); the modules pickle without them (:class:`_StateWithoutProbe`)."""
        if self._handles:
            return
        for name, module in self.fused.items():
            self._register(module, self._spy_start(name), pre=True)
            self._register(module, self._spy_stop(name), always_call=True)
        for name, module in self.cells.items():
            self._register(module, self._cell_hook(name))

    def _register(self, module: nn.Module, hook: Callable[..., None], pre: bool = False, **kwargs: Any) -> None:
        register = module.register_forward_pre_hook if pre else module.register_forward_hook
        self._handles.append(register(_ProbeHook(hook), **kwargs))
        _pickle_without_probe(module)

    def detach(self) -> None:
        """Remove every hook and release what was captured: the model is as it was.

        A spy left behind by a forward pass that was interrupted (``KeyboardInterrupt``: the
        forward hook that ends it does not run) is taken off torch's mode stack when it is on
        top of it, and otherwise records nothing more.
        """
        stale = [spy for spies in self._spies.values() for spy in spies if spy is not None]
        self._spies.clear()
        self._fused_calls.clear()
        for spy in reversed(stale):
            spy.record = _ignore_call
            stack = _get_current_function_mode_stack()
            if stack and stack[-1] is spy:
                spy.__exit__(None, None, None)
        self.release()
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for module in [*self.fused.values(), *self.cells.values()]:
            _pickle_as_before(module)

    def arm(self) -> None:
        """Capture the next forward pass(es) until :meth:`compute` or :meth:`release`."""
        if not self.armed:
            self._armed_span = (_sequence_nr() if _sequence_nr is not None else 0, math.inf)
        self.armed = True

    def disarm(self) -> None:
        """Stop capturing new calls; what was captured stays until :meth:`compute` or :meth:`release`,
        and the recomputations of the calls that ran without gradient (reentrant activation
        checkpointing) are still captured in the backward pass."""
        if self.armed:
            self._armed_span = (self._armed_span[0], _sequence_nr() if _sequence_nr is not None else math.inf)
        self.armed = False

    @property
    def has_captures(self) -> bool:
        """Whether a forward pass was captured since the last release (calls that ran without
        gradient and may be recomputed in the backward pass count)."""
        return any(calls.forward or calls.recomputed for calls in [*self._fused_calls.values(), *self._cell_calls.values()])

    @property
    def has_gradients(self) -> bool:
        """Whether a backward pass has reached any captured output since the last release."""
        fused = any(capture.received_gradient for calls in self._fused_calls.values() for capture in _captures(calls))
        return fused or any(g is not None for calls in self._cell_calls.values() for g in calls.state_grads)

    def release(self) -> None:
        """Drop every captured tensor and gradient hook, and disarm."""
        self.armed = False
        handles = [
            *(handle for calls in self._fused_calls.values() for capture in _captures(calls) for handle in capture.handles),
            *(handle for calls in self._cell_calls.values() for handle in calls.handles),
        ]
        for handle in handles:
            handle.remove()
        self._fused_calls.clear()
        self._cell_calls.clear()
        self._awaiting = 0
        self._left_out.clear()

    def _place(self, calls: _Calls[Any]) -> Optional[_Place]:
        """Whether this call of the module whose calls are ``calls`` is captured, and where it goes; ``None``: not captured.

        Armed, in the forward pass, a call with gradient is captured where it runs. A call
        without gradient is not; it leaves a gap in ``calls.forward`` instead, because reentrant
        activation checkpointing (``checkpoint(fn, x, use_reentrant=True)``) runs its forward
        under ``no_grad`` and runs it again with gradient in the backward pass, where the probe
        is disarmed. Such a recomputation is captured when the backward node running it (the
        checkpoint's) was created in the armed forward pass, its sequence number within the
        armed span, while gaps of that module wait: a later micro-batch's recomputation, or a
        non-reentrant checkpoint's (whose forward ran with gradient and was captured), is not.
        :meth:`_Calls.in_forward_order` puts each recomputation in its gap.
        """
        if self.armed and not (self._awaiting and _in_backward()):
            if torch.is_grad_enabled():
                return _FORWARD
            calls.forward.append(None)
            calls.awaiting += 1
            self._awaiting += 1
            return None
        if not calls.awaiting or not torch.is_grad_enabled() or not _in_backward() or _sequence_nr is None:
            return None
        node = _current_autograd_node()  # type: ignore[misc]  # _in_backward: available
        number = node._sequence_nr()
        if not self._armed_span[0] <= number < self._armed_span[1]:
            return None
        calls.awaiting -= 1
        self._awaiting -= 1
        self._arrivals += 1
        return _Place(number, self._arrivals)

    def _spy_start(self, name: str) -> Callable[..., None]:
        """The forward pre-hook of a fused module: on a captured call, watch its kernel calls."""

        def hook(module: nn.RNNBase, args: tuple[Any, ...]) -> None:
            spy = None
            if (self.armed or self._awaiting) and name not in self.failures:
                place = self._place(self._fused_calls.setdefault(name, _Calls()))
                if place is not None:
                    spy = _KernelSpy(
                        lambda call, output, layers, masks: self._record(name, module, call, output, layers, masks, place),
                        lambda error: self._fail(name, error),
                    )
                    spy.__enter__()
            self._spies.setdefault(name, []).append(spy)

        return hook

    def _spy_stop(self, name: str) -> Callable[..., None]:
        """The forward hook of a fused module (also on an exception): stop watching."""

        def hook(module: nn.RNNBase, args: tuple[Any, ...], output: Any) -> None:
            spies = self._spies.get(name)
            spy = spies.pop() if spies else None
            if spy is not None:
                spy.__exit__(None, None, None)

        return hook

    def _record(
        self,
        name: str,
        module: nn.RNNBase,
        call: KernelCall,
        output: Any,
        layer_outputs: Optional[list[Tensor]],
        masks: Optional[list[Tensor]],
        place: _Place,
    ) -> None:
        """Keep one kernel call of the fused module ``name``; a call with an empty batch is skipped
        (and named), a call that cannot be read names the module."""
        if call.empty:
            self.empty_batches.add(name)
            self._left_out.setdefault(name, _EMPTY_BATCH)
            return
        try:
            capture = capture_kernel_call(module, call, output, layer_outputs, masks)
        except Exception as error:  # a measurement must never stop the user's training
            self._fail(name, error)
            return
        if capture is not None:
            self._fused_calls.setdefault(name, _Calls()).add(place, capture)

    def _cell_hook(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            if not (self.armed or self._awaiting):
                return
            calls = self._cell_calls.setdefault(name, _CellCalls())
            place = self._place(calls)
            if place is None:
                return
            state, cell = (output[0], output[1] if len(output) > 1 else None) if isinstance(output, tuple) else (output, None)
            if self.lyapunov_k and isinstance(module, nn.RNNCellBase):
                calls.steps.append(_cell_step(module, args, output))
            entry = len(calls.state_grads)
            for tensor, grads in ((state, calls.state_grads), (cell, calls.cell_grads)):
                if not isinstance(tensor, Tensor):
                    continue
                calls.has_elements = calls.has_elements or tensor.numel() > 0
                grads.append(None)
                if tensor.requires_grad:
                    calls.handles.append(tensor.register_hook(_accumulate_into(grads, len(grads) - 1)))
            calls.add(place, entry)

        return hook

    def compute(self, grad_scale: float = 1.0, lyapunov: bool = True) -> ProbeResult:
        """Per-timestep norms of the captured pass, then :meth:`release`.

        A fused module whose measurement fails is left out and named in :attr:`failures`; every
        watched layer without norms gets its reason in :attr:`ProbeResult.unmeasured`.

        Args:
            grad_scale: the AMP loss scale the backward pass ran with (hooks see scaled
                gradients); norms are divided by it.
            lyapunov: take the Lyapunov exponents too (with ``lyapunov_k > 0``).

        Returns:
            The :class:`ProbeResult`: ``(T,)`` norms of every measured layer, direction and
            state (float64 for a float64 layer, else float32), the fused layers' saturated
            fractions, and why the others were not measured.
        """
        take_exponents = lyapunov and self.lyapunov_k > 0
        norms: dict[LayerKey, Tensor] = {}
        saturation: dict[LayerKey, Tensor] = {}
        exponents: dict[LayerKey, Tensor] = {}
        without_exponents: dict[LayerKey, str] = {}
        try:
            with torch.no_grad():
                for name, calls in self._fused_calls.items():
                    in_order = calls.in_forward_order()
                    if in_order is None:
                        self._left_out.setdefault(name, _UNPLACED)
                        continue
                    captures = [capture for capture in in_order if capture is not None]
                    if not captures:
                        self._left_out.setdefault(name, _WITHOUT_GRADIENT)
                    # every call the loss reached, in the order they ran; if none did, the first (all zeros)
                    reached = [capture for capture in captures if capture.received_gradient] or captures[:1]
                    if len(reached) > MAX_CALLS_MEASURED:
                        self.many_calls[name] = len(reached)
                    for index, capture in enumerate(reached[:MAX_CALLS_MEASURED]):
                        measured = self._measure_call(name, capture, grad_scale)
                        for (layer, reverse), grads in sorted(measured.items()):  # model order
                            key = LayerKey(name, layer, reverse, call=index)
                            norms[key] = timestep_norms(grads.state)
                            if grads.saturation is not None:
                                saturation[key] = grads.saturation
                            if grads.cell is not None:
                                norms[key.cell_state] = timestep_norms(grads.cell)
                        if measured and take_exponents:
                            keys = {position: LayerKey(name, *position, call=index) for position in measured}
                            self._fused_exponents(name, capture, keys, exponents, without_exponents)
                for name, calls in self._cell_calls.items():
                    entries = calls.in_forward_order()
                    reason = _UNPLACED if entries is None else _cell_left_out(calls)
                    if reason is not None:
                        self._left_out.setdefault(name, reason)
                        if reason == _EMPTY_BATCH:
                            self.empty_batches.add(name)
                        continue
                    key = LayerKey(name)
                    for state_key, grads in ((key, calls.state_grads), (key.cell_state, calls.cell_grads)):
                        if grads:
                            norms[state_key] = _call_norms([None if e is None else grads[e] for e in entries]) / grad_scale
                    if take_exponents:
                        self._cell_exponents(name, calls, entries, key, exponents, without_exponents)
            unmeasured = {key: self._why_unmeasured(key.module) for key in self.layer_keys if key not in norms}
        finally:
            self.release()
        return ProbeResult(
            {key: value.cpu() for key, value in norms.items()},
            {key: float(value) for key, value in saturation.items()},
            unmeasured,
            {key: value.cpu() for key, value in exponents.items()},
            without_exponents,
            take_exponents,
        )

    def _fused_exponents(
        self,
        name: str,
        capture: FusedCapture,
        keys: dict[tuple[int, bool], LayerKey],
        exponents: dict[LayerKey, Tensor],
        without_exponents: dict[LayerKey, str],
    ) -> None:
        """The Lyapunov exponents of one measured call of the fused module ``name``, into
        ``exponents`` (or the reason there are none into ``without_exponents``)."""
        if capture.longest <= self.lyapunov_warmup:
            reason = _short_for_warmup(capture.longest, self.lyapunov_warmup)
            without_exponents.update((key, reason) for key in keys.values())
            return
        try:
            by_layer = capture.lyapunov_exponents(self.fused[name], self.lyapunov_k, self.lyapunov_warmup)
        except Exception as error:  # a measurement must never stop the user's training
            without_exponents.update((key, f"its exponents failed ({type(error).__name__}: {error})") for key in keys.values())
            return
        exponents.update((keys[position], values) for position, values in by_layer.items() if position in keys)

    def _cell_exponents(
        self,
        name: str,
        calls: _CellCalls,
        entries: list[Optional[int]],
        key: LayerKey,
        exponents: dict[LayerKey, Tensor],
        without_exponents: dict[LayerKey, str],
    ) -> None:
        """The Lyapunov exponents of the calls of the cell ``name`` in this step, taken as one
        trajectory: each call's state is the one the previous call returned."""
        module = self.cells[name]
        if not isinstance(module, nn.RNNCellBase):
            without_exponents[key] = "a custom cell: its Jacobian is not known to the probe"
            return
        steps = [calls.steps[entry] for entry in entries if entry is not None]
        if len(steps) != len(entries) or not steps:
            without_exponents[key] = "some of its calls were not captured"
            return
        chained = all(  # a state changed between calls is another trajectory
            all(_same_state(given, returned) for given, returned in zip(later.given, earlier.returned))
            for earlier, later in zip(steps, steps[1:])
        )
        if not chained:
            without_exponents[key] = "a call was given another state than the previous call returned, so they are no trajectory"
            return
        if len(steps) <= self.lyapunov_warmup:
            without_exponents[key] = _short_for_warmup(len(steps), self.lyapunov_warmup)
            return
        weights = CellWeights(module.weight_ih, module.weight_hh, module.bias_ih, module.bias_hh)
        initial = steps[0].given
        try:
            exponents[key] = lyapunov_exponents(
                cell_type_of(module),
                weights.to(torch.promote_types(module.weight_hh.dtype, torch.float32)),
                torch.stack([step.input for step in steps]),
                torch.stack([step.returned[0] for step in steps]),
                initial[0],
                initial_cell=initial[1] if len(initial) > 1 else None,
                k=self.lyapunov_k,
                warmup=self.lyapunov_warmup,
            )
        except Exception as error:  # a measurement must never stop the user's training
            without_exponents[key] = f"its exponents failed ({type(error).__name__}: {error})"

    def _fail(self, name: str, error: Exception) -> None:
        """Leave the module ``name`` out from now on, for ``error`` (named in :attr:`failures`)."""
        self.failures.setdefault(name, f"{type(error).__name__}: {error}")

    def _why_unmeasured(self, name: str) -> str:
        """Why the module ``name`` has no norms in this step, as a clause."""
        if name in self._left_out:
            return self._left_out[name]
        if name in self.failures:
            return f"the probe cannot measure it ({self.failures[name]})"
        return _NOT_RUN

    def _measure_call(self, name: str, capture: FusedCapture, grad_scale: float) -> dict[tuple[int, bool], TimestepGrads]:
        """One call's replay, if it reproduces the states the layer computed; else nothing, and the
        module is named in :attr:`unreproduced` (or in :attr:`failures` if the replay fails)."""
        module = self.fused[name]
        replay = preferred_replay(capture.inputs.device.type) if self.replay == "auto" else self.replay
        try:
            measured = capture.timestep_grads(module, grad_scale, replay)  # type: ignore[arg-type]
        except Exception as error:  # a measurement must never stop the user's training
            self._fail(name, error)
            return {}
        self.replays_run.setdefault(name, set()).update(grads.replay for grads in measured.values())
        tolerance = capture.tolerance
        residuals = [float(grads.residual) for grads in measured.values() if grads.residual is not None]
        residual = max((value for value in residuals if math.isfinite(value)), default=0.0)  # NaN: see state_residual
        if residual > tolerance:
            self.unreproduced.setdefault(
                name,
                f"the states recomputed from its captured input differ from those it computed by {residual:.2g} "
                f"(relative; the tolerance is {tolerance:.2g})",
            )
            self._left_out.setdefault(name, "its replay did not reproduce the states it computed, so it is left out")
            return {}
        return measured

    def notices(self) -> dict[tuple[str, str], str]:
        """What the probe could not measure exactly so far, ``{(kind, module name): message}``.

        Kinds: ``"many calls"`` (:attr:`many_calls`), ``"empty batch"`` (a call skipped, see
        :attr:`empty_batches`), ``"unreproduced"`` (a step whose replay did not reproduce the
        layer's states, see :attr:`unreproduced`: nothing is reported for that module in that
        step) and ``"failure"`` (a module left out, :attr:`failures`). The messages are full
        sentences, for a warning.
        """
        return {
            **{
                ("many calls", name): f"{name!r} ran {count} times in one step (a loop over timesteps?); the first "
                f"{MAX_CALLS_MEASURED} calls the loss reaches are measured, under its keys and '.call1' to "
                f"'.call{MAX_CALLS_MEASURED - 1}'."
                for name, count in self.many_calls.items()
            },
            **{
                ("empty batch", name): f"{name!r} was called with an empty batch (B = 0) in a measured step; a call with "
                "an empty batch was skipped (there is nothing to measure in it), and its other calls are measured."
                for name in sorted(self.empty_batches)
            },
            **{
                ("unreproduced", name): f"dL/dh_t of {name!r} is not reported for a step where its replay did not "
                f"reproduce the layer's own output: {reason}. Such steps are left out rather than measured wrongly."
                for name, reason in self.unreproduced.items()
            },
            **{
                ("failure", name): f"cannot measure dL/dh_t of {name!r} ({reason}); it is left out, training goes on."
                for name, reason in self.failures.items()
            },
        }


# Why a watched layer has no norms in a step (ProbeResult.unmeasured), as a clause.
_EMPTY_BATCH = "its call had an empty batch (B = 0): nothing to measure"
_WITHOUT_GRADIENT = (
    "it ran only without gradient (under torch.no_grad, or in reentrant activation checkpointing that the backward "
    "pass did not recompute)"
)
_UNPLACED = (
    "it ran without gradient several times and only some of those calls were recomputed with gradient in the backward "
    "pass (reentrant activation checkpointing): which call each recomputation replays is unknown, so it is left out"
)
_NOT_RUN = "it did not run with gradient in that step"


def _cell_left_out(calls: _CellCalls) -> Optional[str]:
    """Why a cell module's calls give no norms this step (``None``: they do)."""
    if not calls.state_grads:
        return _WITHOUT_GRADIENT
    return None if calls.has_elements else _EMPTY_BATCH


def _captures(calls: _Calls[FusedCapture]) -> list[FusedCapture]:
    """Every capture of one fused module, of the forward pass and recomputed."""
    return [capture for capture in calls.forward if capture is not None] + [capture for *_, capture in calls.recomputed]


def _accumulate_into(grads: list[Optional[Tensor]], slot: int) -> Callable[[Tensor], None]:
    """A tensor hook that adds the incoming gradient into ``grads[slot]``."""

    def hook(grad: Tensor) -> None:
        previous = grads[slot]
        grads[slot] = grad.detach() if previous is None else previous + grad.detach()

    return hook


def _call_norms(grads: list[Optional[Tensor]]) -> Tensor:
    """``(T,)`` Frobenius norms of per-call gradients, in float32 or wider, all in one
    :func:`~lightning_gradhealth.bptt.timestep_norms` (calls of different batch sizes padded with
    zeros); a call whose output got no gradient counts 0."""
    present = [g for g in grads if g is not None]
    if not present:
        return torch.zeros(len(grads))
    dtype = torch.promote_types(present[0].dtype, torch.float32)
    none = present[0].new_zeros(0, dtype=dtype)
    return timestep_norms(pad_sequence([none if g is None else g.to(dtype).flatten() for g in grads], batch_first=True))


def _short_for_warmup(steps: int, warmup: int) -> str:
    return f"its {steps} steps are no more than lyapunov_warmup={warmup}: no step is counted"


def _cell_step(module: nn.RNNCellBase, args: tuple[Any, ...], output: Any) -> _CellStep:
    """One call of a built-in cell, batched (an unbatched call gets a batch of one), detached;
    a call without a given state was given zeros, as the cell itself takes them."""
    x = args[0].detach()
    returned = tuple(t.detach() for t in (output if isinstance(output, tuple) else (output,)))
    given_arg = args[1] if len(args) > 1 else None
    given = tuple(torch.zeros_like(t) for t in returned) if given_arg is None else tuple(
        t.detach() for t in (given_arg if isinstance(given_arg, tuple) else (given_arg,))
    )
    if x.dim() == 1:
        x, given, returned = x[None], tuple(t[None] for t in given), tuple(t[None] for t in returned)
    return _CellStep(x, given, returned)


def _same_state(given: Tensor, returned: Tensor) -> bool:
    """Whether a call was given the state an earlier call returned: the very tensor (detached
    copies of one tensor view the same memory: no host-device sync), or equal values (a
    recomputation by reentrant activation checkpointing returns new tensors)."""
    if given.data_ptr() == returned.data_ptr() and given.shape == returned.shape and given.stride() == returned.stride():
        return True
    return given.shape == returned.shape and torch.equal(given, returned)
