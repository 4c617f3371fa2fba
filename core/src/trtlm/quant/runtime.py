"""Executing quantized TensorRT-LLM checkpoints in trtlm's torch runtime.

Each module's parameter/buffer names are the checkpoint's per-rank tensor names under the
linear (``weight``, ``weights_scaling_factor``, ``activation_scaling_factor``,
``prequant_scaling_factor``), so ``trtlm build``'s name/shape/dtype check and
``load_state_dict`` work unchanged.

The arithmetic is an *emulation* of TensorRT-LLM's kernels, honest about what each format
loses: weights are dequantized (float32 math, as :mod:`trtlm.quant.formats`), and where the
format quantizes activations too they are quantized and dequantized with the checkpoint's static
scale before the product (FP8: cast through float8_e4m3fn; SmoothQuant: int8 rounding after the
pre-quant multiply).  Perplexities measured through these modules therefore include the
activation quantization error, not only the weight error.  On CUDA the FP8 path uses
``torch._scaled_mm`` when the device supports it (same numerics up to accumulation order).
The weight-only formats fold ``prequant_scaling_factor`` into the dense weight (mathematically
``(x * p) @ W^T``), which also makes a tp>1 checkpoint merged by :func:`dequantize_tensors`
compute exactly what the tp=1 quantized model computes.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from trtlm.quant import formats as qf

#: quant_algo values the runtime executes.
SUPPORTED = ("FP8", "W8A16", "W4A16_AWQ", "W8A8_SQ_PER_CHANNEL")


def _qconf(config: dict[str, Any]) -> dict[str, Any]:
    return config.get("quantization") or {}


def has_prequant(config: dict[str, Any]) -> bool:
    """Whether W4A16_AWQ linears carry ``prequant_scaling_factor`` (TensorRT-LLM's ``pre_quant_scale``)."""
    return bool(_qconf(config).get("pre_quant_scale", False))


def fake_quant_int8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Static per-tensor int8 quantize-dequantize: ``clamp(round(x / s), -128, 127) * s`` (float32 math)."""
    s = scale.float().reshape(())
    return ((x.float() / s).round().clamp(-128, 127) * s).to(x.dtype)


class QuantLinear(nn.Module):
    """One linear of a quantized checkpoint (``quant_algo`` in :data:`SUPPORTED`)."""

    def __init__(self, quant_algo: str, config: dict[str, Any], in_features: int, out_features: int,
                 bias: bool = False, dtype=None, device=None):
        super().__init__()
        algo = str(quant_algo).upper()
        if algo not in SUPPORTED:
            from trtlm.errors import UserError

            raise UserError(f"quantization.quant_algo {quant_algo!r} is not supported by trtlm's runtime "
                            f"(supported: {', '.join(SUPPORTED)})")
        self.algo = algo
        self.dtype = dtype or torch.float32
        f32 = dict(dtype=torch.float32, device=device)
        if algo == "FP8":
            self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.float8_e4m3fn,
                                                       device=device))
            self.register_buffer("weights_scaling_factor", torch.ones(1, **f32))
            self.register_buffer("activation_scaling_factor", torch.ones(1, **f32))
        elif algo in ("W8A16", "W8A8_SQ_PER_CHANNEL"):
            self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
            self.register_buffer("weights_scaling_factor", torch.ones(out_features, **f32))
            if algo == "W8A8_SQ_PER_CHANNEL":
                self.register_buffer("prequant_scaling_factor",
                                     torch.ones(in_features, dtype=self.dtype, device=device))
                self.register_buffer("activation_scaling_factor", torch.ones(1, **f32))
        else:  # W4A16_AWQ: int4 packed in pairs of output rows, group scales
            group = int(_qconf(config).get("group_size") or 128)
            if in_features % group:
                from trtlm.errors import UserError

                raise UserError(f"quantization.group_size {group} does not divide a linear's {in_features} "
                                f"input features on this rank")
            self.register_buffer("weight", torch.empty(out_features // 2, in_features, dtype=torch.int8,
                                                       device=device))
            self.register_buffer("weights_scaling_factor", torch.ones(out_features, in_features // group, **f32))
            if has_prequant(config):
                self.register_buffer("prequant_scaling_factor",
                                     torch.ones(in_features, dtype=self.dtype, device=device))
        self.bias = (nn.Parameter(torch.empty(out_features, dtype=self.dtype, device=device), requires_grad=False)
                     if bias else None)

    def dense_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dequantized weight applying to the *unscaled* input (prequant folded for weight-only)."""
        dtype = dtype or self.dtype
        tensors = dict(self.named_buffers(recurse=False))
        fold = self.algo == "W4A16_AWQ"
        return qf.dequantize(self.algo, tensors, dtype, fold_prequant=fold)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.algo == "FP8":
            return self._fp8(x)
        if self.algo == "W8A8_SQ_PER_CHANNEL":
            xs = fake_quant_int8(x * self.prequant_scaling_factor.to(x.dtype), self.activation_scaling_factor)
            return F.linear(xs, self.dense_weight(x.dtype), self.bias)
        return F.linear(x, self.dense_weight(x.dtype), self.bias)

    def _fp8(self, x: torch.Tensor) -> torch.Tensor:
        a_s, w_s = self.activation_scaling_factor, self.weights_scaling_factor
        if x.is_cuda and hasattr(torch, "_scaled_mm") and torch.cuda.get_device_capability(x.device) >= (8, 9):
            xq = qf.quantize_fp8(x, a_s).reshape(-1, x.shape[-1])
            y = torch._scaled_mm(xq, self.weight.t(), scale_a=a_s.float(), scale_b=w_s.float(), out_dtype=x.dtype)
            y = y.reshape(*x.shape[:-1], -1)
            return y + self.bias if self.bias is not None else y
        return F.linear(qf.fake_quant_fp8(x, a_s), self.dense_weight(x.dtype), self.bias)


class QuantExpertWeights(nn.Module):
    """A quantized expert stack ``[E_local, out, in]`` for :class:`trtlm.runtime.model.MoE`.

    Experts are quantized per expert (FP8: one scale per expert ``[E, 1]``; int8: per output
    channel ``[E, out]``; int4: groups ``[E, out, in/group]``).  Expert linears carry no
    pre-quant scale; FP8/SmoothQuant checkpoints carry one static ``activation_scaling_factor``
    per expert stack, applied to the MoE input for ``fc`` (see :meth:`quantize_input`).
    """

    def __init__(self, quant_algo: str, config: dict[str, Any], experts: int, out_features: int, in_features: int,
                 dtype=None, device=None):
        super().__init__()
        self.algo = str(quant_algo).upper()
        self.dtype = dtype or torch.float32
        f32 = dict(dtype=torch.float32, device=device)
        E = experts
        if self.algo == "FP8":
            self.register_buffer("weight", torch.empty(E, out_features, in_features, dtype=torch.float8_e4m3fn,
                                                       device=device))
            self.register_buffer("weights_scaling_factor", torch.ones(E, 1, **f32))
            self.register_buffer("activation_scaling_factor", torch.ones(1, **f32))
        elif self.algo in ("W8A16", "W8A8_SQ_PER_CHANNEL"):
            self.register_buffer("weight", torch.empty(E, out_features, in_features, dtype=torch.int8, device=device))
            self.register_buffer("weights_scaling_factor", torch.ones(E, out_features, **f32))
            if self.algo == "W8A8_SQ_PER_CHANNEL":
                self.register_buffer("activation_scaling_factor", torch.ones(1, **f32))
        elif self.algo == "W4A16_AWQ":
            group = int(_qconf(config).get("group_size") or 128)
            self.register_buffer("weight", torch.empty(E, out_features // 2, in_features, dtype=torch.int8,
                                                       device=device))
            self.register_buffer("weights_scaling_factor",
                                 torch.ones(E, out_features, max(in_features // group, 1), **f32))
        else:
            from trtlm.errors import UserError

            raise UserError(f"quantization.quant_algo {quant_algo!r} is not supported for MoE experts")

    def dense(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return qf.dequantize(self.algo, dict(self.named_buffers(recurse=False)), dtype or self.dtype)

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        """Activation quantization of the formats that have it (emulated, static per-tensor scale)."""
        if self.algo == "FP8":
            return qf.fake_quant_fp8(x, self.activation_scaling_factor)
        if self.algo == "W8A8_SQ_PER_CHANNEL":
            return fake_quant_int8(x, self.activation_scaling_factor)
        return x


def quant_linear(quant_algo: str, config: dict[str, Any], in_features: int, out_features: int, bias: bool,
                 dtype, device) -> nn.Module:
    """The module :func:`trtlm.runtime.model.make_linear` builds for a quantized checkpoint."""
    return QuantLinear(quant_algo, config, in_features, out_features, bias, dtype, device)


# ----------------------------------------------------------------------------- KV cache

def kv_cache_quant(config: dict[str, Any]) -> str | None:
    """``"FP8"`` / ``"INT8"`` when the checkpoint quantizes the KV cache, else None."""
    algo = _qconf(config).get("kv_cache_quant_algo")
    return str(algo).upper() if algo else None


def fake_quant_kv(x: torch.Tensor, scale: torch.Tensor, algo: str) -> torch.Tensor:
    """What a K/V value becomes after a round trip through the quantized cache."""
    if algo == "FP8":
        return qf.fake_quant_fp8(x, scale)
    return fake_quant_int8(x, scale)


# ----------------------------------------------------------------------------- merging ranks

_SCALE_SUFFIXES = (".weights_scaling_factor", ".weights_scaling_factor_2", ".per_channel_scale",
                   ".prequant_scaling_factor", ".activation_scaling_factor")


def dequantize_tensors(tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """One rank's tensors with every quantized linear replaced by its dense weight.

    Used to merge the ranks of a quantized tp>1 checkpoint in one process (the merged model runs
    with ``quant_algo`` None).  The dense weight is in the checkpoint dtype with the
    pre-quant scale folded in (it then applies to the unscaled input, so the merged model needs no
    prequant tensor), and the scale tensors are dropped; K/V cache scales are kept (the KV cache
    stays quantized).  Activation quantization (FP8, SmoothQuant) is not emulated by such a
    merged model: run the checkpoint with one process per rank for that.

    Vocabulary padding: trtlm never pads the vocabulary of its own AWQ checkpoints (modelopt pads to
    a multiple of 64 for its kernels; TensorRT-LLM does not require it); a modelopt checkpoint whose
    config carries the padded vocab_size is merged as is (the padded rows are zero).
    """
    from trtlm.runtime.model import TORCH_DTYPES

    algo = _qconf(config).get("quant_algo")
    dtype = TORCH_DTYPES.get(str(config.get("dtype", "float16")), torch.float16)
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if name.endswith(_SCALE_SUFFIXES):
            continue
        if name.endswith(".weight") and t.dtype in (torch.int8, torch.float8_e4m3fn, torch.uint8):
            base = name[: -len(".weight")]
            parts = {"weight": t}
            for suffix in _SCALE_SUFFIXES:
                if base + suffix in tensors:
                    parts[suffix[1:]] = tensors[base + suffix]
            out[name] = qf.dequantize(algo, parts, dtype, fold_prequant=True)
        else:
            out[name] = t
    return out


def merge_quantized_ranks(config: dict[str, Any], ranks: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """All ranks of a quantized checkpoint -> the *quantized* tensors of the tp=pp=1 checkpoint.

    Unlike :func:`dequantize_tensors` this keeps the format, so the merged single-process model
    emulates activation and KV quantization too and computes what the tp=1 quantized engine
    computes (every scale is computed on the full tensor before sharding: per-tensor scales are
    replicated, per-channel and group scales follow their weight's rows or columns, see
    :func:`trtlm.layout.split_rule`).  Packed int4 weights are unpacked for the merge (a
    tensor-parallel split cuts whole output rows) and packed again.
    """
    from trtlm.runtime.checkpoint import merge_ranks

    algo = str(_qconf(config).get("quant_algo") or "").upper()
    int4 = algo in ("W4A16_AWQ", "W4A16", "W4A8_AWQ")

    def is_packed(name: str, t: torch.Tensor) -> bool:
        return int4 and name.endswith(".weight") and t.dtype == torch.int8

    unpacked = [{n: (qf.unpack_int4(t) if is_packed(n, t) else t) for n, t in r.items()} for r in ranks]
    merged = merge_ranks(config, unpacked)
    return {n: (qf.pack_int4(t) if is_packed(n, t) else t) for n, t in merged.items()}
