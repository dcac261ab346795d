"""Data types of the host IR, with the short names used when the IR prints itself.

`ir` imports no CUDA library and no torch.distributed; the mapping to torch dtypes imports torch only
when it is asked for, so the IR can be built and printed without torch.
"""
from __future__ import annotations

import enum


class DataType(enum.Enum):
    """Element types of TensorViews and scalars. `Int` is int64 and `Int32` is int32, as in nvFuser."""

    Float = "f32"
    Half = "f16"
    BFloat16 = "bf16"
    Int = "i64"
    Int32 = "i32"
    Bool = "b"
    Float8_e4m3fn = "f8e4m3"  # 8-bit float, 4 exponent and 3 mantissa bits, no infinities (dispatch payloads)

    @property
    def short(self) -> str:
        return self.value

    @property
    def is_floating(self) -> bool:
        """Any floating type, float8 included (local compute ops take only FLOATING_TYPES)."""
        return self in (DataType.Float, DataType.Half, DataType.BFloat16, DataType.Float8_e4m3fn)

    @property
    def is_integral(self) -> bool:
        return self in (DataType.Int, DataType.Int32)

    def __str__(self) -> str:
        return self.value

    def to_torch(self):
        import torch

        return {
            DataType.Float: torch.float32,
            DataType.Half: torch.float16,
            DataType.BFloat16: torch.bfloat16,
            DataType.Int: torch.int64,
            DataType.Int32: torch.int32,
            DataType.Bool: torch.bool,
            DataType.Float8_e4m3fn: torch.float8_e4m3fn,
        }[self]

    @staticmethod
    def from_torch(dtype) -> "DataType":
        import torch

        table = {
            torch.float32: DataType.Float,
            torch.float16: DataType.Half,
            torch.bfloat16: DataType.BFloat16,
            torch.int64: DataType.Int,
            torch.int32: DataType.Int32,
            torch.bool: DataType.Bool,
            torch.float8_e4m3fn: DataType.Float8_e4m3fn,
        }
        if dtype not in table:
            raise TypeError(f"fuser_moe has no DataType for torch dtype {dtype}")
        return table[dtype]


FLOATING_TYPES = (DataType.Float, DataType.Half, DataType.BFloat16)
INDEX_TYPES = (DataType.Int, DataType.Int32)
# Types that MoeDispatch carries with their per-block scales (docs/contract.md section 12).
FP8_TYPES = (DataType.Float8_e4m3fn,)
