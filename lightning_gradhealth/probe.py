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
``(T,)`` CPU tensors keyed by :class:`~lightning_gradhealth.keys.LayerKey`.

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

import copy
import fnmatch
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pad_packed_sequence
from torch.utils.hooks import RemovableHandle

from lightning_gradhealth.bptt import TimestepGrads, fused_timestep_grads, timestep_norms
from lightning_gradhealth.keys import LayerKey, by_name
from lightning_gradhealth.layers import fused_layer_keys

__all__ = ["ProbeResult", "TimestepProbe"]


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
    """

    norms: dict[LayerKey, Tensor]
    saturation: dict[LayerKey, float]

    @property
    def norms_by_name(self) -> dict[str, Tensor]:
        """:attr:`norms` keyed by the public strings, e.g. ``"encoder.rnn.l1_reverse"`` and
        ``"encoder.rnn.l1_reverse.cell"``."""
        return by_name(self.norms)


@dataclass
class FusedCapture:
    """What one call of a fused layer leaves for the probe, time-major and padded.

    ``inputs``, ``outputs`` and the initial states are detached copies taken at forward time;
    the three gradients are filled by tensor hooks during the backward pass (``None`` where
    the loss does not depend on that output). ``to_time_major`` turns the raw gradient of the
    output (packed, batch-first or unbatched, like the output itself) into ``(T, B, F)``.
    ``dropout_active``: the call ran inter-layer dropout, whose masks the kernel keeps to itself.
    """

    inputs: Tensor
    outputs: Tensor
    initial_states: Tensor
    initial_cells: Optional[Tensor]
    lengths: Optional[Tensor]
    to_time_major: Callable[[Tensor], Tensor]
    batched: bool
    dropout_active: bool
    output_grad: Optional[Tensor] = None
    final_state_grad: Optional[Tensor] = None
    final_cell_grad: Optional[Tensor] = None
    handles: list[RemovableHandle] = field(default_factory=list)

    @property
    def received_gradient(self) -> bool:
        """Whether the backward pass reached any of this call's outputs."""
        return any(g is not None for g in (self.output_grad, self.final_state_grad, self.final_cell_grad))

    def timestep_grads(self, module: nn.RNNBase, grad_scale: float = 1.0) -> dict[tuple[int, bool], TimestepGrads]:
        """:func:`~lightning_gradhealth.bptt.fused_timestep_grads` of this call of ``module``:
        ``{(layer, reverse): TimestepGrads}``, gradients divided by ``grad_scale``."""

        def as_batched(grad: Optional[Tensor]) -> Optional[Tensor]:  # h_n and c_n of an unbatched call lack B
            return grad if grad is None or self.batched else grad.unsqueeze(1)

        return fused_timestep_grads(
            module,
            self.inputs,
            self.initial_states,
            self.initial_cells,
            None if self.output_grad is None else self.to_time_major(self.output_grad),
            as_batched(self.final_state_grad),
            as_batched(self.final_cell_grad),
            outputs=None if self.dropout_active else self.outputs,
            lengths=self.lengths,
            grad_scale=grad_scale,
        )


def _accumulate(capture: FusedCapture, name: str) -> Callable[[Tensor], None]:
    """A tensor hook that adds the incoming gradient into ``capture.<name>`` (it may fire again with retain_graph)."""

    def hook(grad: Tensor) -> None:
        previous = getattr(capture, name)
        setattr(capture, name, grad.detach() if previous is None else previous + grad.detach())

    return hook


def capture_fused_call(module: nn.RNNBase, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Optional[FusedCapture]:
    """Record one forward call of ``module`` and hook the gradients of its outputs.

    Returns ``None`` when no output requires grad (nothing will flow back through this call).

    Raises:
        ValueError: the call does not look like the built-in layer's (a subclass with another
            signature or output), so it cannot be measured.
    """
    inputs = args[0] if args else kwargs.get("input")
    hx = args[1] if len(args) > 1 else kwargs.get("hx")
    if not isinstance(output, tuple) or len(output) != 2 or not isinstance(inputs, (Tensor, PackedSequence)):
        raise ValueError("its forward takes or returns something other than the built-in layer's (input, hx) -> (output, h_n)")
    sequence, finals = output
    final_state, final_cell = finals if isinstance(finals, tuple) else (finals, None)
    if isinstance(inputs, PackedSequence):
        padded_inputs, lengths = pad_packed_sequence(inputs)
        padded_outputs, _ = pad_packed_sequence(sequence)
        steps, batched, grad_target = padded_outputs.shape[0], True, sequence.data

        def to_time_major(grad: Tensor) -> Tensor:
            packed = PackedSequence(grad, sequence.batch_sizes, sequence.sorted_indices, sequence.unsorted_indices)
            return pad_packed_sequence(packed, total_length=steps)[0]

    else:
        batched, lengths, grad_target = inputs.dim() == 3, None, sequence
        if not batched:
            to_time_major = lambda grad: grad.unsqueeze(1)  # noqa: E731
        elif module.batch_first:
            to_time_major = lambda grad: grad.transpose(0, 1)  # noqa: E731
        else:
            to_time_major = lambda grad: grad  # noqa: E731
        padded_inputs, padded_outputs = to_time_major(inputs), to_time_major(sequence)
    if not (grad_target.requires_grad or final_state.requires_grad):
        return None

    directions = 2 if module.bidirectional else 1
    state_shape = (module.num_layers * directions, padded_inputs.shape[1], module.proj_size or module.hidden_size)
    cell_shape = (*state_shape[:2], module.hidden_size)
    initial = hx if isinstance(hx, tuple) else (hx, None)
    as_batched = (lambda t: t) if batched else (lambda t: t.unsqueeze(1))
    initial_states = padded_outputs.new_zeros(state_shape) if initial[0] is None else as_batched(initial[0]).detach()
    initial_cells = None
    if isinstance(module, nn.LSTM):
        initial_cells = padded_outputs.new_zeros(cell_shape) if initial[1] is None else as_batched(initial[1]).detach()
    dropout_active = module.training and module.dropout > 0 and module.num_layers > 1
    capture = FusedCapture(
        padded_inputs.detach(),
        padded_outputs.detach(),
        initial_states,
        initial_cells,
        lengths,
        to_time_major,
        batched,
        dropout_active,
    )
    for tensor, name in ((grad_target, "output_grad"), (final_state, "final_state_grad"), (final_cell, "final_cell_grad")):
        if tensor is not None and tensor.requires_grad:
            capture.handles.append(tensor.register_hook(_accumulate(capture, name)))
    return capture


class _InertHook:
    """What a copy of a watched module holds in place of the probe's forward hook: nothing."""

    def __call__(self, *args: Any) -> None:
        return None


class _ProbeHook:
    """The probe's forward hook on one module, as an object rather than a closure, so that a copy
    of the module never carries the probe along.

    A deep copy of the module made while the probe is attached (an EMA model or a teacher copied
    during fit) gets an :class:`_InertHook` under the same hook id, whose handle joins the
    probe's, so :meth:`TimestepProbe.detach` removes it too; the copy's calls feed nothing. A
    pickled module stores the inert stand-in (a closure does not pickle).
    """

    def __init__(self, hook: Callable[..., None], handles: list[RemovableHandle]) -> None:
        self.hook, self.handles = hook, handles
        self.handle: Optional[RemovableHandle] = None

    def __call__(self, *args: Any) -> None:
        return self.hook(*args)

    def __deepcopy__(self, memo: dict[int, Any]) -> _InertHook:
        handle = self.handle
        hooks = handle.hooks_dict_ref() if handle is not None else None
        copied_hooks = memo.get(id(hooks)) if hooks is not None else None  # the copy being filled right now
        if handle is not None and copied_hooks is not None:
            extras = [ref() for ref in handle.extra_dict_ref]
            copied_extras = [copy.deepcopy(extra, memo) for extra in extras if extra is not None]  # memoized: reused
            copy_handle = RemovableHandle(copied_hooks, extra_dict=copied_extras)
            copy_handle.id = handle.id
            self.handles.append(copy_handle)
        return _InertHook()

    def __reduce__(self) -> tuple[type, tuple[()]]:
        return (_InertHook, ())


@dataclass
class _CellCalls:
    """Gradients of one cell module's outputs over one step: entry t is the t-th call (``None``
    until a gradient arrives; it stays ``None`` if the loss does not depend on that output)."""

    state_grads: list[Optional[Tensor]] = field(default_factory=list)
    cell_grads: list[Optional[Tensor]] = field(default_factory=list)
    handles: list[RemovableHandle] = field(default_factory=list)


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

    Args:
        model: the module tree to watch.
        custom_cells: glob patterns over module names of your own cells: modules called once
            per timestep whose output is ``h_t`` or a tuple ``(h_t, c_t, ...)``.

    Attributes:
        fused: ``{module name: module}`` of the fused ``nn.RNN``/``nn.LSTM``/``nn.GRU`` watched.
        cells: ``{module name: module}`` of the cells watched (built-in and custom).
        armed: whether the hooks capture the calls they see.
        repeated_calls: names of fused modules called more than once in a captured pass.
        dropout_calls: names of fused modules that ran inter-layer dropout in a captured pass.
        failures: ``{module name: reason}`` of the modules the probe could not measure.

    Raises:
        ValueError: a ``custom_cells`` pattern matches no module.
    """

    def __init__(self, model: nn.Module, custom_cells: Sequence[str] = ()) -> None:
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
        self.repeated_calls: set[str] = set()
        self.dropout_calls: set[str] = set()
        self.failures: dict[str, str] = {}
        self._fused_captures: dict[str, list[FusedCapture]] = {}
        self._cell_calls: dict[str, _CellCalls] = {}
        self._handles: list[RemovableHandle] = []

    @property
    def layer_keys(self) -> list[LayerKey]:
        """The hidden-state keys of every fused layer and direction (model order), then of every cell."""
        fused = [key for name, module in self.fused.items() for key in fused_layer_keys(name, module)]
        return fused + [LayerKey(name) for name in self.cells]

    def attach(self) -> None:
        """Register the forward hooks (idempotent)."""
        if self._handles:
            return
        for name, module in self.fused.items():
            self._register(module, self._fused_hook(name), with_kwargs=True)
        for name, module in self.cells.items():
            self._register(module, self._cell_hook(name))

    def _register(self, module: nn.Module, hook: Callable[..., None], **kwargs: Any) -> None:
        probe_hook = _ProbeHook(hook, self._handles)
        probe_hook.handle = module.register_forward_hook(probe_hook, **kwargs)
        self._handles.append(probe_hook.handle)

    def detach(self) -> None:
        """Remove every hook and release what was captured: the model is as it was."""
        self.release()
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def arm(self) -> None:
        """Capture the next forward pass(es) until :meth:`compute` or :meth:`release`."""
        self.armed = True

    def disarm(self) -> None:
        """Stop capturing new calls; what was captured stays until :meth:`compute` or :meth:`release`."""
        self.armed = False

    @property
    def has_captures(self) -> bool:
        """Whether a forward pass was captured since the last release."""
        return bool(self._fused_captures or self._cell_calls)

    @property
    def has_gradients(self) -> bool:
        """Whether a backward pass has reached any captured output since the last release."""
        fused = any(capture.received_gradient for captures in self._fused_captures.values() for capture in captures)
        return fused or any(g is not None for calls in self._cell_calls.values() for g in calls.state_grads)

    def release(self) -> None:
        """Drop every captured tensor and gradient hook, and disarm."""
        self.armed = False
        for capture in [*(c for captures in self._fused_captures.values() for c in captures), *self._cell_calls.values()]:
            for handle in capture.handles:
                handle.remove()
        self._fused_captures.clear()
        self._cell_calls.clear()

    def _fused_hook(self, name: str) -> Callable[..., None]:
        def hook(module: nn.RNNBase, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
            if not self.armed or name in self.failures:
                return
            try:
                capture = capture_fused_call(module, args, kwargs, output)
            except Exception as error:  # a measurement must never stop the user's training
                self.failures[name] = f"{type(error).__name__}: {error}"
                return
            if capture is None:
                return
            captures = self._fused_captures.setdefault(name, [])
            if captures:
                self.repeated_calls.add(name)
            captures.append(capture)
            if capture.dropout_active:
                self.dropout_calls.add(name)

        return hook

    def _cell_hook(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            if not self.armed:
                return
            calls = self._cell_calls.setdefault(name, _CellCalls())
            state, cell = (output[0], output[1] if len(output) > 1 else None) if isinstance(output, tuple) else (output, None)
            for tensor, grads in ((state, calls.state_grads), (cell, calls.cell_grads)):
                if not isinstance(tensor, Tensor):
                    continue
                grads.append(None)
                if tensor.requires_grad:
                    calls.handles.append(tensor.register_hook(_accumulate_into(grads, len(grads) - 1)))

        return hook

    def compute(self, grad_scale: float = 1.0) -> ProbeResult:
        """Per-timestep norms of the captured pass, then :meth:`release`.

        A fused module whose measurement fails is left out and named in :attr:`failures`.

        Args:
            grad_scale: the AMP loss scale the backward pass ran with (hooks see scaled
                gradients); norms are divided by it.

        Returns:
            The :class:`ProbeResult`: ``(T,)`` norms of every measured layer, direction and
            state, and the fused layers' saturated fractions.
        """
        norms: dict[LayerKey, Tensor] = {}
        saturation: dict[LayerKey, Tensor] = {}
        try:
            with torch.no_grad():
                for name, captures in self._fused_captures.items():
                    capture = next((c for c in captures if c.received_gradient), captures[0])
                    try:
                        layer_grads = capture.timestep_grads(self.fused[name], grad_scale)
                    except Exception as error:  # a measurement must never stop the user's training
                        self.failures[name] = f"{type(error).__name__}: {error}"
                        continue
                    for layer, reverse in sorted(layer_grads):  # model order
                        grads, key = layer_grads[layer, reverse], LayerKey(name, layer, reverse)
                        norms[key] = timestep_norms(grads.state)
                        if grads.saturation is not None:
                            saturation[key] = grads.saturation
                        if grads.cell is not None:
                            norms[key.cell_state] = timestep_norms(grads.cell)
                for name, calls in self._cell_calls.items():
                    key = LayerKey(name)
                    norms[key] = _call_norms(calls.state_grads) / grad_scale
                    if calls.cell_grads:
                        norms[key.cell_state] = _call_norms(calls.cell_grads) / grad_scale
        finally:
            self.release()
        return ProbeResult(
            {key: value.float().cpu() for key, value in norms.items()},
            {key: float(value) for key, value in saturation.items()},
        )

    def notices(self) -> dict[tuple[str, str], str]:
        """What the probe could not measure exactly so far, ``{(kind, module name): message}``.

        Kinds: ``"repeated"`` (a module called several times in one step, see
        :attr:`repeated_calls`), ``"dropout"`` (:attr:`dropout_calls`) and ``"failure"`` (a
        module left out, :attr:`failures`). The messages are full sentences, for a warning.
        """
        return {
            **{
                ("repeated", name): f"{name!r} runs several times per training step; "
                "the first call that the loss reaches is measured."
                for name in self.repeated_calls
            },
            **{
                ("dropout", name): f"{name!r} applies inter-layer dropout, whose masks the fused kernel keeps to itself; its "
                "dL/dh_t is measured on the same layers without dropout, under the real upstream gradients."
                for name in self.dropout_calls
            },
            **{
                ("failure", name): f"cannot measure dL/dh_t of {name!r} ({reason}); it is left out, training goes on."
                for name, reason in self.failures.items()
            },
        }


def _accumulate_into(grads: list[Optional[Tensor]], slot: int) -> Callable[[Tensor], None]:
    """A tensor hook that adds the incoming gradient into ``grads[slot]``."""

    def hook(grad: Tensor) -> None:
        previous = grads[slot]
        grads[slot] = grad.detach() if previous is None else previous + grad.detach()

    return hook


def _call_norms(grads: list[Optional[Tensor]]) -> Tensor:
    """``(T,)`` Frobenius norms of per-call gradients; a call whose output got no gradient counts 0."""
    present = next(g for g in grads if g is not None) if any(g is not None for g in grads) else None
    if present is None:
        return torch.zeros(len(grads))
    return torch.stack(
        [torch.linalg.vector_norm(g.float()) if g is not None else present.new_zeros((), dtype=torch.float32) for g in grads]
    )
