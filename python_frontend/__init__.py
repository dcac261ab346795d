"""The Python frontend: `FusionDefinition` and `fd.ops` (SPEC.md section 6)."""
from .fusion_definition import DispatchResult, FusionDefinition, Ops

__all__ = ["DispatchResult", "FusionDefinition", "Ops"]
