"""Compiles the backends' CUDA C++ kernels with NVRTC at first use, loads them and launches them.

Every kernel of the CUDA backend lives in a `.cu` file (docs/contract.md section 8) that compiles unchanged
under nvcc (tools/check_kernels.sh) and NVRTC: no system headers, fixed-width types by typedef, and
`extern "C"` entry points so that names are not mangled.

    kernel = get_kernel("alltoallv.cu", "fuser_moe_push_rows", torch.device("cuda", 0))
    kernel.launch(grid, block, [src_tensor, ctypes.c_int64(n), ...])   # on torch's current stream

Compilation targets the device's own architecture (`--gpu-architecture=sm_XY`), with `--fmad=false`
(docs/contract.md section 4: `a * b + c` must not be contracted) and `-std=c++17`. Binaries are cached on disk,
keyed by the sha256 of the source, the headers beside it, the options, the architecture and the NVRTC
version, under `$FUSER_MOE_KERNEL_CACHE`, else `$XDG_CACHE_HOME/fuser_moe/kernels`, else
`~/.cache/fuser_moe/kernels`; loaded modules are cached per device in the process.

For kernel work, `FUSER_MOE_KERNEL_DEFINES` (say `"FM_LL_COPY_BATCH=16 FM_SOMETHING"`) adds one `-D`
option per word to every compilation (and to the cache key), so variants of a compile-time constant can
be timed against each other without editing a source. Results must not depend on it: a define that
changes bits is a bug.

Argument convention for `Kernel.launch(args=...)`, one item per kernel parameter, in order:
  - a `torch.Tensor` passes its `data_ptr()` (a pointer parameter); it must be on the kernel's device;
  - `None` passes a null pointer;
  - a ctypes value passes itself with its own width: `ctypes.c_int32(world)` for `int`,
    `ctypes.c_int64(n)` for `long long`, `ctypes.c_uint64(address)` or `ctypes.c_void_p(address)` for a
    raw pointer, `ctypes.c_float(x)` for `float`, `ctypes.c_double(x)` for `double`.
Bare Python ints, floats and bools are refused: their width in the kernel would be a guess. Where the
driver can tell (cuFuncGetParamInfo, CUDA 12.4+), the number and sizes of the arguments are checked
against the kernel's parameters before the first launch.

Launches go through `cuLaunchKernel` on the given stream (by default torch's current stream of the
kernel's device), never synchronise and never allocate, so they are stream-ordered and can be
captured in a CUDA graph. A launch with `overlap_previous=True` goes through `cuLaunchKernelEx` with
programmatic stream serialisation (on compute capability 9.0 and newer, unless `FUSER_MOE_PDL=0`): the
kernel may start while the kernel before it in the stream is still running, once every block of that one
has executed `griddepcontrol.launch_dependents` (or exited). Only a kernel that orders itself after its
predecessor by other means (flags it acquires) may ask for it; work after it in the stream is ordered
as usual.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import tempfile
import threading
from pathlib import Path
from typing import Optional, Sequence, Union

import torch

from . import _cuda

KERNEL_DIR = Path(__file__).resolve().parent.parent / "kernels"  # backends/kernels: every .cu and its header
COMPILE_OPTIONS = ("--fmad=false", "-std=c++17")
HEADER_SUFFIXES = (".cuh", ".h", ".hpp")

_lock = threading.Lock()
_modules: dict = {}  # (source path, device index) -> CUmodule
_kernels: dict = {}  # (source path, kernel name, device index) -> Kernel

Dim = Union[int, Sequence[int]]


def resolve_source(source_file: Union[str, os.PathLike]) -> Path:
    """An absolute path is used as is; a relative one names a file in backends/kernels/."""
    path = Path(source_file)
    if not path.is_absolute():
        path = KERNEL_DIR / path
    if not path.is_file():
        raise FileNotFoundError(f"kernel source {path} does not exist")
    return path.resolve()


def cache_dir() -> Path:
    """Where compiled kernels are kept between processes."""
    explicit = os.environ.get("FUSER_MOE_KERNEL_CACHE")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fuser_moe" / "kernels"


def device_arch(device_index: int) -> tuple:
    """(major, minor) compute capability of a device."""
    major = _cuda.device_attribute(device_index, "CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR")
    minor = _cuda.device_attribute(device_index, "CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR")
    return major, minor


def target_for(capability: tuple) -> tuple:
    """The NVRTC target for a compute capability: ('sm_XY', cubin) if NVRTC knows the GPU, else PTX
    for the newest virtual architecture it knows that the GPU runs (the driver compiles that PTX)."""
    n = _cuda.nvrtc()
    wanted = capability[0] * 10 + capability[1]
    supported = list(_cuda.call(n.nvrtcGetSupportedArchs(), "nvrtcGetSupportedArchs"))
    if wanted in supported:
        return f"sm_{wanted}", True
    older = [a for a in supported if a <= wanted]
    if not older:
        raise RuntimeError(
            f"NVRTC supports the architectures {supported}, none of which runs on a GPU of compute "
            f"capability {capability[0]}.{capability[1]}"
        )
    return f"compute_{max(older)}", False


def _nvrtc_version() -> str:
    n = _cuda.nvrtc()
    major, minor = _cuda.call(n.nvrtcVersion(), "nvrtcVersion")
    return f"{major}.{minor}"


def compile_options() -> tuple:
    """COMPILE_OPTIONS plus a `-D` option for each word of `FUSER_MOE_KERNEL_DEFINES`."""
    words = os.environ.get("FUSER_MOE_KERNEL_DEFINES", "").split()
    for word in words:
        name = word.split("=", 1)[0]
        if not name.isidentifier():
            raise ValueError(f"FUSER_MOE_KERNEL_DEFINES: {word!r} is not NAME or NAME=VALUE")
    return COMPILE_OPTIONS + tuple(f"-D{word}" for word in words)


def _headers_beside(path: Path) -> list:
    return sorted(p for p in path.parent.iterdir() if p.suffix in HEADER_SUFFIXES and p.is_file())


def compile_source(path: Path, arch: str, cubin: bool) -> bytes:
    """Compiles one .cu file with NVRTC; returns a cubin (`cubin=True`) or NUL-terminated PTX.

    Raises:
        RuntimeError with NVRTC's log when the source does not compile.
    """
    n = _cuda.nvrtc()
    source = path.read_bytes()
    options = [f"--gpu-architecture={arch}", *compile_options(), f"--include-path={path.parent}"]
    program = _cuda.call(n.nvrtcCreateProgram(source, path.name.encode(), 0, [], []),
                         f"nvrtcCreateProgram({path.name})")
    try:
        result = n.nvrtcCompileProgram(program, len(options), [o.encode() for o in options])
        error = result[0] if isinstance(result, tuple) else result
        log_size = _cuda.call(n.nvrtcGetProgramLogSize(program), "nvrtcGetProgramLogSize")
        log = b" " * log_size
        _cuda.call(n.nvrtcGetProgramLog(program, log), "nvrtcGetProgramLog")
        if int(error) != 0:
            text = log.decode(errors="replace").rstrip("\x00 \n")
            raise RuntimeError(
                f"NVRTC could not compile {path} ({' '.join(options)}): {_cuda._error_text(error)}\n{text}"
            )
        if cubin:
            size = _cuda.call(n.nvrtcGetCUBINSize(program), "nvrtcGetCUBINSize")
            binary = b" " * size
            _cuda.call(n.nvrtcGetCUBIN(program, binary), "nvrtcGetCUBIN")
        else:
            size = _cuda.call(n.nvrtcGetPTXSize(program), "nvrtcGetPTXSize")
            binary = b" " * size
            _cuda.call(n.nvrtcGetPTX(program, binary), "nvrtcGetPTX")
        return binary
    finally:
        _cuda.call(n.nvrtcDestroyProgram(program), "nvrtcDestroyProgram")


def compiled_binary(path: Path, capability: tuple) -> bytes:
    """The compiled form of a source for a compute capability, from the disk cache when it is there."""
    arch, cubin = target_for(capability)
    digest = hashlib.sha256()
    for part in (path.read_bytes(), *(h.read_bytes() for h in _headers_beside(path))):
        digest.update(hashlib.sha256(part).digest())
    digest.update(" ".join((arch, *compile_options(), "nvrtc", _nvrtc_version())).encode())
    cached = cache_dir() / f"{path.stem}-{arch}-{digest.hexdigest()[:40]}.{'cubin' if cubin else 'ptx'}"
    try:
        return cached.read_bytes()
    except OSError:
        pass
    binary = compile_source(path, arch, cubin)
    try:  # several ranks may compile at once: write a private file, then rename it into place
        cached.parent.mkdir(parents=True, exist_ok=True)
        fd, partial = tempfile.mkstemp(dir=cached.parent, prefix=f".{cached.name}.")
        with os.fdopen(fd, "wb") as f:
            f.write(binary)
        os.replace(partial, cached)
    except OSError:
        pass  # a read-only cache only costs a compile per process
    return binary


def _param_sizes(function) -> Optional[list]:
    """Byte size of each kernel parameter, or None where the driver cannot say (before CUDA 12.4)."""
    d = _cuda.driver()
    query = getattr(d, "cuFuncGetParamInfo", None)
    if query is None:
        return None
    sizes = []
    for index in range(4096):
        try:
            result = query(function, index)
        except Exception:  # noqa: BLE001 - binding present, driver entry point missing
            return None
        if int(result[0]) != 0:
            if index == 0 and result[0] != d.CUresult.CUDA_ERROR_INVALID_VALUE:
                return None
            break
        sizes.append(int(result[2]))
    return sizes


def _dims(value: Dim, what: str) -> tuple:
    dims = (value,) if isinstance(value, int) else tuple(value)
    if not 1 <= len(dims) <= 3 or any(not isinstance(x, int) or x < 1 for x in dims):
        raise ValueError(f"{what} must be a positive int or 1 to 3 positive ints, got {value!r}")
    return dims + (1,) * (3 - len(dims))


class Kernel:
    """One `extern "C"` kernel of a `.cu` file, loaded on one device.

    Attributes:
        name: the kernel's name in the source.
        device: the `torch.device` it was loaded on.
        param_sizes: bytes of each parameter as the driver reports them, or None.
    """

    def __init__(self, name: str, device: torch.device, function, param_sizes: Optional[list]):
        self.name = name
        self.device = device
        self.function = function
        self.param_sizes = param_sizes
        self.shared_allowed = DEFAULT_SHARED  # dynamic shared memory a launch may ask for without opting in

    def _allow_shared(self, d, shared_mem: int) -> None:
        """Opts the kernel in to `shared_mem` bytes of dynamic shared memory (past the 48 KiB every launch
        may take), once per size it grows to; the driver refuses more than the device's opt-in limit."""
        attribute = d.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
        _cuda.call(d.cuFuncSetAttribute(self.function, attribute, int(shared_mem)),
                   f"cuFuncSetAttribute({self.name}, MAX_DYNAMIC_SHARED_SIZE_BYTES={shared_mem}) on {self.device} "
                   f"(the device allows {shared_memory_limit(self.device)} bytes a block)")
        self.shared_allowed = int(shared_mem)

    def _pack(self, args: Sequence) -> tuple:
        values = []
        for position, arg in enumerate(args):
            if isinstance(arg, torch.Tensor):
                if arg.device != self.device:
                    raise ValueError(
                        f"{self.name}: argument {position} is a tensor on {arg.device}, the kernel runs on "
                        f"{self.device}"
                    )
                values.append(ctypes.c_void_p(arg.data_ptr()))
            elif arg is None:
                values.append(ctypes.c_void_p(0))
            elif isinstance(arg, (ctypes._SimpleCData, ctypes.Structure)):
                values.append(arg)
            else:
                raise TypeError(
                    f"{self.name}: argument {position} is a {type(arg).__name__}; pass numbers as explicit "
                    "ctypes values (ctypes.c_int32, c_int64, c_uint64, c_float, ...) and pointers as tensors"
                )
        if self.param_sizes is not None:
            given = [ctypes.sizeof(v) for v in values]
            if len(given) != len(self.param_sizes):
                raise TypeError(f"{self.name} takes {len(self.param_sizes)} arguments, got {len(given)}")
            for position, (size, want) in enumerate(zip(given, self.param_sizes)):
                if size != want:
                    raise TypeError(
                        f"{self.name}: argument {position} is {size} bytes wide ({type(values[position]).__name__}), "
                        f"the kernel's parameter is {want} bytes"
                    )
        pointers = (ctypes.c_void_p * max(len(values), 1))(*[ctypes.addressof(v) for v in values])
        return values, pointers

    def launch(self, grid: Dim, block: Dim, args: Sequence, stream=None, shared_mem: int = 0,
               overlap_previous: bool = False) -> None:
        """Enqueues the kernel; returns at once (no host synchronisation, no allocation).

        Args:
            grid: blocks, an int or up to three ints (each >= 1).
            block: threads per block, likewise.
            args: the kernel's arguments in order (see the module's argument convention).
            stream: a `torch.cuda.Stream`, a raw `cudaStream_t` as an int, or None for torch's current
                stream on the kernel's device.
            shared_mem: bytes of dynamic shared memory per block; past 48 KiB the kernel is opted in to
                it first (up to `shared_memory_limit(device)`, less the kernel's static shared memory).
            overlap_previous: let the kernel start before the previous kernel of the stream has ended
                (programmatic dependent launch, where `programmatic_launch(device)` allows it); only for
                kernels that order themselves after it by flags of their own.
        """
        d = _cuda.driver()
        grid3, block3 = _dims(grid, "grid"), _dims(block, "block")
        if stream is None:
            handle = torch.cuda.current_stream(self.device).cuda_stream
        elif isinstance(stream, torch.cuda.Stream):
            handle = stream.cuda_stream
        else:
            handle = int(stream)
        values, pointers = self._pack(args)
        with _cuda.on_device(self.device.index):
            if shared_mem > self.shared_allowed:
                self._allow_shared(d, shared_mem)
            if overlap_previous and programmatic_launch(self.device):
                config = d.CUlaunchConfig()
                config.gridDimX, config.gridDimY, config.gridDimZ = grid3
                config.blockDimX, config.blockDimY, config.blockDimZ = block3
                config.sharedMemBytes = shared_mem
                config.hStream = d.CUstream(handle)
                config.attrs = [_programmatic_attribute(d)]
                config.numAttrs = 1
                result = d.cuLaunchKernelEx(config, self.function, ctypes.addressof(pointers), 0)
                api = "cuLaunchKernelEx"
            else:
                result = d.cuLaunchKernel(self.function, *grid3, *block3, shared_mem, d.CUstream(handle),
                                          ctypes.addressof(pointers), 0)
                api = "cuLaunchKernel"
        del values  # kept alive until the driver has copied the parameters
        _cuda.call(result, f"{api}({self.name}, grid={grid3}, block={block3}) on {self.device}")


DEFAULT_SHARED = 48 * 1024  # dynamic shared memory a launch gets without opting in
_shared_limits: dict = {}  # device index -> the most shared memory a block may opt in to


def shared_memory_limit(device) -> int:
    """Bytes of shared memory one block may use on this device after opting in (static and dynamic
    together; 227 KiB on compute capability 9.0), or 48 KiB where the driver does not say."""
    index = _device_index(device)
    limit = _shared_limits.get(index)
    if limit is None:
        try:
            limit = _cuda.device_attribute(index, "CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN")
        except (AttributeError, RuntimeError):  # a driver binding or driver without the attribute
            limit = DEFAULT_SHARED
        limit = _shared_limits[index] = max(int(limit), DEFAULT_SHARED)
    return limit


_programmatic: dict = {}  # device index -> whether programmatic dependent launch is used there


def programmatic_launch(device) -> bool:
    """Whether launches with `overlap_previous=True` use programmatic dependent launch on this device:
    compute capability 9.0 or newer, a driver binding with `cuLaunchKernelEx`, and `FUSER_MOE_PDL` not 0."""
    if os.environ.get("FUSER_MOE_PDL", "1") == "0":
        return False
    index = _device_index(device)
    allowed = _programmatic.get(index)
    if allowed is None:
        allowed = torch.cuda.get_device_capability(index)[0] >= 9 and hasattr(_cuda.driver(), "cuLaunchKernelEx")
        _programmatic[index] = allowed
    return allowed


def _programmatic_attribute(d):
    attribute = d.CUlaunchAttribute()
    attribute.id = d.CUlaunchAttributeID.CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION
    attribute.value.programmaticStreamSerializationAllowed = 1
    return attribute


def _device_index(device) -> int:
    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError(f"kernels run on CUDA devices, got {device}")
    return device.index if device.index is not None else torch.cuda.current_device()


def get_kernel(source_file: Union[str, os.PathLike], name: str, device) -> Kernel:
    """A kernel, compiled and loaded on first use and cached per (source, name, device).

    Args:
        source_file: a `.cu` file; a relative path names a file in backends/kernels/.
        name: the `extern "C"` name of the kernel in that file.
        device: the CUDA device (`torch.device`, "cuda:1", or an index) to load it on.
    Returns:
        The `Kernel`, ready to `launch`.
    """
    path = resolve_source(source_file)
    index = _device_index(device)
    key = (str(path), name, index)
    kernel = _kernels.get(key)
    if kernel is not None:
        return kernel
    with _lock:
        kernel = _kernels.get(key)
        if kernel is not None:
            return kernel
        d = _cuda.driver()
        module = _modules.get((str(path), index))
        with _cuda.on_device(index):
            if module is None:
                binary = compiled_binary(path, device_arch(index))
                module = _cuda.call(d.cuModuleLoadData(binary), f"cuModuleLoadData({path.name}) on cuda:{index}")
                _modules[(str(path), index)] = module
            function = _cuda.call(d.cuModuleGetFunction(module, name.encode()),
                                  f"cuModuleGetFunction({name}) in {path.name}")
            param_sizes = _param_sizes(function)
        kernel = Kernel(name, torch.device("cuda", index), function, param_sizes)
        _kernels[key] = kernel
        return kernel
