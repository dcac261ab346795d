"""The CUDA transport: symmetric GPU buffers mapped through CUDA IPC, pushed by our own kernels.

Each rank allocates its buffer with `cuMemAlloc`, exports it with `cuIpcGetMemHandle`, and publishes the
handle's bytes through the group's store; every rank opens its peers' handles with
`cuIpcOpenMemHandle(..., CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS)`, so a kernel on this GPU can store straight
into a peer's memory (over NVLink). The addresses go to the kernels as an int64 `peer_ptrs` tensor.
`push_rows` (backends/kernels/alltoallv.cu) and `barrier` (backends/kernels/barrier.cu) are single `cuLaunchKernel`s on
torch's current stream: no host synchronisation and no allocation, so they can be captured in a CUDA
graph once the buffers exist. Their errors land in the control block and `check()` raises them.

Every driver call goes through cuda-python, imported on first use. No multicast API is used.
"""
from __future__ import annotations

import ctypes
import threading
import warnings
import weakref

import torch

from . import _cuda, nvrtc
from .base import SymmetricTensor, Transport, _raise_without_cycle, row_bytes

PUSH_SOURCE, PUSH_KERNEL = "alltoallv.cu", "fuser_moe_push_rows"
BARRIER_SOURCE, BARRIER_KERNEL = "barrier.cu", "fuser_moe_barrier"
PUSH_THREADS = 256  # 8 warps a block, one row a warp
BARRIER_THREADS = 32
_MIN_ALLOCATION_BYTES = 256

_count_lock = threading.Lock()
_open_mappings = 0
_live_allocations = 0
_released: list = []  # (device index, address) of allocations no tensor views any more


def open_ipc_mappings() -> int:
    """How many peer buffers this process has mapped through `cuIpcOpenMemHandle` and not yet closed."""
    return _open_mappings


def _live_device_allocations() -> int:
    """How many transport allocations (cuMemAlloc) this process holds; for leak tests."""
    return _live_allocations


def _count(mappings: int = 0, allocations: int = 0) -> None:
    global _open_mappings, _live_allocations
    with _count_lock:
        _open_mappings += mappings
        _live_allocations += allocations


def _release_device_memory(device_index: int, address: int) -> None:
    """Finalizer of a `_DeviceAllocation`: queues the memory for `_free_released_memory`.

    It touches no CUDA API, because it runs wherever the last reference happens to drop, possibly while
    a stream captures a CUDA graph (where freeing would break the capture).
    """
    with _count_lock:
        _released.append((device_index, address))


def _free_released_memory() -> None:
    """Frees the memory that no tensor views any more. Called at points that never run during capture:
    before an allocation, after a retirement, in `check()`, in `close()` and at exit."""
    with _count_lock:
        pending = list(_released)
        _released.clear()
    for device_index, address in pending:
        try:
            d = _cuda.driver()
            with _cuda.on_device(device_index):
                # cuMemFree waits for the kernels still running on the device.
                _cuda.call(d.cuMemFree(d.CUdeviceptr(address)), f"cuMemFree({address:#x}) on cuda:{device_index}")
        except Exception as exc:  # noqa: BLE001 - at exit the context may already be gone
            warnings.warn(f"fuser_moe: could not free a symmetric buffer on cuda:{device_index}: {exc}")
        finally:
            _count(allocations=-1)


class _ExitHook:
    """At exit weakref.finalize runs the newest finalizers first: every allocation (made later than this
    module's import) has queued itself before this one frees the queue."""


_exit_hook = _ExitHook()
weakref.finalize(_exit_hook, _free_released_memory)


class _DeviceAllocation:
    """Zeroed device memory from `cuMemAlloc`, exposed through `__cuda_array_interface__`.

    A tensor made from it with `torch.as_tensor` keeps it alive, so a caller's view of a retired buffer
    never dangles. Once the last such tensor and the transport have dropped it, it is queued and freed at
    the next safe point (`_free_released_memory`).
    """

    def __init__(self, device_index: int, nbytes: int):
        d = _cuda.driver()
        self.device_index = device_index
        self.nbytes = nbytes
        size = max(nbytes, _MIN_ALLOCATION_BYTES)
        where = f"on cuda:{device_index}"
        with _cuda.on_device(device_index):
            address = _cuda.call(d.cuMemAlloc(size), f"cuMemAlloc({size} bytes) {where}")
            self.address = int(address)
            _count(allocations=1)
            self._finalizer = weakref.finalize(self, _release_device_memory, device_index, self.address)
            _cuda.call(d.cuMemsetD8(address, 0, size), f"cuMemsetD8({size} bytes) {where}")
            # cuMemsetD8 runs on the legacy stream, which torch's non-blocking streams do not wait for.
            _cuda.call(d.cuCtxSynchronize(), f"cuCtxSynchronize {where}")

    @property
    def __cuda_array_interface__(self) -> dict:
        return {"shape": (self.nbytes,), "typestr": "|u1", "data": (self.address, False), "version": 2}

    def ipc_handle(self) -> bytes:
        d = _cuda.driver()
        with _cuda.on_device(self.device_index):
            handle = _cuda.call(d.cuIpcGetMemHandle(d.CUdeviceptr(self.address)),
                                f"cuIpcGetMemHandle on cuda:{self.device_index}")
        return bytes(handle.reserved)

    def tensor(self, dtype: torch.dtype, shape: tuple, device: torch.device) -> torch.Tensor:
        if self.nbytes == 0:
            return torch.empty(shape, dtype=dtype, device=device)
        raw = torch.as_tensor(self, device=device)
        if raw.device != device or raw.data_ptr() != self.address:
            raise RuntimeError(
                f"wrapping a symmetric buffer at {self.address:#x} as a tensor gave {raw.device} at "
                f"{raw.data_ptr():#x}, expected {device} without a copy"
            )
        return raw.view(dtype).view(shape)


class _PeerMapping:
    """A peer's buffer opened in this process with `cuIpcOpenMemHandle`."""

    def __init__(self, device_index: int, handle: bytes, peer: int):
        d = _cuda.driver()
        self.device_index = device_index
        self.peer = peer
        ipc_handle = d.CUipcMemHandle()
        ipc_handle.reserved = handle
        flags = int(d.CUipcMem_flags.CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS)
        with _cuda.on_device(device_index):
            address = _cuda.call(
                d.cuIpcOpenMemHandle(ipc_handle, flags),
                f"cuIpcOpenMemHandle(buffer of rank {peer}) on cuda:{device_index} (can this GPU reach the "
                "peer's GPU, and do both ranks run on this host?)",
            )
        self.address = int(address)
        self.open = True
        _count(mappings=1)

    def close(self) -> None:
        if not self.open:
            return
        self.open = False
        _count(mappings=-1)
        d = _cuda.driver()
        with _cuda.on_device(self.device_index):
            _cuda.call(d.cuIpcCloseMemHandle(d.CUdeviceptr(self.address)),
                       f"cuIpcCloseMemHandle(buffer of rank {self.peer}) on cuda:{self.device_index}")


class _Mappings:
    """Every peer mapping a transport holds, closed at close() and at interpreter exit."""

    def __init__(self, device_index: int):
        self.device_index = device_index
        self.open: list = []

    def close(self, mappings: list, quiet: bool) -> None:
        for mapping in mappings:
            try:
                mapping.close()
            except Exception as exc:  # noqa: BLE001
                if not quiet:
                    raise
                warnings.warn(f"fuser_moe: {exc}")
            if mapping in self.open:
                self.open.remove(mapping)

    def release(self) -> None:
        """Closes whatever is still open, after the device finished the kernels that use it."""
        if not self.open:
            return
        try:
            d = _cuda.driver()
            with _cuda.on_device(self.device_index):
                _cuda.call(d.cuCtxSynchronize(), "cuCtxSynchronize")
        except Exception as exc:  # noqa: BLE001
            warnings.warn(f"fuser_moe: closing symmetric buffers on cuda:{self.device_index}: {exc}")
        self.close(list(self.open), quiet=True)


def _gpu_identity(index: int) -> str:
    """A name of the GPU that is the same in every process that uses it (its UUID; the PCI address where
    torch gives none): ranks compare it to learn which of them share a GPU."""
    props = torch.cuda.get_device_properties(index)
    uuid = getattr(props, "uuid", None)
    if uuid is not None:
        return str(uuid)
    return f"pci:{props.pci_domain_id}:{props.pci_bus_id}:{props.pci_device_id}"


class CudaIpcTransport(Transport):
    """`Transport` for CUDA tensors: buffers shared through CUDA IPC, NVRTC-compiled kernels.

    Every rank must run on this host, one process per GPU, and every pair of GPUs must have peer access.
    """

    def __init__(self, comm):
        device = torch.device(comm.device)
        if device.type != "cuda":
            raise ValueError(f"CudaIpcTransport runs on CUDA tensors, the communicator is on {device}")
        if not torch.cuda.is_available():
            raise RuntimeError("CudaIpcTransport needs CUDA, and torch sees no CUDA device")
        index = device.index if device.index is not None else torch.cuda.current_device()
        super().__init__(comm, torch.device("cuda", index))
        self._index = index
        torch.cuda.init()
        _cuda.driver()  # fails here, with the reason, when cuda-python is missing
        self._mappings = _Mappings(index)
        self._finalizer = weakref.finalize(self, self._mappings.release)
        self._push_kernel = None
        self._barrier_kernel = None
        self._reported_index = None
        self._max_push_blocks = 4 * _cuda.device_attribute(index, "CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT")
        self._gpu = _gpu_identity(index)
        self._ranks_on_device = 1 if self.world_size == 1 else None  # known after the first allocation

    # ------------------------------------------------------------------ allocation
    def _capturing(self) -> bool:
        with torch.cuda.device(self._index):
            return torch.cuda.is_current_stream_capturing()

    def _before_allocation(self, what: str) -> None:
        if self._capturing():
            raise RuntimeError(
                f"{what} needs a new symmetric allocation, which cannot happen while the current stream "
                "captures a CUDA graph: run the same calls once before capturing (warm-up) so that every "
                "buffer already has its largest size"
            )
        # Pushes this rank enqueued into peers' buffers must be done before any buffer is retired.
        torch.cuda.synchronize(self.device)
        _free_released_memory()

    def _allocate(self, purpose, dtype, trailing_shape, rows) -> SymmetricTensor:
        allocation = self._next_allocation()
        spec = self._spec(purpose, dtype, trailing_shape, rows)
        what = f"{self._describe(spec)} on rank {self.rank}"
        shape = (rows, *trailing_shape)
        memory = _DeviceAllocation(self._index, rows * row_bytes(dtype, trailing_shape))
        local = memory.tensor(dtype, shape, self.device)
        # Zeroed (and the zeroing finished) before any peer can map it: a flag or stamp word must not hold
        # a stale value from memory the driver hands out again, and a zeroing enqueued after the peers
        # could write here would race with their first stores.
        local.zero_()
        torch.cuda.current_stream(self.device).synchronize()
        addresses = [0] * self.world_size
        addresses[self.rank] = memory.address
        mappings = []
        if self.world_size > 1:
            try:
                records = self._rendezvous(f"a{allocation}/publish",
                                           {**spec, "handle": memory.ipc_handle().hex(), "gpu": self._gpu}, what)
                self._check_agreement(records, spec)
                self._ranks_on_device = sum(record.get("gpu") == self._gpu for record in records)
                for peer, record in enumerate(records):
                    if peer != self.rank:
                        mapping = _PeerMapping(self._index, bytes.fromhex(record["handle"]), peer)
                        mappings.append(mapping)
                        addresses[peer] = mapping.address
                self._rendezvous(f"a{allocation}/ready", None, what)
            except BaseException:
                self._mappings.close(mappings, quiet=True)
                raise
            self._mappings.open.extend(mappings)
        peer_ptrs = torch.tensor(addresses, dtype=torch.int64, device=self.device)
        peers = [local if r == self.rank else None for r in range(self.world_size)]
        buffer = SymmetricTensor(self, purpose, dtype, trailing_shape, rows, local, peers, peer_ptrs, allocation)
        buffer._resources = (memory, mappings)
        return buffer

    def _retire(self, old: SymmetricTensor, allocation: int) -> None:
        """Unmaps the peers' old buffers; after every rank did, the old local memory may be freed."""
        old.retired = True
        memory, mappings = old._resources
        self._mappings.close(mappings, quiet=False)
        self._rendezvous(f"a{allocation}/retired", None, f"retiring {old!r} on rank {self.rank}")
        old._resources = None  # `memory` is freed once no tensor views it any more
        del memory

    def _ensure_control(self) -> SymmetricTensor:
        if self._control is None:
            self._before_allocation("the barrier's control block")  # refuses during capture, before loading
            self._push_kernel = nvrtc.get_kernel(PUSH_SOURCE, PUSH_KERNEL, self.device)
            self._barrier_kernel = nvrtc.get_kernel(BARRIER_SOURCE, BARRIER_KERNEL, self.device)
            control = super()._ensure_control()
            self._reported_index = torch.tensor(self.layout.reported(), dtype=torch.int64, device=self.device)
            base = control.local.data_ptr()
            layout = self.layout
            self._fwd_needed = ctypes.c_uint64(base + 8 * layout.array("fwd_needed", 0))
            self._fwd_capacity = ctypes.c_uint64(base + 8 * layout.array("fwd_capacity", 0))
            self._status = ctypes.c_uint64(base + 8 * layout.scalar("out_needed"))
        return self._control

    @property
    def ranks_on_device(self) -> int:
        """How many ranks of the group (this one included) run on this rank's GPU. Collective the first
        time in a group of several ranks (it makes the control block, whose rendezvous tells it)."""
        if self._ranks_on_device is None:
            self._ensure_control()
        return self._ranks_on_device

    @property
    def barrier_gave_up(self) -> torch.Tensor:
        """The control block's timeout_generation word (a one-element int64 view): nonzero once a barrier
        of this rank gave up waiting for a peer, until `check()` reports it. Kernels that wait for peers'
        rows after a barrier read it to stop waiting too (the peer that missed the barrier sends nothing)."""
        control = self._ensure_control()
        at = self.layout.scalar("timeout_generation")
        return control.local[at:at + 1]

    # ------------------------------------------------------------------ data path
    def push_rows(self, src, src_row, dst_rank, dst_row, dst) -> None:
        n = self._validate_push(src, src_row, dst_rank, dst_row, dst)
        if self._control is None:
            self._ensure_control()
        if n == 0:
            return
        blocks = min(-(-n // (PUSH_THREADS // 32)), self._max_push_blocks)
        self._push_kernel.launch(blocks, PUSH_THREADS, [
            src, ctypes.c_int64(src.shape[0]), src_row, dst_rank, dst_row, ctypes.c_int64(n),
            dst.peer_ptrs, ctypes.c_int64(dst.rows), ctypes.c_int64(dst.row_bytes), ctypes.c_int32(self.world_size),
            self._fwd_needed, self._fwd_capacity, self._status,
        ])

    def barrier(self) -> None:
        self._check_open()
        control = self._ensure_control()
        timeout_ns = int(self.timeout_s * 1e9)
        self._barrier_kernel.launch(1, BARRIER_THREADS, [
            control.peer_ptrs, ctypes.c_int32(self.rank), ctypes.c_int32(self.world_size), ctypes.c_int64(timeout_ns),
        ])

    def check(self) -> None:
        """Reads the control block (a host synchronisation on the current stream), raises, clears."""
        if self._control is None:
            return
        if self._capturing():
            raise RuntimeError("check() synchronises with the host and cannot run during CUDA graph capture")
        with torch.cuda.device(self._index):
            local = self._control.local
            words = local.cpu().tolist()
            if any(words[i] for i in self.layout.reported()):
                local.index_fill_(0, self._reported_index, 0)
        _free_released_memory()
        _raise_without_cycle(self._report(words))  # no local holds the exception: no reference cycle

    # ------------------------------------------------------------------ lifetime
    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        buffers = list(self._buffers.values()) + ([self._control] if self._control is not None else [])
        self._buffers.clear()
        self._control = None
        for buffer in buffers:
            buffer.retired = True
            buffer._resources = None
        buffers = buffer = None  # noqa: F841 - drop the last references before freeing
        self._finalizer()  # synchronises, then closes every peer mapping
        _free_released_memory()
