"""The host IR: types, values, nodes and the container. Imports neither torch.distributed nor CUDA."""
from .base import Expr, Extent, TensorView, Val
from .container import HostIrContainer
from .dtypes import DataType
from .nodes import (Add, Cast, CommunicatorBackend, GroupedMm, MoeCombine, MoeDispatch, Mul, Silu, Size)

__all__ = [
    "Add", "Cast", "CommunicatorBackend", "DataType", "Expr", "Extent", "GroupedMm", "HostIrContainer",
    "MoeCombine", "MoeDispatch", "Mul", "Silu", "Size", "TensorView", "Val",
]
