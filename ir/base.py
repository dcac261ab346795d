"""Values and expressions of the host IR: `Val` (a scalar), `TensorView` (a typed tensor) and `Expr`.

A `TensorView` has a dtype and one extent per dimension; an extent is a scalar `Val` that is either a
constant (printed as its number) or symbolic (printed as `i<n>`), bound to a number when the evaluator
binds a tensor to the view. `Expr` is the base of every node: it records inputs, outputs and
attributes, then calls `validate()`, so a malformed node cannot be built (nvFuser's shape).
"""
from __future__ import annotations

import itertools
from typing import Any, Iterable, Optional, Sequence

from .dtypes import DataType

_uid = itertools.count()


class Val:
    """A scalar value of the host IR: a constant, or a symbol bound at run time."""

    def __init__(self, dtype: DataType = DataType.Int, value: Optional[int] = None, name: Optional[str] = None):
        if not isinstance(dtype, DataType):
            raise TypeError(f"Val dtype must be a DataType, got {dtype!r}")
        self.dtype = dtype
        self.value = value
        self.name = name
        self.definition: Optional[Expr] = None
        self.uid = next(_uid)

    @property
    def is_const(self) -> bool:
        return self.value is not None

    def ref(self) -> str:
        """How this value appears where it is used."""
        if self.is_const:
            return str(self.value)
        return f"%{self.name}" if self.name else f"%v{self.uid}"

    def typed(self) -> str:
        """How this value appears where it is defined: `%n:i64`."""
        return f"{self.ref()}:{self.dtype.short}"

    def __repr__(self) -> str:
        return self.typed()

    # Values are graph nodes, compared by identity (as torch.fx.Node).
    __hash__ = object.__hash__


class Extent(Val):
    """The size of one dimension of a TensorView: constant, or a symbol `i<n>`."""

    def __init__(self, value: Optional[int] = None, name: Optional[str] = None):
        if value is not None and (not isinstance(value, int) or value < 0):
            raise ValueError(f"a constant extent must be a non-negative int, got {value!r}")
        super().__init__(DataType.Int, value, name)

    def ref(self) -> str:
        if self.is_const:
            return str(self.value)
        return self.name if self.name else f"i{self.uid}"


class TensorView(Val):
    """A tensor of the host IR: dtype and extents, nothing else (the data lives only at run time)."""

    def __init__(self, dtype: DataType, extents: Sequence[Extent], name: Optional[str] = None):
        super().__init__(dtype, None, name)
        for e in extents:
            if not isinstance(e, Extent):
                raise TypeError(f"TensorView extents must be Extent values, got {e!r}")
        self.extents = list(extents)

    @property
    def ndim(self) -> int:
        return len(self.extents)

    def axis(self, dim: int) -> Extent:
        return self.extents[dim]

    @property
    def is_const(self) -> bool:  # a TensorView is never a compile-time constant
        return False

    def type_str(self) -> str:
        return f"{self.dtype.short}[{','.join(e.ref() for e in self.extents)}]"

    def typed(self) -> str:
        return f"{self.ref()}:{self.type_str()}"

    def __repr__(self) -> str:
        return f"TensorView({self.typed()})"


def _format_attr(value: Any) -> str:
    if hasattr(value, "value") and hasattr(value, "name") and not isinstance(value, Val):  # enums
        return str(value.value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_format_attr(v) for v in value) + "]"
    return str(value)


class Expr:
    """Base of every host-IR node. Subclasses add named accessors and a `validate()`."""

    op_name = "Expr"

    def __init__(self, outputs: Iterable[Val], inputs: Iterable[Val], attributes: Optional[dict] = None):
        self.inputs: list[Val] = list(inputs)
        self.outputs: list[Val] = list(outputs)
        self.attributes: dict = dict(attributes or {})
        for v in self.inputs + self.outputs:
            if not isinstance(v, Val):
                raise TypeError(f"{self.op_name}: operands must be IR values, got {v!r}")
        self.validate()
        for out in self.outputs:
            out.definition = self

    def validate(self) -> None:
        """Raises TypeError or ValueError if the node is malformed. Subclasses override."""

    def attr(self, name: str) -> Any:
        return self.attributes[name]

    def get_op_string(self) -> str:
        shown = {k: v for k, v in self.attributes.items() if v is not None}
        if not shown:
            return self.op_name
        return f"{self.op_name}[" + ", ".join(f"{k}={_format_attr(v)}" for k, v in shown.items()) + "]"

    def to_string(self) -> str:
        outs = ", ".join(o.typed() for o in self.outputs)
        ins = ", ".join(i.ref() for i in self.inputs)
        return f"{outs} = {self.get_op_string()}({ins})"

    def __repr__(self) -> str:
        return self.to_string()


def type_check(cond: bool, op: str, operand: str, expected: str, got: Any) -> None:
    """Raises TypeError naming the op, the operand and what was expected (docs/contract.md section 6)."""
    if not cond:
        raise TypeError(f"{op}: operand '{operand}' must be {expected}, got {got}")


def shape_check(cond: bool, op: str, message: str) -> None:
    if not cond:
        raise ValueError(f"{op}: {message}")
