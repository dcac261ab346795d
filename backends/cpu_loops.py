"""The compiled loops of cpu_reduce.py (Numba), defined at module level.

Imported only by `cpu_reduce._compile`, once Numba is known to be there. Everything the loops use
(the LLVM intrinsics, the typing-time overloads) is a module global, not a closure cell: Numba's disk
cache keys a function by its closure's contents as well, and intrinsics made afresh in every process
would miss the cache and compile the loops again in each rank process.
"""
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
