"""The nodes of the host IR: `MoeDispatch`, `MoeCombine` and the local compute ops.

Each node checks its operands when it is built (dtype and rank; a wrong dtype is a TypeError naming
the op and the operand, a wrong rank or a bad attribute a ValueError) and offers named accessors, so
call sites read `node.in_topk_idx()` rather than `node.inputs[1]`.
"""
from __future__ import annotations

import enum
from typing import Optional, Sequence

from .base import Expr, TensorView, Val, shape_check, type_check
from .dtypes import FLOATING_TYPES, FP8_TYPES, INDEX_TYPES, DataType


class CommunicatorBackend(enum.Enum):
    """Which transport a communication node uses. AUTO resolves per node at run time (docs/contract.md section 7)."""

    NCCL = "nccl"
    CUDA = "cuda"
    AUTO = "auto"

    @staticmethod
    def parse(value) -> "CommunicatorBackend":
        if isinstance(value, CommunicatorBackend):
            return value
        try:
            return CommunicatorBackend(str(value).lower())
        except ValueError:
            raise ValueError(f"unknown backend {value!r}: expected one of nccl, cuda, auto") from None


def _tv(op: str, name: str, v: Val) -> TensorView:
    type_check(isinstance(v, TensorView), op, name, "a TensorView", type(v).__name__)
    return v  # type: ignore[return-value]


def _floating(op: str, name: str, v: TensorView) -> None:
    type_check(v.dtype in FLOATING_TYPES, op, name, "Float, Half or BFloat16", v.dtype.name)


def _rank(op: str, name: str, v: TensorView, ndim: int) -> None:
    shape_check(v.ndim == ndim, op, f"operand '{name}' must be {ndim}-D, got {v.ndim}-D {v.type_str()}")


def _scale_blocks(hidden: int) -> int:
    return -(-hidden // 128)


def _check_scales(op: str, x_name: str, x: TensorView, s_name: str, scales: TensorView) -> None:
    """An fp8 tensor [T, H] and its scales [T, ceil(H / 128)] Float (docs/contract.md section 12)."""
    type_check(x.dtype in FP8_TYPES, op, x_name, f"Float8_e4m3fn when '{s_name}' are given", x.dtype.name)
    type_check(scales.dtype == DataType.Float, op, s_name, "Float (float32)", scales.dtype.name)
    _rank(op, x_name, x, 2)
    _rank(op, s_name, scales, 2)
    rows, cols = x.axis(0), x.axis(1)
    s_rows, s_cols = scales.axis(0), scales.axis(1)
    if rows.is_const and s_rows.is_const:
        shape_check(rows.value == s_rows.value, op,
                    f"'{s_name}' {scales.type_str()} must have one row per row of '{x_name}' {x.type_str()}")
    if cols.is_const and s_cols.is_const:
        shape_check(s_cols.value == _scale_blocks(cols.value), op,
                    f"'{s_name}' {scales.type_str()} must have ceil(H / 128) = {_scale_blocks(cols.value)} "
                    f"columns for '{x_name}' {x.type_str()}")


def _check_num_sms(op: str, num_sms) -> None:
    shape_check(num_sms is None or (isinstance(num_sms, int) and not isinstance(num_sms, bool) and num_sms > 0), op,
                f"num_sms must be a positive int (the most SMs its kernels take) or None, got {num_sms!r}")


class MoeDispatch(Expr):
    """Sends each token to the ranks that hold its experts; outputs one row per (token, local expert).

    Inputs: x [T, H] floating, topk_idx [T, K] Int or Int32, topk_weights [T, K] Float; with an fp8 x
    (Float8_e4m3fn) also x_scales [T, ceil(H / 128)] Float (docs/contract.md section 12).
    Outputs (docs/contract.md section 3): recv_x, recv_topk_idx, recv_topk_weights, recv_src_idx, recv_src_rank,
    n_tokens_to_rank, n_tokens_from_rank, n_tokens_per_expert; with x_scales also recv_x_scales.
    Attributes: num_experts, expert_to_rank (None: contiguous blocks), backend, max_recv_tokens, num_sms
    (None: the SMs the protocol wants; n: no kernel of the CUDA backend takes more than n SMs).
    """

    op_name = "MoeDispatch"
    OUTPUT_NAMES = (
        "recv_x", "recv_topk_idx", "recv_topk_weights", "recv_src_idx", "recv_src_rank",
        "n_tokens_to_rank", "n_tokens_from_rank", "n_tokens_per_expert",
    )
    SCALED_OUTPUT_NAMES = OUTPUT_NAMES + ("recv_x_scales",)

    def __init__(self, outputs: Sequence[Val], x: Val, topk_idx: Val, topk_weights: Val, *,
                 num_experts: int, expert_to_rank: Optional[Sequence[int]] = None,
                 backend=CommunicatorBackend.AUTO, max_recv_tokens: Optional[int] = None,
                 x_scales: Optional[Val] = None, num_sms: Optional[int] = None):
        placement = None if expert_to_rank is None else tuple(int(r) for r in expert_to_rank)
        inputs = [x, topk_idx, topk_weights] + ([] if x_scales is None else [x_scales])
        super().__init__(outputs, inputs, {
            "num_experts": num_experts,
            "expert_to_rank": placement,
            "backend": CommunicatorBackend.parse(backend),
            "max_recv_tokens": max_recv_tokens,
            "num_sms": num_sms,
        })

    def validate(self) -> None:
        op = self.op_name
        x, idx, w = (_tv(op, n, v) for n, v in zip(("x", "topk_idx", "topk_weights"), self.inputs))
        if len(self.inputs) == 4:
            _check_scales(op, "x", x, "x_scales", _tv(op, "x_scales", self.inputs[3]))
        else:
            type_check(x.dtype not in FP8_TYPES, op, "x", "Float, Half or BFloat16 (an fp8 x needs x_scales)",
                       x.dtype.name)
            _floating(op, "x", x)
        type_check(idx.dtype in INDEX_TYPES, op, "topk_idx", "Int (int64) or Int32", idx.dtype.name)
        type_check(w.dtype == DataType.Float, op, "topk_weights", "Float (float32)", w.dtype.name)
        _rank(op, "x", x, 2)
        _rank(op, "topk_idx", idx, 2)
        _rank(op, "topk_weights", w, 2)
        e = self.attributes["num_experts"]
        shape_check(isinstance(e, int) and not isinstance(e, bool) and e > 0, op,
                    f"num_experts must be a positive int, got {e!r}")
        placement = self.attributes["expert_to_rank"]
        if placement is not None:
            shape_check(len(placement) == e, op,
                        f"expert_to_rank must have num_experts={e} entries, got {len(placement)}")
            shape_check(all(r >= 0 for r in placement), op,
                        f"expert_to_rank names a negative rank: {list(placement)}")
        cap = self.attributes["max_recv_tokens"]
        shape_check(cap is None or (isinstance(cap, int) and cap >= 0), op,
                    f"max_recv_tokens must be a non-negative int or None, got {cap!r}")
        _check_num_sms(op, self.attributes["num_sms"])
        names = self.output_names()
        shape_check(len(self.outputs) == len(names), op, f"expects {len(names)} outputs, got {len(self.outputs)}")
        if self.has_scales():
            out = self.outputs[-1]
            type_check(isinstance(out, TensorView) and out.dtype == DataType.Float, op, "recv_x_scales",
                       "a Float TensorView", out)

    # named accessors
    def in_x(self) -> TensorView: return self.inputs[0]
    def in_topk_idx(self) -> TensorView: return self.inputs[1]
    def in_topk_weights(self) -> TensorView: return self.inputs[2]
    def in_x_scales(self) -> Optional[TensorView]: return self.inputs[3] if len(self.inputs) == 4 else None
    def has_scales(self) -> bool: return len(self.inputs) == 4
    def output_names(self) -> tuple: return self.SCALED_OUTPUT_NAMES if self.has_scales() else self.OUTPUT_NAMES
    def out(self, name: str) -> TensorView: return self.outputs[self.output_names().index(name)]
    def num_experts(self) -> int: return self.attributes["num_experts"]
    def expert_to_rank(self) -> Optional[tuple]: return self.attributes["expert_to_rank"]
    def backend(self) -> CommunicatorBackend: return self.attributes["backend"]
    def max_recv_tokens(self) -> Optional[int]: return self.attributes["max_recv_tokens"]
    def num_sms(self) -> Optional[int]: return self.attributes["num_sms"]


class MoeCombine(Expr):
    """Weights expert outputs, pre-sums them per (token, expert rank), returns them to their source rank.

    Inputs: x [V, H] floating (row-aligned with dispatch's recv_x), topk_weights [V] Float, src_idx [V]
    Int, src_rank [V] Int, n_tokens_to_rank [W] Int, n_tokens_from_rank [W] Int, num_tokens (scalar Int).
    Output: combined_x [num_tokens, H] in x's dtype (docs/contract.md section 4).
    Attributes: backend, num_sms (as MoeDispatch's).
    """

    op_name = "MoeCombine"
    INPUT_NAMES = ("x", "topk_weights", "src_idx", "src_rank", "n_tokens_to_rank", "n_tokens_from_rank",
                   "num_tokens")

    def __init__(self, output: Val, x: Val, topk_weights: Val, src_idx: Val, src_rank: Val,
                 n_tokens_to_rank: Val, n_tokens_from_rank: Val, num_tokens: Val, *,
                 backend=CommunicatorBackend.AUTO, num_sms: Optional[int] = None):
        super().__init__([output], [x, topk_weights, src_idx, src_rank, n_tokens_to_rank,
                                    n_tokens_from_rank, num_tokens],
                         {"backend": CommunicatorBackend.parse(backend), "num_sms": num_sms})

    def validate(self) -> None:
        op = self.op_name
        x, w, src_idx, src_rank, n_to, n_from = (
            _tv(op, n, v) for n, v in zip(self.INPUT_NAMES[:6], self.inputs[:6]))
        _floating(op, "x", x)
        _rank(op, "x", x, 2)
        type_check(w.dtype == DataType.Float, op, "topk_weights", "Float (float32)", w.dtype.name)
        for name, v in (("src_idx", src_idx), ("src_rank", src_rank), ("n_tokens_to_rank", n_to),
                        ("n_tokens_from_rank", n_from)):
            type_check(v.dtype == DataType.Int, op, name, "Int (int64)", v.dtype.name)
        for name, v in (("topk_weights", w), ("src_idx", src_idx), ("src_rank", src_rank),
                        ("n_tokens_to_rank", n_to), ("n_tokens_from_rank", n_from)):
            _rank(op, name, v, 1)
        num_tokens = self.inputs[6]
        type_check(not isinstance(num_tokens, TensorView) and num_tokens.dtype == DataType.Int, op,
                   "num_tokens", "an Int scalar", num_tokens)
        _check_num_sms(op, self.attributes["num_sms"])
        out = self.outputs[0]
        type_check(isinstance(out, TensorView) and out.dtype == x.dtype, op, "combined_x",
                   f"a TensorView of x's dtype {x.dtype.name}", out)

    def in_x(self) -> TensorView: return self.inputs[0]
    def in_topk_weights(self) -> TensorView: return self.inputs[1]
    def in_src_idx(self) -> TensorView: return self.inputs[2]
    def in_src_rank(self) -> TensorView: return self.inputs[3]
    def in_n_tokens_to_rank(self) -> TensorView: return self.inputs[4]
    def in_n_tokens_from_rank(self) -> TensorView: return self.inputs[5]
    def in_num_tokens(self) -> Val: return self.inputs[6]
    def out_combined_x(self) -> TensorView: return self.outputs[0]
    def backend(self) -> CommunicatorBackend: return self.attributes["backend"]
    def num_sms(self) -> Optional[int]: return self.attributes["num_sms"]


class GroupedMm(Expr):
    """out[rows of group g] = a[rows of group g] @ b[g]; groups are contiguous row ranges of `a`."""

    op_name = "GroupedMm"

    def __init__(self, output: Val, a: Val, b: Val, group_sizes: Val):
        super().__init__([output], [a, b, group_sizes])

    def validate(self) -> None:
        op = self.op_name
        a, b, sizes = (_tv(op, n, v) for n, v in zip(("a", "b", "group_sizes"), self.inputs))
        _floating(op, "a", a)
        type_check(b.dtype == a.dtype, op, "b", f"of a's dtype {a.dtype.name}", b.dtype.name)
        type_check(sizes.dtype in INDEX_TYPES, op, "group_sizes", "Int or Int32", sizes.dtype.name)
        _rank(op, "a", a, 2)
        _rank(op, "b", b, 3)
        _rank(op, "group_sizes", sizes, 1)
        ka, kb = a.axis(1), b.axis(1)
        if ka.is_const and kb.is_const:
            shape_check(ka.value == kb.value, op, f"a is {a.type_str()} but b is {b.type_str()}: inner sizes differ")

    def in_a(self) -> TensorView: return self.inputs[0]
    def in_b(self) -> TensorView: return self.inputs[1]
    def in_group_sizes(self) -> TensorView: return self.inputs[2]
    def out(self) -> TensorView: return self.outputs[0]


class Silu(Expr):
    op_name = "Silu"

    def __init__(self, output: Val, a: Val):
        super().__init__([output], [a])

    def validate(self) -> None:
        _floating(self.op_name, "a", _tv(self.op_name, "a", self.inputs[0]))

    def in_a(self) -> TensorView: return self.inputs[0]
    def out(self) -> TensorView: return self.outputs[0]


class _Binary(Expr):
    def __init__(self, output: Val, a: Val, b: Val):
        super().__init__([output], [a, b])

    def validate(self) -> None:
        op = self.op_name
        a, b = _tv(op, "a", self.inputs[0]), _tv(op, "b", self.inputs[1])
        type_check(a.dtype not in FP8_TYPES, op, "a", "not Float8_e4m3fn (dequantize_fp8 it first)", a.dtype.name)
        type_check(b.dtype == a.dtype, op, "b", f"of a's dtype {a.dtype.name}", b.dtype.name)
        shape_check(a.ndim == b.ndim, op, f"operands must have the same rank, got {a.type_str()} and {b.type_str()}")

    def in_a(self) -> TensorView: return self.inputs[0]
    def in_b(self) -> TensorView: return self.inputs[1]
    def out(self) -> TensorView: return self.outputs[0]


class Mul(_Binary):
    op_name = "Mul"


class Add(_Binary):
    op_name = "Add"


class Cast(Expr):
    op_name = "Cast"

    def __init__(self, output: Val, a: Val, dtype: DataType):
        super().__init__([output], [a], {"dtype": dtype})

    def validate(self) -> None:
        _tv(self.op_name, "a", self.inputs[0])
        type_check(isinstance(self.attributes["dtype"], DataType), self.op_name, "dtype", "a DataType",
                   self.attributes["dtype"])

    def in_a(self) -> TensorView: return self.inputs[0]
    def dtype(self) -> DataType: return self.attributes["dtype"]
    def out(self) -> TensorView: return self.outputs[0]


class Size(Expr):
    """The extent of one dimension of a tensor, as a scalar Int."""

    op_name = "Size"

    def __init__(self, output: Val, a: Val, dim: int):
        super().__init__([output], [a], {"dim": dim})

    def validate(self) -> None:
        a = _tv(self.op_name, "a", self.inputs[0])
        dim = self.attributes["dim"]
        shape_check(isinstance(dim, int) and -a.ndim <= dim < a.ndim, self.op_name,
                    f"dim {dim!r} is out of range for {a.ndim}-D {a.type_str()}")

    def in_a(self) -> TensorView: return self.inputs[0]
    def dim(self) -> int: return self.attributes["dim"] % self.inputs[0].ndim
    def out(self) -> Val: return self.outputs[0]



class QuantizeFp8(Expr):
    """x [T, H] floating -> x_fp8 [T, H] Float8_e4m3fn, scales [T, ceil(H / 128)] Float, with the rounding
    points of docs/contract.md section 12."""

    op_name = "QuantizeFp8"

    def __init__(self, x_fp8: Val, scales: Val, x: Val):
        super().__init__([x_fp8, scales], [x])

    def validate(self) -> None:
        op = self.op_name
        x = _tv(op, "x", self.inputs[0])
        _floating(op, "x", x)
        _rank(op, "x", x, 2)
        q, scales = (_tv(op, n, v) for n, v in zip(("x_fp8", "scales"), self.outputs))
        _check_scales(op, "x_fp8", q, "scales", scales)

    def in_x(self) -> TensorView: return self.inputs[0]
    def out_x_fp8(self) -> TensorView: return self.outputs[0]
    def out_scales(self) -> TensorView: return self.outputs[1]


class DequantizeFp8(Expr):
    """x_fp8 [T, H] Float8_e4m3fn, scales [T, ceil(H / 128)] Float -> cast(float32(q) * scale) [T, H] in
    the dtype attribute (Float, Half or BFloat16; docs/contract.md section 12)."""

    op_name = "DequantizeFp8"

    def __init__(self, output: Val, x_fp8: Val, scales: Val, dtype: DataType):
        super().__init__([output], [x_fp8, scales], {"dtype": dtype})

    def validate(self) -> None:
        op = self.op_name
        q, scales = (_tv(op, n, v) for n, v in zip(("x_fp8", "scales"), self.inputs))
        _check_scales(op, "x_fp8", q, "scales", scales)
        dtype = self.attributes["dtype"]
        type_check(dtype in FLOATING_TYPES, op, "dtype", "Float, Half or BFloat16",
                   getattr(dtype, "name", dtype))
        out = _tv(op, "output", self.outputs[0])
        type_check(out.dtype == dtype, op, "output", f"of dtype {getattr(dtype, 'name', dtype)}", out.dtype.name)

    def in_x_fp8(self) -> TensorView: return self.inputs[0]
    def in_scales(self) -> TensorView: return self.inputs[1]
    def dtype(self) -> DataType: return self.attributes["dtype"]
