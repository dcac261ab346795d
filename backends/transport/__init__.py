"""Symmetric-memory transport of the CUDA backend (docs/contract.md section 8).

`transport_for(comm)` gives the one transport of a communicator: `CudaIpcTransport` for CUDA devices
(buffers shared through CUDA IPC, NVRTC-compiled push and barrier kernels), `ShmTransport` for the CPU
(the same protocol over POSIX shared memory, so that CI exercises it). Both implement `Transport`:
`buffer`, `push_rows`, `barrier`, `check`, `close`. cuda-python is imported only by the CUDA transport,
so this package imports without it.
"""
from __future__ import annotations

import threading
import weakref

import torch

from .base import ControlLayout, SymmetricTensor, Transport
from .cuda_ipc import CudaIpcTransport, open_ipc_mappings
from .shm import ShmTransport

__all__ = [
    "ControlLayout", "CudaIpcTransport", "ShmTransport", "SymmetricTensor", "Transport",
    "open_ipc_mappings", "transport_for",
]

_lock = threading.Lock()
_transports: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def transport_for(comm) -> Transport:
    """The transport of a communicator, created on first use and closed with the communicator.

    Creating it allocates nothing; the first `buffer`, `push_rows` or `barrier` (collective calls)
    sets up the barrier's control block on every rank.

    Args:
        comm: a `Communicator` (rank, world_size, device, timeout_s, store, on_close).
    Returns:
        `ShmTransport` when `comm.device` is the CPU, `CudaIpcTransport` when it is a CUDA device.
    """
    with _lock:
        transport = _transports.get(comm)
        if transport is not None and not transport.closed:
            return transport
        device = torch.device(comm.device)
        if device.type == "cpu":
            transport = ShmTransport(comm)
        elif device.type == "cuda":
            transport = CudaIpcTransport(comm)
        else:
            raise ValueError(f"no symmetric-memory transport for {device} tensors (CPU and CUDA only)")
        _transports[comm] = transport
        comm.on_close(transport.close)
        return transport

