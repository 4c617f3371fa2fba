"""CUDA C kernels compiled at run time with NVRTC and launched through the driver API.

For the few kernels Triton cannot express well (where the schedule of loads is the whole point: the
int4 GEMV of :mod:`trtlm.quant.w4_gemv`), trtlm compiles CUDA C with NVRTC, the runtime compiler
every CUDA build of PyTorch ships (``libnvrtc``), so there is no build step, no ``nvcc`` and
nothing to install.  A kernel is compiled once per process, device and variant (the ``#define``
lines that specialise it), for the device's own architecture.

Launches go through ``cuLaunchKernelEx`` on PyTorch's current stream, so they are captured into
CUDA graphs like any other kernel, and may carry the programmatic-dependent-launch attribute
(:mod:`trtlm.runtime.kernels.pdl`: the kernel calls ``griddepcontrol.wait`` before it reads what
the kernel before wrote).

Only ``ctypes`` is used: where NVRTC or the driver cannot be found, :func:`nvrtc_available` is
false and callers keep their other kernels.
"""
from __future__ import annotations

import ctypes
import functools
import glob
import os
import sys

import torch

__all__ = ["nvrtc_available", "compile_kernel", "CudaKernel"]

_CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION = 6
_CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES = 8
_STATIC_SHARED_LIMIT = 48 * 1024  # dynamic shared memory beyond this needs the attribute above


class _LaunchAttribute(ctypes.Structure):
    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_char * 4), ("value", ctypes.c_char * 64)]


class _LaunchConfig(ctypes.Structure):
    _fields_ = [("gridDimX", ctypes.c_uint), ("gridDimY", ctypes.c_uint), ("gridDimZ", ctypes.c_uint),
                ("blockDimX", ctypes.c_uint), ("blockDimY", ctypes.c_uint), ("blockDimZ", ctypes.c_uint),
                ("sharedMemBytes", ctypes.c_uint), ("hStream", ctypes.c_void_p),
                ("attrs", ctypes.POINTER(_LaunchAttribute)), ("numAttrs", ctypes.c_uint)]


def _candidates_nvrtc() -> list[str]:
    """libnvrtc by soname (PyTorch's CUDA wheels load it, or the system has it), then the copies
    the ``nvidia-*`` wheels put in site-packages."""
    major = (torch.version.cuda or "12").split(".")[0]
    names = [f"libnvrtc.so.{major}", "libnvrtc.so"]
    for root in sys.path:
        names += sorted(glob.glob(os.path.join(root, "nvidia", "*", "lib", f"libnvrtc.so.{major}*")))
    return names


@functools.lru_cache(maxsize=None)
def _libs() -> tuple[ctypes.CDLL, ctypes.CDLL] | None:
    if torch.version.cuda is None or os.environ.get("TRTLM_NO_NVRTC"):
        return None
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    if not hasattr(cuda, "cuLaunchKernelEx"):  # (a driver older than CUDA 12)
        return None
    for name in _candidates_nvrtc():
        try:
            return ctypes.CDLL(name), cuda
        except OSError:
            continue
    return None


def nvrtc_available() -> bool:
    """Whether CUDA C kernels can be compiled and launched here (NVRTC and a CUDA 12+ driver)."""
    return _libs() is not None


def _check_cu(result: int, what: str) -> None:
    if result:
        _, cuda = _libs()
        msg = ctypes.c_char_p()
        cuda.cuGetErrorString(result, ctypes.byref(msg))
        raise RuntimeError(f"{what} failed: CUDA error {result} ({(msg.value or b'?').decode()})")


def _compile_cubin(source: str, name: str, arch: str) -> bytes:
    nvrtc, _ = _libs()
    prog = ctypes.c_void_p()
    if nvrtc.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), f"{name}.cu".encode(), 0, None, None):
        raise RuntimeError("nvrtcCreateProgram failed")
    try:
        opts = [f"--gpu-architecture=sm_{arch}".encode(), b"--std=c++17", b"-default-device"]
        res = nvrtc.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
        if res:
            size = ctypes.c_size_t()
            nvrtc.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
            log = ctypes.create_string_buffer(size.value)
            nvrtc.nvrtcGetProgramLog(prog, log)
            raise RuntimeError(f"NVRTC could not compile {name}:\n{log.value.decode(errors='replace')}")
        size = ctypes.c_size_t()
        nvrtc.nvrtcGetCUBINSize(prog, ctypes.byref(size))
        cubin = ctypes.create_string_buffer(size.value)
        nvrtc.nvrtcGetCUBIN(prog, cubin)
        return cubin.raw
    finally:
        nvrtc.nvrtcDestroyProgram(ctypes.byref(prog))


class CudaKernel:
    """One compiled ``extern "C" __global__`` function of one device, launched on PyTorch's current
    stream of that device."""

    def __init__(self, function: ctypes.c_void_p, module: ctypes.c_void_p, name: str, device_index: int) -> None:
        self._function, self._module, self.name, self.device_index = function, module, name, device_index
        self._shared_allowed = _STATIC_SHARED_LIMIT

    def __call__(self, grid: tuple[int, int, int], block: tuple[int, int, int], args: list,
                 pdl: bool = False, shared: int = 0) -> None:
        """Launch with ``args``: tensors (passed as device pointers), ``None`` (a null pointer) or
        Python ints (passed as C ``int``).  ``pdl``: the programmatic-dependent-launch attribute;
        ``shared``: bytes of dynamic shared memory (``extern __shared__``)."""
        if torch.cuda.current_device() != self.device_index:  # (the module lives in its device's context)
            with torch.cuda.device(self.device_index):
                return self._launch(grid, block, args, pdl, shared)
        return self._launch(grid, block, args, pdl, shared)

    def _launch(self, grid: tuple[int, int, int], block: tuple[int, int, int], args: list, pdl: bool,
                shared: int) -> None:
        _, cuda = _libs()
        if shared > self._shared_allowed:
            _check_cu(cuda.cuFuncSetAttribute(self._function, _CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                                              ctypes.c_int(shared)), f"allowing {self.name} {shared} B of shared memory")
            self._shared_allowed = shared
        held = []
        for a in args:
            if isinstance(a, torch.Tensor):
                held.append(ctypes.c_void_p(a.data_ptr()))
            elif a is None:
                held.append(ctypes.c_void_p(0))
            elif isinstance(a, int):
                held.append(ctypes.c_int(a))
            else:
                raise TypeError(f"kernel argument of type {type(a).__name__}")
        params = (ctypes.c_void_p * len(held))(*[ctypes.cast(ctypes.byref(h), ctypes.c_void_p) for h in held])
        stream = torch.cuda.current_stream(self.device_index).cuda_stream
        cfg = _LaunchConfig(*grid, *block, shared, ctypes.c_void_p(stream))
        if pdl:
            attr = _LaunchAttribute(_CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION, b"",
                                    (1).to_bytes(4, "little"))
            cfg.attrs, cfg.numAttrs = ctypes.pointer(attr), 1
        _check_cu(cuda.cuLaunchKernelEx(ctypes.byref(cfg), self._function, params, None), f"launching {self.name}")


@functools.lru_cache(maxsize=None)
def _compile_on(source: str, name: str, device_index: int) -> CudaKernel:
    major, minor = torch.cuda.get_device_capability(device_index)
    cubin = _compile_cubin(source, name, f"{major}{minor}")
    _, cuda = _libs()
    with torch.cuda.device(device_index):
        torch.zeros(1, device=f"cuda:{device_index}")  # (the device's primary context, made current)
        module, function = ctypes.c_void_p(), ctypes.c_void_p()
        _check_cu(cuda.cuModuleLoadData(ctypes.byref(module), cubin), f"loading {name}")
        _check_cu(cuda.cuModuleGetFunction(ctypes.byref(function), module, name.encode()), f"finding {name}")
    return CudaKernel(function, module, name, device_index)


def compile_kernel(source: str, name: str, device: torch.device) -> CudaKernel:
    """The ``extern "C"`` kernel ``name`` of ``source`` for ``device`` (compiled once per process)."""
    if not nvrtc_available():
        raise RuntimeError("NVRTC is not available (a CUDA build of PyTorch and a CUDA 12+ driver are needed)")
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _compile_on(source, name, index)
