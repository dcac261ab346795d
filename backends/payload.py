"""FP8 dispatch payloads: each token's e4m3 row and its scales travel as one opaque row (docs/contract.md
section 12).

The backends move rows of bytes and never compute on the payload (as TensorRT-LLM's NVLinkOneSided
treats its payload), so an fp8 dispatch packs every token's row as

    [fp8 row: H bytes | zeros up to 16 bytes | ceil(H / 128) float32 scales | zeros up to 16 bytes]

viewed as a bfloat16 tensor [T, row_bytes / 2] (a width the backends accept: a multiple of 8 elements,
so their 16-byte vector copies apply), calls the backend's ordinary dispatch with it, and returns
`recv_x` [V, H] float8_e4m3fn and `recv_x_scales` [V, ceil(H / 128)] float32 as views into the received
packed rows (row stride row_bytes): no copy of the V rows. Bits are only copied, so bfloat16 NaN
patterns in the view are harmless. Capacity mode's padding rows are zero in both views (the backends
pad with zero rows): recv_x 0 and scale 0, which dequantises to 0.

`fuser_moe.backends.fp8.quantize_fp8` writes its outputs in this layout, so a dispatch of what it
returned sends its buffer as it is (`as_packed`), with no packing pass: quantisation into the send.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional, Sequence

import torch

from .common import CommStats, DispatchOutputs
from .communicator import Communicator
from .validation import checked

FP8 = torch.float8_e4m3fn
BLOCK_COLS = 128  # columns per scale
WIRE_DTYPE = torch.bfloat16  # the dtype the packed rows are viewed as; bits are copied, never computed on
_ALIGN = 16


# DispatchOutputs' fields, in its order, then the scales: an fp8 dispatch's outputs unpack like a plain
# dispatch's, with recv_x_scales last.
ScaledDispatchOutputs = NamedTuple(
    "ScaledDispatchOutputs",
    [(name, torch.Tensor) for name in DispatchOutputs._fields] + [("recv_x_scales", torch.Tensor)])
ScaledDispatchOutputs.__doc__ = """The outputs of an fp8 MoeDispatch on this rank: `DispatchOutputs`' fields, then the scales.

    recv_x: [V, H] float8_e4m3fn, one row per received (source token, local expert) pair (a view, row
        stride row_bytes; zeros on capacity padding).
    recv_topk_idx, recv_topk_weights, recv_src_idx, recv_src_rank, n_tokens_to_rank, n_tokens_from_rank,
        n_tokens_per_expert: as in `DispatchOutputs`.
    recv_x_scales: [V, ceil(H / 128)] float32, the scales of recv_x's row (a view; 0 on padding).
    """


def scale_blocks(hidden: int) -> int:
    """ceil(H / 128): the scales of a row of H columns."""
    return -(-hidden // BLOCK_COLS)


def _round_up(n: int, to: int) -> int:
    return -(-n // to) * to


@dataclass(frozen=True)
class PackedLayout:
    """Where the parts of a packed row of an H-column fp8 row lie (bytes from the row's start)."""

    hidden: int

    @property
    def blocks(self) -> int:
        return scale_blocks(self.hidden)

    @property
    def scale_offset(self) -> int:
        return _round_up(self.hidden, _ALIGN)

    @property
    def scale_bytes(self) -> int:
        return 4 * self.blocks

    @property
    def row_bytes(self) -> int:
        return _round_up(self.scale_offset + self.scale_bytes, _ALIGN)

    @property
    def width(self) -> int:
        """Elements of a packed row in WIRE_DTYPE (a multiple of 8)."""
        return self.row_bytes // WIRE_DTYPE.itemsize


def empty_packed(rows: int, hidden: int, device) -> torch.Tensor:
    """An uninitialised packed tensor [rows, width] of WIRE_DTYPE."""
    return torch.empty(rows, PackedLayout(hidden).width, dtype=WIRE_DTYPE, device=device)


def views(packed: torch.Tensor, hidden: int) -> tuple:
    """(x_fp8 [R, H] float8_e4m3fn, scales [R, ceil(H/128)] float32): views into packed rows [R, width]."""
    layout = PackedLayout(hidden)
    if packed.dim() != 2 or packed.shape[1] != layout.width or packed.dtype != WIRE_DTYPE:
        raise ValueError(f"packed rows must be {WIRE_DTYPE} [R, {layout.width}] for H={hidden}, got "
                         f"{packed.dtype} {list(packed.shape)}")
    if packed.stride(1) != 1 or (packed.shape[0] > 1 and packed.stride(0) != layout.width):
        packed = packed.contiguous()
    raw = packed.view(torch.uint8)
    x = raw[:, :hidden].view(FP8)
    scales = raw[:, layout.scale_offset:layout.scale_offset + layout.scale_bytes].view(torch.float32)
    return x, scales


def as_packed(x: torch.Tensor, scales: torch.Tensor) -> Optional[torch.Tensor]:
    """The packed rows that x and scales are views of (as `quantize_fp8` returns them), or None."""
    if x.dim() != 2 or scales.dim() != 2 or x.dtype != FP8 or scales.dtype != torch.float32:
        return None
    rows, hidden = x.shape
    layout = PackedLayout(hidden)
    if rows == 0 or x.device != scales.device or x.untyped_storage().data_ptr() != scales.untyped_storage().data_ptr():
        return None
    if x.stride() != (layout.row_bytes, 1) or scales.stride() != (layout.row_bytes // 4, 1) \
            or scales.shape != (rows, layout.blocks):
        return None
    if scales.data_ptr() - x.data_ptr() != layout.scale_offset or x.data_ptr() % _ALIGN:
        return None
    if x.storage_offset() + rows * layout.row_bytes > x.untyped_storage().nbytes():
        return None
    packed = torch.empty(0, dtype=WIRE_DTYPE, device=x.device)
    packed.set_(x.untyped_storage(), x.storage_offset() // WIRE_DTYPE.itemsize, (rows, layout.width),
                (layout.width, 1))
    return packed


def pack(x: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Packed rows [T, width] of WIRE_DTYPE holding x [T, H] float8_e4m3fn and scales [T, ceil(H/128)]
    float32; x and scales themselves when they are views of packed rows (no copy)."""
    packed = as_packed(x, scales)
    if packed is not None:
        return packed
    rows, hidden = x.shape
    layout = PackedLayout(hidden)
    packed = empty_packed(rows, hidden, x.device)
    if rows == 0:
        return packed
    from . import fp8

    if fp8.kernels_apply(x.device):
        fp8.pack_rows_kernel(x, scales, layout, packed)
        return packed
    raw = packed.view(torch.uint8)
    raw[:, :hidden].copy_(x.view(torch.uint8))
    raw[:, hidden:layout.scale_offset].zero_()
    raw[:, layout.scale_offset:layout.scale_offset + layout.scale_bytes].copy_(scales.contiguous().view(torch.uint8))
    raw[:, layout.scale_offset + layout.scale_bytes:].zero_()
    return packed


# ------------------------------------------------------------------------------------------ checks
def validate_scaled_dispatch(x: torch.Tensor, x_scales: Optional[torch.Tensor]) -> None:
    """The checks of docs/contract.md section 12 on this rank's x and x_scales (host metadata only).

    Raises: TypeError for an fp8 x without scales, scales with a non-fp8 x, or scales not float32;
        ValueError for an x that is not 2-D, scales not [T, ceil(H/128)], or scales on another device.
    """
    if x_scales is None:
        if x.dtype == FP8:
            raise TypeError("moe_dispatch: x is float8_e4m3fn but no x_scales were given: an fp8 dispatch needs "
                            "x_scales [T, ceil(H / 128)] float32 (docs/contract.md section 12)")
        return
    if x.dtype != FP8:
        raise TypeError(f"moe_dispatch: x_scales were given but x is {x.dtype}: scales go with a float8_e4m3fn x "
                        "only")
    if x_scales.dtype != torch.float32:
        raise TypeError(f"moe_dispatch: x_scales must be float32, got {x_scales.dtype}")
    if x.dim() != 2:
        raise ValueError(f"moe_dispatch: x must be 2-D [T, H], got shape {list(x.shape)}")
    want = [x.shape[0], scale_blocks(x.shape[1])]
    if list(x_scales.shape) != want:
        raise ValueError(f"moe_dispatch: x_scales must be [T, ceil(H / 128)] = {want} for x of shape "
                         f"{list(x.shape)}, got {list(x_scales.shape)}")
    if x_scales.device != x.device:
        raise ValueError(f"moe_dispatch: x_scales is on {x_scales.device} but x on {x.device}")


def check_scaled_dispatch_everywhere(comm: Communicator, x: torch.Tensor, x_scales: Optional[torch.Tensor]) -> None:
    """Checked mode: every rank raises when any rank's x / x_scales are bad, and when ranks disagree on H
    (ranks whose H differ can pack rows of the same width: the backend's own agreement cannot tell)."""
    checked(comm, lambda: validate_scaled_dispatch(x, x_scales))
    if x_scales is None:
        return
    hidden = comm.exchange(int(x.shape[1]))
    if len(set(hidden)) != 1:
        raise ValueError(f"moe_dispatch: ranks disagree on the hidden size of the fp8 x: H per rank {hidden}")


# ------------------------------------------------------------------------------------------ dispatch
def dispatch(backend, comm: Communicator, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor, *,
             num_experts: int, x_scales: Optional[torch.Tensor] = None, expert_to_rank: Optional[Sequence[int]] = None,
             max_recv_tokens: Optional[int] = None, check_inputs: bool = True, stats: Optional[CommStats] = None,
             return_handle: bool = False, num_sms: Optional[int] = None):
    """`backend.dispatch`, with the fp8 payloads of docs/contract.md section 12.

    Args:
        backend: a backend object (`NcclBackend`, `CudaBackend`).
        comm: the expert-parallel group.
        x: [T, H] tokens: float32, bfloat16 or float16; or float8_e4m3fn together with x_scales.
        topk_idx: [T, K] int64/int32 global expert ids, -1 for an empty slot.
        topk_weights: [T, K] float32.
        num_experts: E.
        x_scales: [T, ceil(H / 128)] float32, the scale of each 128-column block of x's rows; only with
            an fp8 x.
        expert_to_rank, max_recv_tokens, check_inputs, stats, return_handle, num_sms: as `backend.dispatch`.
    Returns: the backend's `DispatchOutputs` without x_scales; with them, `ScaledDispatchOutputs`
        (recv_x [V, H] float8_e4m3fn and recv_x_scales [V, ceil(H / 128)] float32, views into the
        received packed rows); with return_handle, (outputs, the backend's `DispatchHandle`).
    Raises: the errors of `validate_scaled_dispatch` on every rank in checked mode, then the backend's.
    """
    if check_inputs:
        if x_scales is not None or x.dtype == FP8:
            check_scaled_dispatch_everywhere(comm, x, x_scales)
    else:
        validate_scaled_dispatch(x, x_scales)
    common = dict(num_experts=num_experts, expert_to_rank=expert_to_rank, max_recv_tokens=max_recv_tokens,
                  check_inputs=check_inputs, stats=stats, num_sms=num_sms)
    if return_handle:
        common["return_handle"] = True
    if x_scales is None:
        return backend.dispatch(comm, x, topk_idx, topk_weights, **common)
    result = backend.dispatch(comm, pack(x, x_scales), topk_idx, topk_weights, **common)
    out, handle = result if return_handle else (result, None)
    recv_x, recv_scales = views(out.recv_x, x.shape[1])
    scaled = ScaledDispatchOutputs(recv_x, *out[1:], recv_x_scales=recv_scales)
    return (scaled, handle) if return_handle else scaled
