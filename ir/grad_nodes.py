"""Nodes that only backward host IRs use: the local pieces of each forward node's adjoint.

A backward host IR (docs/contract.md section 11) is built from the adjoints of the forward nodes: the
communication adjoints are MoeDispatch and MoeCombine nodes again (see executors/autograd.py), glued by
the local nodes below. Like every node they check their operands when they are built and print typed,
one a line. They are evaluated with torch by executors/autograd.py's `BackwardEvaluator`.
"""
from __future__ import annotations

from .base import Expr, TensorView, Val, shape_check, type_check
from .dtypes import FLOATING_TYPES, INDEX_TYPES, DataType


def _tv(op: str, name: str, v: Val) -> TensorView:
    type_check(isinstance(v, TensorView), op, name, "a TensorView", type(v).__name__)
    return v  # type: ignore[return-value]


class FullLike(Expr):
    """out = a tensor of `a`'s shape filled with `value`, of dtype `dtype` (unit weights, zeros)."""

    op_name = "FullLike"

    def __init__(self, output: Val, a: Val, *, value: float, dtype: DataType):
        super().__init__([output], [a], {"value": value, "dtype": dtype})

    def validate(self) -> None:
        _tv(self.op_name, "a", self.inputs[0])
        type_check(isinstance(self.attributes["dtype"], DataType), self.op_name, "dtype", "a DataType",
                   self.attributes["dtype"])


class ExpertOneHot(Expr):
    """out [V, E] Float: row i holds `grad[i]` at column `expert[i]` and zeros elsewhere (all zeros where
    expert[i] is -1, a capacity padding row). Combined with unit weights, every column of a token gets at
    most one non-zero term, so the sums are exact and the source reads each pair's value back unchanged."""

    op_name = "ExpertOneHot"

    def __init__(self, output: Val, grad: Val, expert: Val, *, num_experts: int):
        super().__init__([output], [grad, expert], {"num_experts": num_experts})

    def validate(self) -> None:
        op = self.op_name
        grad, expert = _tv(op, "grad", self.inputs[0]), _tv(op, "expert", self.inputs[1])
        type_check(grad.dtype == DataType.Float, op, "grad", "Float (float32)", grad.dtype.name)
        type_check(expert.dtype in INDEX_TYPES, op, "expert", "Int or Int32", expert.dtype.name)
        shape_check(grad.ndim == 1 and expert.ndim == 1, op, "grad and expert must be 1-D")


class GatherSlots(Expr):
    """out[t, k] = per_expert[t, topk_idx[t, k]] (0 where topk_idx[t, k] is -1); out is [T, K] Float."""

    op_name = "GatherSlots"

    def __init__(self, output: Val, per_expert: Val, topk_idx: Val):
        super().__init__([output], [per_expert, topk_idx])

    def validate(self) -> None:
        op = self.op_name
        table, idx = _tv(op, "per_expert", self.inputs[0]), _tv(op, "topk_idx", self.inputs[1])
        type_check(table.dtype == DataType.Float, op, "per_expert", "Float (float32)", table.dtype.name)
        type_check(idx.dtype in INDEX_TYPES, op, "topk_idx", "Int or Int32", idx.dtype.name)
        shape_check(table.ndim == 2 and idx.ndim == 2, op, "per_expert and topk_idx must be 2-D")


class RowScale(Expr):
    """out[v] = cast(float32(w[v]) * float32(a[v])) in a's dtype: the adjoint of combine for its x."""

    op_name = "RowScale"

    def __init__(self, output: Val, a: Val, w: Val):
        super().__init__([output], [a, w])

    def validate(self) -> None:
        op = self.op_name
        a, w = _tv(op, "a", self.inputs[0]), _tv(op, "w", self.inputs[1])
        type_check(a.dtype in FLOATING_TYPES, op, "a", "Float, Half or BFloat16", a.dtype.name)
        type_check(w.dtype == DataType.Float, op, "w", "Float (float32)", w.dtype.name)
        shape_check(a.ndim == 2 and w.ndim == 1, op, f"a must be 2-D and w 1-D, got {a.type_str()}, {w.type_str()}")


class RowDot(Expr):
    """out[v] = the float32 dot product of a[v] and b[v] (0 where src_rank[v] is -1, a padding row): the
    adjoint of combine for its weights."""

    op_name = "RowDot"

    def __init__(self, output: Val, a: Val, b: Val, src_rank: Val):
        super().__init__([output], [a, b, src_rank])

    def validate(self) -> None:
        op = self.op_name
        a, b, src_rank = (_tv(op, n, v) for n, v in zip(("a", "b", "src_rank"), self.inputs))
        for name, v in (("a", a), ("b", b)):
            type_check(v.dtype in FLOATING_TYPES, op, name, "Float, Half or BFloat16", v.dtype.name)
        shape_check(a.ndim == 2 and b.ndim == 2 and src_rank.ndim == 1, op, "a, b must be 2-D and src_rank 1-D")


class SiluGrad(Expr):
    """out = grad * d silu(a) / da, as torch computes it (aten.silu_backward)."""

    op_name = "SiluGrad"

    def __init__(self, output: Val, grad: Val, a: Val):
        super().__init__([output], [grad, a])

    def validate(self) -> None:
        _tv(self.op_name, "grad", self.inputs[0])
        _tv(self.op_name, "a", self.inputs[1])


class SumToShape(Expr):
    """out = grad summed over the dimensions that broadcasting expanded, to the shape of `like`."""

    op_name = "SumToShape"

    def __init__(self, output: Val, grad: Val, like: Val):
        super().__init__([output], [grad, like])

    def validate(self) -> None:
        _tv(self.op_name, "grad", self.inputs[0])
        _tv(self.op_name, "like", self.inputs[1])


class GroupedMmGradA(Expr):
    """out [M, H_in] = grad rows of group g times b[g]^T (rows past the groups get zeros)."""

    op_name = "GroupedMmGradA"

    def __init__(self, output: Val, grad: Val, b: Val, group_sizes: Val):
        super().__init__([output], [grad, b, group_sizes])

    def validate(self) -> None:
        for name, v in zip(("grad", "b", "group_sizes"), self.inputs):
            _tv(self.op_name, name, v)


class GroupedMmGradB(Expr):
    """out [G, H_in, H_out]: out[g] = a rows of group g, transposed, times grad rows of group g."""

    op_name = "GroupedMmGradB"

    def __init__(self, output: Val, a: Val, grad: Val, group_sizes: Val):
        super().__init__([output], [a, grad, group_sizes])

    def validate(self) -> None:
        for name, v in zip(("a", "grad", "group_sizes"), self.inputs):
            _tv(self.op_name, name, v)
