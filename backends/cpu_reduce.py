"""Fused CPU reductions for combine: the plan's sums in one pass over the rows, compiled with Numba.

The routing plan (backends/routing.py) decides which rows form each group and in which order they are
added (docs/contract.md section 4: per group the float32 sum of w * y in row order from +0.0, cast; per
token the float32 sum of its partials in ascending expert-rank order, cast). On CPU tensors torch does
that in several passes over float32 copies of the rows (widen, multiply, index_add_, cast), each
reading and writing megabytes; here one loop per group reads each bfloat16 or float32 row once, keeps
the group's float32 sum in a row-sized buffer and writes the group's row once, already cast. The
arithmetic is the same operation for operation: each product w * y rounded to float32, then added to
the running float32 sum (Numba compiles without fast-math, so nothing is contracted into a fused
multiply-add or reordered), and the cast to bfloat16 rounds to nearest even as torch does, NaN
becoming the very bits that torch's own cast gives on this machine (probed once). So the bits are
torch's; tests/test_cpu_reduce.py checks both ways against each other and the reference.

Used when Numba is installed (`pip install 'fuser_moe[cpu]'`), the rows are bfloat16 or float32 and
contiguous, and a call has at least `FUSER_MOE_CPU_REDUCE_MIN` elements (default 65536: below that the
torch passes stay in the cache, and processes that never reach it never import Numba).
`FUSER_MOE_CPU_REDUCE=0` turns it off, `=1` uses it for every size. Without Numba the torch passes run.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import torch

_DEFAULT_MIN_ELEMENTS = 1 << 16
_kernel = None  # the compiled loops (grouped_sums, group_rows), once imported
_unavailable: Optional[str] = None  # why the fused path cannot run here (set at first use)
_nan_bits: Optional[int] = None  # the bfloat16 bits torch's cast gives a float32 NaN, None if it varies


def reason_unused(rows: torch.Tensor, weights: Optional[torch.Tensor] = None) -> Optional[str]:
    """None when the fused loop serves this reduction of `rows` (times `weights`); else why not."""
    mode = os.environ.get("FUSER_MOE_CPU_REDUCE", "")
    if mode not in ("", "0", "1"):
        raise ValueError(f"FUSER_MOE_CPU_REDUCE must be 0 (torch passes), 1 (the fused loop) or unset "
                         f"(by size), got {mode!r}")
    if mode == "0":
        return "FUSER_MOE_CPU_REDUCE=0"
    if rows.device.type != "cpu":
        return "not CPU tensors"
    if rows.dtype not in (torch.bfloat16, torch.float32) or rows.dim() != 2:
        return f"{rows.dtype} rows of {rows.dim()} dimensions (the fused loop reads bfloat16 and float32 rows)"
    if not rows.is_contiguous():
        return "rows not contiguous"
    if weights is not None and (weights.dtype != torch.float32 or weights.device.type != "cpu"):
        return f"{weights.dtype} weights (the contract's products are float32)"
    elements = rows.numel()
    if mode != "1":
        text = os.environ.get("FUSER_MOE_CPU_REDUCE_MIN", str(_DEFAULT_MIN_ELEMENTS))
        try:
            threshold = int(text)
        except ValueError:
            threshold = -1
        if threshold < 0:
            raise ValueError(f"FUSER_MOE_CPU_REDUCE_MIN must be a non-negative int (elements), got {text!r}")
        if elements < threshold:
            return f"{elements} elements < FUSER_MOE_CPU_REDUCE_MIN ({threshold})"
    if _load() is None:
        return _unavailable
    return None


def _load():
    """The compiled loops (compiled at the first call, cached on disk by Numba), or None without Numba."""
    global _kernel, _unavailable, _nan_bits
    if _kernel is not None or _unavailable is not None:
        return _kernel
    try:
        import numba  # noqa: F401
    except ImportError:
        _unavailable = "Numba is not installed (pip install 'fuser_moe[cpu]')"
        return None
    _nan_bits = _probe_nan_bits()
    _kernel = _compile()
    return _kernel


def _probe_nan_bits() -> Optional[int]:
    """What torch's float32 -> bfloat16 cast makes of NaNs here (its vector and scalar loops may differ:
    one answer for every length, sign and payload, or None, and then the fused loop casts no NaN)."""
    import numpy as np

    payloads = np.array([0x7FC00000, 0xFFC00000, 0x7F800001, 0xFF812345, 0x7FFFFFFF], dtype=np.uint32)
    seen = set()
    for length in (1, 3, 8, 17, 64, 1000):
        bits = torch.from_numpy(np.resize(payloads, length).view(np.float32)).to(torch.bfloat16)
        seen.update(int(b) & 0xFFFF for b in bits.view(torch.int16).tolist())
    return seen.pop() if len(seen) == 1 else None


def _compile():
    import numpy as np
    from numba import njit

    one = np.uint32(1)
    sixteen = np.uint32(16)
    abs_mask = np.uint32(0x7FFFFFFF)
    inf_bits = np.uint32(0x7F800000)
    half = np.uint32(0x7FFF)

    @njit(cache=True, nogil=True, boundscheck=False)
    def grouped_sums(y, y_bf16, w, weighted, order, starts, first, out, out_bf16, nan_bits):  # pragma: no cover
        # Groups first .. first + len(out): out[i] = cast(sum over j in [starts[g], starts[g + 1]) of
        # (w[order[j]] *) y[order[j]]), g = first + i, added in j order from +0.0. y and out hold
        # bfloat16 bits (uint16) when y_bf16 / out_bf16, else float32.
        hidden = y.shape[1]
        acc = np.empty(hidden, np.float32)
        acc_bits = acc.view(np.uint32)
        row = np.empty(hidden, np.uint32)
        row_f = row.view(np.float32)
        for i in range(out.shape[0]):
            g = first + i
            for h in range(hidden):
                acc[h] = np.float32(0.0)
            for j in range(starts[g], starts[g + 1]):
                r = order[j]
                if y_bf16:
                    for h in range(hidden):
                        row[h] = np.uint32(y[r, h]) << sixteen
                else:
                    for h in range(hidden):
                        row_f[h] = y[r, h]
                if weighted:
                    wr = w[r]
                    for h in range(hidden):
                        acc[h] = acc[h] + row_f[h] * wr
                else:
                    for h in range(hidden):
                        acc[h] = acc[h] + row_f[h]
            if out_bf16:
                for h in range(hidden):
                    u = acc_bits[h]
                    if (u & abs_mask) > inf_bits:
                        out[i, h] = nan_bits
                    else:
                        out[i, h] = (u + half + ((u >> sixteen) & one)) >> sixteen
            else:
                for h in range(hidden):
                    out[i, h] = acc[h]

    @njit(cache=True, nogil=True, boundscheck=False)
    def group_rows(index, n, order, starts):  # pragma: no cover
        # A stable counting sort: the rows of group g at order[starts[g]:starts[g + 1]], ascending; rows
        # whose index is outside [0, n) belong to none.
        for g in range(n + 1):
            starts[g] = 0
        for r in range(index.shape[0]):
            g = index[r]
            if g >= 0 and g < n:
                starts[g + 1] += 1
        for g in range(n):
            starts[g + 1] += starts[g]
        fill = starts[:n].copy()
        for r in range(index.shape[0]):
            g = index[r]
            if g >= 0 and g < n:
                order[fill[g]] = r
                fill[g] += 1

    return grouped_sums, group_rows


def _bits(t: torch.Tensor):
    """A numpy view of a contiguous CPU tensor: uint16 for bfloat16, float32 for float32."""
    import numpy as np

    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


def csr(index: torch.Tensor, n: int):
    """Rows by group, as numpy arrays: (order, starts), the rows of group g at order[starts[g]:starts[g + 1]]
    in ascending row order; rows whose index is outside [0, n) belong to none."""
    import numpy as np

    index_np = index.contiguous().numpy()
    if index_np.dtype != np.int64:
        index_np = index_np.astype(np.int64)
    order = np.empty(index_np.shape[0], dtype=np.int64)
    starts = np.empty(n + 1, dtype=np.int64)
    _load()[1](index_np, n, order, starts)
    return order, starts


def grouped_sums(rows: torch.Tensor, weights: Optional[torch.Tensor], index: torch.Tensor, n_groups: int,
                 outs: Sequence[tuple]) -> None:
    """For each (first, out) of `outs`: out[i] = cast of the float32 sum, in row order from +0.0, of
    weights[r] * rows[r] (rows[r] without weights) over the rows r with index[r] == first + i.

    rows: [V, H] contiguous bfloat16 or float32 (reason_unused said yes). weights: [V] float32 or None.
    index: [V] int64 group of each row, -1 for none. outs: (first group, [n, H] contiguous tensor of
    rows' dtype or float32).
    """
    # The loop does not check its bounds: the shapes are checked here.
    n_rows, hidden = rows.shape
    if index.numel() != n_rows or (weights is not None and weights.numel() != n_rows):
        raise ValueError(f"grouped_sums: {n_rows} rows, {index.numel()} group indices and "
                         f"{None if weights is None else weights.numel()} weights")
    for first, out in outs:
        if out.dim() != 2 or out.shape[1] != hidden or first < 0 or first + out.shape[0] > n_groups:
            raise ValueError(f"grouped_sums: an output of shape {tuple(out.shape)} for groups from {first} "
                             f"of {n_groups}, rows of {hidden}")
    kernel = _load()[0]
    order_np, starts_np = csr(index, n_groups)
    y = _bits(rows)
    w = weights.contiguous().numpy() if weights is not None else _bits(torch.zeros(1, dtype=torch.float32))
    y_bf16, weighted = rows.dtype == torch.bfloat16, weights is not None
    for first, out in outs:
        if out.shape[0] == 0:
            continue
        direct = out.is_contiguous() and (out.dtype == torch.float32
                                          or (out.dtype == torch.bfloat16 and _nan_bits is not None))
        if direct:
            kernel(y, y_bf16, w, weighted, order_np, starts_np, first, _bits(out), out.dtype == torch.bfloat16,
                   _nan_bits or 0)
        else:  # float32 sums, cast by torch
            wide = torch.empty(out.shape, dtype=torch.float32)
            kernel(y, y_bf16, w, weighted, order_np, starts_np, first, wide.numpy(), False, 0)
            out.copy_(wide)
