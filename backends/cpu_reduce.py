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
passes run.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import torch

_DEFAULT_MIN_ELEMENTS = 1 << 16
_kernel = None  # the compiled loops (grouped_sums, group_rows, expand_rows, pack_meta, pair_sums), once imported
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
    import numpy as np
    from llvmlite import ir
    from numba import njit, types
    from numba.extending import intrinsic, overload

    # The bfloat16 conversions as LLVM integer operations on 32 bits. Numba widens integer arithmetic
    # to 64 bits, and the loop vectoriser then works on half as many lanes, or (with the cast's NaN
    # test) not at all; written here, widening, summing and casting a row fuse into one vector loop.
    i32 = ir.IntType(32)

    @intrinsic
    def bf16_to_f32(typingctx, bits):  # pragma: no cover - compiled
        # float32 of bfloat16 bits (uint16): the bits in the high half, exact
        def codegen(context, builder, signature, args):
            wide = builder.shl(builder.zext(args[0], i32), ir.Constant(i32, 16))
            return builder.bitcast(wide, ir.FloatType())
        return types.float32(types.uint16), codegen

    @intrinsic
    def f32_to_bf16(typingctx, value, nan_bits):  # pragma: no cover - compiled
        # bfloat16 bits of a float32, rounded to nearest even as torch's cast; a NaN gives nan_bits
        def codegen(context, builder, signature, args):
            value, nan = args
            u = builder.bitcast(value, i32)
            lsb = builder.and_(builder.lshr(u, ir.Constant(i32, 16)), ir.Constant(i32, 1))
            rounded = builder.lshr(builder.add(builder.add(u, ir.Constant(i32, 0x7FFF)), lsb), ir.Constant(i32, 16))
            return builder.select(builder.fcmp_unordered("uno", value, value), nan,
                                  builder.trunc(rounded, ir.IntType(16)))
        return types.uint16(types.float32, types.uint16), codegen

    # Two bfloat16 elements as one uint32 word (element 2i in the low half: little-endian), which saves
    # the vector loops the zero-extension and the narrowing shuffles that single elements need.
    @intrinsic
    def pair_to_f32(typingctx, bits):  # pragma: no cover - compiled
        # the float32 values of the word's (low, high) bfloat16 elements, exact
        def codegen(context, builder, signature, args):
            low = builder.bitcast(builder.shl(args[0], ir.Constant(i32, 16)), ir.FloatType())
            high = builder.bitcast(builder.and_(args[0], ir.Constant(i32, 0xFFFF0000)), ir.FloatType())
            return context.make_tuple(builder, signature.return_type, [low, high])
        return types.UniTuple(types.float32, 2)(types.uint32), codegen

    @intrinsic
    def f32_to_pair(typingctx, low, high, nan_bits):  # pragma: no cover - compiled
        # the word of two bfloat16 elements, each rounded as f32_to_bf16 rounds
        def codegen(context, builder, signature, args):
            nan = builder.zext(args[2], i32)

            def rounded(value):  # the bfloat16 bits in the high half, the low half garbage
                u = builder.bitcast(value, i32)
                lsb = builder.and_(builder.lshr(u, ir.Constant(i32, 16)), ir.Constant(i32, 1))
                return builder.add(builder.add(u, ir.Constant(i32, 0x7FFF)), lsb)

            def is_nan(value):
                return builder.fcmp_unordered("uno", value, value)

            low = builder.select(is_nan(args[0]), nan, builder.lshr(rounded(args[0]), ir.Constant(i32, 16)))
            high = builder.select(is_nan(args[1]), builder.shl(nan, ir.Constant(i32, 16)),
                                  builder.and_(rounded(args[1]), ir.Constant(i32, 0xFFFF0000)))
            return builder.or_(low, high)
        return types.uint32(types.float32, types.float32, types.uint16), codegen

    # The element types are told apart when Numba types a call, not by flags read in the loops, so each
    # compiled variant's loops hold no branch: uint16 rows are bfloat16 bits, float32 rows are float32,
    # and weights of None mean a plain sum.
    def widen(value):
        pass

    @overload(widen, inline="always")
    def _widen(value):  # pragma: no cover - compiled
        if value == types.uint16:
            return lambda value: bf16_to_f32(value)
        return lambda value: value

    def narrow(value, nan_bits, target):
        pass

    @overload(narrow, inline="always")
    def _narrow(value, nan_bits, target):  # pragma: no cover - compiled
        if target.dtype == types.uint16:
            return lambda value, nan_bits, target: f32_to_bf16(value, nan_bits)
        return lambda value, nan_bits, target: value

    def weight(w, r):
        pass

    @overload(weight, inline="always")
    def _weight(w, r):  # pragma: no cover - compiled
        if isinstance(w, types.NoneType):
            return lambda w, r: None
        return lambda w, r: w[r]

    def scale(value, w_row):
        pass

    @overload(scale, inline="always")
    def _scale(value, w_row):  # pragma: no cover - compiled
        # w * value, rounded once; the value itself without weights
        if isinstance(w_row, types.NoneType):
            return lambda value, w_row: value
        return lambda value, w_row: value * w_row

    @njit(cache=True, nogil=True, boundscheck=False)
    def grouped_sums(y, w, order, starts, first, out, nan_bits):  # pragma: no cover
        # Groups first .. first + len(out): out[i] = cast(sum over j in [starts[g], starts[g + 1]) of
        # (w[order[j]] *) y[order[j]]), g = first + i, added in j order from +0.0; w None: no weights.
        # y and out hold bfloat16 bits (uint16) or float32. The group's last row is added in the loop
        # that casts and writes the output row, so a group of one row never touches `acc`; rows are 1-D
        # views, so every loop over h compiles to a vector loop (2-D indexing does not).
        hidden = y.shape[1]
        acc = np.empty(hidden, np.float32)
        nan16 = np.uint16(nan_bits)
        zero = np.float32(0.0)
        for i in range(out.shape[0]):
            g = first + i
            lo, last = starts[g], starts[g + 1] - 1
            target = out[i]
            if last < lo:  # no row: +0.0
                for h in range(hidden):
                    target[h] = 0
                continue
            for j in range(lo, last):
                y_row, w_row = y[order[j]], weight(w, order[j])
                if j == lo:
                    for h in range(hidden):
                        acc[h] = zero + scale(widen(y_row[h]), w_row)
                else:
                    for h in range(hidden):
                        acc[h] = acc[h] + scale(widen(y_row[h]), w_row)
            y_row, w_row = y[order[last]], weight(w, order[last])
            if last == lo:
                for h in range(hidden):
                    target[h] = narrow(zero + scale(widen(y_row[h]), w_row), nan16, target)
            else:
                for h in range(hidden):
                    target[h] = narrow(acc[h] + scale(widen(y_row[h]), w_row), nan16, target)

    @njit(cache=True, nogil=True, boundscheck=False)
    def pair_sums(y, w, order, starts, first, out, nan_bits):  # pragma: no cover
        # grouped_sums of bfloat16 rows into bfloat16 rows, two elements a uint32 word: y [V, H / 2] and
        # out [n, H / 2] uint32. Each element gets the same operations as in grouped_sums; the even
        # and the odd elements of the group's float32 sum are kept apart (acc_low, acc_high).
        words = y.shape[1]
        acc_low, acc_high = np.empty(words, np.float32), np.empty(words, np.float32)
        nan16 = np.uint16(nan_bits)
        zero = np.float32(0.0)
        for i in range(out.shape[0]):
            g = first + i
            lo, last = starts[g], starts[g + 1] - 1
            target = out[i]
            if last < lo:  # no row: +0.0
                for h in range(words):
                    target[h] = 0
                continue
            for j in range(lo, last):
                y_row, w_row = y[order[j]], weight(w, order[j])
                if j == lo:
                    for h in range(words):
                        low, high = pair_to_f32(y_row[h])
                        acc_low[h] = zero + scale(low, w_row)
                        acc_high[h] = zero + scale(high, w_row)
                else:
                    for h in range(words):
                        low, high = pair_to_f32(y_row[h])
                        acc_low[h] = acc_low[h] + scale(low, w_row)
                        acc_high[h] = acc_high[h] + scale(high, w_row)
            y_row, w_row = y[order[last]], weight(w, order[last])
            if last == lo:
                for h in range(words):
                    low, high = pair_to_f32(y_row[h])
                    target[h] = f32_to_pair(zero + scale(low, w_row), zero + scale(high, w_row), nan16)
            else:
                for h in range(words):
                    low, high = pair_to_f32(y_row[h])
                    target[h] = f32_to_pair(acc_low[h] + scale(low, w_row), acc_high[h] + scale(high, w_row), nan16)

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

    @njit(cache=True, nogil=True, boundscheck=False)
    def expand_rows(meta, at, wire, stride, row_bytes, top_k, real, recv, idx_out, w_out, src_idx, src_rank,
                    wire_row):  # pragma: no cover
        # Every slot k of wire row n (bytes wire[n * stride:][:row_bytes], wire a flat byte array) that
        # names an output row j in [0, real): the row's bytes to recv[j], the slot's expert id and weight
        # bits, the row's token and source to row j, n to wire_row[j]. Output rows past real are padding
        # (zero bytes, -1, weight +0.0). `at`: the layout's word offsets (routing.py): token, source,
        # output rows, expert ids, weight bits.
        token_at, source_at, rows_at, experts_at, weights_at = at[0], at[1], at[2], at[3], at[4]
        for n in range(meta.shape[0]):
            for k in range(top_k):
                j = meta[n, rows_at + k]
                if j < 0 or j >= real:
                    continue
                source = wire[n * stride:n * stride + row_bytes]
                target = recv[j]  # 1-D views: the copy compiles to a vector loop (2-D indexing does not)
                for b in range(row_bytes):
                    target[b] = source[b]
                idx_out[j] = meta[n, experts_at + k]
                w_out[j] = np.uint32(meta[n, weights_at + k] & 0xFFFFFFFF)
                src_idx[j] = meta[n, token_at]
                src_rank[j] = meta[n, source_at]
                wire_row[j] = n
        for j in range(real, recv.shape[0]):
            target = recv[j]
            for b in range(row_bytes):
                target[b] = 0
            idx_out[j] = -1
            w_out[j] = 0
            src_idx[j] = -1
            src_rank[j] = -1

    @njit(cache=True, nogil=True, boundscheck=False)
    def pack_meta(token, row_rank, slot_rank, out_rows, with_rows, experts, weight_bits, rank, at, top_k, meta,
                  only_rows):  # pragma: no cover
        # Metadata row n of wire row (token[n] to rank row_rank[n]): the token, this rank, then per slot
        # its output row and expert id where the slot's expert lives on row_rank[n] (else -1) and its
        # weight bits. only_rows: just the output-row words (the rest is written already).
        token_at, source_at, rows_at, experts_at, weights_at = at[0], at[1], at[2], at[3], at[4]
        for n in range(token.shape[0]):
            t = token[n]
            d = row_rank[n]
            if not only_rows:
                meta[n, token_at] = t
                meta[n, source_at] = rank
            for k in range(top_k):
                here = slot_rank[t, k] == d
                if with_rows:
                    meta[n, rows_at + k] = out_rows[t, k] if here else -1
                if not only_rows:
                    meta[n, experts_at + k] = experts[t, k] if here else -1
                    meta[n, weights_at + k] = weight_bits[t, k]

    return grouped_sums, group_rows, expand_rows, pack_meta, pair_sums


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
    kernels = _load()
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
                import numpy as np

                kernels[4](y.view(np.uint32), w, order_np, starts_np, first, target.view(np.uint32), _nan_bits)
            else:
                kernels[0](y, w, order_np, starts_np, first, target, _nan_bits or 0)
        else:  # float32 sums, cast by torch
            wide = torch.empty(out.shape, dtype=torch.float32)
            kernels[0](y, w, order_np, starts_np, first, wide.numpy(), 0)
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
    _load()[2](meta.numpy(), np.array(layout, dtype=np.int64), flat, stride, row_bytes, top_k, real, rows_out,
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

    _load()[3](token.contiguous().numpy(), row_rank.contiguous().numpy(), words(slot_rank), words(out_rows),
               out_rows is not None, words(topk_idx), words(weight_bits), rank, np.array(layout, dtype=np.int64),
               top_k, meta.numpy(), only_rows)
    return meta
