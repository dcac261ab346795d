"""Traces of host-IR runs: one event per expression, a summary table and Chrome trace JSON.

An event records the op, the backend it resolved to and why, input and output shapes and dtypes, bytes
sent and received over the wire, host synchronisations, and wall and device time (docs/contract.md section 7).
Device time comes from CUDA events and is read once at the end of a run, so tracing adds one host
synchronisation per run on GPUs and none per expression.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Optional


@dataclass
class TraceEvent:
    op: str
    node: str  # the node's text form
    backend: Optional[str] = None
    reason: Optional[str] = None
    inputs: list = field(default_factory=list)  # [(name, shape, dtype)]
    outputs: list = field(default_factory=list)
    bytes_sent: int = 0
    bytes_recv: int = 0
    host_syncs: int = 0
    sync_reasons: list = field(default_factory=list)
    path: Optional[str] = None  # the protocol that served a communication node ("low-latency", "general")
    sms: Optional[int] = None  # the most blocks (so SMs) a kernel of the node launched
    start_us: float = 0.0  # wall clock, microseconds since the epoch
    wall_ms: float = 0.0
    device_ms: Optional[float] = None
    rank: int = 0
    run: int = 0
    _events: Any = None  # (start, end) CUDA events until resolved

    def resolve_device_time(self) -> None:
        """Reads what the device computed: elapsed time, and byte counts kept as device scalars."""
        for name in ("bytes_sent", "bytes_recv"):
            value = getattr(self, name)
            if not isinstance(value, int):
                setattr(self, name, int(value))
        if self._events is not None:
            start, end = self._events
            end.synchronize()
            self.device_ms = start.elapsed_time(end)
            self._events = None


def _shape_str(entries: list) -> str:
    return " ".join(f"{dtype}{list(shape)}" for _, shape, dtype in entries)


def _bytes_str(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


SUMMARY_CELL_WIDTH = 64  # characters; a longer cell is cut and ends with an ellipsis


def _cut(cell: str, width: int) -> str:
    """`cell` in at most `width` characters; a cut cell ends with "..." so that it does not read as whole."""
    return cell if len(cell) <= width else cell[:width - 3] + "..."


class Trace:
    """The events of one evaluator, over all of its runs."""

    def __init__(self, rank: int = 0):
        self.rank = rank
        self.events: list[TraceEvent] = []

    def add(self, event: TraceEvent) -> None:
        self.events.append(event)

    def finish_run(self) -> None:
        for e in self.events:
            e.resolve_device_time()

    def summary(self, file=None) -> str:
        """A table of the events, one line each; printed to `file` when given, and returned."""
        header = ("#", "run", "op", "backend", "why", "inputs", "outputs", "sent", "recv", "syncs", "wall ms",
                  "device ms")
        rows = [header]
        for i, e in enumerate(self.events):
            backend = (e.backend or "-") + (f"/{e.path}" if e.path else "") + (f" {e.sms} SMs" if e.sms else "")
            rows.append((str(i), str(e.run), e.op, backend, e.reason or "-", _shape_str(e.inputs),
                         _shape_str(e.outputs), _bytes_str(e.bytes_sent), _bytes_str(e.bytes_recv),
                         str(e.host_syncs), f"{e.wall_ms:.3f}",
                         "-" if e.device_ms is None else f"{e.device_ms:.3f}"))
        widths = [min(max(len(r[c]) for r in rows), SUMMARY_CELL_WIDTH) for c in range(len(header))]
        lines = [f"trace of rank {self.rank}: {len(self.events)} events"]
        for r in rows:
            lines.append("  ".join(_cut(cell, w).ljust(w) for cell, w in zip(r, widths)).rstrip())
        text = "\n".join(lines)
        if file is not None:
            print(text, file=file)
        return text

    def to_chrome(self, path: str) -> str:
        """Writes Chrome trace JSON (Perfetto and chrome://tracing open it); returns the path."""
        events = []
        for e in self.events:
            args = {k: v for k, v in asdict(e).items() if k not in ("_events", "start_us", "wall_ms", "op")}
            events.append({"name": e.op, "cat": e.backend or "local", "ph": "X", "ts": e.start_us,
                           "dur": max(e.wall_ms * 1e3, 0.001), "pid": self.rank, "tid": 0, "args": args})
            if e.device_ms is not None:
                events.append({"name": f"{e.op} (device)", "cat": "device", "ph": "X", "ts": e.start_us,
                               "dur": max(e.device_ms * 1e3, 0.001), "pid": self.rank, "tid": 1})
        meta = [{"name": "process_name", "ph": "M", "pid": self.rank, "args": {"name": f"rank {self.rank}"}},
                {"name": "thread_name", "ph": "M", "pid": self.rank, "tid": 0, "args": {"name": "host"}},
                {"name": "thread_name", "ph": "M", "pid": self.rank, "tid": 1, "args": {"name": "device"}}]
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump({"traceEvents": meta + events, "displayTimeUnit": "ms"}, f)
        return path
