"""Programmatic dependent launch (PDL): let a decode step's next kernel start while this one ends.

A batch-1 decode step is ~360 short kernels in a row (a norm, a GEMV, RoPE, the KV write,
attention, ... per layer).  Each waits for the one before to finish and flush, then pays its own
launch and ramp-up: on the H200 that fixed cost is a few microseconds per kernel, and a 4096-row
GEMV streams its weights in only ~4 us.  With PDL (sm_90+) a kernel launched with
``launch_pdl=True`` may start as soon as every program of the kernel before it has called
``griddepcontrol.launch_dependents``: its launch, program set-up and first instructions overlap the
kernel before, and it blocks in ``griddepcontrol.wait`` until that kernel has completed and its
writes are visible.  Measured on the H200 (docs/benchmarks.md, quantized engines, run 14):
a batch-1 decode step of Mistral-7B 1.4% faster in bf16, whose linears are cuBLAS kernels
launched the ordinary way, and 6-7% faster with FP8 or int8 weights, whose GEMVs are ours.
(Prefetching the GEMV's weights into L2 before the wait made FP8 and int8 steps 3% slower
again, probably by competing with the kernel before for bandwidth.)

The rules every kernel here follows (what makes it safe):

- a kernel that takes the ``PDL`` flag calls :func:`pdl_wait` before it reads anything another
  kernel wrote and before it writes anything, so a reused buffer is never written early;
- it calls :func:`pdl_release` only after its own wait, so at most one kernel is launched ahead:
  the chain never piles up waiting programs.

A kernel launched without the attribute (cuBLAS, a torch op) waits for the one before as usual,
and ``griddepcontrol`` is a no-op in a kernel launched without it, so kernels with and without PDL
mix freely, in CUDA graphs too (captured as programmatic edges).  ``TRTLM_PDL=0`` turns it off
(for measuring; docs/benchmarks.md, quantized engines, run 14).
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

__all__ = ["pdl_options", "pdl_wait", "pdl_release", "pdl_available"]

try:  # Triton >= 3.4
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # pragma: no cover - older Triton: PDL is never turned on (pdl_available)
    gdc_launch_dependents = gdc_wait = None


@functools.lru_cache(maxsize=None)
def _device_has_pdl(index: int) -> bool:
    return torch.cuda.get_device_capability(index) >= (9, 0)


def pdl_available(device: torch.device) -> bool:
    """Whether kernels on ``device`` launch with PDL: a CUDA device of compute capability 9.0 or
    newer, a Triton that has ``griddepcontrol``, and ``TRTLM_PDL`` not ``0``."""
    if device.type != "cuda" or gdc_wait is None or os.environ.get("TRTLM_PDL", "1") == "0":
        return False
    return _device_has_pdl(device.index if device.index is not None else torch.cuda.current_device())


def pdl_options(device: torch.device) -> dict[str, bool]:
    """The launch keywords of a kernel that takes the ``PDL`` flag: ``PDL`` (the constexpr that
    compiles the waits in) and Triton's ``launch_pdl``, both on where :func:`pdl_available`."""
    on = pdl_available(device)
    return {"PDL": True, "launch_pdl": True} if on else {"PDL": False}


@triton.jit
def pdl_wait(PDL: tl.constexpr):
    """Block until the kernel before has completed and its writes are visible (a no-op without PDL)."""
    if PDL:
        gdc_wait()


@triton.jit
def pdl_release(PDL: tl.constexpr):
    """Let the kernel after this one launch now (it still waits for this one in :func:`pdl_wait`)."""
    if PDL:
        gdc_launch_dependents()
