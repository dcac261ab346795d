"""FP8 quantisation with one float32 scale per 128 columns, and its inverse (docs/contract.md section 12).

Rounding points (the contract's, with one decision of ours, docs/fp8.md):
  per row and block of 128 columns (the last block possibly shorter)
    amax  = max |float32(x)|
    scale = amax / 448 in float32, and 1 where that is 0 (a zero block; also a block so small that
            amax / 448 underflows to 0, which would otherwise give 0 / 0 = NaN)
    q     = e4m3fn(clamp(float32(x) / scale, -448, 448)), rounded to nearest even
  dequantisation: cast(float32(q) * scale) to the requested dtype, rounded to nearest even.

Two implementations give the same bits: the torch formulation (`quantize_reference`,
`dequantize_reference`; CPU tensors, and the oracle) and the kernels of kernels/fp8.cu, compiled with
NVRTC at first use, for CUDA tensors. `quantize_fp8` returns views into one packed payload buffer
(backends/payload.py) so that a dispatch sends it without a packing pass. Inputs are expected to be
finite; a NaN or an infinity makes its block NaN (bits not specified across devices).
"""
from __future__ import annotations

import ctypes
import os

import torch

from . import payload

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
BLOCK_COLS = payload.BLOCK_COLS
_FLOATS = (torch.float32, torch.bfloat16, torch.float16)
_SUFFIX = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}
_KERNEL_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kernels", "fp8.cu")
_THREADS = 256
_kernel_cache: dict = {}
_sm_counts: dict = {}
_bindings: list = []  # [bool]: cuda-python importable


# ------------------------------------------------------------------------------------------ checks
def _check_quantize_input(x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"quantize_fp8: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOATS:
        raise TypeError(f"quantize_fp8: x must be float32, bfloat16 or float16, got {x.dtype}")
    if x.dim() != 2:
        raise ValueError(f"quantize_fp8: x must be 2-D [T, H], got shape {list(x.shape)}")


def _check_dequantize_input(x_fp8: torch.Tensor, scales: torch.Tensor, dtype) -> None:
    if x_fp8.dtype != FP8:
        raise TypeError(f"dequantize_fp8: x_fp8 must be float8_e4m3fn, got {x_fp8.dtype}")
    if scales.dtype != torch.float32:
        raise TypeError(f"dequantize_fp8: scales must be float32, got {scales.dtype}")
    if dtype not in _FLOATS:
        raise TypeError(f"dequantize_fp8: dtype must be float32, bfloat16 or float16, got {dtype}")
    if x_fp8.dim() != 2:
        raise ValueError(f"dequantize_fp8: x_fp8 must be 2-D [T, H], got shape {list(x_fp8.shape)}")
    want = [x_fp8.shape[0], payload.scale_blocks(x_fp8.shape[1])]
    if list(scales.shape) != want:
        raise ValueError(f"dequantize_fp8: scales must be [T, ceil(H / 128)] = {want} for x_fp8 of shape "
                         f"{list(x_fp8.shape)}, got {list(scales.shape)}")
    if scales.device != x_fp8.device:
        raise ValueError(f"dequantize_fp8: scales are on {scales.device} but x_fp8 on {x_fp8.device}")


# ------------------------------------------------------------------------------------------ torch formulation
def _blocks(x: torch.Tensor) -> torch.Tensor:
    """x [T, H] as float32 [T, nb, 128], the last block padded with zeros (they leave amax unchanged)."""
    rows, hidden = x.shape
    nb = payload.scale_blocks(hidden)
    xf = torch.nn.functional.pad(x.float(), (0, nb * BLOCK_COLS - hidden))
    return xf.view(rows, nb, BLOCK_COLS)


def quantize_reference(x: torch.Tensor) -> tuple:
    """The torch formulation of quantize_fp8 (the oracle), on x's device.

    Args: x [T, H] float32, bfloat16 or float16.
    Returns: (x_fp8 [T, H] float8_e4m3fn, scales [T, ceil(H/128)] float32), both contiguous.
    """
    _check_quantize_input(x)
    rows, hidden = x.shape
    if rows == 0 or hidden == 0:
        return (torch.empty(rows, hidden, dtype=FP8, device=x.device),
                torch.ones(rows, payload.scale_blocks(hidden), dtype=torch.float32, device=x.device))
    blocks = _blocks(x)
    # A divisor on the device, not a Python number: torch's CUDA division by a CPU scalar multiplies by its
    # rounded reciprocal, which is not the contract's division.
    scale = blocks.abs().amax(dim=2) / torch.full((), FP8_MAX, dtype=torch.float32, device=x.device)
    scale = torch.where(scale == 0, torch.ones((), dtype=torch.float32, device=x.device), scale)
    q = (blocks / scale.unsqueeze(2)).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q.view(rows, -1)[:, :hidden].contiguous(), scale


def dequantize_reference(x_fp8: torch.Tensor, scales: torch.Tensor, dtype=torch.bfloat16) -> torch.Tensor:
    """The torch formulation of dequantize_fp8 (the oracle): cast(float32(q) * scale), on x_fp8's device.

    Args: x_fp8 [T, H] float8_e4m3fn, scales [T, ceil(H/128)] float32, dtype float32/bfloat16/float16.
    Returns: [T, H] in dtype, contiguous.
    """
    _check_dequantize_input(x_fp8, scales, dtype)
    rows, hidden = x_fp8.shape
    if rows == 0 or hidden == 0:
        return torch.empty(rows, hidden, dtype=dtype, device=x_fp8.device)
    values = _blocks(x_fp8) * scales.unsqueeze(2)
    return values.view(rows, -1)[:, :hidden].to(dtype).contiguous()


# ------------------------------------------------------------------------------------------ kernels
def kernels_apply(device: torch.device) -> bool:
    """Whether the kernels of fp8.cu serve tensors on `device` (CUDA, with cuda-python installed); the
    torch formulation gives the same bits elsewhere."""
    if device.type != "cuda":
        return False
    if not _bindings:
        try:
            import cuda.bindings.driver  # noqa: F401
            _bindings.append(True)
        except ImportError:
            _bindings.append(False)
    return _bindings[0]


def _kernel(name: str, device: torch.device):
    key = (name, device.index)
    kernel = _kernel_cache.get(key)
    if kernel is None:
        from .transport.nvrtc import get_kernel

        kernel = _kernel_cache[key] = get_kernel(_KERNEL_SOURCE, name, device)
    return kernel


def _grid(device: torch.device, warps: int) -> int:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _sm_counts:
        _sm_counts[index] = torch.cuda.get_device_properties(index).multi_processor_count
    per_block = _THREADS // 32
    return max(1, min(-(-warps // per_block), 16 * _sm_counts[index]))


def _quantize_kernel(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, zero: tuple) -> None:
    """Launches fuser_moe_fp8_quantize_*: x [T, H] (columns contiguous) into the fp8 view q and the
    float32 view scales (any row strides), zeroing the byte ranges `zero` = (a, b, c, d) of q's rows."""
    rows, hidden = x.shape
    if x.stride(1) != 1:
        x = x.contiguous()
    i64 = ctypes.c_int64
    items = rows * payload.scale_blocks(hidden)
    _kernel(f"fuser_moe_fp8_quantize_{_SUFFIX[x.dtype]}", x.device).launch(_grid(x.device, items), _THREADS, [
        x, i64(x.stride(0)), i64(rows), i64(hidden), q, i64(q.stride(0)), scales, i64(scales.stride(0)),
        *(i64(v) for v in zero)])


def pack_rows_kernel(x: torch.Tensor, scales: torch.Tensor, layout, packed: torch.Tensor) -> None:
    """Launches fuser_moe_fp8_pack_rows: x [T, H] fp8 and scales [T, nb] float32 into packed rows."""
    rows, hidden = x.shape
    if x.stride(1) != 1:
        x = x.contiguous()
    if scales.stride(1) != 1:
        scales = scales.contiguous()
    i64 = ctypes.c_int64
    _kernel("fuser_moe_fp8_pack_rows", x.device).launch(_grid(x.device, rows), _THREADS, [
        x, i64(x.stride(0)), scales, i64(4 * scales.stride(0)), i64(rows), i64(hidden), i64(layout.scale_offset),
        i64(layout.scale_bytes), i64(layout.row_bytes), packed])


# ------------------------------------------------------------------------------------------ the ops
def quantize_fp8(x: torch.Tensor) -> tuple:
    """Quantises x to e4m3fn with one float32 scale per 128 columns (docs/contract.md section 12).

    Args:
        x: [T, H] float32, bfloat16 or float16.
    Returns:
        x_fp8: [T, H] float8_e4m3fn, q = e4m3fn(clamp(float32(x) / scale, -448, 448)).
        scales: [T, ceil(H / 128)] float32, amax / 448 of each block (1 where that is 0).
        Both are views into one buffer of packed payload rows (backends/payload.py; row stride
        row_bytes), which `moe_dispatch` sends as it is; `.contiguous()` gives dense copies.
    """
    _check_quantize_input(x)
    rows, hidden = x.shape
    layout = payload.PackedLayout(hidden)
    packed = payload.empty_packed(rows, hidden, x.device)
    q, scales = payload.views(packed, hidden)
    if rows == 0:
        return q, scales
    if hidden == 0:
        packed.zero_()
        return q, scales
    if kernels_apply(x.device):
        _quantize_kernel(x, q, scales, (hidden, layout.scale_offset, layout.scale_offset + layout.scale_bytes,
                                        layout.row_bytes))
        return q, scales
    q_ref, scales_ref = quantize_reference(x)
    raw = packed.view(torch.uint8)
    raw[:, hidden:layout.scale_offset].zero_()
    raw[:, layout.scale_offset + layout.scale_bytes:].zero_()
    raw[:, :hidden].copy_(q_ref.view(torch.uint8))
    scales.copy_(scales_ref)
    return q, scales


def dequantize_fp8(x_fp8: torch.Tensor, scales: torch.Tensor, dtype=torch.bfloat16) -> torch.Tensor:
    """cast(float32(q) * scale) per 128-column block (docs/contract.md section 12).

    Args:
        x_fp8: [T, H] float8_e4m3fn (any row stride, columns contiguous).
        scales: [T, ceil(H / 128)] float32.
        dtype: float32, bfloat16 or float16, the output's.
    Returns: [T, H] in dtype, contiguous.
    """
    _check_dequantize_input(x_fp8, scales, dtype)
    rows, hidden = x_fp8.shape
    if not kernels_apply(x_fp8.device) or rows == 0 or hidden == 0:
        return dequantize_reference(x_fp8, scales, dtype)
    if x_fp8.stride(1) != 1:
        x_fp8 = x_fp8.contiguous()
    if scales.stride(1) != 1:
        scales = scales.contiguous()
    out = torch.empty(rows, hidden, dtype=dtype, device=x_fp8.device)
    i64 = ctypes.c_int64
    items = rows * payload.scale_blocks(hidden)
    _kernel(f"fuser_moe_fp8_dequantize_{_SUFFIX[dtype]}", x_fp8.device).launch(
        _grid(x_fp8.device, items), _THREADS, [
            x_fp8, i64(x_fp8.stride(0)), scales, i64(scales.stride(0)), i64(rows), i64(hidden), out])
    return out

