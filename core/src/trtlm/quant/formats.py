"""Tensor math of the quantized TensorRT-LLM checkpoint formats (pure torch, no I/O).

Every function here reproduces, bit for bit, what NVIDIA Model Optimizer (modelopt 0.47,
``export_tensorrt_llm_checkpoint``) writes, so a checkpoint produced by trtlm is
indistinguishable from a modelopt one given the same weights and calibration data.  The
reference fixtures in ``tests/fixtures/modelopt`` are reproduced exactly by these functions
(see ``tests/test_quant_formats.py``).

Facts the functions encode (each was checked against the fixtures):

* **Source precision.**  Scales *and* quantized values are computed from the checkpoint's own
  weights in float32 (modelopt quantizes the model as loaded, fp32 for the fixtures), never from
  the weights already rounded to the export dtype.  Rounding a weight to fp16 first changes the
  scales and ~0.2 % of the fp8 bytes.  Non-fp32 inputs are upcast to float32, which is exactly
  what torch's type promotion does in modelopt (``fp16_weight / fp32_scale``).
* **Scales.**  ``scale = amax / maxbound`` in float32, maxbound 448 (fp8 e4m3), 127 (int8),
  7 (int4).  An all-zero row/group/tensor gets scale 1.0 (modelopt's ``export_amax`` replaces a
  zero amax by maxbound).
* **Rounding.**  fp8: a plain cast ``(w / s).to(float8_e4m3fn)`` (round to nearest even; the
  clamp to +-448 added here never changes a value modelopt produces, it only saturates instead
  of producing NaN when a caller passes a scale smaller than amax/448).  int8/int4:
  ``round`` (half to even) then clamp to [-128, 127] / [-8, 7].
* **Fusion.**  Per-tensor scales of linears that TensorRT-LLM runs as one GEMM are shared:
  fused qkv uses max(amax_q, amax_k, amax_v); for FP8 (and NVFP4) the dense MLP's ``fc``
  (HF gate_proj) and ``gate`` (HF up_proj) also share one weight scale and one activation scale
  (modelopt ``preprocess_linear_fusion``).  Mixtral experts: one scale per expert, shape [E, 1];
  ``fc`` = cat(w3, w1) shares max(amax_w1, amax_w3) per expert.  Per-channel / per-group scales
  are simply concatenated.  Under tensor parallelism every scale is computed on the full
  (unsplit) tensor and per-tensor scales are replicated to every rank.
* **INT4 packing.**  Two int4 values per byte along the *output* dimension: weight [out, in]
  -> int8 [out/2, in]; byte (j, i) = (q[2j, i] & 0xF) | (q[2j+1, i] & 0xF) << 4 (even row in the
  low nibble).  Experts [E, out, in] -> [E, out/2, in].  Scales [out, in/group] float32.
* **Pre-quant scales (AWQ / SmoothQuant).**  The runtime computes ``y = (x * p) @ Wq^T`` where p
  is ``prequant_scaling_factor``; the stored weight is ``W / p``, so the dense equivalent is
  ``dequant(Wq) * p`` (broadcast over the input dim).  Linears fed by the same input and fused
  by TensorRT-LLM (q, k, v) get the *mean* of their individual scales, each weight being
  re-smoothed by ``p_i / mean`` (``fuse_prequant``).  modelopt does *not* fuse fc/gate for
  AWQ or SmoothQuant (they keep their own prequant scales); for SmoothQuant with alpha = 1 the
  two are identical anyway (the scale depends only on the shared activation amax).
* **AWQ vocab padding.**  For W4A16_AWQ / W4A8_AWQ (modelopt also classifies its
  INT4_BLOCKWISE config as W4A16_AWQ), modelopt pads ``vocab_embedding`` and ``lm_head`` with
  zero rows to a multiple of 64 and writes the padded ``vocab_size`` (1000 -> 1024) into
  config.json, even though lm_head itself is not quantized.
* **KV cache.**  ``k_cache_scaling_factor = max(k_amax / 448, 1.0)`` (same for v) and
  ``kv_cache_scaling_factor = max(k, v)``: for FP8 modelopt never exports a scale below 1.0, so
  for ordinary models all three are exactly 1.0.  INT8 KV: ``amax / 127`` without the clamp.
"""
from __future__ import annotations

from typing import Iterable, Mapping, NamedTuple, Sequence

import torch
import torch.nn.functional as F

from trtlm.errors import UserError

__all__ = [
    "FP8_MAX", "INT8_MAX", "INT4_MAX", "AWQ_VOCAB_MULTIPLE",
    "amax", "fp8_weight_scale", "fp8_expert_weight_scale", "fp8_per_channel_scale",
    "fp8_activation_scale", "fp8_per_token_scale", "quantize_fp8", "dequantize_fp8", "fake_quant_fp8",
    "int8_weight_scale", "quantize_int8", "dequantize_int8",
    "int4_group_scales", "quantize_int4", "pack_int4", "unpack_int4", "dequantize_int4", "fake_quant_int4",
    "smoothquant_scales", "smooth_weight", "fuse_prequant", "prequant_activation_scale", "quantize_smoothquant",
    "awq_weight_scale", "awq_act_scale", "awq_scale_for_alpha", "awq_alphas", "AwqSearchResult",
    "awq_lite_search", "quantize_awq", "quantize_w4a8_awq", "awq_padded_vocab_size", "pad_vocab_rows",
    "kv_cache_scale", "dequantize",
]

FP8_MAX = 448.0  #: largest finite float8_e4m3fn value
INT8_MAX = 127.0
INT4_MAX = 7.0
AWQ_VOCAB_MULTIPLE = 64  #: modelopt pads vocab to this multiple for INT4/W4A8 AWQ exports

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


# --------------------------------------------------------------------------- helpers

def amax(*tensors: torch.Tensor) -> torch.Tensor:
    """Absolute max over all elements of all ``tensors`` as a 0-dim float32 tensor.

    Several tensors model a fused linear (qkv, fc+gate): TensorRT-LLM runs them as one GEMM, so
    they must share one per-tensor scale, the max of their individual amaxes.
    """
    if not tensors:
        raise ValueError("amax() needs at least one tensor")
    return torch.stack([t.detach().abs().amax().float() for t in tensors]).amax()


def _scale_from_amax(a: torch.Tensor, maxbound: float) -> torch.Tensor:
    """``amax / maxbound`` in float32, zero amax -> 1.0 (modelopt's ``export_amax`` rule)."""
    s = a.float() / maxbound
    return torch.where(a == 0, torch.ones_like(s), s)


def _expand_scale(scale: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Broadcast a per-tensor [1], per-expert [E, 1] or per-row [out] / [E, out] scale over ``w``."""
    scale = scale.float()
    if scale.numel() == 1:
        return scale.reshape(())
    if w.dim() == 3 and scale.dim() in (1, 2) and scale.shape[0] == w.shape[0] and scale.numel() == w.shape[0]:
        return scale.reshape(w.shape[0], 1, 1)  # per expert
    if tuple(scale.shape) == tuple(w.shape[:-1]):
        return scale.unsqueeze(-1)  # per output channel
    if tuple(scale.shape) == tuple(w.shape[:-1]) + (1,):
        return scale
    raise ValueError(f"cannot broadcast scale of shape {tuple(scale.shape)} over weight {tuple(w.shape)}")


def _as_fp8(q: torch.Tensor) -> torch.Tensor:
    if q.dtype == torch.float8_e4m3fn:
        return q
    if q.dtype in (torch.uint8, torch.int8):
        return q.view(torch.float8_e4m3fn)
    raise TypeError(f"expected a float8_e4m3fn (or its uint8/int8 view) tensor, got {q.dtype}")


def _group_size(in_features: int, scales: torch.Tensor) -> int:
    groups = scales.shape[-1]
    if groups == 0 or in_features % groups:
        raise ValueError(f"in_features {in_features} is not a multiple of the {groups} scale groups")
    return in_features // groups


# --------------------------------------------------------------------------- FP8

def fp8_weight_scale(*weights: torch.Tensor) -> torch.Tensor:
    """Per-tensor FP8 weight scale ``[1]`` float32 = amax / 448.

    Pass every part of a fused linear (q, k, v; or fc and gate for FP8) to get the shared scale.
    """
    return _scale_from_amax(amax(*weights), FP8_MAX).reshape(1)


def fp8_expert_weight_scale(*weights: torch.Tensor) -> torch.Tensor:
    """Per-expert FP8 scale ``[E, 1]`` float32 for stacked expert weights ``[E, out, in]``.

    Pass both Mixtral w1 and w3 stacks for ``mlp.fc`` (they share one scale per expert), w2 for
    ``mlp.proj``.
    """
    per = torch.stack([w.detach().abs().amax(dim=(-2, -1)).float() for w in weights]).amax(0)
    return _scale_from_amax(per, FP8_MAX).reshape(-1, 1)


def fp8_per_channel_scale(w: torch.Tensor) -> torch.Tensor:
    """FP8_PER_CHANNEL_PER_TOKEN weight scale: ``per_channel_scale`` [out] = row amax / 448."""
    return _scale_from_amax(w.detach().abs().amax(-1), FP8_MAX)


def fp8_activation_scale(act_amax: torch.Tensor | float) -> torch.Tensor:
    """Static FP8 ``activation_scaling_factor`` [1] = calibrated input amax / 448.

    For a fused linear pass the max of the parts' input amaxes (they read the same input anyway).
    """
    a = torch.as_tensor(act_amax).detach().float().amax()
    return (a / FP8_MAX).reshape(1)


def fp8_per_token_scale(x: torch.Tensor) -> torch.Tensor:
    """Dynamic per-token FP8 activation scale (FP8_PER_CHANNEL_PER_TOKEN): row amax / 448, keepdim."""
    return _scale_from_amax(x.detach().abs().amax(-1, keepdim=True), FP8_MAX)


def quantize_fp8(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``float8_e4m3fn(w / scale)``, computed in float32 as modelopt's ``to_quantized_weight``.

    ``scale`` may be per tensor [1], per expert [E, 1] (``w`` [E, out, in]) or per row [out].
    """
    q = torch.div(w.detach().float(), _expand_scale(scale, w))  # a new tensor: the steps after work in place
    return q.clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)


def dequantize_fp8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """``q * scale`` in float32, then cast to ``dtype``."""
    q = _as_fp8(q)
    return (q.float() * _expand_scale(scale, q)).to(dtype)


def fake_quant_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Quantize-dequantize ``x`` through FP8 with a static scale, in ``x``'s dtype (runtime emulation)."""
    return dequantize_fp8(quantize_fp8(x, scale), scale, x.dtype)


# --------------------------------------------------------------------------- INT8 (weight-only, SmoothQuant)

def int8_weight_scale(w: torch.Tensor) -> torch.Tensor:
    """Per-output-channel int8 scale [out] (or [E, out]) float32 = row amax / 127."""
    return _scale_from_amax(w.detach().abs().amax(-1), INT8_MAX)


def quantize_int8(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``round(w / scale[:, None]).clamp(-128, 127)`` as int8 (float32 math, round half to even).

    Rounding and clamping work in place on the quotient: a fresh tensor per step cost 2.2x the time
    on a 2048-wide weight (page faults of new allocations), with the same bits."""
    q = torch.div(w.detach().float(), _expand_scale(scale, w))
    return q.round_().clamp_(-128, 127).to(torch.int8)


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """``q * scale[:, None]`` in float32, then cast to ``dtype``."""
    return (q.float() * _expand_scale(scale, q)).to(dtype)


# --------------------------------------------------------------------------- INT4 (AWQ / blockwise)

def int4_group_scales(w: torch.Tensor, group_size: int = 128) -> torch.Tensor:
    """Per-group int4 scales [out, in/group] (or [E, out, in/group]) float32 = group amax / 7."""
    *lead, k = w.shape
    if k % group_size:
        raise ValueError(f"in_features {k} is not a multiple of group_size {group_size}")
    a = w.detach().reshape(*lead, k // group_size, group_size).abs().amax(-1)
    return _scale_from_amax(a, INT4_MAX)


def quantize_int4(w: torch.Tensor, scales: torch.Tensor, group_size: int | None = None) -> torch.Tensor:
    """Int4 values in [-8, 7] (stored as int8, unpacked): ``round(w / group_scale).clamp(-8, 7)``."""
    g = group_size or _group_size(w.shape[-1], scales)
    *lead, k = w.shape
    # each group divided by its scale, broadcast (no weight-sized copy of the scales), then in place
    q = torch.div(w.detach().float().reshape(*lead, k // g, g), scales.float().unsqueeze(-1))
    return q.round_().clamp_(-8, 7).reshape(w.shape).to(torch.int8)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Pack int4 values [.., out, in] into int8 [.., out/2, in] (modelopt ``pack_int4_in_uint8``).

    Pairs of consecutive *output* rows share a byte: row 2j in the low nibble, row 2j+1 in the
    high nibble.  The result is viewed as int8, which is what TensorRT-LLM checkpoints store.
    """
    if q.shape[-2] % 2:
        raise ValueError(f"cannot pack int4: out dimension {q.shape[-2]} is odd")
    q = q.to(torch.int8)
    # in int8 throughout: a value's low nibble, or'ed with the next row's shifted into the high one
    # (two's complement: -8 << 4 is -128, the byte 0x80), 5x faster than widening to int16 first
    return (q[..., 0::2, :] & 0x0F).bitwise_or_(q[..., 1::2, :] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: int8 [.., out/2, in] -> int8 values in [-8, 7], [.., out, in]."""
    p = packed.view(torch.uint8).to(torch.int16)
    nib = torch.stack([p & 0x0F, (p >> 4) & 0x0F], dim=-2)  # [.., out/2, 2, in]
    nib = torch.where(nib >= 8, nib - 16, nib)
    *lead, half, two, k = nib.shape
    return nib.reshape(*lead, half * two, k).to(torch.int8)


def dequantize_int4(
    packed: torch.Tensor,
    scales: torch.Tensor,
    dtype: torch.dtype = torch.float16,
    prequant: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dense weight from packed int4 + group scales (float32 math, cast to ``dtype`` last).

    With ``prequant`` (AWQ's ``prequant_scaling_factor``) the result is the weight to apply to the
    *unscaled* input: ``dequant * prequant`` broadcast over the input dimension.
    """
    q = unpack_int4(packed)
    g = _group_size(q.shape[-1], scales)
    w = q.float() * scales.float().repeat_interleave(g, dim=-1)
    if prequant is not None:
        w = w * prequant.float()
    return w.to(dtype)


def fake_quant_int4(w: torch.Tensor, group_size: int = 128) -> torch.Tensor:
    """Quantize-dequantize ``w`` blockwise with dynamic amax, as modelopt's CPU fake quant does.

    This is the arithmetic used during the AWQ search (``scale = 7 / amax``, ``q = round(w *
    scale)``), which differs from the export's ``w / (amax / 7)`` only in rare ties.
    """
    *lead, k = w.shape
    wb = w.reshape(*lead, k // group_size, group_size)
    a = wb.abs().amax(-1, keepdim=True)
    x = wb
    if w.dtype == torch.half:  # modelopt's _tensor_quant computes fp16 inputs in fp32
        x, a = wb.float(), a.float()
    scale = torch.tensor(INT4_MAX) / a
    tiny = a <= 1.0 / (1 << 24)  # an all-zero block quantizes to 0
    scale = torch.where(tiny, torch.zeros_like(scale), scale)
    q = torch.clamp((x * scale).round(), -8, 7)
    scale = torch.where(tiny, torch.ones_like(scale), scale)
    if w.dtype == torch.half:
        q = q.half()
    return (q / scale.to(w.dtype)).reshape(*lead, k)


# --------------------------------------------------------------------------- pre-quant scales (SQ, AWQ)

def smoothquant_scales(act_amax: torch.Tensor, weight: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """SmoothQuant ``prequant_scaling_factor`` [in] float32, modelopt's formula.

    ``p = weight_amax_in^(1 - alpha) / act_amax^alpha`` clamped to [1e-4, 1e4], where
    ``weight_amax_in`` is the per-input-channel amax of ``weight`` (over the output dim) and
    ``act_amax`` the calibrated per-channel input amax.  The input is multiplied by ``p``, the
    weight divided by it (:func:`smooth_weight`).  modelopt's INT8_SMOOTHQUANT_CFG uses
    alpha = 1.0, which makes ``p = 1 / act_amax`` (independent of the weight) and the smoothed
    activation amax exactly 1, hence ``activation_scaling_factor = 1/127``.

    Compute it per HF linear; fused parts are then merged with :func:`fuse_prequant`.
    """
    act = act_amax.detach().float()
    w_amax = weight.detach().abs().amax(dim=0, keepdim=True)
    p = (w_amax.pow(1 - alpha) / act.pow(alpha)).squeeze().float()
    epsilon = 1.0 / (1 << 31)
    if p.min() <= epsilon:  # modelopt's (odd) guard, reproduced as is
        p = torch.where(act <= epsilon, torch.ones_like(p), p)
    return p.clamp(min=1e-4, max=1e4)


def smooth_weight(weight: torch.Tensor, prequant: torch.Tensor) -> torch.Tensor:
    """Fold a pre-quant scale into the weight: ``weight * (1 / prequant)`` per input channel.

    Exactly modelopt's ``apply_pre_quant_scale_and_smooth``: the reciprocal is taken in float32
    and the product cast back to the weight's dtype.
    """
    inv = 1.0 / prequant.float()
    return (weight * inv.squeeze()[None, :]).to(weight.dtype)


def fuse_prequant(
    weights: Sequence[torch.Tensor], prequants: Sequence[torch.Tensor]
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Give linears that TensorRT-LLM fuses (q, k, v) one common pre-quant scale.

    ``weights`` are the already-smoothed weights (``W_i / p_i``).  The common scale is the mean
    of the ``p_i``; each weight is re-smoothed by ``p_i / mean`` (modelopt's
    ``preprocess_linear_fusion``; weights whose scale already equals the mean are untouched).
    Returns the new weights and the common scale.
    """
    if len(weights) != len(prequants) or not weights:
        raise ValueError("fuse_prequant needs one prequant scale per weight")
    ps = [p.to(weights[0].dtype) for p in prequants]
    avg = torch.stack(ps).mean(dim=0)
    out = []
    for w, p in zip(weights, ps):
        out.append(w if torch.equal(p, avg) else w * p.to(w.dtype) / avg.to(w.dtype))
    return out, avg


def prequant_activation_scale(
    act_amax: torch.Tensor, prequants: Sequence[torch.Tensor], maxbound: float = INT8_MAX
) -> torch.Tensor:
    """Static per-tensor activation scale [1] after smoothing: ``max_i amax(act_amax * p_i) / maxbound``.

    ``act_amax`` is the per-channel input amax; ``prequants`` are the parts' *individual* scales
    (before :func:`fuse_prequant`, as in modelopt).  maxbound 127 for SmoothQuant, 448 for W4A8.
    """
    a = torch.stack([(act_amax.detach().float() * p.float()).amax() for p in prequants]).amax()
    return (a.float() / maxbound).reshape(1)


def quantize_smoothquant(
    weights: Sequence[torch.Tensor], act_amax: torch.Tensor, alpha: float = 1.0
) -> dict[str, torch.Tensor]:
    """W8A8_SQ_PER_CHANNEL tensors for one (possibly fused) linear.

    :param weights: the HF weights of the parts ([q, k, v], or a single weight), in order.
    :param act_amax: per-channel amax [in] of their common input over the calibration set.
    :return: ``weight`` int8 (parts concatenated on dim 0), ``weights_scaling_factor`` [out] f32,
        ``prequant_scaling_factor`` [in] f32 (the writer casts it to the checkpoint dtype, as
        modelopt does), ``activation_scaling_factor`` [1] f32.
    """
    pqs = [smoothquant_scales(act_amax, w, alpha) for w in weights]
    smoothed = [smooth_weight(w, p) for w, p in zip(weights, pqs)]
    smoothed, common = fuse_prequant(smoothed, pqs)
    w = torch.cat(smoothed, dim=0)
    ws = int8_weight_scale(w)
    return {
        "weight": quantize_int8(w, ws),
        "weights_scaling_factor": ws,
        "prequant_scaling_factor": common.float(),
        "activation_scaling_factor": prequant_activation_scale(act_amax, pqs, INT8_MAX),
    }


# --------------------------------------------------------------------------- AWQ-lite

def awq_weight_scale(weight: torch.Tensor, group_size: int = 128) -> torch.Tensor:
    """AWQ's per-input-channel weight statistic [in] float32: mean over rows of |w| / group amax."""
    shape = weight.shape
    wv = weight.detach().contiguous().view(-1, group_size)
    a = wv.abs().amax(dim=1, keepdim=True)
    s = wv.abs() / (a + torch.finfo(weight.dtype).tiny)
    return s.view(shape).mean(0).to(torch.float32)


def awq_act_scale(batches: Iterable[torch.Tensor]) -> torch.Tensor:
    """AWQ's per-input-channel activation statistic [in] float32.

    The mean of |x| over the tokens of each calibration forward call, averaged over the calls
    (not token-weighted), exactly as modelopt's awq_lite caches it.
    """
    total, n = None, 0
    for x in batches:
        m = x.detach().abs().contiguous().view(-1, x.shape[-1]).mean(0).to(torch.float32)
        total = m if total is None else total + m
        n += 1
    if not n:
        raise ValueError("awq_act_scale needs at least one batch")
    return total / n


def awq_scale_for_alpha(act_scale: torch.Tensor, weight_scale: torch.Tensor, alpha: float) -> torch.Tensor:
    """AWQ scale s [in] for one alpha: ``act^alpha / weight^(1-alpha)``, clamped, normalized.

    The weight is multiplied by s before quantization and the input by 1/s.
    """
    tiny = torch.finfo(torch.float32).tiny
    s = (act_scale.pow(alpha) / (weight_scale.pow(1 - alpha) + tiny)).clamp(min=1e-4, max=1e4).view(-1)
    return (s / (s.max() * s.min()).sqrt()).view(-1)


def awq_alphas(alpha_step: float = 0.1) -> list[float]:
    """The alpha grid of modelopt's awq_lite: float32 ``arange(0, 1 + step, step)`` as Python floats."""
    return [k.item() for k in torch.arange(0, 1.0 + alpha_step, alpha_step)]


class AwqSearchResult(NamedTuple):
    """Outcome of :func:`awq_lite_search`."""

    prequant: torch.Tensor  #: ``prequant_scaling_factor`` [in] float32 = 1 / scale
    scale: torch.Tensor  #: the AWQ scale s [in] float32 that multiplies the weight
    alpha: float  #: the chosen alpha
    losses: dict[float, float]  #: summed output MSE per alpha


def awq_lite_search(
    weight: torch.Tensor,
    inputs: Sequence[torch.Tensor],
    group_size: int = 128,
    alpha_step: float = 0.1,
    act_scale: torch.Tensor | None = None,
) -> AwqSearchResult:
    """modelopt's awq_lite scale search for one linear (no bias), bit-exact.

    For each alpha of :func:`awq_alphas`, s = :func:`awq_scale_for_alpha` and the loss is the
    sum over calibration batches of ``mean((linear(x / s, fq(W * s)) - linear(x, W))^2)`` with
    ``fq`` blockwise int4 fake quantization.  The first alpha with the smallest loss wins.

    :param weight: the HF weight [out, in] in the dtype the model is calibrated in (fp32 for the
        modelopt fixtures); all arithmetic follows that dtype as modelopt's does.
    :param inputs: this linear's inputs, one tensor per calibration forward call ([.., in]), from
        the *unquantized* model (awq_lite keeps every layer's output unquantized while searching).
    :param act_scale: precomputed :func:`awq_act_scale` of ``inputs`` (computed if omitted).
    """
    ws = awq_weight_scale(weight, group_size)
    xs = awq_act_scale(inputs) if act_scale is None else act_scale
    alphas = awq_alphas(alpha_step)
    loss = {a: torch.zeros((), dtype=torch.float32) for a in alphas}
    scales = {a: awq_scale_for_alpha(xs, ws, a) for a in alphas}
    for x in inputs:
        out_actual = F.linear(x, weight)
        for a in alphas:
            s = scales[a]
            out = F.linear(x * (1 / s).to(weight.dtype), fake_quant_int4(weight * s.to(weight.dtype), group_size))
            loss[a] += (out - out_actual).float().pow(2).mean()
    losses = {a: float(v) for a, v in loss.items()}
    best = min(losses, key=losses.get)
    scale = awq_scale_for_alpha(xs, ws, best)
    return AwqSearchResult(prequant=(1.0 / scale).to(torch.float32), scale=scale, alpha=best, losses=losses)


def _awq_smoothed(weights: Sequence[torch.Tensor], prequants: Sequence[torch.Tensor]):
    smoothed = [smooth_weight(w, p) for w, p in zip(weights, prequants)]
    smoothed, common = fuse_prequant(smoothed, prequants)
    return torch.cat(smoothed, dim=0), common


def quantize_awq(
    weights: Sequence[torch.Tensor], prequants: Sequence[torch.Tensor], group_size: int = 128
) -> dict[str, torch.Tensor]:
    """W4A16_AWQ tensors for one (possibly fused) linear.

    :param weights: the HF weights of the parts ([q, k, v] or one weight).
    :param prequants: each part's ``awq_lite_search(...).prequant``; pass all-ones scales (or use
        :func:`int4_group_scales` directly) for plain blockwise int4 without AWQ.
    :return: ``weight`` int8 [out/2, in] (packed), ``weights_scaling_factor`` [out, in/group] f32,
        ``prequant_scaling_factor`` [in] f32 (cast to the checkpoint dtype when writing).
    """
    w, common = _awq_smoothed(weights, prequants)
    ws = int4_group_scales(w, group_size)
    return {
        "weight": pack_int4(quantize_int4(w, ws, group_size)),
        "weights_scaling_factor": ws,
        "prequant_scaling_factor": common.float(),
    }


def quantize_w4a8_awq(
    weights: Sequence[torch.Tensor],
    prequants: Sequence[torch.Tensor],
    act_amax: torch.Tensor,
    group_size: int = 128,
) -> dict[str, torch.Tensor]:
    """W4A8_AWQ tensors (modelopt W4A8_AWQ_BETA_CFG): :func:`quantize_awq` plus FP8 scales.

    ``weights_scaling_factor`` stays the real int4 group scale (amax / 7, *not* divided by
    ``weights_scaling_factor_2``); ``weights_scaling_factor_2`` [1] = amax(smoothed weight) / 448;
    ``activation_scaling_factor`` [1] = max_i amax(act_amax * p_i) / 448 (p_i the parts'
    individual prequant scales).
    """
    w, common = _awq_smoothed(weights, prequants)
    ws = int4_group_scales(w, group_size)
    return {
        "weight": pack_int4(quantize_int4(w, ws, group_size)),
        "weights_scaling_factor": ws,
        "weights_scaling_factor_2": fp8_weight_scale(w),
        "prequant_scaling_factor": common.float(),
        "activation_scaling_factor": prequant_activation_scale(act_amax, prequants, FP8_MAX),
    }


def awq_padded_vocab_size(vocab_size: int, multiple: int = AWQ_VOCAB_MULTIPLE) -> int:
    """Vocab size modelopt writes for INT4/W4A8 AWQ exports (rounded up to a multiple of 64)."""
    return -(-vocab_size // multiple) * multiple


def pad_vocab_rows(weight: torch.Tensor, rows: int) -> torch.Tensor:
    """Zero-pad ``weight`` (embedding or lm_head [vocab, H]) on dim 0 up to ``rows`` rows."""
    if weight.shape[0] > rows:
        raise ValueError(f"cannot pad {weight.shape[0]} rows down to {rows}")
    return F.pad(weight, (0, 0, 0, rows - weight.shape[0]))


# --------------------------------------------------------------------------- KV cache

def kv_cache_scale(
    k_amax: torch.Tensor | float, v_amax: torch.Tensor | float, kind: str = "FP8"
) -> dict[str, torch.Tensor]:
    """KV-cache scales [1] float32 per attention layer from the calibrated K and V amaxes.

    FP8: ``k = max(k_amax / 448, 1.0)``, ``v`` likewise, ``kv_cache_scaling_factor = max(k, v)``
    (modelopt never exports an FP8 KV scale below 1).  INT8: ``amax / 127`` without the floor.
    The amaxes are those of the key/value states entering attention (after RoPE).
    """
    kind = kind.upper()
    if kind not in ("FP8", "INT8"):
        raise ValueError(f"unknown KV cache quantization {kind!r}")
    bound = FP8_MAX if kind == "FP8" else INT8_MAX
    out = {}
    for name, a in (("k_cache_scaling_factor", k_amax), ("v_cache_scaling_factor", v_amax)):
        s = (torch.as_tensor(a).detach().float().amax() / bound).reshape(1)
        if kind == "FP8":
            s = torch.maximum(s, torch.ones(1))
        out[name] = s
    out["kv_cache_scaling_factor"] = torch.maximum(out["k_cache_scaling_factor"], out["v_cache_scaling_factor"])
    return out


# --------------------------------------------------------------------------- runtime dequantization

_INT4_KINDS = ("W4A16", "W4A16_AWQ", "W4A8_AWQ", "W4A16_GPTQ")
_INT8_KINDS = ("W8A16", "W8A16_GPTQ")


def dequantize(
    kind: str | None,
    tensors: Mapping[str, torch.Tensor],
    dtype: torch.dtype = torch.float16,
    fold_prequant: bool = True,
) -> torch.Tensor:
    """Dense weight of one linear of a TensorRT-LLM checkpoint, in ``dtype``.

    :param kind: ``quantization.quant_algo`` (None / "none" for an unquantized checkpoint).
    :param tensors: the linear's tensors by TensorRT-LLM suffix: ``weight`` plus, as the format
        has them, ``weights_scaling_factor``, ``per_channel_scale``, ``prequant_scaling_factor``.
        A floating-point ``weight`` (a module listed in exclude_modules, e.g. lm_head) is returned
        as is, cast to ``dtype``.
    :param fold_prequant: multiply ``prequant_scaling_factor`` into the weight (input dim), so the
        result applies to the unscaled input; with False the caller scales the input itself.
    """
    w = tensors["weight"]
    if kind is None or str(kind).upper() in ("", "NONE") or w.dtype in _FLOAT_DTYPES:
        return w.to(dtype)
    kind = str(kind).upper()
    p = tensors.get("prequant_scaling_factor") if fold_prequant else None
    if kind == "FP8":
        return dequantize_fp8(w, tensors["weights_scaling_factor"], dtype)
    if kind == "FP8_PER_CHANNEL_PER_TOKEN":
        return dequantize_fp8(w, tensors["per_channel_scale"], dtype)
    if kind in _INT8_KINDS or kind.startswith("W8A8_SQ"):
        out = dequantize_int8(w, tensors["weights_scaling_factor"], torch.float32)
        return (out * p.float() if p is not None else out).to(dtype)
    if kind in _INT4_KINDS:
        s = tensors["weights_scaling_factor"]
        if s.dim() == w.dim() - 1:  # per-channel int4: one group spanning the whole row
            s = s.unsqueeze(-1)
        return dequantize_int4(w, s, dtype, prequant=p)
    raise UserError(f"quant_algo {kind!r} is not one trtlm's runtime executes (FP8, FP8_PER_CHANNEL_PER_TOKEN, "
                    f"W8A16, W8A8_SQ_*, W4A16, W4A16_AWQ, W4A8_AWQ); rebuild the checkpoint with a supported --quant")
