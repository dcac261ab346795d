"""The host IR: types, values, nodes and the container. Imports neither torch.distributed nor CUDA."""
from .base import Expr, Extent, TensorView, Val
from .container import HostIrContainer
from .dtypes import DataType
from .nodes import (Add, Cast, CommunicatorBackend, DequantizeFp8, GroupedMm, MoeCombine, MoeDispatch, Mul, QuantizeFp8,
                    Silu, Size)

__all__ = [
    "Add", "Cast", "CommunicatorBackend", "DataType", "DequantizeFp8", "Expr", "Extent", "GroupedMm", "HostIrContainer",
    "MoeCombine", "MoeDispatch", "Mul", "QuantizeFp8", "Silu", "Size", "TensorView", "Val",
]
