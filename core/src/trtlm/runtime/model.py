"""A whole decoder-only transformer in one file, assembled from a TensorRT-LLM config.

Parameter names are TensorRT-LLM's checkpoint names (``transformer.layers.0.
attention.qkv.weight``...), so a rank file loads with ``load_state_dict`` and
the build step checks a checkpoint by comparing it with this module's own
parameters, as TensorRT-LLM's loader does.

What the config selects:

* position embedding: ``rope_gpt_neox`` (RoPE, ``rotary_base``) or ``alibi``
  (slopes from ``alibi_bias_max``), sliced per tensor-parallel rank;
* normalisation: RMSNorm (Llama family) or LayerNorm without bias (MPT) —
  chosen by the family through ``norm=`` (see ``build_network``);
* feed-forward: gated SiLU (``fc`` is the SiLU branch, ``gate`` the linear
  one, TensorRT-LLM's naming), plain GELU, or MoE when ``config["moe"]``;
* attention: GQA with each rank's (possibly duplicated) KV heads,
  ``clip_qkv``, a sliding window from ``runtime_defaults``.

Numerics follow transformers' implementations (RMSNorm in float32, RoPE
tables in float32 cast to the activation dtype, softmax through SDPA) so
float32 logits match transformers' to ~1e-6.

One ``forward`` computes one packed engine step: the new tokens of many
sequences, flat (``[N]``, no padding), whatever mix of prompts, prompt chunks
and decode tokens it holds; keys and values go to the paged KV cache
(:mod:`trtlm.runtime.kv_cache`) and attention reads them through each
sequence's block table (:mod:`trtlm.runtime.attention`).  The same module
runs on CPU and GPU, in one process or as one rank of many.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from trtlm.config import CheckpointConfig, as_checkpoint_config
from trtlm.runtime.attention import ForwardBatch, paged_attention, write_kv
from trtlm.runtime.comm import LocalComm
from trtlm.runtime.kernels import fused

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class Dims:
    """Sizes of one tensor-parallel rank's share of the model."""

    vocab: int
    vocab_local: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_size: int
    inter: int
    tp: int

    @classmethod
    def from_config(cls, cfg: CheckpointConfig, tp: int) -> "Dims":
        return cls(vocab=cfg.vocab_size, vocab_local=-(-cfg.vocab_size // tp), hidden=cfg.hidden_size,
                   layers=cfg.num_hidden_layers, heads=cfg.num_attention_heads // tp,
                   kv_heads=max(cfg.num_key_value_heads // tp, 1), head_size=cfg.head_size,
                   inter=int(cfg.intermediate_size or 0) // tp, tp=tp)


class Linear(nn.Module):
    """``y = x W^T (+ b)`` with TensorRT-LLM's parameter names.  Quantized
    checkpoints use the subclasses in :mod:`trtlm.quant.runtime`."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, dtype=None, device=None):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype, device=device),
                                   requires_grad=False)
        self.bias = (nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False)
                     if bias else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, dtype=None, device=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim, dtype=dtype, device=device), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fused.add_rms_norm(x, None, self.weight, self.eps)[1]

    def add_forward(self, x: torch.Tensor, delta: torch.Tensor | None,
                    fp8_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x + delta, norm(x + delta))`` in one kernel on the GPU; with ``fp8_scale`` the norm
        comes out as FP8, quantized for the FP8 linear that reads it (see ``fp8_input_scale``)."""
        if fp8_scale is not None:
            return fused.add_rms_norm_fp8(x, delta, self.weight, self.eps, fp8_scale)
        return fused.add_rms_norm(x, delta, self.weight, self.eps)


class LayerNorm(nn.Module):
    def __init__(self, dim: int, eps: float, bias: bool, dtype=None, device=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim, dtype=dtype, device=device), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(dim, dtype=dtype, device=device), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)

    def add_forward(self, x: torch.Tensor, delta: torch.Tensor | None,
                    fp8_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        x = x if delta is None else x + delta
        return x, self.forward(x)


def rope_tables(positions: torch.Tensor, head_size: int, base: float, dtype: torch.dtype,
                inv_freq: torch.Tensor | None = None):
    """``cos``, ``sin`` ``[N, 1, D]`` for token positions ``[N]`` (float32 math, as transformers)."""
    if inv_freq is None:
        inv_freq = rope_inv_freq(head_size, base, positions.device)
    freqs = positions.float()[..., None] * inv_freq
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]


def rope_inv_freq(head_size: int, base: float, device) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, head_size, 2, dtype=torch.int64, device=device).float() / head_size))


class Attention(nn.Module):
    def __init__(self, cfg: CheckpointConfig, d: Dims, comm, dtype=None, device=None):
        super().__init__()
        # TensorRT-LLM's attention takes its bias from ``attn_bias`` (else ``bias``);
        # ``dense_bias`` separates the output projection (Qwen2: qkv biased, dense not).
        qkv_bias = bool(cfg.source.get("attn_bias", linear_bias(cfg)))
        dense_bias = bool(cfg.source.get("dense_bias", qkv_bias))
        self.d = d
        self.comm = comm
        qkv_out = (d.heads + 2 * d.kv_heads) * d.head_size
        self.qkv = make_linear(cfg, d.hidden, qkv_out, qkv_bias, dtype, device)
        self.dense = make_linear(cfg, d.heads * d.head_size, d.hidden, dense_bias, dtype, device)
        self.clip_qkv = cfg.clip_qkv
        self.use_rope = uses_rope(cfg)
        self.window = cfg.sliding_window
        self.kv_quant = _kv_quant(cfg)
        if self.kv_quant:  # checkpoint names of TensorRT-LLM's KV-cache scales
            for name in ("kv_cache_scaling_factor", "k_cache_scaling_factor", "v_cache_scaling_factor"):
                self.register_buffer(name, torch.ones(1, dtype=torch.float32, device=device))

    def forward(self, x: torch.Tensor, batch: ForwardBatch, cache, layer: int, rope, slopes) -> torch.Tensor:
        """``x [N, hidden]`` -> ``[N, hidden]``; this step's keys/values are written to the cache first."""
        N = x.shape[0]
        d = self.d
        qkv = self.qkv(x)
        if self.clip_qkv:
            qkv = qkv.clamp(-self.clip_qkv, self.clip_qkv)
        qk, v = qkv.split([(d.heads + d.kv_heads) * d.head_size, d.kv_heads * d.head_size], dim=-1)
        qk = qk.view(N, d.heads + d.kv_heads, d.head_size)
        v = v.view(N, d.kv_heads, d.head_size)
        if self.use_rope:  # queries and keys rotated together: one set of elementwise ops per layer
            qk = fused.rope(qk, *rope)
        q, k = qk[:, :d.heads], qk[:, d.heads:]
        scale = self.kv_cache_scaling_factor if self.kv_quant else None
        kc, vc = cache.k[layer], cache.v[layer]
        write_kv(k, v, kc, vc, batch.slot_mapping, scale)
        out = paged_attention(q, kc, vc, batch, 1.0 / math.sqrt(d.head_size), self.window, slopes, scale,
                              _fp8_input_scale(self.dense))
        return row_parallel(self.dense, out.reshape(N, d.heads * d.head_size), self.comm)


class GatedMLP(nn.Module):
    """SwiGLU: ``proj(silu(fc(x)) * gate(x))`` (TensorRT-LLM's names)."""

    def __init__(self, cfg: CheckpointConfig, d: Dims, comm, dtype=None, device=None):
        super().__init__()
        bias = linear_bias(cfg)
        self.fc = make_linear(cfg, d.hidden, d.inter, bias, dtype, device)
        self.gate = make_linear(cfg, d.hidden, d.inter, bias, dtype, device)
        self.proj = make_linear(cfg, d.inter, d.hidden, bias, dtype, device)
        self.comm = comm
        self.fused: tuple[torch.Tensor, torch.Tensor | None] | None = None
        #: FP8 ``fc``/``gate`` fused: (codes [2I, H], per-column weight scales [2I], input scale, 1.0)
        self.fused_fp8: tuple[torch.Tensor, ...] | None = None
        #: weight-only quantized ``fc``/``gate`` stacked: (the stacked ``QuantLinear``,)
        self.fused_quant: tuple[nn.Module] | None = None
        #: ... and ``proj`` applies the SwiGLU itself (``QuantLinear.swiglu_forward``: the int4 GEMV)
        self.proj_takes_swiglu = False

    def fuse(self) -> None:
        """Put ``fc`` and ``gate`` in one ``[2I, H]`` weight so both products are one matrix
        product (one read of ``x``, one kernel).  ``fc.weight``/``gate.weight`` become views of
        it, so the state_dict (names, shapes, values) is unchanged; call after loading weights.
        FP8 linears are fused the same way (:meth:`_fuse_fp8`); other quantized ones are left alone."""
        if self.fused is not None or self.fused_fp8 is not None or self.fused_quant is not None:
            return
        if type(self.fc) is not Linear or type(self.gate) is not Linear:
            self._fuse_fp8()
            if self.fused_fp8 is None:
                self._fuse_quantized()
            return
        inter = self.fc.weight.shape[0]
        w = torch.cat([self.fc.weight.data, self.gate.weight.data])
        self.fc.weight.data, self.gate.weight.data = w[:inter], w[inter:]
        b = None
        if self.fc.bias is not None:
            b = torch.cat([self.fc.bias.data, self.gate.bias.data])
            self.fc.bias.data, self.gate.bias.data = b[:inter], b[inter:]
        self.fused = (w, b)

    def _fuse_fp8(self) -> None:
        """FP8 ``fc`` and ``gate`` on ``_scaled_mm`` with one input scale (they read the same
        activations; TensorRT-LLM and modelopt calibrate them alike): one ``[2I, H]`` FP8 product
        in float32, whose per-tensor weight scales become per-column scales applied -- with the
        SiLU, the product and the down projection's input quantization -- in one kernel after it."""
        fc, gate = self.fc, self.gate
        scale, other = _fp8_input_scale(fc), _fp8_input_scale(gate)
        if scale is None or other is None or not torch.equal(scale, other) or fc.bias is not None:
            return
        inter = fc.weight.shape[0]
        w = torch.cat([fc.weight.view(torch.uint8), gate.weight.view(torch.uint8)]).view(fc.weight.dtype)
        fc.weight, gate.weight = w[:inter], w[inter:]
        cols = torch.cat([fc.weights_scaling_factor.float().expand(inter),
                          gate.weights_scaling_factor.float().expand(inter)]).contiguous()
        self.fused_fp8 = (w, cols, scale, torch.ones(1, dtype=torch.float32, device=w.device))

    def _fuse_quantized(self) -> None:
        """Weight-only quantized ``fc`` and ``gate`` as one stacked quantized linear
        (``QuantLinear.stacked``: one kernel, their codes and scales views of its own)."""
        stacked = getattr(type(self.fc), "stacked", None)
        if stacked is None or type(self.gate) is not type(self.fc):
            return
        both = stacked([self.fc, self.gate])
        if both is not None:
            self.fused_quant = (both,)  # (a tuple: not a submodule, so the state_dict keeps its names)
            prepare_swiglu = getattr(self.proj, "prepare_swiglu", None)
            self.proj_takes_swiglu = bool(prepare_swiglu is not None and prepare_swiglu())

    def fp8_input_scale(self) -> torch.Tensor | None:
        """The scale the norm before this MLP quantizes its output with (FP8 ``fc``/``gate`` fused)."""
        return self.fused_fp8[2] if self.fused_fp8 is not None else None

    def forward(self, x):
        if self.fused_fp8 is not None:
            from trtlm.quant.kernels import fp8_scaled_mm  # (quantized models only)

            w, cols, scale, one = self.fused_fp8
            y = fp8_scaled_mm(x, w, one, scale, out_dtype=torch.float32)  # the weight scales: after
            down_scale = _fp8_input_scale(self.proj)
            if down_scale is not None:
                return row_parallel(self.proj, fused.silu_mul_fp8(y, cols, self.proj.dtype, down_scale), self.comm)
            return row_parallel(self.proj, fused.silu_mul((y * cols).to(self.proj.dtype)), self.comm)
        if self.fused is not None:
            return row_parallel(self.proj, fused.silu_mul(F.linear(x, *self.fused)), self.comm)
        if self.fused_quant is not None:
            y = self.fused_quant[0](x)
            if self.proj_takes_swiglu:  # (the int4 GEMV applies the SwiGLU as it reads y)
                return row_parallel(self.proj, y, self.comm, swiglu=True)
            return row_parallel(self.proj, fused.silu_mul(y), self.comm)
        return row_parallel(self.proj, F.silu(self.fc(x)) * self.gate(x), self.comm)


def _fp8_input_scale(module: nn.Module) -> torch.Tensor | None:
    """The static FP8 input scale of ``module`` if the op before it may hand it FP8 (see
    ``QuantLinear.fp8_input_scale``), else None (plain and other quantized modules)."""
    scale = getattr(module, "fp8_input_scale", None)
    return scale() if scale is not None else None


class PlainMLP(nn.Module):
    """``proj(gelu(fc(x)))`` with exact GELU, as transformers' MPT computes it."""

    def __init__(self, cfg: CheckpointConfig, d: Dims, comm, dtype=None, device=None):
        super().__init__()
        bias = linear_bias(cfg)
        self.fc = make_linear(cfg, d.hidden, d.inter, bias, dtype, device)
        self.proj = make_linear(cfg, d.inter, d.hidden, bias, dtype, device)
        self.comm = comm

    def forward(self, x):
        return row_parallel(self.proj, F.gelu(self.fc(x)), self.comm)


class ExpertWeights(nn.Module):
    """A stack of per-expert matrices ``[E_local, out, in]`` held as ``.weight``, so the
    state_dict name is TensorRT-LLM's (``mlp.fc.weight``, ``mlp.proj.weight``) and the build
    step's name/shape check sees the expert tensors like any other weight."""

    def __init__(self, experts: int, out_features: int, in_features: int, dtype=None, device=None):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(experts, out_features, in_features, dtype=dtype, device=device),
                                   requires_grad=False)


class MoE(nn.Module):
    """Mixtral-style sparse MoE; the routing and grouped expert products live in
    :mod:`trtlm.runtime.moe`.

    ``router.weight`` ``[E, H]`` float32 (every rank routes over all experts),
    ``fc.weight`` ``[E_local, 2*I/moe_tp, H]`` (up rows first, gate rows second),
    ``proj.weight`` ``[E_local, H, I/moe_tp]``; a rank holds the experts
    ``[moe_ep_rank * E_local, ...)`` and its partial sums are all-reduced.
    """

    def __init__(self, cfg: CheckpointConfig, d: Dims, comm, mapping=None, dtype=None, device=None):
        super().__init__()
        E = cfg.moe.num_experts
        ep = mapping.moe_ep_size if mapping else 1
        mtp = mapping.moe_tp_size if mapping else 1
        tp_rank = comm.tp_rank
        inter = int(cfg.intermediate_size) // mtp
        self.top_k = cfg.moe.top_k
        # TensorRT-LLM's default is RENORMALIZE (1), what Mixtral does
        self.normalization_mode = 1 if cfg.moe.normalization_mode is None else cfg.moe.normalization_mode
        self.expert_offset = (mapping.moe_ep_rank(tp_rank) if mapping else 0) * (E // ep)
        self.router = Linear(d.hidden, E, False, torch.float32, device)
        quant = cfg.quantization.quant_algo
        if quant:
            from trtlm.quant.runtime import QuantExpertWeights

            self.fc = QuantExpertWeights(quant, cfg.source, E // ep, 2 * inter, d.hidden, dtype, device)
            self.proj = QuantExpertWeights(quant, cfg.source, E // ep, d.hidden, inter, dtype, device)
        else:
            self.fc = ExpertWeights(E // ep, 2 * inter, d.hidden, dtype, device)
            self.proj = ExpertWeights(E // ep, d.hidden, inter, dtype, device)
        self.comm = comm

    def forward(self, x):
        if isinstance(self.fc, ExpertWeights):
            from trtlm.runtime.moe import moe_forward

            out = moe_forward(x, self.router.weight, self.fc.weight, self.proj.weight, self.top_k,
                              self.normalization_mode, expert_offset=self.expert_offset)
        else:  # quantized experts: only the routed experts' codes are read at small batch (the input is
            # quantized as the format does, and the router sees it: slightly pessimistic next to TensorRT-LLM)
            from trtlm.quant.runtime import quant_moe_forward

            out = quant_moe_forward(x, self.router.weight, self.fc, self.proj, self.top_k, self.normalization_mode,
                                    expert_offset=self.expert_offset)
        return self.comm.all_reduce(out)


def row_parallel(linear: nn.Module, x: torch.Tensor, comm, swiglu: bool = False) -> torch.Tensor:
    """A row-parallel product summed over tensor-parallel ranks, its bias added once
    (TensorRT-LLM's RowLinear adds the replicated bias after the all-reduce).  ``swiglu``: ``x`` is
    the SwiGLU's input, which the (quantized) linear's ``swiglu_forward`` takes."""
    forward = linear.swiglu_forward if swiglu else linear
    bias = getattr(linear, "bias", None)
    if bias is None or comm.tp_size == 1:
        return comm.all_reduce(forward(x))
    if type(linear) is Linear:
        return comm.all_reduce(F.linear(x, linear.weight)) + bias
    out = forward(x)  # quantized linears add their bias themselves: keep rank 0's only
    return comm.all_reduce(out if comm.tp_rank == 0 else out - bias)


def _kv_quant(cfg: CheckpointConfig) -> str | None:
    algo = cfg.quantization.kv_cache_quant_algo
    return str(algo).upper() if algo else None


def linear_bias(cfg: CheckpointConfig) -> bool:
    """Whether the linear layers carry biases.  A checkpoint without the ``bias`` key has none
    (Llama-style models; trtlm's converters always write the key), whatever
    :class:`~trtlm.config.CheckpointConfig` assumes for TensorRT-LLM's generic default."""
    return bool(cfg.source.get("bias", False))


def uses_rope(cfg: CheckpointConfig) -> bool:
    """RoPE unless the checkpoint says otherwise (ALiBi for MPT); the runtime has no learned positions."""
    return str(cfg.source.get("position_embedding_type", "rope_gpt_neox")).startswith("rope")


def make_linear(cfg: CheckpointConfig, in_features, out_features, bias, dtype, device) -> nn.Module:
    quant = cfg.quantization.quant_algo
    if quant:
        from trtlm.quant.runtime import quant_linear

        return quant_linear(quant, cfg.source, in_features, out_features, bias, dtype, device)
    return Linear(in_features, out_features, bias, dtype, device)


class Block(nn.Module):
    def __init__(self, cfg: CheckpointConfig, d: Dims, comm, norm: str, mapping=None, dtype=None, device=None):
        super().__init__()
        eps = cfg.norm_epsilon
        Norm = (lambda: RMSNorm(d.hidden, eps, dtype, device)) if norm == "rms" else (
            lambda: LayerNorm(d.hidden, eps, False, dtype, device))  # TensorRT-LLM's MPT: no LayerNorm bias
        self.input_layernorm = Norm()
        self.attention = Attention(cfg, d, comm, dtype, device)
        self.post_layernorm = Norm()
        if cfg.moe is not None:
            self.mlp = MoE(cfg, d, comm, mapping, dtype, device)
        elif str(cfg.hidden_act or "silu") in ("silu", "swiglu"):
            self.mlp = GatedMLP(cfg, d, comm, dtype, device)
        else:
            self.mlp = PlainMLP(cfg, d, comm, dtype, device)

    def forward(self, x, batch, cache, layer, rope, slopes):
        x, delta = self.step(x, None, batch, cache, layer, rope, slopes)
        return x + delta

    def step(self, x, delta, batch, cache, layer, rope, slopes):
        """The layer on the residual stream ``x + delta`` -> the next ``(x, delta)``: the residual
        add is left to the next norm, which does both in one kernel on the GPU."""
        # An FP8 linear after a norm gets its input quantized by the norm's kernel (fp8_input_scale).
        x, h = self.input_layernorm.add_forward(x, delta, self.qkv_fp8_scale)
        x, h = self.post_layernorm.add_forward(x, self.attention(h, batch, cache, layer, rope, slopes),
                                               self.mlp_fp8_scale)
        return x, self.mlp(h)

    @property
    def qkv_fp8_scale(self) -> torch.Tensor | None:
        return _fp8_input_scale(self.attention.qkv)

    @property
    def mlp_fp8_scale(self) -> torch.Tensor | None:
        return _fp8_input_scale(self.mlp)


class Embedding(nn.Module):
    """Token embedding; vocabulary-parallel when the checkpoint splits it."""

    def __init__(self, rows: int, hidden: int, comm, parallel: bool, dtype=None, device=None):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(rows, hidden, dtype=dtype, device=device), requires_grad=False)
        self.comm = comm
        self.parallel = parallel and comm.tp_size > 1

    def forward(self, ids):
        if not self.parallel:
            return F.embedding(ids, self.weight)
        rows = self.weight.shape[0]
        local = ids - self.comm.tp_rank * rows
        inside = (local >= 0) & (local < rows)
        out = F.embedding(local.clamp(0, rows - 1), self.weight) * inside[..., None].to(self.weight.dtype)
        return self.comm.all_reduce(out)


class _Module(nn.Module):
    pass


class Transformer(nn.Module):
    """Decoder-only LM for one rank (or the whole model when tp = pp = 1).

    :param config: TensorRT-LLM checkpoint config.
    :param norm: ``"rms"`` (default) or ``"layer"`` (LayerNorm without bias, as TensorRT-LLM's MPT).
    :param comm: collectives (default: single process).
    :param layers: the global layer indices this pipeline stage holds (default all).
    :param first, last: whether this stage holds the embedding / ln_f + lm_head.
    """

    def __init__(self, config: dict[str, Any] | CheckpointConfig, norm: str = "rms", comm=None, mapping=None,
                 layers: range | None = None, first: bool = True, last: bool = True,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None):
        super().__init__()
        comm = comm or LocalComm()
        cfg = as_checkpoint_config(config)  # parsed once; every module reads its typed fields
        self.cfg = cfg
        self.config = cfg.source  #: the checkpoint's dict, as plugins and quantized layers read it
        self.comm = comm
        self.norm_type = norm
        self.dtype = dtype or TORCH_DTYPES[cfg.dtype or "float32"]
        d = Dims.from_config(cfg, comm.tp_size)
        self.d = d
        self.layer_ids = layers if layers is not None else range(d.layers)
        self.first, self.last = first, last
        self.transformer = _Module()
        if first:
            parallel = cfg.use_parallel_embedding and comm.tp_size > 1
            rows = d.vocab_local if parallel else d.vocab
            self.transformer.vocab_embedding = Embedding(rows, d.hidden, comm, parallel, self.dtype, device)
        self.transformer.layers = nn.ModuleList(
            Block(cfg, d, comm, norm, mapping, self.dtype, device) for _ in self.layer_ids)
        if last:
            eps = cfg.norm_epsilon
            self.transformer.ln_f = (RMSNorm(d.hidden, eps, self.dtype, device) if norm == "rms"
                                     else LayerNorm(d.hidden, eps, False, self.dtype, device))
            self.lm_head = Linear(d.hidden, d.vocab_local if comm.tp_size > 1 else d.vocab,
                                  cfg.lm_head_bias, self.dtype, device)
        self.alibi = cfg.position_embedding_type == "alibi"
        self._inv_freq: torch.Tensor | None = None  #: RoPE frequencies, made once per device
        if self.alibi:
            from trtlm.runtime.alibi import alibi_slopes

            slopes = alibi_slopes(cfg.num_attention_heads, 8.0 if cfg.alibi_bias_max is None else cfg.alibi_bias_max)
            self.register_buffer("alibi_slopes",
                                 slopes[comm.tp_rank * d.heads:(comm.tp_rank + 1) * d.heads].to(device),
                                 persistent=False)

    # -- what the engine needs to know ---------------------------------------------------
    def kv_cache_spec(self) -> dict[str, Any]:
        """Layers, heads and dtypes of this rank's KV cache (the engine sizes its pool from them)."""
        algo = _kv_quant(self.cfg)
        kv_dtype = {"FP8": torch.float8_e4m3fn, "INT8": torch.int8}.get(algo) if algo else None
        return {"num_layers": len(self.layer_ids), "kv_heads": self.d.kv_heads, "head_size": self.d.head_size,
                "dtype": self.dtype, "kv_dtype": kv_dtype}

    def forward(self, tokens_or_hidden: torch.Tensor, batch: ForwardBatch, cache) -> torch.Tensor:
        """One packed step: tokens ``[N]`` (first stage) or hidden states ``[N, H]`` (later
        stages) -> logits ``[M, V]`` of the rows ``batch.logits_indices`` (last stage) or
        hidden states ``[N, H]``."""
        x = self.transformer.vocab_embedding(tokens_or_hidden) if self.first else tokens_or_hidden
        rope = None
        if not self.alibi:
            if self._inv_freq is None or self._inv_freq.device != x.device:
                self._inv_freq = rope_inv_freq(self.d.head_size, self.cfg.rotary_base, x.device)
            rope = rope_tables(batch.positions, self.d.head_size, 0.0, x.dtype, self._inv_freq)
        slopes = self.alibi_slopes if self.alibi else None
        delta = None
        for i, block in enumerate(self.transformer.layers):
            x, delta = block.step(x, delta, batch, cache, i, rope, slopes)
        if not self.last:
            return x if delta is None else x + delta
        rows = batch.logits_indices
        x = x.index_select(0, rows)
        if delta is not None:
            x = x + delta.index_select(0, rows)
        x = self.transformer.ln_f(x)
        logits = self.comm.all_gather_last(self.lm_head(x))
        return logits[..., :self.d.vocab]
