"""The Python frontend: `FusionDefinition` and `fd.ops` (docs/contract.md section 6)."""
from .fusion_definition import DispatchResult, FusionDefinition, Ops

__all__ = ["DispatchResult", "FusionDefinition", "Ops"]
