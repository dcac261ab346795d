"""`HostIrContainer`: a host program's inputs, outputs and top-level expressions, and its text form.

The text form prints one node a line with every value typed, as jaxprs do:

    %recv_x:bf16[i3,7168], ... = MoeDispatch[num_experts=64, backend=auto](%x, %topk_idx, %topk_weights)
"""
from __future__ import annotations

from typing import Iterable, Optional

from .base import Expr, Extent, TensorView, Val


class HostIrContainer:
    """Owns the values and expressions of one host program and gives them readable, unique names."""

    def __init__(self):
        self.inputs: list[Val] = []
        self.outputs: list[Val] = []
        self.exprs: list[Expr] = []
        self._names: set[str] = set()
        self._n_extents = 0

    # ------------------------------------------------------------------ building
    def _name(self, v: Val, hint: Optional[str]) -> None:
        if isinstance(v, Extent):
            if not v.is_const and v.name is None:
                v.name = f"i{self._n_extents}"
                self._n_extents += 1
            return
        if v.name is not None and v.name in self._names:
            return
        base = hint or v.name or ("t" if isinstance(v, TensorView) else "s")
        name, n = base, 0
        while name in self._names:
            n += 1
            name = f"{base}{n}"
        v.name = name
        self._names.add(name)
        if isinstance(v, TensorView):
            for e in v.extents:
                self._name(e, None)

    def register(self, v: Val, hint: Optional[str] = None) -> Val:
        """Names a value (and the symbolic extents of a tensor) so that it prints readably."""
        self._name(v, hint)
        return v

    def add_input(self, v: Val, hint: Optional[str] = None) -> Val:
        self.register(v, hint)
        self.inputs.append(v)
        return v

    def push_back(self, expr: Expr, hints: Optional[Iterable[Optional[str]]] = None) -> Expr:
        """Appends a top-level expression; its outputs are named from `hints` where given."""
        hints = list(hints) if hints is not None else [None] * len(expr.outputs)
        for out, hint in zip(expr.outputs, hints):
            self.register(out, hint)
        self.exprs.append(expr)
        return expr

    def add_output(self, v: Val) -> None:
        if not isinstance(v, Val):
            raise TypeError(f"add_output: expected an IR value, got {type(v).__name__}")
        known = {id(x) for x in self.inputs} | {id(o) for e in self.exprs for o in e.outputs}
        if id(v) not in known:
            raise ValueError(f"add_output: {v.ref()} is neither an input nor produced by an expression")
        self.outputs.append(v)

    # ------------------------------------------------------------------ analysis
    def last_uses(self) -> dict[int, int]:
        """For each value id, the index of the last expression that reads it (outputs never expire)."""
        last: dict[int, int] = {}
        for i, e in enumerate(self.exprs):
            for v in e.inputs:
                last[id(v)] = i
        for v in self.outputs:
            last[id(v)] = len(self.exprs)
        return last

    # ------------------------------------------------------------------ printing
    def to_string(self) -> str:
        lines = ["HostIrContainer(" + ", ".join(v.typed() for v in self.inputs) + ") {"]
        lines += ["  " + e.to_string() for e in self.exprs]
        lines.append("  return " + ", ".join(v.ref() for v in self.outputs))
        lines.append("}")
        return "\n".join(lines)

    __str__ = to_string
