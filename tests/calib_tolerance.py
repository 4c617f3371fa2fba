"""Comparing calibration-derived checkpoint tensors with the modelopt fixtures on any CPU.

Weights and weight-only scales are pure functions of the stored fp32 weights (elementwise math and
max reductions, which do not depend on summation order), so the tests demand them bit for bit.

Everything derived from *activations* is different: the calibration forward pass sums products
in fp32 matmuls whose blocking/vectorisation differs between CPUs (AVX2 vs AVX-512, MKL vs
OpenBLAS paths, AMD vs Intel), so an activation amax is reproducible only to fp32 rounding of a
length-K dot product — observed ~1e-9 absolute (~1e-7 relative) on AMD EPYC against fixtures
made on another CPU.  That reaches the activation scaling factors, the KV-cache scales, the
SmoothQuant smoother, AWQ's pre-quant scales (and through them the smoothed weights, their scales
and their integer codes).

Tolerance, and why it is the right size:

* Float values: relative ``2**-10``, one float16 ulp.  The checkpoint's pre-quant scales are
  *stored* in float16 and the engine computes in float16/bfloat16, so a fp32 difference of
  ~1e-7 relative can legitimately round a stored float16 value to its neighbour (one ulp), and
  nothing smaller than one float16 step is visible to the engine.  A wrong formula (alpha, max vs
  mean, 127 vs 448, a missed fusion) moves these values by percent, far outside.
* Integer / fp8 codes of weights that depend on a calibrated scale: at most one code apart, in at
  most 1 % of the elements.  A scale moving by a relative ``d`` moves ``q = w / s`` by ``|q| d``,
  which flips the rounding only of elements lying within that distance of a rounding boundary:
  about ``127 * 1e-7`` ~ 0.001 % of int8 codes for the observed noise.  1 % leaves margin while a
  wrong scale or smoother (which changes most codes) still fails.
"""
from __future__ import annotations

import torch

FP16_ULP = 2.0 ** -10  #: relative tolerance of calibration-derived float values (one float16 ulp)
MAX_CODE_FLIPS = 0.01  #: fraction of integer/fp8 codes allowed to differ by one step

#: tensor suffixes whose value comes from calibrated activations in every format
ACTIVATION_SUFFIXES = ("activation_scaling_factor", "kv_cache_scaling_factor", "k_cache_scaling_factor",
                       "v_cache_scaling_factor")


def _codes(t: torch.Tensor, packed_int4: bool) -> torch.Tensor:
    if t.dtype == torch.float8_e4m3fn:
        # fp8 e4m3 bytes of same-sign values are ordered like the values: one step = one byte value
        b = t.view(torch.uint8).to(torch.int32)
        return torch.where(b >= 128, -(b - 128), b)
    if packed_int4:
        from trtlm.quant.formats import unpack_int4

        return unpack_int4(t).to(torch.int32)
    return t.to(torch.int32)


def assert_calibrated_close(ours: torch.Tensor, ref: torch.Tensor, what: str, *, packed_int4: bool = False) -> None:
    """``ours`` equals the fixture's calibration-derived ``ref`` within the tolerance of the module doc.

    :param packed_int4: ``ref`` is an int8 tensor holding two int4 codes per byte (compare the codes).
    """
    assert ours.dtype == ref.dtype, f"{what}: dtype {ours.dtype} != {ref.dtype}"
    assert ours.shape == ref.shape, f"{what}: shape {tuple(ours.shape)} != {tuple(ref.shape)}"
    if ours.is_floating_point() and ours.dtype != torch.float8_e4m3fn:
        diff = (ours.double() - ref.double()).abs()
        bound = ref.double().abs() * FP16_ULP
        worst = (diff / bound.clamp_min(1e-300)).max().item()
        assert torch.all(diff <= bound), f"{what}: differs by more than one float16 ulp (x{worst:.3g} the bound)"
        return
    a, b = _codes(ours, packed_int4), _codes(ref, packed_int4)
    d = (a - b).abs()
    assert d.max().item() <= 1, f"{what}: codes differ by {d.max().item()} steps (at most 1 allowed)"
    frac = (d > 0).float().mean().item()
    assert frac <= MAX_CODE_FLIPS, f"{what}: {100 * frac:.2f}% of codes differ (at most {100 * MAX_CODE_FLIPS}%)"
