"""Evaluation of host IR on each rank: the evaluator, backend selection and traces."""
from .backend_selection import get_backend, resolve_backend
from .evaluator import HostIrEvaluator, grouped_mm
from .trace import Trace, TraceEvent

__all__ = ["HostIrEvaluator", "Trace", "TraceEvent", "get_backend", "grouped_mm", "resolve_backend"]
