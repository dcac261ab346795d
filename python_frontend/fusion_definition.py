"""`FusionDefinition`: the Python way to write a host program (docs/contract.md section 6).

    with FusionDefinition() as fd:
        x = fd.define_tensor(shape=[-1, H], dtype=DataType.BFloat16)
        ...
        d = fd.ops.moe_dispatch(x, idx, w, num_experts=E)
        out = fd.ops.moe_combine(d.recv_x, d.recv_topk_weights, ..., num_tokens=fd.ops.size(x, 0))
        fd.add_output(out)
    (combined,) = fd.execute([x_t, idx_t, w_t])

Ops check their operands as the program is built: a wrong dtype raises TypeError naming the op, the
operand and what was expected; a wrong rank raises ValueError.
"""
from __future__ import annotations

from collections import namedtuple
from typing import Optional, Sequence, Union

from fuser_moe.ir import (Add, Cast, CommunicatorBackend, DataType, DequantizeFp8, Extent, GroupedMm, HostIrContainer,
                          MoeCombine, MoeDispatch, Mul, QuantizeFp8, Silu, Size, TensorView, Val)
from fuser_moe.ir.base import type_check

DispatchResult = namedtuple("DispatchResult", MoeDispatch.OUTPUT_NAMES)
DispatchResult.__doc__ = "The TensorViews of a MoeDispatch, by name (docs/contract.md section 3)."
ScaledDispatchResult = namedtuple("ScaledDispatchResult", MoeDispatch.SCALED_OUTPUT_NAMES)
ScaledDispatchResult.__doc__ = ("The TensorViews of an fp8 MoeDispatch: DispatchResult's and recv_x_scales "
                                "(docs/contract.md section 12).")


def _scale_extent(hidden: Extent) -> Extent:
    """ceil(H / 128) as an extent: a constant where H is one."""
    return Extent(-(-hidden.value // 128)) if hidden.is_const else Extent()


def _differentiable_call(inputs) -> bool:
    """Grad mode is on and an input tensor requires grad: execute records a backward (section 11)."""
    import torch

    return torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in inputs)


def _operand(op: str, name: str, v) -> TensorView:
    type_check(isinstance(v, TensorView), op, name, "a TensorView defined in this FusionDefinition",
               type(v).__name__)
    return v


class Ops:
    """`fd.ops`: builders for every node. Each returns the TensorView(s) it defines."""

    def __init__(self, fd: "FusionDefinition"):
        self._fd = fd

    def _emit(self, expr, hints=None):
        self._fd._check_open()
        self._fd.container.push_back(expr, hints)
        return expr

    # ------------------------------------------------------------------ communication
    def moe_dispatch(self, x: TensorView, topk_idx: TensorView, topk_weights: TensorView, *, num_experts: int,
                     expert_to_rank: Optional[Sequence[int]] = None,
                     backend: Union[CommunicatorBackend, str] = CommunicatorBackend.AUTO,
                     max_recv_tokens: Optional[int] = None, x_scales: Optional[TensorView] = None,
                     num_sms: Optional[int] = None):
        """Dispatch tokens to the ranks that hold their experts (docs/contract.md section 3).

        Args:
            x: [T, H] Float, Half or BFloat16 tokens; or Float8_e4m3fn together with x_scales.
            topk_idx: [T, K] Int or Int32, global expert ids; -1 means no expert for that slot.
            topk_weights: [T, K] Float.
            num_experts: E, experts in all.
            expert_to_rank: optional placement [E]; contiguous blocks by default.
            backend: CommunicatorBackend.NCCL, CUDA or AUTO.
            max_recv_tokens: capacity C; outputs get leading extent C (docs/contract.md section 5).
            num_sms: the most SMs the CUDA backend's kernels of this node take (None: what its protocol
                wants); the rest stay free for compute beside the communication.
            x_scales: [T, ceil(H / 128)] Float, one scale per 128 columns of an fp8 x (docs/contract.md
                section 12); they travel with their row.
        Returns: DispatchResult of TensorViews: recv_x [V, H] (x's dtype), recv_topk_idx [V] Int,
            recv_topk_weights [V] Float, recv_src_idx [V] Int, recv_src_rank [V] Int, n_tokens_to_rank [W]
            Int, n_tokens_from_rank [W] Int, n_tokens_per_expert [E_local] Int; with x_scales a
            ScaledDispatchResult, which adds recv_x_scales [V, ceil(H / 128)] Float, row-aligned with recv_x.
        """
        op = "moe_dispatch"
        x, topk_idx, topk_weights = (_operand(op, n, v) for n, v in
                                     (("x", x), ("topk_idx", topk_idx), ("topk_weights", topk_weights)))
        if x_scales is not None:
            x_scales = _operand(op, "x_scales", x_scales)
        if max_recv_tokens is not None and (not isinstance(max_recv_tokens, int) or max_recv_tokens < 0):
            raise ValueError(f"{op}: max_recv_tokens must be a non-negative int or None, got {max_recv_tokens!r}")
        rows = Extent(max_recv_tokens) if max_recv_tokens is not None else Extent()
        hidden = x.axis(1) if x.ndim == 2 else Extent()
        world = self._fd._world_extent
        Int, Float = DataType.Int, DataType.Float
        outs = [TensorView(x.dtype, [rows, hidden]), TensorView(Int, [rows]), TensorView(Float, [rows]),
                TensorView(Int, [rows]), TensorView(Int, [rows]), TensorView(Int, [world]), TensorView(Int, [world]),
                TensorView(Int, [Extent()])]
        if x_scales is not None:
            blocks = x_scales.axis(1) if x_scales.ndim == 2 else _scale_extent(hidden)
            outs.append(TensorView(Float, [rows, blocks]))
        expr = MoeDispatch(outs, x, topk_idx, topk_weights, num_experts=num_experts, expert_to_rank=expert_to_rank,
                           backend=backend, max_recv_tokens=max_recv_tokens, x_scales=x_scales,
                           num_sms=num_sms)
        self._emit(expr, expr.output_names())
        return DispatchResult(*outs) if x_scales is None else ScaledDispatchResult(*outs)

    def moe_combine(self, x: TensorView, topk_weights: TensorView, src_idx: TensorView, src_rank: TensorView,
                    n_tokens_to_rank: TensorView, n_tokens_from_rank: TensorView, *, num_tokens: Union[int, Val],
                    backend: Union[CommunicatorBackend, str, None] = None,
                    num_sms: Optional[int] = None) -> TensorView:
        """Return weighted expert outputs to their tokens and sum them (docs/contract.md section 4).

        Args:
            x: [V, H] expert outputs, row-aligned with the dispatch's recv_x.
            topk_weights: [V] Float; src_idx: [V] Int; src_rank: [V] Int; n_tokens_to_rank and
                n_tokens_from_rank: [W] Int; all from the matching dispatch.
            num_tokens: T of this rank: an int, or a scalar such as `fd.ops.size(x, 0)`.
            backend: CommunicatorBackend.NCCL, CUDA or AUTO; when not given, the backend of the MoeDispatch
                whose outputs these are (AUTO when they come from none).
        Returns: combined_x [num_tokens, H] in x's dtype.
        """
        op = "moe_combine"
        operands = [_operand(op, n, v) for n, v in zip(MoeCombine.INPUT_NAMES[:6],
                                                       (x, topk_weights, src_idx, src_rank, n_tokens_to_rank,
                                                        n_tokens_from_rank))]
        if isinstance(num_tokens, bool) or not isinstance(num_tokens, (int, Val)) or isinstance(num_tokens, TensorView):
            raise TypeError(f"{op}: operand 'num_tokens' must be an int or a scalar Int, got {num_tokens!r}")
        if isinstance(num_tokens, int):
            if num_tokens < 0:
                raise ValueError(f"{op}: num_tokens must be non-negative, got {num_tokens}")
            count: Val = Val(DataType.Int, num_tokens)
            rows = Extent(num_tokens)
        else:
            count = num_tokens
            size_of = count.definition
            rows = size_of.in_a().axis(size_of.dim()) if isinstance(size_of, Size) else Extent()
        if backend is None:
            dispatch = next((v.definition for v in operands if isinstance(getattr(v, "definition", None), MoeDispatch)),
                            None)
            backend = dispatch.backend() if dispatch is not None else CommunicatorBackend.AUTO
        hidden = operands[0].axis(1) if operands[0].ndim == 2 else Extent()
        out = TensorView(operands[0].dtype, [rows, hidden])
        self._emit(MoeCombine(out, *operands, count, backend=backend, num_sms=num_sms), ["combined_x"])
        return out

    # ------------------------------------------------------------------ fp8
    def quantize_fp8(self, x: TensorView) -> tuple:
        """e4m3fn with one float32 scale per 128 columns (docs/contract.md section 12).

        Args:
            x: [T, H] Float, Half or BFloat16.
        Returns: (x_fp8 [T, H] Float8_e4m3fn, scales [T, ceil(H / 128)] Float): per block amax = max
            |float32(x)|, scale = amax / 448 (1 where that is 0), q = e4m3fn(clamp(x / scale, -448, 448)).
        """
        x = _operand("quantize_fp8", "x", x)
        rows = x.axis(0) if x.ndim == 2 else Extent()
        hidden = x.axis(1) if x.ndim == 2 else Extent()
        q = TensorView(DataType.Float8_e4m3fn, [rows, hidden])
        scales = TensorView(DataType.Float, [rows, _scale_extent(hidden)])
        self._emit(QuantizeFp8(q, scales, x), ["x_fp8", "scales"])
        return q, scales

    def dequantize_fp8(self, x_fp8: TensorView, scales: TensorView, dtype: DataType) -> TensorView:
        """cast(float32(q) * scale) per 128-column block (docs/contract.md section 12).

        Args:
            x_fp8: [T, H] Float8_e4m3fn. scales: [T, ceil(H / 128)] Float.
            dtype: Float, Half or BFloat16, the result's.
        Returns: [T, H] TensorView of dtype.
        """
        op = "dequantize_fp8"
        x_fp8, scales = _operand(op, "x_fp8", x_fp8), _operand(op, "scales", scales)
        type_check(isinstance(dtype, DataType), op, "dtype", "a DataType", dtype)
        out = TensorView(dtype, list(x_fp8.extents))
        self._emit(DequantizeFp8(out, x_fp8, scales, dtype))
        return out

    # ------------------------------------------------------------------ local compute
    def grouped_mm(self, a: TensorView, b: TensorView, group_sizes: TensorView) -> TensorView:
        """Rows of `a` [M, H_in] in contiguous groups of `group_sizes` [G], times `b` [G, H_in, H_out]."""
        a, b, group_sizes = (_operand("grouped_mm", n, v) for n, v in (("a", a), ("b", b), ("group_sizes", group_sizes)))
        out_cols = b.axis(2) if b.ndim == 3 else Extent()
        rows = a.axis(0) if a.ndim == 2 else Extent()
        out = TensorView(a.dtype, [rows, out_cols])
        self._emit(GroupedMm(out, a, b, group_sizes))
        return out

    def silu(self, a: TensorView) -> TensorView:
        a = _operand("silu", "a", a)
        out = TensorView(a.dtype, list(a.extents))
        self._emit(Silu(out, a))
        return out

    def mul(self, a: TensorView, b: TensorView) -> TensorView:
        a, b = _operand("mul", "a", a), _operand("mul", "b", b)
        out = TensorView(a.dtype, list(a.extents))
        self._emit(Mul(out, a, b))
        return out

    def add(self, a: TensorView, b: TensorView) -> TensorView:
        a, b = _operand("add", "a", a), _operand("add", "b", b)
        out = TensorView(a.dtype, list(a.extents))
        self._emit(Add(out, a, b))
        return out

    def cast(self, a: TensorView, dtype: DataType) -> TensorView:
        a = _operand("cast", "a", a)
        type_check(isinstance(dtype, DataType), "cast", "dtype", "a DataType", dtype)
        out = TensorView(dtype, list(a.extents))
        self._emit(Cast(out, a, dtype))
        return out

    def size(self, a: TensorView, dim: int) -> Val:
        """The extent of dimension `dim` of `a`, as a scalar Int."""
        a = _operand("size", "a", a)
        out = Val(DataType.Int)
        self._emit(Size(out, a, dim), ["size"])
        return out


class FusionDefinition:
    """Builds a host program inside a `with` block; `execute` runs it on this rank.

    Methods: `define_tensor`, `define_scalar`, `add_output`, `ops.*`, `execute`; `print(fd)` shows the
    host IR, one node a line.
    """

    def __init__(self):
        self.container = HostIrContainer()
        self.ops = Ops(self)
        self._open = False
        self._built = False
        self._world_extent = Extent()
        self._world_extent.name = "w"
        self._evaluators: dict = {}

    def __enter__(self) -> "FusionDefinition":
        if self._built:
            raise RuntimeError("this FusionDefinition is already built; make a new one")
        self._open = True
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._open = False
        if exc_type is None:
            if not self.container.outputs:
                raise ValueError("a FusionDefinition needs at least one output: call fd.add_output(...)")
            self._built = True

    def _check_open(self) -> None:
        if not self._open:
            raise RuntimeError("define the fusion inside `with FusionDefinition() as fd:`")

    def define_tensor(self, shape: Sequence[int], dtype: DataType = DataType.Float, name: Optional[str] = None) -> TensorView:
        """An input tensor. `shape` gives one entry per dimension: a size, or -1 for a size known at run time."""
        self._check_open()
        if not isinstance(dtype, DataType):
            raise TypeError(f"define_tensor: dtype must be a DataType, got {dtype!r}")
        extents = []
        for s in shape:
            if not isinstance(s, int) or s < -1:
                raise ValueError(f"define_tensor: shape entries must be sizes or -1, got {list(shape)}")
            extents.append(Extent() if s == -1 else Extent(s))
        return self.container.add_input(TensorView(dtype, extents), name or "t")  # type: ignore[return-value]

    def define_scalar(self, dtype: DataType = DataType.Int, name: Optional[str] = None) -> Val:
        """An input scalar (an int at run time)."""
        self._check_open()
        return self.container.add_input(Val(dtype), name or "n")

    def add_output(self, v: Val) -> None:
        self._check_open()
        self.container.add_output(v)

    def execute(self, inputs: Sequence, communicator=None, trace: bool = False, check_inputs: bool = True) -> list:
        """Runs the program on this rank and returns its outputs as a list.

        Args:
            inputs: tensors (and ints for scalar inputs) in definition order.
            communicator: the expert-parallel group; by default the initialised process group, else one
                from the launcher's environment, else a single rank (docs/contract.md section 6).
            trace: record a trace; read it from `fd.last_trace` (or the evaluator's `trace`).
            check_inputs: checked mode (docs/contract.md section 9).
        Returns: the outputs, tensors (ints for scalar outputs). When grad mode is on and an input requires
            grad, floating outputs carry a grad_fn: `backward()`, called on every rank, runs the program
            printed by `backward_ir()` (docs/contract.md section 11).
        """
        from fuser_moe.executors import HostIrEvaluator

        if not self._built:
            raise RuntimeError("execute() is called after the `with FusionDefinition() as fd:` block closes")
        key = (id(communicator), bool(trace), bool(check_inputs))
        evaluator = self._evaluators.get(key)
        if evaluator is None:
            evaluator = HostIrEvaluator(self.container, communicator, trace=trace, check_inputs=check_inputs)
            self._evaluators[key] = evaluator
        self.last_evaluator = evaluator
        if _differentiable_call(inputs):
            outputs, self.last_evaluator = self._differentiable().run(inputs, communicator, trace, check_inputs)
            return outputs
        return evaluator.run(inputs)

    # ------------------------------------------------------------------ autograd (docs/contract.md section 11)
    def _differentiable(self):
        from fuser_moe.executors.autograd import DifferentiableProgram

        if getattr(self, "_autograd", None) is None:
            self._autograd = DifferentiableProgram(self.container, getattr(self, "_routing", None))
        return self._autograd

    def backward_ir(self, requires_grad: Optional[Sequence[bool]] = None,
                    grad_outputs: Optional[Sequence[bool]] = None):
        """The backward host IR that `backward()` runs after `execute` with inputs that require grad.

        Args:
            requires_grad: per input, whether its gradient is wanted (default: every floating input).
            grad_outputs: per output, whether a gradient arrives for it (default: every floating output).
        Returns: the backward `HostIrContainer` (print it: one node a line, typed). Its inputs are the
            gradients of the outputs (`%grad_<name>`) and the forward values it reads; its outputs are
            the gradients of the inputs that get one, in input order.
        """
        if not self._built:
            raise RuntimeError("backward_ir() is called after the `with FusionDefinition() as fd:` block closes")
        prog = self._differentiable()
        needs = tuple(requires_grad) if requires_grad is not None else tuple(
            isinstance(v, TensorView) and v.dtype in (DataType.Float, DataType.Half, DataType.BFloat16)
            for v in self.container.inputs)
        defined = tuple(grad_outputs) if grad_outputs is not None else prog.all_grads()
        return prog.program(needs, defined).container

    @property
    def last_trace(self):
        ev = getattr(self, "last_evaluator", None)
        return None if ev is None else ev.trace

    @property
    def last_backward_trace(self):
        """The trace of the last backward run of this fusion (with `execute(..., trace=True)`), or None."""
        prog = getattr(self, "_autograd", None)
        ev = None if prog is None else prog.last_backward_evaluator
        return None if ev is None else ev.trace

    def __str__(self) -> str:
        return self.container.to_string()

    __repr__ = __str__
