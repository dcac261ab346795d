"""Fused CPU loops for the routing plan's data movement and sums, compiled with Numba.

The routing plan (backends/routing.py, the torch twin of the kernels) decides everything: which rows
form each group and in which order they are added, where each pair lands, the one wire-metadata layout
(whose word offsets are passed in from there). On CPU tensors torch carries those decisions out in
many small ops and several passes over the rows; the loops here carry out the same decisions in one
pass each, and tests/test_cpu_reduce.py checks every one against the torch twin bit for bit.

- `grouped_sums` (combine, docs/contract.md section 4: per group the float32 sum of w * y in row order
  from +0.0, cast; per token the float32 sum of its partials in ascending expert-rank order, cast):
  torch widens, multiplies, `index_add_`s and casts, each pass reading and writing megabytes; here one
  loop per group reads each bfloat16 or float32 row once, keeps the group's float32 sum in a row-sized
  buffer and writes the group's row once, already cast (its last row is added in that same loop).
  Bfloat16 rows of even length into bfloat16 are read and written two elements a uint32 word
  (`sums_loop`), which spares the vector loops the widening and narrowing shuffles. The arithmetic is the same operation for
  operation: each product w * y rounded to float32, then added to the running float32 sum (Numba
  compiles without fast-math, so nothing is contracted into a fused multiply-add or reordered), and
  the cast to bfloat16 rounds to nearest even as torch does, NaN becoming the very bits that torch's
  own cast gives on this machine (probed once).
- `expand_rows` (dispatch's expansion): each received wire row copied once to every output row its
  metadata names, with the row's expert id, weight, token and source, padding rows after; torch needs
  a scatter, a division and six gathers for it.
- `pack_meta` (the sender's metadata rows): token, source, and per slot its output row and expert id
  (-1 where the slot's expert lives on another rank than the row's) and weight bits.

Used when Numba is installed (`pip install 'fuser_moe[cpu]'`). The sums need bfloat16 or float32
contiguous rows, and they and the expansion run for calls of at least `FUSER_MOE_CPU_REDUCE_MIN`
elements of rows (default 65536: below that the torch passes stay in the cache, and processes that
never reach it never import Numba); metadata of at least `META_MIN_WORDS` words.
`FUSER_MOE_CPU_REDUCE=0` turns every loop off, `=1` uses them for every size. Without Numba the torch
passes run. The loops themselves are in backends/cpu_loops.py, imported at the first use.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import torch

_DEFAULT_MIN_ELEMENTS = 1 << 16
_kernel = None  # the compiled loops: backends/cpu_loops.py, once imported
_unavailable: Optional[str] = None  # why the fused path cannot run here (set at first use)
_nan_bits: Optional[int] = None  # the bfloat16 bits torch's cast gives a float32 NaN, None if it varies


def _mode() -> str:
    """FUSER_MOE_CPU_REDUCE, checked: "0", "1" or "" (unset)."""
    mode = os.environ.get("FUSER_MOE_CPU_REDUCE", "")
    if mode not in ("", "0", "1"):
        raise ValueError(f"FUSER_MOE_CPU_REDUCE must be 0 (torch passes), 1 (the fused loop) or unset "
                         f"(by size), got {mode!r}")
    return mode


def _switched_off(size: int, unit: str = "elements") -> Optional[str]:
    """Why the fused loops do not run for a call of `size` row elements, or metadata words with
    unit="words" (the switches, the size rule, Numba), or None."""
    mode = _mode()
    if mode == "0":
        return "FUSER_MOE_CPU_REDUCE=0"
    if mode != "1":
        if unit == "words":
            threshold, name = META_MIN_WORDS, "META_MIN_WORDS"
        else:
            text = os.environ.get("FUSER_MOE_CPU_REDUCE_MIN", str(_DEFAULT_MIN_ELEMENTS))
            try:
                threshold = int(text)
            except ValueError:
                threshold = -1
            if threshold < 0:
                raise ValueError(f"FUSER_MOE_CPU_REDUCE_MIN must be a non-negative int (elements), got {text!r}")
            name = "FUSER_MOE_CPU_REDUCE_MIN"
        if size < threshold:
            return f"{size} {unit} < {name} ({threshold})"
    if _load() is None:
        return _unavailable
    return None


def reason_unused(rows: torch.Tensor, weights: Optional[torch.Tensor] = None) -> Optional[str]:
    """None when the fused loop serves this reduction of `rows` (times `weights`); else why not."""
    if os.environ.get("FUSER_MOE_CPU_REDUCE", "") == "0":
        return "FUSER_MOE_CPU_REDUCE=0"
    if rows.device.type != "cpu":
        return "not CPU tensors"
    if rows.dtype not in (torch.bfloat16, torch.float32) or rows.dim() != 2:
        return f"{rows.dtype} rows of {rows.dim()} dimensions (the fused loop reads bfloat16 and float32 rows)"
    if not rows.is_contiguous():
        return "rows not contiguous"
    if weights is not None and (weights.dtype != torch.float32 or weights.device.type != "cpu"):
        return f"{weights.dtype} weights (the contract's products are float32)"
    return _switched_off(rows.numel())


# Metadata of at least this many words is written by the fused loop (unless FUSER_MOE_CPU_REDUCE=0):
# below it torch's dozen small ops cost little; above it their fixed costs and passes are most of the
# time (2048 slots: 0.7 ms of torch ops against 0.05 ms). FUSER_MOE_CPU_REDUCE_MIN counts row elements,
# which metadata has none of, so it does not apply here.
META_MIN_WORDS = 4096


def meta_unused(meta: torch.Tensor) -> Optional[str]:
    """None when the fused loop (`pack_meta`) writes this [N, 2 + 3K] int64 metadata; else why not."""
    if _mode() == "0":
        return "FUSER_MOE_CPU_REDUCE=0"
    if meta.device.type != "cpu" or meta.dtype != torch.int64 or meta.dim() != 2:
        return "not 2-D int64 metadata on the CPU"
    if meta.shape[1] > 1 and meta.stride(1) != 1:
        return "metadata words not contiguous"
    return _switched_off(meta.numel(), unit="words")


def expand_unused(wire_x: torch.Tensor, meta: torch.Tensor) -> Optional[str]:
    """None when the fused expansion (`expand_rows`) serves these received rows and their metadata; else
    why not. It moves bytes, so any dtype of rows is fine; each row's elements must be contiguous."""
    if os.environ.get("FUSER_MOE_CPU_REDUCE", "") == "0":
        return "FUSER_MOE_CPU_REDUCE=0"
    if wire_x.device.type != "cpu" or meta.device.type != "cpu":
        return "not CPU tensors"
    if wire_x.dim() != 2 or (wire_x.shape[1] > 1 and wire_x.stride(1) != 1):
        return "rows not 2-D with contiguous elements"
    if meta.dtype != torch.int64 or meta.dim() != 2 or (meta.shape[1] > 1 and meta.stride(1) != 1):
        return "metadata not 2-D int64 with contiguous words"
    return _switched_off(wire_x.numel())


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
    from . import cpu_loops

    return cpu_loops


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
    _load().group_rows(index_np, n, order, starts)
    return order, starts


def sums_loop(rows, out) -> str:
    """Which compiled loop sums these rows (numpy views, `_bits`) into this output: "pairs" (bfloat16
    into bfloat16 two elements a uint32 word: an even row length, both 4-byte aligned) or "elements"."""
    if rows.dtype != out.dtype or rows.dtype.itemsize != 2 or rows.shape[1] % 2:
        return "elements"
    if rows.ctypes.data % 4 or out.ctypes.data % 4:
        return "elements"
    return "pairs"


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
    import numpy as np

    loops = _load()
    order_np, starts_np = csr(index, n_groups)
    y = _bits(rows)
    w = weights.contiguous().numpy() if weights is not None else None
    for first, out in outs:
        if out.shape[0] == 0:
            continue
        direct = out.is_contiguous() and (out.dtype == torch.float32
                                          or (out.dtype == torch.bfloat16 and _nan_bits is not None))
        if direct:
            target = _bits(out)
            if sums_loop(y, target) == "pairs":
                loops.pair_sums(y.view(np.uint32), w, order_np, starts_np, first, target.view(np.uint32), _nan_bits)
            else:
                loops.grouped_sums(y, w, order_np, starts_np, first, target, _nan_bits or 0)
        else:  # float32 sums, cast by torch
            wide = torch.empty(out.shape, dtype=torch.float32)
            loops.grouped_sums(y, w, order_np, starts_np, first, wide.numpy(), 0)
            out.copy_(wide)


def _flat_rows(t: torch.Tensor) -> tuple:
    """(flat numpy uint8 array, row stride in bytes, row bytes) of a 2-D CPU tensor whose rows are
    contiguous, any dtype and any row stride: row n is flat[n * stride:][:row bytes]. A flat 1-D array
    lets the compiled copy run as a vector loop, which a strided 2-D view does not."""
    row_bytes = t.shape[1] * t.element_size()
    if t.shape[0] == 0 or row_bytes == 0:
        return torch.empty(0, dtype=torch.uint8).numpy(), 0, row_bytes
    stride = t.stride(0) * t.element_size()
    as_bytes = t.view(torch.uint8)
    flat = as_bytes.as_strided(((t.shape[0] - 1) * stride + row_bytes,), (1,))
    return flat.numpy(), stride, row_bytes


def expand_rows(meta: torch.Tensor, wire_x: torch.Tensor, top_k: int, pairs: int, out_rows: int,
                layout: Sequence[int]) -> tuple:
    """routing.expand in one pass (expand_unused said yes): each received wire row copied once to each
    output row its metadata names, with that row's expert id, weight, token and source.

    layout: the word offsets of routing.py's metadata layout (token, source, output rows, expert ids,
    weight bits), which stays defined there alone.

    Returns (recv_x [R, H] of wire_x's dtype, topk_idx [R] int64, topk_weights [R] float32, src_idx [R],
    src_rank [R] int64, wire_row [min(V, R)] int64), R = out_rows; rows past min(V, R) are padding.
    """
    import numpy as np

    n_wire, width = meta.shape
    if wire_x.shape[0] != n_wire or width != max(layout) + top_k:
        raise ValueError(f"expand_rows: {wire_x.shape[0]} rows with {n_wire} metadata rows of {width} words "
                         f"(K={top_k} wants {max(layout) + top_k})")
    real = min(pairs, out_rows)
    hidden = wire_x.shape[1]
    recv_x = torch.empty(out_rows, hidden, dtype=wire_x.dtype)
    idx = torch.empty(out_rows, dtype=torch.int64)
    weights = torch.empty(out_rows, dtype=torch.float32)
    src_idx = torch.empty(out_rows, dtype=torch.int64)
    src_rank = torch.empty(out_rows, dtype=torch.int64)
    wire_row = torch.empty(real, dtype=torch.int64)
    flat, stride, row_bytes = _flat_rows(wire_x)
    rows_out = recv_x.view(torch.uint8).numpy() if row_bytes else np.empty((out_rows, 0), dtype=np.uint8)
    _load().expand_rows(meta.numpy(), np.array(layout, dtype=np.int64), flat, stride, row_bytes, top_k, real, rows_out,
               idx.numpy(), weights.view(torch.int32).numpy().view(np.uint32), src_idx.numpy(), src_rank.numpy(),
               wire_row.numpy())
    return recv_x, idx, weights, src_idx, src_rank, wire_row


def pack_meta(meta: torch.Tensor, token: torch.Tensor, row_rank: torch.Tensor, slot_rank: torch.Tensor,
              out_rows: Optional[torch.Tensor], topk_idx: Optional[torch.Tensor], weight_bits: Optional[torch.Tensor],
              rank: int, layout: Sequence[int], only_rows: bool = False) -> torch.Tensor:
    """routing.wire_meta / wire_meta_rows in one pass (meta_unused said yes): writes `meta` [N, 2 + 3K].

    token, row_rank: [N] int64 each wire row's token and destination; slot_rank: [T, K] int64 the rank of
    each slot's expert (-1 empty); out_rows: [T, K] int64 output rows, or None to leave those words;
    topk_idx: [T, K] expert ids and weight_bits [T, K] int64 float32 bits (unused with only_rows);
    layout: routing.meta_layout(K). Returns meta.
    """
    n = token.numel()
    tokens, top_k = slot_rank.shape
    if meta.shape != (n, max(layout) + top_k) or row_rank.numel() != n:
        raise ValueError(f"pack_meta: metadata {tuple(meta.shape)} for {n} wire rows ({row_rank.numel()} "
                         f"destinations) of K={top_k}")
    if n == 0:
        return meta
    for name, t in (("out_rows", out_rows), ("topk_idx", topk_idx), ("weight_bits", weight_bits)):
        if t is not None and tuple(t.shape) != (tokens, top_k):
            raise ValueError(f"pack_meta: {name} of shape {tuple(t.shape)}, slots [{tokens}, {top_k}]")
    lo, hi = int(token.min()), int(token.max())
    if lo < 0 or hi >= tokens:
        raise ValueError(f"pack_meta: a wire row names token {lo if lo < 0 else hi} of {tokens}")
    import numpy as np

    def words(t):
        return np.zeros((1, 1), dtype=np.int64) if t is None else t.long().contiguous().numpy()

    _load().pack_meta(token.contiguous().numpy(), row_rank.contiguous().numpy(), words(slot_rank), words(out_rows),
               out_rows is not None, words(topk_idx), words(weight_bits), rank, np.array(layout, dtype=np.int64),
               top_k, meta.numpy(), only_rows)
    return meta
