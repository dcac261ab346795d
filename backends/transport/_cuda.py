"""Checked access to the CUDA driver and NVRTC through cuda-python, imported only when first needed.

cuda-python returns a tuple `(error, *values)` from every call instead of raising. `call` unwraps it and
raises `CudaError` naming the call and the error, so no return code goes unchecked. The transport uses
the driver API in the device's *primary* context, the one PyTorch uses, pushed only when it is not
already current, so nothing here changes PyTorch's notion of the current device.
"""
from __future__ import annotations

import threading
from typing import Any

_lock = threading.Lock()
_modules: dict = {}
_primary_contexts: dict = {}


class CudaError(RuntimeError):
    """A CUDA driver or NVRTC call failed; `code` is the error enum cuda-python returned."""

    def __init__(self, message: str, code: Any = None):
        super().__init__(message)
        self.code = code


def _import(name: str):
    module = _modules.get(name)
    if module is not None:
        return module
    try:
        if name == "driver":
            from cuda.bindings import driver as module
        else:
            from cuda.bindings import nvrtc as module
    except ImportError:
        try:  # cuda-python before 12.6 exposed the same bindings under other names
            if name == "driver":
                from cuda import cuda as module
            else:
                from cuda import nvrtc as module
        except ImportError as exc:
            raise RuntimeError(
                "the CUDA transport needs cuda-python (pip install 'cuda-python>=12.4'), "
                f"which could not be imported: {exc}"
            ) from exc
    _modules[name] = module
    return module


def driver():
    """The `cuda.bindings.driver` module, with `cuInit` done."""
    with _lock:
        first = "driver" not in _modules
        module = _import("driver")
    if first:
        call(module.cuInit(0), "cuInit")
    return module


def nvrtc():
    """The `cuda.bindings.nvrtc` module."""
    with _lock:
        return _import("nvrtc")


def _error_text(error) -> str:
    """'NAME: description' for a CUresult or nvrtcResult."""
    kind = type(error).__name__
    try:
        if kind == "CUresult":
            d = _modules["driver"]
            name_err, name = d.cuGetErrorName(error)
            str_err, text = d.cuGetErrorString(error)
            name = name.decode() if int(name_err) == 0 and name else getattr(error, "name", str(error))
            text = text.decode() if int(str_err) == 0 and text else ""
            return f"{name}: {text}" if text else name
        if kind == "nvrtcResult":
            n = _modules["nvrtc"]
            err, text = n.nvrtcGetErrorString(error)
            return text.decode() if int(err) == 0 else getattr(error, "name", str(error))
    except Exception:  # noqa: BLE001 - the message must not hide the original error
        pass
    return getattr(error, "name", str(error))


def call(result, what: str):
    """Unwraps a cuda-python result; raises `CudaError` unless it succeeded.

    Args:
        result: what a cuda-python call returned: `(error, *values)`, or a bare error enum.
        what: the call, for the message (e.g. "cuMemAlloc(4096 bytes) on cuda:1").
    Returns:
        None when the call returns no value, the value when it returns one, else the tuple of values.
    """
    if isinstance(result, tuple):
        error, values = result[0], result[1:]
    else:
        error, values = result, ()
    if int(error) != 0:
        raise CudaError(f"{what} failed: {_error_text(error)}", error)
    if not values:
        return None
    return values[0] if len(values) == 1 else values


def primary_context(device_index: int):
    """The primary context of a device (the one PyTorch uses), retained for the life of the process."""
    context = _primary_contexts.get(device_index)
    if context is None:
        d = driver()
        device = call(d.cuDeviceGet(device_index), f"cuDeviceGet({device_index})")
        context = call(d.cuDevicePrimaryCtxRetain(device), f"cuDevicePrimaryCtxRetain(cuda:{device_index})")
        _primary_contexts[device_index] = context
    return context


class on_device:
    """Makes a device's primary context current for the driver calls inside the `with` block.

    Pushes the context only when another one is current, and pops it afterwards, so that it is cheap
    in the common case (PyTorch already made it current) and leaves the caller's state as it was.
    """

    __slots__ = ("device_index", "context", "pushed")

    def __init__(self, device_index: int):
        self.device_index = device_index
        self.context = primary_context(device_index)
        self.pushed = False

    def __enter__(self):
        d = _modules["driver"]
        current = call(d.cuCtxGetCurrent(), "cuCtxGetCurrent")
        if current is None or int(current) != int(self.context):
            call(d.cuCtxPushCurrent(self.context), f"cuCtxPushCurrent(cuda:{self.device_index})")
            self.pushed = True
        return self.context

    def __exit__(self, *exc_info):
        if self.pushed:
            self.pushed = False
            call(_modules["driver"].cuCtxPopCurrent(), f"cuCtxPopCurrent(cuda:{self.device_index})")
        return False


def device_attribute(device_index: int, attribute_name: str) -> int:
    """An integer attribute of a device, e.g. 'CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT'."""
    d = driver()
    device = call(d.cuDeviceGet(device_index), f"cuDeviceGet({device_index})")
    attribute = getattr(d.CUdevice_attribute, attribute_name)
    return int(call(d.cuDeviceGetAttribute(attribute, device), f"cuDeviceGetAttribute({attribute_name})"))
