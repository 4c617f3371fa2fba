"""The fast forward pass of :class:`~trtlm.runtime.model.Transformer`, for GPU decode.

It runs over the model's own parameters (nothing is copied or renamed; the
state_dict stays TensorRT-LLM's) and computes the same function as
``Transformer.forward`` with fewer, larger kernels, because decode at small
batch is bound by memory traffic and by the number of kernels per token, not
by arithmetic:

* RoPE from one ``cos``/``sin`` table per sequence length, applied to the
  queries and keys together (one set of elementwise kernels per layer);
* decode attention (one query token) as two batched products over the KV
  cache grouped by KV head: grouped-query attention without
  ``repeat_interleave`` copies of the cache, and the additive mask converted
  to the activation dtype once per step instead of once per layer;
  prefill goes through SDPA with ``enable_gqa``;
* the gated MLP's ``fc`` and ``gate`` as one matrix product
  (:meth:`~trtlm.runtime.model.GatedMLP.fuse`);
* MoE layers through ``torch.nn.functional.grouped_mm``, which reads only the
  weights of the experts that tokens were routed to (at batch 1 that is 2 of
  8 experts) and needs no host synchronisation, so it can be captured in a
  CUDA graph;
* optionally (``compile=True``) the non-GEMM pieces (RMSNorm, residual add
  + RMSNorm, RoPE, SwiGLU, the decode softmax with its scale and mask, MoE
  routing and combining) compiled by ``torch.compile`` into one or two
  kernels each.  Measured on an H100 (docs/benchmarks.md, "GPU decode"):
  Mistral-7B batch-1 decode 132 -> 163 tok/s, because at batch 1 every small
  kernel costs ~2.5 us and a step has ~500 of them;
* in static-shape (decode) steps RoPE and both KV-cache writes as one op
  (:func:`rope_write`), one kernel per layer instead of three when compiled:
  163.0 -> 165.9 tok/s in one A/B run (bench/results/h100_run4).

Everything here is shape-static when ``Step`` is (``start`` a device tensor,
``length`` fixed): :mod:`trtlm.runtime.cuda_graph` captures it in a CUDA graph.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.nn.functional as F

from trtlm.runtime.model import GatedMLP, KVCache, Linear, MoE, PlainMLP, RMSNorm, Step, Transformer, row_parallel


def unsupported_reason(model: Transformer) -> str | None:
    """Why :class:`FastForward` cannot run ``model`` (``None`` when it can)."""
    if model.alibi:
        return "ALiBi position bias"
    if not model.first:
        return "a pipeline stage without the embedding"
    for block in model.transformer.layers:
        att = block.attention
        if type(att.qkv) is not Linear or type(att.dense) is not Linear:
            return "quantized linear layers"
        mlp = block.mlp
        if isinstance(mlp, (GatedMLP, PlainMLP)):
            if any(type(m) is not Linear for m in (mlp.fc, mlp.proj)):
                return "quantized linear layers"
        elif not isinstance(mlp, MoE):
            return f"feed-forward {type(mlp).__name__}"
    return None


# -- the elementwise pieces (eager; torch.compile'd on request) ---------------------------
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """As :class:`~trtlm.runtime.model.RMSNorm` (float32 statistics, transformers' rounding)."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def add_rms_norm(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, eps: float):
    """``(x + y, rms_norm(x + y))``: the residual add fused with the next layer's norm."""
    s = x + y
    return s, rms_norm(s, weight, eps)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """GPT-NeoX rotary embedding, ``x [B, T, heads, D]``, ``cos``/``sin`` ``[B, T, 1, D]``."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def rope_write(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor,
               start: torch.Tensor, heads: int) -> torch.Tensor:
    """A static-shape step's attention input: RoPE on the queries and keys of the fused ``qkv``
    product ``[B, T, (H + 2 KV) D]``, the keys and values written into the caches ``kc``/``vc``
    ``[B, KV, max_seq, D]`` at slots ``start`` (a device tensor) -> the queries ``[B, T, H, D]``.

    One function so that ``torch.compile`` makes it one kernel instead of three (rotate, two cache
    writes): inductor writes the cache slots in place (its re-inplacing of ``index_copy_`` on a graph
    input), it does not copy the cache."""
    B, T, _ = qkv.shape
    KV, D = kc.shape[1], kc.shape[-1]
    qk = rope(qkv[..., :(heads + KV) * D].view(B, T, heads + KV, D), cos, sin)
    kc.index_copy_(2, start, qk[:, :, heads:].transpose(1, 2))
    vc.index_copy_(2, start, qkv[..., (heads + KV) * D:].view(B, T, KV, D).transpose(1, 2))
    return qk[:, :, :heads]


def swiglu(h: torch.Tensor) -> torch.Tensor:
    """``silu(fc) * gate`` of the fused ``[..., 2I]`` product (``fc`` rows first)."""
    a, g = h.chunk(2, dim=-1)
    return F.silu(a) * g


def decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, bias: torch.Tensor,
                     scale: float) -> torch.Tensor:
    """One query token per sequence: ``q [B, KV, rep, D]`` (query head ``h`` reads KV head
    ``h // rep``), ``keys``/``values`` ``[B, KV, L, D]`` straight from the cache (no
    ``repeat_interleave`` copies), ``bias [B, 1, 1, L]`` additive -> ``[B, KV, rep, D]``."""
    scores = torch.matmul(q, keys.transpose(-1, -2)) * scale + bias  # scale and bias fuse into the softmax
    return torch.matmul(torch.softmax(scores, dim=-1), values)  # softmax accumulates in float32


def moe_route(x: torch.Tensor, router: torch.Tensor, top_k: int, normalization_mode: int, experts: int):
    """Routing plus the bookkeeping of :func:`grouped_experts`: ``(scales, pair order, the rows of
    ``x`` sorted by expert, grouped_mm offsets)``; fixed shapes, no host synchronisation."""
    from trtlm.runtime.moe import route

    scales, ids = route(F.linear(x.float(), router.float()), top_k, normalization_mode)
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = (flat[:, None] == torch.arange(experts, device=flat.device)).sum(0)
    offs = counts.cumsum(0).to(torch.int32)
    return scales, order, x.index_select(0, torch.div(order, top_k, rounding_mode="floor")), offs


def moe_combine(ys: torch.Tensor, order: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Sorted pair outputs ``[T*k, H]`` -> ``[T, H]``: back to pair order, scaled and summed in float32."""
    T, k = scales.shape
    y = torch.empty_like(ys).index_copy_(0, order, ys)
    return (y.view(T, k, -1).float() * scales.unsqueeze(-1)).sum(1).to(ys.dtype)


class _Compiled:
    """``torch.compile(fn)``, falling back to ``fn`` for good if compilation fails (an optional
    speed-up must not take the runtime down)."""

    def __init__(self, fn: Callable):
        self.fn = fn
        # dynamic=False compiles one graph per (batch size, cache-length bucket); past torch's
        # default of 8 recompiles per function it would silently run eagerly again.
        dynamo = torch._dynamo.config
        limit = "recompile_limit" if hasattr(dynamo, "recompile_limit") else "cache_size_limit"
        setattr(dynamo, limit, max(getattr(dynamo, limit), 64))
        # one kernel per small softmax/norm row rather than a split two-kernel reduction
        self.compiled: Callable | None = torch.compile(fn, fullgraph=True, dynamic=False,
                                                       options={"split_reductions": False})

    def __call__(self, *args):
        if self.compiled is not None:
            try:
                return self.compiled(*args)
            except Exception as exc:  # noqa: BLE001 - any compiler failure: run eagerly
                import warnings

                warnings.warn(f"torch.compile of {self.fn.__name__} failed ({type(exc).__name__}: {exc}); "
                              f"running it eagerly", stacklevel=2)
                self.compiled = None
        return self.fn(*args)


class Ops:
    """The non-GEMM pieces the fast path calls; ``compile=True`` wraps each in ``torch.compile``
    (one or two fused kernels each instead of 3-8 small ones)."""

    def __init__(self, compile: bool = False):
        fns: dict[str, Callable] = {"rms_norm": rms_norm, "add_rms_norm": add_rms_norm, "rope": rope,
                                    "rope_write": rope_write,
                                    "swiglu": swiglu, "decode_attention": decode_attention,
                                    "moe_route": moe_route, "moe_combine": moe_combine, "up_swiglu": up_swiglu}
        if compile:
            fns = {k: _Compiled(f) for k, f in fns.items()}
        for k, f in fns.items():
            setattr(self, k, f)
        self.compiled = compile


# -- MoE -------------------------------------------------------------------------------------
def grouped_experts(x: torch.Tensor, fc: torch.Tensor, proj: torch.Tensor, scales: torch.Tensor,
                    expert_ids: torch.Tensor) -> torch.Tensor:
    """Sum over each token's selected experts of ``scale * proj_e(silu(gate_e x) * up_e x)``.

    ``x [T, H]``, ``fc [E, 2I, H]`` (up rows first, TensorRT-LLM's order), ``proj [E, H, I]``,
    ``scales``/``expert_ids`` ``[T, k]`` from :func:`trtlm.runtime.moe.route`.  The token/expert
    pairs are sorted by expert and both products are one ``grouped_mm`` each: experts nobody was
    routed to have empty groups and their weights are never read.  No host synchronisation and
    fixed shapes (the group offsets live on the device).  Sums in float32 like
    :func:`trtlm.runtime.moe.moe_forward`.
    """
    k = expert_ids.shape[1]
    flat = expert_ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = (flat[:, None] == torch.arange(fc.shape[0], device=flat.device)).sum(0)
    offs = counts.cumsum(0).to(torch.int32)
    xs = x.index_select(0, torch.div(order, k, rounding_mode="floor"))
    return moe_combine(grouped_swiglu(xs, fc, proj, offs), order, scales)


def grouped_swiglu(xs: torch.Tensor, fc: torch.Tensor, proj: torch.Tensor, offs: torch.Tensor,
                   act: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """The experts' SwiGLU on rows grouped by expert (``offs``: cumulative rows per expert)."""
    h = F.grouped_mm(xs, fc.transpose(1, 2), offs=offs)  # [S, 2I]
    return F.grouped_mm((act or up_swiglu)(h), proj.transpose(1, 2), offs=offs)  # [S, H]


def up_swiglu(h: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` of an expert's ``[..., 2I]`` product (``up`` rows first)."""
    up, gate = h.chunk(2, dim=-1)
    return F.silu(gate) * up


def grouped_mm_available(device: torch.device) -> bool:
    if not hasattr(F, "grouped_mm"):
        return False
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device)[0] >= 8
    return True


# -- the forward ------------------------------------------------------------------------------
class FastForward:
    """``forward(tokens, step, cache) -> logits``: the same function as ``model(tokens, step, cache)``.

    :param model: a single-stage :class:`Transformer` (see :func:`unsupported_reason`).
    :param compile: compile the elementwise pieces with ``torch.compile``.
    :param grouped_moe: run MoE layers through ``grouped_mm`` (default: where available).
    """

    def __init__(self, model: Transformer, compile: bool = False, grouped_moe: bool | None = None):
        reason = unsupported_reason(model)
        if reason:
            raise ValueError(f"the fast forward does not handle {reason}; use the model's own forward")
        self.model = model
        self.ops = Ops(compile)
        d = model.d
        self.heads, self.kv_heads, self.head_size = d.heads, d.kv_heads, d.head_size
        self.scale = 1.0 / math.sqrt(d.head_size)
        self.rope_base = float(model.config.get("rotary_base", 10000.0))
        device = next(model.parameters()).device
        if grouped_moe is None:  # CUDA's grouped_mm kernels take bf16 only
            grouped_moe = grouped_mm_available(device) and (device.type != "cuda" or model.dtype == torch.bfloat16)
        self.grouped_moe = grouped_moe
        for block in model.transformer.layers:
            if isinstance(block.mlp, GatedMLP):
                block.mlp.fuse()
        self._tables: tuple[torch.Tensor, torch.Tensor] | None = None
        #: static-shape steps: RoPE and both cache writes in one op (:func:`rope_write`);
        #: ``False`` keeps them apart (the A/B in bench/gpu_decode_ab.py)
        self.fuse_cache_write = True

    def rope_tables(self, length: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """``cos``/``sin`` ``[length, D]`` for positions ``0..length-1``, computed exactly as
        :func:`trtlm.runtime.model.rope_tables` computes each position's row."""
        if self._tables is None or self._tables[0].shape[0] < length or self._tables[0].device != device:
            D = self.head_size
            inv_freq = 1.0 / (self.rope_base ** (torch.arange(0, D, 2, dtype=torch.int64, device=device).float() / D))
            freqs = torch.arange(length, device=device).float()[:, None] * inv_freq
            emb = torch.cat([freqs, freqs], dim=-1)
            self._tables = (emb.cos().to(self.model.dtype), emb.sin().to(self.model.dtype))
        return self._tables

    def norm(self, norm_module, x):
        if isinstance(norm_module, RMSNorm):
            return self.ops.rms_norm(x, norm_module.weight, norm_module.eps)
        return norm_module(x)

    def __call__(self, tokens: torch.Tensor, step: Step, cache: KVCache) -> torch.Tensor:
        model = self.model
        x = model.transformer.vocab_embedding(tokens)
        cos_t, sin_t = self.rope_tables(cache.max_seq, x.device)
        cos, sin = cos_t[step.positions][:, :, None], sin_t[step.positions][:, :, None]  # [B, T, 1, D]
        bias = step.mask.to(x.dtype)  # once per step, not per layer
        layers = model.transformer.layers
        h = self.norm(layers[0].input_layernorm, x)
        for i, block in enumerate(layers):
            a = self.attention(block.attention, h, step, cache.k[i], cache.v[i], cos, sin, bias)
            x, h = self.add_norm(x, a, block.post_layernorm)
            m = self.mlp(block.mlp, h)
            nxt = layers[i + 1].input_layernorm if i + 1 < len(layers) else (
                model.transformer.ln_f if model.last else None)
            if nxt is None:
                x = x + m
            else:
                x, h = self.add_norm(x, m, nxt)
        if not model.last:
            return x
        logits = model.comm.all_gather_last(model.lm_head(h))
        return logits[..., :model.d.vocab]

    def add_norm(self, x, y, norm_module):
        if isinstance(norm_module, RMSNorm):
            return self.ops.add_rms_norm(x, y, norm_module.weight, norm_module.eps)
        s = x + y
        return s, norm_module(s)

    def attention(self, att, x, step: Step, kc, vc, cos, sin, bias):
        B, T, _ = x.shape
        H, KV, D = self.heads, self.kv_heads, self.head_size
        qkv = F.linear(x, att.qkv.weight, att.qkv.bias)
        if att.clip_qkv:
            qkv = qkv.clamp(-att.clip_qkv, att.clip_qkv)
        if att.use_rope and self.fuse_cache_write and not isinstance(step.start, int):
            q = self.ops.rope_write(qkv, cos, sin, kc, vc, step.start, H)  # one kernel when compiled
            return self.attend(att, q, step, kc, vc, bias)
        qk = qkv[..., :(H + KV) * D].view(B, T, H + KV, D)
        v = qkv[..., (H + KV) * D:].view(B, T, KV, D)
        if att.use_rope:
            qk = self.ops.rope(qk, cos, sin)
        q, k = qk[:, :, :H], qk[:, :, H:]
        if isinstance(step.start, int):
            kc[:, :, step.start:step.start + T] = k.transpose(1, 2)
            vc[:, :, step.start:step.start + T] = v.transpose(1, 2)
        else:
            kc.index_copy_(2, step.start, k.transpose(1, 2))
            vc.index_copy_(2, step.start, v.transpose(1, 2))
        return self.attend(att, q, step, kc, vc, bias)

    def attend(self, att, q, step: Step, kc, vc, bias):
        """Queries ``[B, T, H, D]`` over the cache (this step's keys/values already written)."""
        B, T = q.shape[:2]
        H, KV, D = self.heads, self.kv_heads, self.head_size
        keys, values = kc[:, :, :step.length], vc[:, :, :step.length]
        if T == 1:
            out = self.ops.decode_attention(q.reshape(B, KV, H // KV, D), keys, values, bias, self.scale)
            out = out.reshape(B, 1, H * D)
        else:
            out = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, attn_mask=bias,
                                                 enable_gqa=KV != H)
            out = out.transpose(1, 2).reshape(B, T, H * D)
        return row_parallel(att.dense, out, att.comm)

    def mlp(self, mlp, x):
        if isinstance(mlp, GatedMLP):
            if mlp.fused is not None:
                h = F.linear(x, mlp.fused[0], mlp.fused[1])
                return row_parallel(mlp.proj, self.ops.swiglu(h), mlp.comm)
            return mlp(x)
        if isinstance(mlp, MoE) and self.grouped_moe and mlp.expert_offset == 0 \
                and mlp.fc.weight.shape[0] == mlp.router.weight.shape[0]:
            B, T, Hd = x.shape
            flat = x.reshape(B * T, Hd)
            fc, proj = mlp.fc.weight, mlp.proj.weight
            scales, order, xs, offs = self.ops.moe_route(flat, mlp.router.weight, mlp.top_k,
                                                         mlp.normalization_mode, fc.shape[0])
            ys = grouped_swiglu(xs, fc, proj, offs, self.ops.up_swiglu)
            return mlp.comm.all_reduce(self.ops.moe_combine(ys, order, scales).view(B, T, Hd))
        return mlp(x)


def make_forward(model: Transformer, fast: bool = True, compile: bool = False) -> Callable[..., Any]:
    """The fast forward when it handles ``model``, else the model itself."""
    if fast and unsupported_reason(model) is None:
        return FastForward(model, compile=compile)
    return model
