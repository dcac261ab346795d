"""Transports for MoeDispatch and MoeCombine: the communicator, the NCCL backend and the CUDA backend.

Backends share one interface (`dispatch`, `combine`) and the routing arithmetic of `routing.py`; they
differ only in how rows travel. Importing this package loads neither NCCL-specific nor CUDA libraries.
"""
from .common import CommStats, DispatchOutputs
from .communicator import Communicator

__all__ = ["CommStats", "Communicator", "DispatchOutputs"]
