"""Per-node backend choice (docs/contract.md section 7): NCCL, CUDA, or AUTO resolved with a recorded reason.

The choice must be the same on every rank, or ranks would wait in different transports; every input
to it is therefore either the same everywhere (the node's attribute, tensors' device type) or gathered
from all ranks once per communicator (hosts, peer access).
"""
from __future__ import annotations

import socket
from typing import Optional

import torch

from fuser_moe.backends.communicator import Communicator
from fuser_moe.ir import CommunicatorBackend

_backends: dict = {}


def get_backend(name: str):
    """The backend object for 'nccl' or 'cuda' (the CUDA backend is imported on first use)."""
    if name not in _backends:
        if name == "nccl":
            from fuser_moe.backends.nccl import NcclBackend

            _backends[name] = NcclBackend()
        elif name == "cuda":
            from fuser_moe.backends.cuda import CudaBackend

            _backends[name] = CudaBackend()
        else:
            raise ValueError(f"unknown backend {name!r}")
    return _backends[name]


def cuda_backend_missing(device) -> Optional[str]:
    """Why the CUDA backend cannot run on `device` here, or None when it can."""
    try:
        backend = get_backend("cuda")
    except ImportError as exc:
        return f"the CUDA backend is not available: {exc}"
    return backend.unavailable_reason(torch.device(device))


def _group_facts(comm: Communicator) -> dict:
    """Hosts and peer access of the whole group, gathered once and cached on the communicator."""
    facts = getattr(comm, "_selection_facts", None)
    if facts is not None:
        return facts
    device = comm.device
    mine = {"host": socket.gethostname(),
            "device": device.index if device.type == "cuda" else None,
            "n_gpus": torch.cuda.device_count() if torch.cuda.is_available() else 0}
    everyone = comm.exchange(mine)
    same_host = len({f["host"] for f in everyone}) == 1
    peer_ok, missing = True, []
    if same_host and device.type == "cuda":
        for f in everyone:
            other = f["device"]
            if other is not None and other != device.index and not torch.cuda.can_device_access_peer(device.index, other):
                peer_ok = False
                missing.append((device.index, other))
    verdicts = comm.exchange((peer_ok, missing))
    facts = {"same_host": same_host, "peer_access": all(v[0] for v in verdicts),
             "missing_peers": [m for v in verdicts for m in v[1]]}
    comm._selection_facts = facts
    return facts


def resolve_backend(requested: CommunicatorBackend, device: torch.device, comm: Communicator) -> tuple[str, str]:
    """Returns (backend name, reason). Raises RuntimeError when an explicit choice cannot run here."""
    if requested == CommunicatorBackend.NCCL:
        return "nccl", "requested"
    if requested == CommunicatorBackend.CUDA:
        missing = cuda_backend_missing(device)
        if missing:
            raise RuntimeError(f"backend=cuda was requested but {missing}")
        if device.type == "cuda" and comm.is_distributed:
            facts = _group_facts(comm)
            if not facts["same_host"]:
                raise RuntimeError("backend=cuda was requested but the ranks of the group are on more than one "
                                   "host; CUDA IPC needs every rank on one host (use nccl or auto)")
            if not facts["peer_access"]:
                raise RuntimeError(f"backend=cuda was requested but these GPU pairs have no peer access: "
                                   f"{facts['missing_peers']} (use nccl or auto)")
        transport = "CUDA IPC" if device.type == "cuda" else "POSIX shared memory"
        return "cuda", f"requested ({transport})"
    # AUTO
    if device.type != "cuda":
        return "nccl", "auto: tensors are on the CPU"
    missing = cuda_backend_missing(device)
    if missing:
        return "nccl", f"auto: {missing}"
    if not comm.is_distributed:
        return "cuda", "auto: single rank on a CUDA device"
    facts = _group_facts(comm)
    if not facts["same_host"]:
        return "nccl", "auto: ranks span several hosts"
    if not facts["peer_access"]:
        return "nccl", f"auto: no peer access between GPUs {facts['missing_peers']}"
    return "cuda", "auto: CUDA tensors, one host, peer access between every pair of GPUs"
