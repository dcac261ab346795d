"""fuser_moe: a host-IR runtime for expert-parallel MoE dispatch and combine.

Write a program with `FusionDefinition`; it becomes a host IR whose `MoeDispatch` and `MoeCombine`
nodes run on every rank through the NCCL backend or the CUDA backend. See docs/contract.md for the contract.
"""
import os as _os

# In a source checkout that was not installed (a GPU machine without network for pip's build
# isolation, say), the layers beside this folder are found through the package path: fuser_moe.ir is
# ../ir and so on, the same mapping pyproject.toml installs.
_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if _os.path.isfile(_os.path.join(_root, "pyproject.toml")) and _os.path.isfile(_os.path.join(_root, "ir", "nodes.py")):
    __path__.append(_root)  # noqa: F821 - the package's own __path__

from fuser_moe.backends.common import DispatchOutputs
from fuser_moe.backends.communicator import Communicator
from fuser_moe.executors import HostIrEvaluator, Trace
from fuser_moe.ir import CommunicatorBackend, DataType, HostIrContainer, MoeCombine, MoeDispatch, TensorView, Val
from fuser_moe.python_frontend import FusionDefinition
from fuser_moe.functional import moe_combine, moe_dispatch
from fuser_moe.nn import MoELayer

__version__ = "0.1.0"

__all__ = [
    "Communicator", "CommunicatorBackend", "DataType", "DispatchOutputs", "FusionDefinition", "HostIrContainer",
    "HostIrEvaluator", "MoELayer", "MoeCombine", "MoeDispatch", "TensorView", "Trace", "Val", "__version__",
    "moe_combine", "moe_dispatch",
]
