"""`HostIrEvaluator`: runs a host IR on this rank (docs/contract.md section 7).

One handler per node type, chosen with `functools.singledispatchmethod` (nvFuser's `handle(Node*)`).
A handler reads its inputs from the environment, calls one runtime function and binds the outputs;
it holds no algorithm. Every bound tensor is checked against its TensorView, and a value is dropped
from the environment after its last use.
"""
from __future__ import annotations

import os
import time
from functools import singledispatchmethod
from typing import Optional, Sequence

import torch

from fuser_moe.backends import fp8, payload
from fuser_moe.backends.common import CommStats
from fuser_moe.backends.communicator import Communicator
from fuser_moe.ir import (Add, Cast, DataType, DequantizeFp8, Expr, Extent, GroupedMm, HostIrContainer, MoeCombine,
                          MoeDispatch, Mul, QuantizeFp8, Silu, Size, TensorView, Val)

from .backend_selection import get_backend, resolve_backend
from .trace import Trace, TraceEvent


def _describe(tv: Val, value) -> tuple:
    if isinstance(value, torch.Tensor):
        try:
            dtype = DataType.from_torch(value.dtype).short
        except TypeError:
            dtype = str(value.dtype).replace("torch.", "")
        return (tv.ref(), tuple(value.shape), dtype)
    return (tv.ref(), (), type(value).__name__)


class HostIrEvaluator:
    """Evaluates a `HostIrContainer` on this rank.

    Args:
        container: the host program.
        communicator: the expert-parallel group; when None it is found from the environment at the
            first run (docs/contract.md section 6), on the device of the first input tensor.
        trace: record a `TraceEvent` per expression in `self.trace`. `FUSER_MOE_TRACE=DIR` turns
            tracing on and writes `DIR/trace_rank{r}.json` after every run.
        check_inputs: checked mode of docs/contract.md section 9; False skips input validation.
    """

    def __init__(self, container: HostIrContainer, communicator: Optional[Communicator] = None,
                 trace: bool = False, check_inputs: bool = True):
        self.container = container
        self.communicator = communicator
        self.trace_dir = os.environ.get("FUSER_MOE_TRACE") or None
        self.tracing = bool(trace or self.trace_dir)
        self.check_inputs = check_inputs
        self.trace = Trace(communicator.rank if communicator is not None else 0)
        self._runs = 0
        self._env: dict = {}
        self._extents: dict = {}
        self._handles: dict = {}  # id(MoeDispatch) -> its DispatchHandle, for the combine of its outputs
        self._last_uses = container.last_uses()

    # ------------------------------------------------------------------ binding
    def _value(self, v: Val):
        if isinstance(v, Extent) or (v.is_const and not isinstance(v, TensorView)):
            if v.is_const:
                return v.value
            if id(v) in self._extents:
                return self._extents[id(v)]
        if id(v) not in self._env:
            raise RuntimeError(f"{v.ref()} is read before it is defined (or after its last use)")
        return self._env[id(v)]

    def _bind_extent(self, extent: Extent, size: int, what: str, dim: int = 0, shape=None, type_str: str = "") -> None:
        given = f" (given shape {shape}, expected {type_str})" if shape is not None else ""
        if extent.is_const:
            if extent.value != size:
                raise TypeError(f"{what}: dimension {dim} must have size {extent.value}, got {size}{given}")
            return
        known = self._extents.get(id(extent))
        if known is not None and known != size:
            raise TypeError(f"{what}: dimension {dim} (extent {extent.ref()}) is {known} elsewhere in this run, "
                            f"got {size}{given}")
        self._extents[id(extent)] = size

    def _bind(self, v: Val, value, role: str) -> None:
        """Binds `value` to `v` after checking it against v's type; a mismatch is a TypeError naming v."""
        what = f"{role} {v.ref()}"
        if isinstance(v, TensorView):
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"{what} must be a torch.Tensor of type {v.type_str()}, got {type(value).__name__}")
            if value.dtype != v.dtype.to_torch():
                hint = ""
                try:
                    given = DataType.from_torch(value.dtype)
                    hint = (f"; to bind {value.dtype} tensors, define it with dtype=DataType.{given.name}"
                            if role == "input" else "")
                except (TypeError, ValueError, KeyError):
                    pass
                raise TypeError(f"{what} must have dtype {v.dtype.to_torch()} (DataType.{v.dtype.name}, "
                                f"{v.type_str()}), got {value.dtype}{hint}")
            if value.dim() != v.ndim:
                raise TypeError(f"{what} must be {v.ndim}-D ({v.type_str()}), got shape {list(value.shape)}")
            for dim, (extent, size) in enumerate(zip(v.extents, value.shape)):
                self._bind_extent(extent, int(size), what, dim, list(value.shape), v.type_str())
        else:
            if isinstance(value, torch.Tensor):
                value = int(value.item())
            if not isinstance(value, int):
                raise TypeError(f"{what} must be an int, got {type(value).__name__}")
        self._env[id(v)] = value

    # ------------------------------------------------------------------ running
    def _communicator(self, inputs: Sequence) -> Communicator:
        if self.communicator is None:
            device = next((t.device for t in inputs if isinstance(t, torch.Tensor)), torch.device("cpu"))
            self.communicator = Communicator.from_environment(device=device)
            self.trace.rank = self.communicator.rank
        return self.communicator

    def run(self, inputs: Sequence) -> list:
        """Binds `inputs` to the container's inputs, runs every expression, returns the outputs."""
        c = self.container
        if len(inputs) != len(c.inputs):
            raise ValueError(f"the fusion takes {len(c.inputs)} inputs "
                             f"({', '.join(v.typed() for v in c.inputs)}), got {len(inputs)}")
        self._env, self._extents = {}, {}
        self._communicator(inputs)
        comm_positions = [i for i, e in enumerate(c.exprs) if isinstance(e, (MoeDispatch, MoeCombine))]
        try:
            for v, value in zip(c.inputs, inputs):
                self._bind(v, value, "input")
        except (TypeError, ValueError) as exc:
            self._fail_together(exc, comm_positions)
        outputs_ids = {id(v) for v in c.outputs}
        try:
            for i, expr in enumerate(c.exprs):
                self._position = i
                try:
                    self._run_expr(expr)
                except (TypeError, ValueError, RuntimeError) as exc:
                    if i not in comm_positions:
                        self._fail_together(exc, [p for p in comm_positions if p > i])
                    raise
                finally:
                    self.communicator.context = None
                for v in expr.inputs:  # free what no later expression reads
                    if self._last_uses.get(id(v)) == i and id(v) not in outputs_ids:
                        self._env.pop(id(v), None)
            results = [self._value(v) for v in c.outputs]
        finally:
            self._env, self._handles = {}, {}
        self._runs += 1
        if self.tracing:
            self.trace.finish_run()
            if self.trace_dir:
                self.trace.to_chrome(os.path.join(self.trace_dir, f"trace_rank{self.trace.rank}.json"))
        return results

    def _fail_together(self, error: BaseException, later_comm_nodes: list) -> None:
        """Raises `error` on this rank, and on every peer too when a communication node is still ahead.

        In checked mode every communication node starts by agreeing on errors with all ranks
        (`Communicator.agree`), so a rank that fails before reaching one takes part in that agreement
        instead: the peers raise "rank r rejected its input" rather than wait for it forever.
        """
        if later_comm_nodes and self.check_inputs and self.communicator.is_distributed:
            node = self.container.exprs[later_comm_nodes[0]]
            self.communicator.context = (f"{node.op_name} (node {later_comm_nodes[0]})", None)
            try:
                self.communicator.agree(error)
            finally:
                self.communicator.context = None
        raise error

    def _run_expr(self, expr: Expr) -> None:
        try:
            self._run_expr_unnamed(expr)
        except Exception as exc:  # noqa: BLE001 - re-raised, same type, with the node named
            _name_node(exc, expr)
            raise

    def _run_expr_unnamed(self, expr: Expr) -> None:
        if not self.tracing:
            self._stats = CommStats()
            self._choice = (None, None)
            self.handle(expr)
            return
        device = next((self._env[id(v)].device for v in expr.inputs
                       if isinstance(v, TensorView) and id(v) in self._env), torch.device("cpu"))
        event = TraceEvent(op=expr.op_name, node=expr.to_string(), rank=self.trace.rank, run=self._runs,
                           inputs=[_describe(v, self._value(v)) for v in expr.inputs])
        self._stats, self._choice = CommStats(), (None, None)
        cuda_events = None
        if device.type == "cuda":
            cuda_events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            cuda_events[0].record()
        event.start_us = time.time() * 1e6
        t0 = time.perf_counter()
        self.handle(expr)
        if cuda_events is not None:
            cuda_events[1].record()
            event._events = cuda_events
        event.wall_ms = (time.perf_counter() - t0) * 1e3
        event.backend, event.reason = self._choice
        event.outputs = [_describe(v, self._env[id(v)]) for v in expr.outputs]
        event.bytes_sent, event.bytes_recv = self._stats.bytes_sent, self._stats.bytes_recv
        event.host_syncs, event.sync_reasons = self._stats.host_syncs, list(self._stats.sync_reasons)
        event.path, event.sms = self._stats.path or None, self._stats.sms or None
        self.trace.add(event)

    def _backend_for(self, expr, device: torch.device):
        """Resolves the node's backend. In checked mode every store exchange of the node (backend
        selection's included) carries which node runs and on which backend, so that ranks that disagree
        on either raise together at once (docs/contract.md section 9)."""
        comm = self.communicator
        node = f"{expr.op_name} (node {getattr(self, '_position', 0)})"
        if self.check_inputs:
            comm.context = (node, None)
        name, reason = resolve_backend(expr.backend(), device, comm)
        if self.check_inputs:
            comm.context = (node, name)
        self._choice = (name, reason)
        return get_backend(name)

    # ------------------------------------------------------------------ handlers
    @singledispatchmethod
    def handle(self, expr: Expr) -> None:
        raise NotImplementedError(f"HostIrEvaluator has no handler for {type(expr).__name__}")

    @handle.register
    def _(self, expr: MoeDispatch) -> None:
        x, idx, w = (self._value(v) for v in (expr.in_x(), expr.in_topk_idx(), expr.in_topk_weights()))
        scales = self._value(expr.in_x_scales()) if expr.has_scales() else None
        backend = self._backend_for(expr, x.device)
        out, handle = payload.dispatch(backend, self.communicator, x, idx, w, x_scales=scales,
                                       num_experts=expr.num_experts(), expert_to_rank=expr.expert_to_rank(),
                                       max_recv_tokens=expr.max_recv_tokens(), check_inputs=self.check_inputs,
                                       stats=self._stats, return_handle=True, num_sms=expr.num_sms())
        self._handles[id(expr)] = handle
        for name, value in zip(out._fields, out):
            self._bind(expr.out(name), value, f"{expr.op_name} output")

    @handle.register
    def _(self, expr: MoeCombine) -> None:
        x = self._value(expr.in_x())
        backend = self._backend_for(expr, x.device)
        out = backend.combine(self.communicator, x, self._value(expr.in_topk_weights()),
                              self._value(expr.in_src_idx()), self._value(expr.in_src_rank()),
                              self._value(expr.in_n_tokens_to_rank()), self._value(expr.in_n_tokens_from_rank()),
                              int(self._value(expr.in_num_tokens())), check_inputs=self.check_inputs,
                              stats=self._stats, handle=self._handle_for(expr), num_sms=expr.num_sms())
        self._bind(expr.out_combined_x(), out, f"{expr.op_name} output")

    def _handle_for(self, expr: MoeCombine):
        """The handle of the dispatch whose recv_src_idx and recv_src_rank this combine reads, if any (the
        backend checks that the tensors are that dispatch's, and ignores a handle that does not serve)."""
        source = expr.in_src_idx().definition
        if isinstance(source, MoeDispatch) and expr.in_src_rank().definition is source:
            return self._handles.get(id(source))
        return None

    @handle.register
    def _(self, expr: GroupedMm) -> None:
        out = grouped_mm(self._value(expr.in_a()), self._value(expr.in_b()), self._value(expr.in_group_sizes()))
        self._bind(expr.out(), out, f"{expr.op_name} output")

    @handle.register
    def _(self, expr: Silu) -> None:
        self._bind(expr.out(), torch.nn.functional.silu(self._value(expr.in_a())), "Silu output")

    @handle.register
    def _(self, expr: Mul) -> None:
        self._bind(expr.out(), self._value(expr.in_a()) * self._value(expr.in_b()), "Mul output")

    @handle.register
    def _(self, expr: Add) -> None:
        self._bind(expr.out(), self._value(expr.in_a()) + self._value(expr.in_b()), "Add output")

    @handle.register
    def _(self, expr: Cast) -> None:
        self._bind(expr.out(), self._value(expr.in_a()).to(expr.dtype().to_torch()), "Cast output")

    @handle.register
    def _(self, expr: QuantizeFp8) -> None:
        q, scales = fp8.quantize_fp8(self._value(expr.in_x()))
        self._bind(expr.out_x_fp8(), q, "QuantizeFp8 output")
        self._bind(expr.out_scales(), scales, "QuantizeFp8 output")

    @handle.register
    def _(self, expr: DequantizeFp8) -> None:
        out = fp8.dequantize_fp8(self._value(expr.in_x_fp8()), self._value(expr.in_scales()), expr.dtype().to_torch())
        self._bind(expr.outputs[0], out, "DequantizeFp8 output")

    @handle.register
    def _(self, expr: Size) -> None:
        self._bind(expr.out(), int(self._value(expr.in_a()).shape[expr.dim()]), "Size output")


def _name_node(exc: BaseException, expr: Expr) -> None:
    """Appends the node an error came from to its message (as torch.fx does), keeping its type:
    `... while executing %recv_x:bf16[i3,7168], ... = MoeDispatch[...](%x, %topk_idx, %topk_weights)`."""
    where = f"while executing {expr.to_string()}"
    if getattr(exc, "_fuser_moe_node", None) is not None:
        return
    exc._fuser_moe_node = where
    if exc.args and isinstance(exc.args[0], str):
        exc.args = (f"{exc.args[0]}\n\n{where}",) + tuple(exc.args[1:])
    elif not exc.args:
        exc.args = (where,)
    else:
        exc.add_note(where)


def grouped_mm(a: torch.Tensor, b: torch.Tensor, group_sizes: torch.Tensor) -> torch.Tensor:
    """out[rows of group g] = a[rows of group g] @ b[g]; rows past the groups (capacity padding) are 0.

    Args: a [M, H_in], b [G, H_in, H_out] of a's dtype, group_sizes [G] integer with sum <= M.
    """
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"grouped_mm: a is {list(a.shape)} but b is {list(b.shape)}: inner sizes differ")
    if group_sizes.numel() != b.shape[0]:
        raise ValueError(f"grouped_mm: {group_sizes.numel()} group sizes for {b.shape[0]} matrices in b")
    sizes = group_sizes.tolist()
    if sum(sizes) > a.shape[0] or min(sizes, default=0) < 0:
        raise ValueError(f"grouped_mm: group sizes {sizes} do not fit the {a.shape[0]} rows of a")
    out = torch.zeros(a.shape[0], b.shape[2], dtype=a.dtype, device=a.device)
    start = 0
    for g, n in enumerate(sizes):
        if n:
            out[start:start + n] = a[start:start + n] @ b[g]
        start += n
    return out
