"""Autograd through host IR (docs/contract.md section 11): backward host IRs and a differentiable run.

`build_backward(container, ...)` turns a forward host program into its backward host program, built
from each node's adjoint, which prints like the forward. The inputs of the backward program are the
gradients of the forward outputs (`%grad_<name>`) and the forward values the adjoints read (saved by
the forward run under their forward names); its outputs are the gradients of the forward inputs.

Adjoints, with the contract's rounding points:
  MoeDispatch(x, topk_idx, topk_weights):
    grad_x = MoeCombine(grad_recv_x, weights = 1, recv_src_idx, recv_src_rank, counts, T): unit weights
      make float32(1) * float32(g) exact, so this is the float32 sum of the rows of each (token, expert
      rank) in row order, cast, then the sum of those partials in ascending expert-rank order, cast.
    grad_topk_weights = GatherSlots(MoeCombine(ExpertOneHot(grad_recv_topk_weights, recv_topk_idx), 1,
      ...), topk_idx): each received row puts its weight gradient at the column of its global expert
      ([V, E] float32, zeros elsewhere); a token picks an expert at most once, so every sum adds zeros
      and the source reads back each pair's float32 gradient unchanged; -1 slots get 0.
  MoeCombine(y, w, src_idx, src_rank, counts, T), with the routing of the MoeDispatch that made src_idx:
    g = MoeDispatch(grad_combined_x, topk_idx, zeros) re-sends grad_out[t] to every expert rank of t,
      once per (token, expert rank); its rows align with y's (the row order of dispatch is fixed),
      capacity padding rows are zeros.
    grad_y = RowScale(g.recv_x, w) = cast(float32(w) * float32(g)); grad_w = RowDot(g.recv_x, y) in
      float32 (0 on padding rows).
  Local ops differentiate as torch does (GroupedMm, Silu, Mul, Add, Cast; Size has no gradient).
  A value read by several nodes gets the sum of their contributions, added in program order.

Every rank must run the same backward program in the same order, since it communicates. In checked
mode (the default) a backward first agrees with every peer on what it runs: a rank that calls
backward() alone, or runs the backward of another call, makes every rank raise instead of hang.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from functools import singledispatchmethod
from typing import Optional, Sequence

import torch

from fuser_moe.ir import (Add, Cast, DataType, Expr, Extent, GroupedMm, HostIrContainer, MoeCombine, MoeDispatch, Mul,
                          Silu, Size, TensorView, Val)
from fuser_moe.ir.grad_nodes import (ExpertOneHot, FullLike, GatherSlots, GroupedMmGradA, GroupedMmGradB, RowDot,
                                     RowScale, SiluGrad, SumToShape)

from .evaluator import HostIrEvaluator

# dtypes that carry gradients (fp8 payloads and integers do not)
DIFFERENTIABLE = (DataType.Float, DataType.Half, DataType.BFloat16)
_AGREE_PREFIX = "fuser_moe autograd: "


@dataclass(frozen=True)
class Routing:
    """What the adjoint of a MoeCombine needs from its dispatch: the source's topk_idx and the attributes.

    `recv_rows` is the leading extent of the dispatch's outputs (so the backward checks that the
    re-dispatched gradient has as many rows as the forward had); `dispatch` the forward node, if any.
    """

    topk_idx: TensorView
    num_experts: int
    expert_to_rank: Optional[tuple]
    backend: object
    max_recv_tokens: Optional[int]
    recv_rows: Extent
    world: Extent
    dispatch: Optional[MoeDispatch] = None


def routing_of_dispatch(d: MoeDispatch) -> Routing:
    return Routing(d.in_topk_idx(), d.num_experts(), d.expert_to_rank(), d.backend(), d.max_recv_tokens(),
                   d.out("recv_x").axis(0), d.out("n_tokens_to_rank").axis(0), d)


@dataclass
class BackwardProgram:
    """A backward host program and how to feed it.

    container: the backward host IR (print it). grad_of_output[j]: the container input that receives
    the gradient of forward output j, or None. saved: forward values the container reads, in input
    order after the gradients. grad_of_input[i]: the container output position of forward input i's
    gradient, or None (no gradient reaches it).
    """

    container: HostIrContainer
    grad_of_output: list
    saved: list
    grad_of_input: list
    comm_nodes: int = 0
    _evaluators: dict = field(default_factory=dict)

    def __str__(self) -> str:
        return self.container.to_string()


def _same_extents(a: TensorView, b: TensorView) -> bool:
    if a.ndim != b.ndim:
        return False
    return all(x is y or (x.is_const and y.is_const and x.value == y.value) for x, y in zip(a.extents, b.extents))


def live_values(container: HostIrContainer, needs_grad: Sequence[bool]) -> set:
    """Ids of the floating values that depend on an input that needs a gradient."""
    live = {id(v) for v, need in zip(container.inputs, needs_grad)
            if need and isinstance(v, TensorView) and v.dtype in DIFFERENTIABLE}
    for e in container.exprs:
        if isinstance(e, MoeDispatch):
            if id(e.in_x()) in live and e.in_x().dtype in DIFFERENTIABLE:
                live.add(id(e.out("recv_x")))
            if id(e.in_topk_weights()) in live:
                live.add(id(e.out("recv_topk_weights")))
            continue
        if isinstance(e, MoeCombine):
            if id(e.in_x()) in live or id(e.in_topk_weights()) in live:
                live.add(id(e.out_combined_x()))
            continue
        if isinstance(e, Size) or not any(id(v) in live for v in e.inputs):
            continue
        for out in e.outputs:
            if isinstance(out, TensorView) and out.dtype in DIFFERENTIABLE:
                live.add(id(out))
    return live


class _Builder:
    """Builds one backward program: walks the forward nodes in reverse and emits their adjoints."""

    def __init__(self, container: HostIrContainer, needs_grad: Sequence[bool], routing: dict):
        self.fwd = container
        self.live = live_values(container, needs_grad)
        self.routing = routing
        self.exprs: list = []  # (expr, hints)
        self.contrib: dict = {}  # id(value) -> [grad TVs]
        self.produced: set = set()
        self._n_extents = 0

    # -------------------------------------------------------------- helpers
    def emit(self, expr: Expr, hints) -> Expr:
        self.exprs.append((expr, hints))
        for out in expr.outputs:
            self.produced.add(id(out))
        return expr

    def like(self, v: TensorView, dtype: Optional[DataType] = None) -> TensorView:
        return TensorView(dtype or v.dtype, list(v.extents))

    def new_extent(self) -> Extent:
        e = Extent(name=f"b{self._n_extents}")
        self._n_extents += 1
        return e

    def contribute(self, v: Val, grad: TensorView) -> None:
        self.contrib.setdefault(id(v), []).append(grad)

    def grad_of(self, v: Val) -> Optional[TensorView]:
        """The accumulated gradient of `v` (contributions added in the order they were made)."""
        parts = self.contrib.get(id(v))
        if not parts:
            return None
        total = parts[0]
        for part in parts[1:]:
            out = self.like(total)
            self.emit(Add(out, total, part), [f"grad_{v.name}"])
            total = out
        self.contrib[id(v)] = [total]
        return total

    def needs(self, v: Val) -> bool:
        return id(v) in self.live

    # -------------------------------------------------------------- adjoints
    def adjoint(self, e: Expr) -> None:
        if isinstance(e, MoeDispatch):
            return self._dispatch(e)
        if isinstance(e, MoeCombine):
            return self._combine(e)
        grads = [self.grad_of(o) for o in e.outputs]
        if all(grad is None for grad in grads):
            return
        g = grads[0]
        if isinstance(e, GroupedMm):
            a, b, sizes = e.inputs
            if self.needs(a):
                ga = self.emit(GroupedMmGradA(self.like(a), g, b, sizes), [f"grad_{a.name}"]).outputs[0]
                self.contribute(a, ga)
            if self.needs(b):
                gb = self.emit(GroupedMmGradB(self.like(b), a, g, sizes), [f"grad_{b.name}"]).outputs[0]
                self.contribute(b, gb)
        elif isinstance(e, Silu):
            a = e.inputs[0]
            self.contribute(a, self.emit(SiluGrad(self.like(a), g, a), [f"grad_{a.name}"]).outputs[0])
        elif isinstance(e, Mul):
            a, b = e.inputs
            for operand, other in ((a, b), (b, a)):
                if self.needs(operand):
                    prod = self.emit(Mul(self.like(e.outputs[0]), g, other), [f"grad_{operand.name}"]).outputs[0]
                    self.contribute(operand, self._sum_to(prod, operand))
        elif isinstance(e, Add):
            for operand in e.inputs:
                if self.needs(operand):
                    self.contribute(operand, self._sum_to(g, operand))
        elif isinstance(e, Cast):
            a = e.inputs[0]
            if self.needs(a):
                self.contribute(a, self.emit(Cast(self.like(a), g, a.dtype), [f"grad_{a.name}"]).outputs[0])
        elif any(self.needs(v) for v in e.inputs):
            # Raised only where a gradient must pass through the node: never lose one silently.
            raise NotImplementedError(f"autograd: no adjoint for {e.op_name}, but a gradient must flow through "
                                      f"{e.to_string()} (detach its input, or run the fusion under torch.no_grad())")

    def _sum_to(self, grad: TensorView, operand: TensorView) -> TensorView:
        if _same_extents(grad, operand):
            return grad
        return self.emit(SumToShape(self.like(operand), grad, operand), [f"grad_{operand.name}"]).outputs[0]

    def _dispatch(self, d: MoeDispatch) -> None:
        x, topk_idx, topk_w = d.in_x(), d.in_topk_idx(), d.in_topk_weights()
        g_x = self.grad_of(d.out("recv_x"))
        g_w = self.grad_of(d.out("recv_topk_weights"))
        need_x = g_x is not None and self.needs(x)
        need_w = g_w is not None and self.needs(topk_w)
        if not (need_x or need_w):
            return
        src_idx, src_rank = d.out("recv_src_idx"), d.out("recv_src_rank")
        n_to, n_from = d.out("n_tokens_to_rank"), d.out("n_tokens_from_rank")
        ones = self.emit(FullLike(self.like(src_idx, DataType.Float), src_idx, value=1.0, dtype=DataType.Float),
                         ["unit_weights"]).outputs[0]
        tokens = x.axis(0)
        if need_x:
            out = TensorView(x.dtype, [tokens, x.axis(1)])
            self.emit(MoeCombine(out, g_x, ones, src_idx, src_rank, n_to, n_from, tokens, backend=d.backend()),
                      [f"grad_{x.name}"])
            self.contribute(x, out)
        if need_w:
            experts = Extent(d.num_experts())
            onehot = self.emit(ExpertOneHot(TensorView(DataType.Float, [src_idx.axis(0), experts]), g_w,
                                            d.out("recv_topk_idx"), num_experts=d.num_experts()),
                               [f"grad_{d.out('recv_topk_weights').name}_per_expert"]).outputs[0]
            per_token = TensorView(DataType.Float, [tokens, experts])
            self.emit(MoeCombine(per_token, onehot, ones, src_idx, src_rank, n_to, n_from, tokens,
                                 backend=d.backend()), [f"grad_{topk_w.name}_per_expert"])
            gw = self.emit(GatherSlots(self.like(topk_w), per_token, topk_idx), [f"grad_{topk_w.name}"]).outputs[0]
            self.contribute(topk_w, gw)

    def _combine(self, c: MoeCombine) -> None:
        y, w = c.in_x(), c.in_topk_weights()
        g = self.grad_of(c.out_combined_x())
        need_y = g is not None and self.needs(y)
        need_w = g is not None and self.needs(w)
        if not (need_y or need_w):
            return
        routing = self.routing.get(id(c)) or self._find_routing(c)
        idx = routing.topk_idx
        zeros = self.emit(FullLike(TensorView(DataType.Float, list(idx.extents)), idx, value=0.0,
                                   dtype=DataType.Float), ["no_weights"]).outputs[0]
        rows, world = routing.recv_rows, routing.world
        Int = DataType.Int
        outs = [TensorView(g.dtype, [rows, g.axis(1)]), TensorView(Int, [rows]), TensorView(DataType.Float, [rows]),
                TensorView(Int, [rows]), TensorView(Int, [rows]), TensorView(Int, [world]),
                TensorView(Int, [world]), TensorView(Int, [self.new_extent()])]
        self.emit(MoeDispatch(outs, g, idx, zeros, num_experts=routing.num_experts,
                              expert_to_rank=routing.expert_to_rank, backend=routing.backend,
                              max_recv_tokens=routing.max_recv_tokens),
                  [f"grad_{c.out_combined_x().name}_{n}" for n in MoeDispatch.OUTPUT_NAMES])
        g_rows = outs[0]
        if need_y:
            self.contribute(y, self.emit(RowScale(self.like(y), g_rows, w), [f"grad_{y.name}"]).outputs[0])
        if need_w:
            gw = self.emit(RowDot(TensorView(DataType.Float, [y.axis(0)]), g_rows, y, c.in_src_rank()),
                           [f"grad_{w.name}"]).outputs[0]
            self.contribute(w, gw)

    def _find_routing(self, c: MoeCombine) -> Routing:
        d = c.in_src_idx().definition
        ok = (isinstance(d, MoeDispatch) and c.in_src_idx() is d.out("recv_src_idx")
              and c.in_src_rank() is d.out("recv_src_rank") and c.in_n_tokens_to_rank() is d.out("n_tokens_to_rank")
              and c.in_n_tokens_from_rank() is d.out("n_tokens_from_rank"))
        if not ok:
            raise ValueError(
                f"autograd: the gradient of {c.to_string()} travels back along the routing of the MoeDispatch "
                f"whose recv_src_idx, recv_src_rank, n_tokens_to_rank and n_tokens_from_rank it reads, but "
                f"{c.in_src_idx().ref()} and its companions are not all outputs of one MoeDispatch of this fusion "
                f"(use fuser_moe.moe_combine, which takes the dispatch's routing, for a combine on its own)")
        return routing_of_dispatch(d)

    # -------------------------------------------------------------- program
    def build(self, grads_defined: Sequence[bool], needs_grad: Sequence[bool]) -> BackwardProgram:
        fwd = self.fwd
        grad_inputs: list = []
        grad_of_output: list = []
        for out, defined in zip(fwd.outputs, grads_defined):
            if defined and isinstance(out, TensorView) and id(out) in self.live:
                g = TensorView(out.dtype, list(out.extents))
                grad_inputs.append((g, f"grad_{out.name}"))
                self.contribute(out, g)
                grad_of_output.append(g)
            else:
                grad_of_output.append(None)
        for e in reversed(fwd.exprs):
            self.adjoint(e)
        input_grads = []
        for v, need in zip(fwd.inputs, needs_grad):
            input_grads.append(self.grad_of(v) if need and id(v) in self.live else None)
        # Forward values the adjoints read, in order of first use.
        grad_ids = {id(g) for g, _ in grad_inputs}
        saved, seen = [], set()
        for e, _ in self.exprs:
            for v in e.inputs:
                constant = v.is_const and not isinstance(v, TensorView)
                if constant or id(v) in self.produced or id(v) in grad_ids or id(v) in seen:
                    continue
                seen.add(id(v))
                saved.append(v)
        bwd = HostIrContainer()
        for v in saved:  # forward names first, so that they print as in the forward program
            bwd.register(v)
        for g, hint in grad_inputs:
            bwd.add_input(g, hint)
        for v in saved:
            bwd.inputs.append(v)
        for e, hints in self.exprs:
            bwd.push_back(e, hints)
        grad_of_input = []
        for g in input_grads:
            if g is None:
                grad_of_input.append(None)
            else:
                grad_of_input.append(len(bwd.outputs))
                bwd.outputs.append(g)
        comm_nodes = sum(isinstance(e, (MoeDispatch, MoeCombine)) for e, _ in self.exprs)
        return BackwardProgram(bwd, grad_of_output, saved, grad_of_input, comm_nodes)


def build_backward(container: HostIrContainer, needs_grad: Optional[Sequence[bool]] = None,
                   grads_defined: Optional[Sequence[bool]] = None, routing: Optional[dict] = None) -> BackwardProgram:
    """The backward program of `container`.

    Args:
        container: the forward host program.
        needs_grad: per forward input, whether its gradient is wanted (default: every floating input).
        grads_defined: per forward output, whether a gradient arrives for it (default: every floating one).
        routing: {id(MoeCombine node): Routing} for combines whose dispatch is not in the program.
    Returns: a `BackwardProgram`.
    """
    if needs_grad is None:
        needs_grad = [isinstance(v, TensorView) and v.dtype in DIFFERENTIABLE for v in container.inputs]
    if grads_defined is None:
        grads_defined = [isinstance(v, TensorView) and v.dtype in DIFFERENTIABLE for v in container.outputs]
    return _Builder(container, needs_grad, routing or {}).build(grads_defined, needs_grad)


# ---------------------------------------------------------------------------------------- evaluation
class BackwardEvaluator(HostIrEvaluator):
    """A `HostIrEvaluator` that also runs the local nodes of backward programs (ir/grad_nodes.py)."""

    @singledispatchmethod
    def handle(self, expr: Expr) -> None:
        super().handle(expr)

    @handle.register
    def _(self, expr: FullLike) -> None:
        a = self._value(expr.inputs[0])
        out = torch.full(a.shape, expr.attr("value"), dtype=expr.attr("dtype").to_torch(), device=a.device)
        self._bind(expr.outputs[0], out, "FullLike output")

    @handle.register
    def _(self, expr: ExpertOneHot) -> None:
        grad, expert = (self._value(v) for v in expr.inputs)
        self._bind(expr.outputs[0], expert_one_hot(grad, expert, expr.attr("num_experts")), "ExpertOneHot output")

    @handle.register
    def _(self, expr: GatherSlots) -> None:
        table, idx = (self._value(v) for v in expr.inputs)
        self._bind(expr.outputs[0], gather_slots(table, idx), "GatherSlots output")

    @handle.register
    def _(self, expr: RowScale) -> None:
        a, w = (self._value(v) for v in expr.inputs)
        self._bind(expr.outputs[0], (w.float().unsqueeze(1) * a.float()).to(a.dtype), "RowScale output")

    @handle.register
    def _(self, expr: RowDot) -> None:
        a, b, src_rank = (self._value(v) for v in expr.inputs)
        self._bind(expr.outputs[0], row_dot(a, b, src_rank), "RowDot output")

    @handle.register
    def _(self, expr: SiluGrad) -> None:
        grad, a = (self._value(v) for v in expr.inputs)
        self._bind(expr.outputs[0], torch.ops.aten.silu_backward(grad, a), "SiluGrad output")

    @handle.register
    def _(self, expr: SumToShape) -> None:
        grad, like = (self._value(v) for v in expr.inputs)
        self._bind(expr.outputs[0], grad.sum_to_size(like.shape).contiguous(), "SumToShape output")

    @handle.register
    def _(self, expr: GroupedMmGradA) -> None:
        grad, b, sizes = (self._value(v) for v in expr.inputs)
        self._bind(expr.outputs[0], grouped_mm_grad_a(grad, b, sizes), "GroupedMmGradA output")

    @handle.register
    def _(self, expr: GroupedMmGradB) -> None:
        a, grad, sizes = (self._value(v) for v in expr.inputs)
        self._bind(expr.outputs[0], grouped_mm_grad_b(a, grad, sizes), "GroupedMmGradB output")


def expert_one_hot(grad: torch.Tensor, expert: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[V, E] float32: grad[i] at column expert[i], zeros elsewhere and on rows whose expert is -1."""
    out = torch.zeros(grad.shape[0], num_experts, dtype=torch.float32, device=grad.device)
    valid = expert >= 0
    values = torch.where(valid, grad.float(), torch.zeros_like(grad, dtype=torch.float32))
    out.scatter_(1, expert.long().clamp(min=0).unsqueeze(1), values.unsqueeze(1))
    return out


def gather_slots(table: torch.Tensor, topk_idx: torch.Tensor) -> torch.Tensor:
    """[T, K] float32: table[t, topk_idx[t, k]], 0 for -1 slots."""
    idx = topk_idx.long()
    picked = table.gather(1, idx.clamp(min=0))
    return torch.where(idx >= 0, picked, torch.zeros_like(picked))


def row_dot(a: torch.Tensor, b: torch.Tensor, src_rank: torch.Tensor) -> torch.Tensor:
    """[V] float32 dot products of the rows of a and b; 0 on padding rows (src_rank -1)."""
    dots = (a.float() * b.float()).sum(dim=1)
    return torch.where(src_rank >= 0, dots, torch.zeros_like(dots))


def grouped_mm_grad_a(grad: torch.Tensor, b: torch.Tensor, group_sizes: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(grad.shape[0], b.shape[1], dtype=grad.dtype, device=grad.device)
    start = 0
    for g, n in enumerate(group_sizes.tolist()):
        if n:
            out[start:start + n] = grad[start:start + n] @ b[g].transpose(0, 1)
        start += n
    return out


def grouped_mm_grad_b(a: torch.Tensor, grad: torch.Tensor, group_sizes: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(group_sizes.numel(), a.shape[1], grad.shape[1], dtype=a.dtype, device=a.device)
    start = 0
    for g, n in enumerate(group_sizes.tolist()):
        if n:
            out[g] = a[start:start + n].transpose(0, 1) @ grad[start:start + n]
        start += n
    return out


# ---------------------------------------------------------------------------------------- agreement
_backward_calls: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def next_call_number(comm) -> int:
    """Numbers the differentiable runs on `comm` (the same sequence on every rank that runs the same program)."""
    n = _backward_calls.get(comm, 0)
    _backward_calls[comm] = n + 1
    return n


def _running(rank: int, what: str) -> tuple:
    # The shape of a checked-mode verdict (kind, message): a peer that is in a forward check instead
    # reads it as "rank r rejected its input (RuntimeError: ...)" and raises too.
    return ("RuntimeError", f"{_AGREE_PREFIX}rank {rank} is running backward() of {what}; every rank must "
                            "call backward() of the same call, in the same order, since it communicates")


def agree_on_backward(comm, what: str) -> None:
    """Every rank says which backward it is about to run; any disagreement raises on every rank.

    A peer that is running something else (a forward call's checks) gets an error from its own check;
    a peer that runs nothing makes this rank raise TimeoutError within the communicator's timeout.
    """
    if comm is None or not comm.is_distributed:
        return
    try:
        verdicts = comm.exchange(_running(comm.rank, what))
    except TimeoutError as exc:
        raise TimeoutError(f"{_AGREE_PREFIX}rank {comm.rank} waited {comm.timeout_s:g} s for every rank to call "
                           f"backward() of {what}, in vain: every rank must call backward(), since it "
                           f"communicates ({exc})") from exc
    problems = []
    for peer, verdict in enumerate(verdicts):
        if verdict == _running(peer, what):
            continue
        if verdict is None:
            problems.append(f"rank {peer} did not call backward() of {what}: it is in a forward call (the checks "
                            "of a MoeDispatch or MoeCombine)")
        elif isinstance(verdict, tuple) and len(verdict) == 2 and str(verdict[1]).startswith(_AGREE_PREFIX):
            theirs = str(verdict[1])[len(_AGREE_PREFIX):].split("backward() of ", 1)[-1].split("; every rank")[0]
            problems.append(f"rank {peer} is running backward() of {theirs}, this rank backward() of {what}")
        else:
            problems.append(f"rank {peer} is doing something else (it sent {verdict!r})")
    if problems:
        raise RuntimeError(f"{_AGREE_PREFIX}ranks disagree about backward(): " + "; ".join(problems)
                           + "; every rank must call backward() of the same calls, in the same order")


def run_backward(prog: BackwardProgram, comm, values: list, trace: bool, check_inputs: bool, what: str) -> list:
    """Runs a backward program on this rank (after agreeing with every peer in checked mode)."""
    if check_inputs and prog.comm_nodes:
        agree_on_backward(comm, what)
    key = (id(comm), trace, check_inputs)
    evaluator = prog._evaluators.get(key)
    if evaluator is None:
        evaluator = prog._evaluators[key] = BackwardEvaluator(prog.container, comm, trace=trace,
                                                              check_inputs=check_inputs)
    return evaluator.run(values), evaluator


# ---------------------------------------------------------------------------------------- differentiable runs
def _describe(container: HostIrContainer) -> str:
    ops = [e.op_name for e in container.exprs if isinstance(e, (MoeDispatch, MoeCombine))]
    return "a fusion of " + (", ".join(ops) if ops else "local ops")


class DifferentiableProgram:
    """A forward host program that runs under autograd: forward saves what its backward reads.

    Args:
        container: the forward host program.
        routing: {id(MoeCombine node): Routing} for combines whose dispatch is not in the program.
    """

    def __init__(self, container: HostIrContainer, routing: Optional[dict] = None):
        self.container = container
        self.routing = routing or {}
        self._programs: dict = {}
        self._forwards: dict = {}
        self.last_backward: Optional[BackwardProgram] = None
        self.last_backward_evaluator: Optional[BackwardEvaluator] = None

    def program(self, needs_grad: tuple, grads_defined: tuple) -> BackwardProgram:
        key = (needs_grad, grads_defined)
        prog = self._programs.get(key)
        if prog is None:
            prog = self._programs[key] = build_backward(self.container, needs_grad, grads_defined, self.routing)
        return prog

    def all_grads(self) -> tuple:
        return tuple(isinstance(v, TensorView) and v.dtype in DIFFERENTIABLE for v in self.container.outputs)

    def forward_evaluator(self, needs_grad: tuple, communicator, trace: bool, check_inputs: bool):
        """An evaluator of the forward program that also returns the values the backward reads."""
        key = (needs_grad, id(communicator), trace, check_inputs)
        found = self._forwards.get(key)
        if found is None:
            prog = self.program(needs_grad, self.all_grads())
            augmented = HostIrContainer()
            augmented.inputs, augmented.exprs = self.container.inputs, self.container.exprs
            augmented.outputs = list(self.container.outputs) + list(prog.saved)
            found = self._forwards[key] = (HostIrEvaluator(augmented, communicator, trace=trace,
                                                           check_inputs=check_inputs), prog.saved)
        return found

    def run(self, inputs: Sequence, communicator=None, trace: bool = False, check_inputs: bool = True):
        """Runs the forward program under autograd; returns (outputs with grad_fn, the forward evaluator)."""
        needs = tuple(isinstance(t, torch.Tensor) and t.requires_grad and isinstance(v, TensorView)
                      and v.dtype in DIFFERENTIABLE for t, v in zip(inputs, self.container.inputs))
        if len(inputs) != len(self.container.inputs):
            raise ValueError(f"the fusion takes {len(self.container.inputs)} inputs "
                             f"({', '.join(v.typed() for v in self.container.inputs)}), got {len(inputs)}")
        evaluator, saved = self.forward_evaluator(needs, communicator, trace, check_inputs)
        state = _RunState(self, evaluator, needs, saved, trace, check_inputs)
        tensors = [t for t in inputs if isinstance(t, torch.Tensor)]
        positions = [i for i, t in enumerate(inputs) if isinstance(t, torch.Tensor)]
        state.positions, state.inputs_template = positions, list(inputs)
        outputs = _FusionFunction.apply(state, *tensors)
        return list(outputs), evaluator


class _RunState:
    """What one differentiable run carries from its forward to its backward."""

    def __init__(self, program, evaluator, needs, saved, trace, check_inputs):
        self.program, self.evaluator, self.needs, self.saved = program, evaluator, needs, saved
        self.trace, self.check_inputs = trace, check_inputs
        self.positions: list = []
        self.inputs_template: list = []
        self.saved_kinds: list = []  # per saved value: ("tensor", position in saved_tensors) or ("int", value)
        self.call = 0
        self.communicator = None


class _FusionFunction(torch.autograd.Function):
    """Runs a forward program with the evaluator; backward runs its backward program (on every rank)."""

    @staticmethod
    def forward(ctx, state: _RunState, *tensors):
        inputs = list(state.inputs_template)
        for pos, t in zip(state.positions, tensors):
            inputs[pos] = t
        results = state.evaluator.run(inputs)
        n_out = len(state.program.container.outputs)
        outputs, saved_values = results[:n_out], results[n_out:]
        state.communicator = state.evaluator.communicator
        state.call = next_call_number(state.communicator)
        to_save = [torch.empty(0)]  # a marker, so that a backward through a freed graph is always detected
        for value in saved_values:
            if isinstance(value, torch.Tensor):
                state.saved_kinds.append(("tensor", len(to_save)))
                to_save.append(value)
            else:
                state.saved_kinds.append(("int", int(value)))
        ctx.save_for_backward(*to_save)
        ctx.state = state
        ctx.set_materialize_grads(False)
        outputs = [o.clone() if any(o is t for t in tensors) else o for o in outputs]  # an input passed through
        ctx.mark_non_differentiable(*[o for o, v in zip(outputs, state.program.container.outputs)
                                      if isinstance(o, torch.Tensor)
                                      and not (isinstance(v, TensorView) and v.dtype in DIFFERENTIABLE)])
        return tuple(outputs)

    @staticmethod
    def backward(ctx, *grads):
        state: _RunState = ctx.state
        try:
            saved_tensors = ctx.saved_tensors
        except RuntimeError as exc:
            raise RuntimeError(
                f"{_AGREE_PREFIX}backward() through {_describe(state.program.container)} a second time: the first "
                "backward() freed what it saved (pass retain_graph=True to the first backward() to run it twice)"
            ) from exc
        fwd = state.program.container
        defined = tuple(g is not None and isinstance(v, TensorView) and v.dtype in DIFFERENTIABLE
                        for g, v in zip(grads, fwd.outputs))
        prog = state.program.program(state.needs, defined)
        comm = state.communicator
        what = (f"fusion call #{state.call} ({_describe(fwd)}, gradients for inputs "
                f"{[i for i, n in enumerate(state.needs) if n]} from outputs {[j for j, d in enumerate(defined) if d]})")
        by_id = {id(v): kind for v, kind in zip(state.saved, state.saved_kinds)}
        values = [g.contiguous() for g, slot in zip(grads, prog.grad_of_output) if slot is not None]
        for v in prog.saved:
            kind, where = by_id[id(v)]
            values.append(saved_tensors[where] if kind == "tensor" else where)
        results, evaluator = run_backward(prog, comm, values, state.trace, state.check_inputs, what)
        state.program.last_backward, state.program.last_backward_evaluator = prog, evaluator
        input_grads = [None if slot is None else results[slot] for slot in prog.grad_of_input]
        return (None,) + tuple(input_grads[pos] for pos in state.positions)
