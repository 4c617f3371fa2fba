"""Mixture-of-experts feed-forward layer (Mixtral style) for the PyTorch runtime.

Pure torch; nothing else from trtlm is imported, so the layer can be tested and reused on its own.

Weight layout is TensorRT-LLM's MoE layout, as written by the converter:

* ``router_weight`` ``[E_total, H]`` -- the router ("gate") of every expert, also on expert-parallel ranks,
  because routing needs all the logits.  TensorRT-LLM keeps it in float32 and computes the router in float32.
* ``fc`` ``[E_local, 2*I, H]`` -- per expert ``cat(w3, w1)``: the UP (linear) rows first, the GATE (SiLU) rows
  second.  (transformers 5 fuses them the other way round, ``gate_up_proj`` = gate first.)
* ``proj`` ``[E_local, H, I]`` -- per expert ``w2`` (down projection).

Parallelism, both handled by the caller's all-reduce:

* expert parallelism: a rank holds a contiguous block of experts ``[expert_offset, expert_offset + E_local)``;
  token/expert pairs routed elsewhere contribute zero here.
* expert tensor parallelism: a rank holds a slice of every expert's intermediate dimension -- ``fc`` is
  ``[E_local, 2*I/tp, H]`` (its up slice, then its gate slice) and ``proj`` is ``[E_local, H, I/tp]``.  The SwiGLU is
  elementwise in the intermediate dimension, so each rank's output is a partial sum of the down projection.  The
  code below only ever splits ``fc`` into two halves along dim 1, so it works for any ``I``.

Numerics follow transformers 5.23's Mixtral (``MixtralTopKRouter`` + the default ``grouped_mm`` experts path, which
``batched_mm`` shares):

1. router logits, softmax and top-k in float32 (transformers upcasts the logits before the softmax); the scales stay
   float32;
2. each expert's up/gate GEMM, SiLU(gate) * up and the down GEMM in the hidden dtype;
3. expert output (hidden dtype) times its float32 scale -> float32 by type promotion, the ``k`` contributions of a
   token summed in float32, and a single cast back to the hidden dtype at the end.

(transformers 4.x cast the routing weights to the hidden dtype *before* the multiply; 5.x no longer does, and
neither do we.)  One deliberate difference: transformers computes the router GEMM in the hidden dtype and only then
upcasts, TensorRT-LLM computes it in float32; we default to TensorRT-LLM's float32 and take ``router_dtype`` to
reproduce transformers' bf16/fp16 router logits bit for bit when matching it matters more.

Three execution strategies, picked by size (see :func:`select_strategy`), all mathematically identical:

``"gather"``  small ``T*k`` (decode at batch 1): index the selected experts' weights and run a batched GEMV.
``"dense"``   moderate ``T`` (decode at batch 8..256): every local expert on every token, weighted by a dense scale
              matrix that is zero for unselected experts.
``"sorted"``  large ``T`` (prefill): sort the pairs by expert and run one GEMM per expert on its contiguous segment.

``gather`` and ``dense`` have no host synchronisation and no data-dependent shapes, so they can be captured in a CUDA
graph; ``sorted`` reads the per-expert counts back to the host once.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "DENSE_MAX_TOKENS",
    "GATHER_COST_FACTOR",
    "NORMALIZE_NONE",
    "NORMALIZE_RENORMALIZE",
    "STRATEGIES",
    "moe_forward",
    "route",
    "select_strategy",
]

#: TensorRT-LLM's ``MoeConfig.ExpertScaleNormalizationMode`` values.
#: NONE: the scales are the top-k of the softmax over all experts (they need not sum to one).
NORMALIZE_NONE = 0
#: RENORMALIZE: the scales are a softmax over the top-k logits (they sum to one).  This is Mixtral's routing:
#: transformers' ``softmax -> topk -> divide by the sum`` is the same function.
NORMALIZE_RENORMALIZE = 1

STRATEGIES = ("gather", "dense", "sorted")
#: picked automatically on Hopper GPUs for bf16 with every expert local (grouped_mm's alignment rules)
GROUPED = "grouped"

#: ``gather`` is used while ``GATHER_COST_FACTOR * T * k <= E_local``.  Indexing ``fc[idx]`` copies the selected
#: experts' weights, so each token/expert pair moves an expert's weights about three times (read and write for the
#: copy, read again by the bmm), while ``dense`` reads every local expert's weights once.  Decode at these sizes is
#: bound by memory traffic, so the cheaper of ``3*T*k`` and ``E_local`` expert-weight passes wins.  Measured on an
#: H100, bf16, Mixtral-8x7B layer (H=4096, I=14336, k=2), CUDA-graph replay: E_local=8, T=1: gather 0.76 ms vs
#: dense 1.04 ms; T=2: gather 1.40 ms vs dense 1.06 ms; E_local=4 (expert parallel over 2), T=1: gather 0.78 ms vs
#: dense 0.55 ms -- exactly the choices this rule makes.  For many small experts (E=64, k=6) it means batch 1..3.
GATHER_COST_FACTOR = 3

#: ``dense`` is used up to this many tokens.  ``dense`` does ``E_local/k`` times the useful FLOPs, but while its
#: GEMMs are memory-bound (each expert's weights are read once whatever T is) that extra work is nearly free, and it
#: needs no host synchronisation, so it runs inside a CUDA graph (batch-64 decode).  An H100 does about 300 bf16 FLOP
#: per byte of HBM traffic, so the GEMMs turn compute-bound at a few hundred rows; past that the wasted FLOPs cost
#: real time and ``sorted`` (only the selected pairs) wins.  Measured as above (dense with graph replay vs sorted):
#: E_local=8: T=64 1.14 vs 1.40 ms, T=256 1.47 vs 1.52 ms, T=320 1.72 vs 1.58 ms; E_local=4: T=256 0.76 vs
#: 0.99 ms, T=384 1.00 vs 0.98 ms.  The crossover depends on T (when the GEMMs saturate), hardly on E.
DENSE_MAX_TOKENS = 256


def route(router_logits: Tensor, top_k: int, normalization_mode: int) -> tuple[Tensor, Tensor]:
    """Select ``top_k`` experts per token and their scales.

    ``router_logits`` ``[T, E]`` (any float dtype; upcast to float32 because the softmax must not run in bf16) ->
    ``(scales [T, k] float32, expert_ids [T, k] int64)``, experts in descending order of logit.

    * ``NORMALIZE_NONE``: ``scales = topk(softmax(logits))`` -- the probabilities over all experts.
    * ``NORMALIZE_RENORMALIZE``: ``scales = softmax(topk(logits))`` -- renormalised over the selected experts
      (mathematically transformers' Mixtral ``topk(softmax) / sum``; this form needs no division and is TensorRT-LLM's).

    No host synchronisation, fixed output shapes: safe inside a CUDA graph.
    """
    if router_logits.dim() != 2:
        raise ValueError(f"router_logits must be [T, E], got shape {tuple(router_logits.shape)}")
    num_experts = router_logits.shape[-1]
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must be in [1, {num_experts}], got {top_k}")
    logits = router_logits.float()
    if normalization_mode == NORMALIZE_NONE:
        scales, expert_ids = torch.topk(torch.softmax(logits, dim=-1), top_k, dim=-1)
    elif normalization_mode == NORMALIZE_RENORMALIZE:
        top_logits, expert_ids = torch.topk(logits, top_k, dim=-1)
        scales = torch.softmax(top_logits, dim=-1)
    else:
        raise ValueError(
            f"unknown normalization_mode {normalization_mode!r}; expected NORMALIZE_NONE ({NORMALIZE_NONE}) "
            f"or NORMALIZE_RENORMALIZE ({NORMALIZE_RENORMALIZE})"
        )
    return scales, expert_ids


def select_strategy(num_tokens: int, top_k: int, num_local_experts: int) -> str:
    """The strategy :func:`moe_forward` uses by default for this many tokens (host-side shape arithmetic only).

    ``gather`` while moving the gathered weights (``GATHER_COST_FACTOR`` passes per pair) is cheaper than reading
    every local expert once; ``dense`` up to ``DENSE_MAX_TOKENS`` tokens, where the GEMMs are still memory-bound
    and the wasted FLOPs are free; ``sorted`` beyond, where only the selected pairs should be computed.
    """
    if GATHER_COST_FACTOR * num_tokens * top_k <= num_local_experts:
        return "gather"
    if num_tokens <= DENSE_MAX_TOKENS:
        return "dense"
    return "sorted"


def moe_forward(
    x: Tensor,
    router_weight: Tensor,
    fc: Tensor,
    proj: Tensor,
    top_k: int,
    normalization_mode: int,
    expert_offset: int = 0,
    *,
    strategy: str | None = None,
    router_dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Mixtral sparse-MoE feed-forward: ``sum_k scale_k * proj_e(silu(gate_e(x)) * up_e(x))``.

    Args:
        x: ``[T, H]`` hidden states (any leading shape ``[..., H]`` is flattened and restored).
        router_weight: ``[E_total, H]``, all experts' router rows (float32 in TensorRT-LLM checkpoints).
        fc: ``[E_local, 2*I, H]``, per expert ``cat(up, gate)`` -- up (w3) rows FIRST, gate (w1) rows second.
            With expert tensor parallelism ``I`` is this rank's slice; only the two halves matter.
        proj: ``[E_local, H, I]``, per expert down projection (w2).
        top_k: experts per token.
        normalization_mode: ``NORMALIZE_NONE`` or ``NORMALIZE_RENORMALIZE`` (Mixtral), see :func:`route`.
        expert_offset: global id of local expert 0.  Expert-parallel ranks hold the contiguous block
            ``[expert_offset, expert_offset + E_local)``; pairs routed to experts outside it contribute zero, and
            the caller sums the ranks' outputs.
        strategy: force ``"gather"``, ``"dense"`` or ``"sorted"``; ``None`` picks by size (:func:`select_strategy`),
            never ``"sorted"`` while the current CUDA stream is being captured into a graph.
        router_dtype: dtype of the router GEMM.  float32 (default) is TensorRT-LLM's; ``x.dtype`` reproduces
            transformers, which computes the router logits in the hidden dtype and upcasts them afterwards.

    Returns:
        ``[T, H]`` in ``x.dtype``.  Expert GEMMs run in ``x.dtype`` (``fc``/``proj`` must have that dtype); the
        scaled contributions are summed in float32 and cast once, like transformers 5.
    """
    orig_shape = x.shape
    hidden = orig_shape[-1]
    x = x.reshape(-1, hidden)
    num_tokens = x.shape[0]
    num_local, two_i, fc_hidden = fc.shape
    num_total = router_weight.shape[0]
    if router_weight.shape[1] != hidden or fc_hidden != hidden:
        raise ValueError(
            f"hidden size mismatch: x {tuple(orig_shape)}, router_weight {tuple(router_weight.shape)}, fc {tuple(fc.shape)}"
        )
    if two_i % 2 or proj.shape != (num_local, hidden, two_i // 2):
        raise ValueError(
            f"fc {tuple(fc.shape)} and proj {tuple(proj.shape)} disagree; expected fc [E, 2I, H] and proj [E, H, I]"
        )
    if not 0 <= expert_offset <= num_total - num_local:
        raise ValueError(f"local experts [{expert_offset}, {expert_offset + num_local}) outside [0, {num_total})")
    if strategy is None and num_local == num_total and grouped_mm_available(x.device) and (
            not x.is_cuda or x.dtype == torch.bfloat16):  # CUDA's grouped_mm kernels take bf16 only
        strategy = GROUPED
    if strategy is None:
        strategy = select_strategy(num_tokens, top_k, num_local)
        if strategy == "sorted" and x.is_cuda and torch.cuda.is_current_stream_capturing():
            strategy = "dense"  # being captured into a CUDA graph (e.g. a large-batch decode graph): no host sync
    elif strategy not in (*STRATEGIES, GROUPED):
        raise ValueError(f"unknown strategy {strategy!r}; expected one of {STRATEGIES}")

    if num_tokens == 0:
        return x.new_zeros(orig_shape)

    logits = F.linear(x.to(router_dtype), router_weight.to(router_dtype))
    scales, expert_ids = route(logits, top_k, normalization_mode)
    local_ids = expert_ids - expert_offset if expert_offset else expert_ids
    # Whether some experts live on other ranks is known from shapes alone (no sync); only then is masking needed.
    all_local = num_local == num_total
    valid = None if all_local else (local_ids >= 0) & (local_ids < num_local)

    if strategy == GROUPED:
        out = grouped_experts(x, fc, proj, scales, local_ids)
    elif strategy == "gather":
        out = _gather(x, fc, proj, scales, local_ids, valid)
    elif strategy == "dense":
        out = _dense(x, fc, proj, scales, local_ids)
    else:
        out = _sorted(x, fc, proj, scales, local_ids, valid)
    return out.reshape(orig_shape)


def _swiglu(h: Tensor) -> Tensor:
    """``[..., 2I]`` fc output -> ``[..., I]``: SiLU(gate) * up, up being the FIRST half (TensorRT-LLM's order)."""
    up, gate = h.chunk(2, dim=-1)
    return F.silu(gate) * up


def _combine(y: Tensor, scales: Tensor, valid: Tensor | None, dtype: torch.dtype) -> Tensor:
    """Per-pair expert outputs ``[T*k, H]`` (pair ``t*k + j`` = token t's j-th choice) -> ``[T, H]``.

    Same as transformers 5's experts: hidden-dtype output times float32 scale (float32 by promotion), the token's
    ``k`` products summed in float32 in routing order, one cast at the end.  Pairs of other ranks are masked with
    ``where`` rather than only a zero scale, so a garbage row (e.g. an overflowing expert we were never meant to
    run) cannot turn into NaN through ``0 * inf``.
    """
    num_tokens, top_k = scales.shape
    weighted = y.view(num_tokens, top_k, -1).float() * scales.unsqueeze(-1)
    if valid is not None:
        weighted = torch.where(valid.unsqueeze(-1), weighted, 0.0)
    return weighted.sum(dim=1).to(dtype)


def _gather(x: Tensor, fc: Tensor, proj: Tensor, scales: Tensor, local_ids: Tensor, valid: Tensor | None) -> Tensor:
    """Small ``T*k``: copy the ``T*k`` selected experts' weights out (``fc[idx]``) and run batched GEMVs.

    No host sync and fixed shapes (CUDA-graph capturable).  Pairs of other ranks are clamped to a valid index,
    computed, and masked in :func:`_combine` -- cheaper than any data-dependent skipping at this size.
    Temporary memory: ``T*k`` experts' weights (one ``fc`` copy, then one ``proj`` copy).
    """
    num_tokens, top_k = local_ids.shape
    hidden = x.shape[-1]
    idx = local_ids.reshape(-1)
    if valid is not None:
        idx = idx.clamp(0, fc.shape[0] - 1)
    xs = x.unsqueeze(1).expand(num_tokens, top_k, hidden).reshape(-1, hidden, 1)  # pair order t*k + j
    # Advanced indexing, not index_select: on an H100 ``fc[idx]`` copies these 100+ MB slices at memcpy speed
    # (~3 TB/s), ``index_select`` at a third of that.
    h = torch.bmm(fc[idx], xs).squeeze(-1)  # [S, 2I]
    a = _swiglu(h).unsqueeze(-1)  # [S, I, 1]
    y = torch.bmm(proj[idx], a).squeeze(-1)  # [S, H]
    return _combine(y, scales, valid, x.dtype)


def _dense(x: Tensor, fc: Tensor, proj: Tensor, scales: Tensor, local_ids: Tensor) -> Tensor:
    """Moderate ``T``: every local expert on every token, weighted by a dense ``[T, E_local]`` scale matrix.

    The up/gate projection of all experts is ONE GEMM ``x @ fc.view(E*2I, H).T`` (x is shared by all experts);
    the down projection is one bmm over experts.  The scale matrix is built from a one-hot comparison against
    ``arange(E_local)``: ids of other ranks match no column, so they drop out without clamping, and nothing
    depends on the data's values for shapes (CUDA-graph capturable).  Unselected experts are masked with ``where``
    (not only multiplied by zero) so their outputs can never leak NaN/inf.
    """
    num_local, two_i, hidden = fc.shape
    num_tokens = x.shape[0]
    onehot = local_ids.unsqueeze(-1) == torch.arange(num_local, device=local_ids.device)  # [T, k, E]
    dense_scales = (onehot * scales.unsqueeze(-1)).sum(dim=1)  # [T, E] f32; experts are distinct per token
    selected = onehot.any(dim=1)  # [T, E]
    h = F.linear(x, fc.reshape(num_local * two_i, hidden)).view(num_tokens, num_local, two_i)
    a = _swiglu(h).transpose(0, 1)  # [E, T, I]
    y = torch.bmm(a, proj.transpose(1, 2))  # [E, T, H]
    weighted = y.float() * dense_scales.t().unsqueeze(-1)
    weighted = torch.where(selected.t().unsqueeze(-1), weighted, 0.0)
    return weighted.sum(dim=0).to(x.dtype)


def _sorted(x: Tensor, fc: Tensor, proj: Tensor, scales: Tensor, local_ids: Tensor, valid: Tensor | None) -> Tensor:
    """Large ``T``: group the pairs by expert (stable sort) and run each expert's two GEMMs on its segment.

    The loop is over experts, never tokens.  The per-expert counts are read back to the host once (one sync),
    which is fine for prefill; pairs of other ranks are sorted to the end and never computed.
    """
    num_local = fc.shape[0]
    num_tokens, top_k = local_ids.shape
    hidden = x.shape[-1]
    flat = local_ids.reshape(-1)
    key = flat if valid is None else torch.where(valid.reshape(-1), flat, num_local)
    order = torch.argsort(key, stable=True)
    counts = torch.bincount(key, minlength=num_local + 1).tolist()  # the one host synchronisation
    num_valid = sum(counts[:num_local])
    order = order[:num_valid]
    xs = x.index_select(0, torch.div(order, top_k, rounding_mode="floor"))  # [N, H], grouped by expert
    ys = torch.empty_like(xs)
    start = 0
    for e in range(num_local):
        n = counts[e]
        if n == 0:
            continue
        seg = xs[start : start + n]
        a = _swiglu(F.linear(seg, fc[e]))
        torch.mm(a, proj[e].t(), out=ys[start : start + n])
        start += n
    if num_valid == flat.numel():
        y = torch.empty_like(ys).index_copy_(0, order, ys)  # back to pair order t*k + j
    else:
        y = x.new_zeros(flat.numel(), hidden).index_copy_(0, order, ys)
    return _combine(y, scales, valid, x.dtype)


# -- grouped GEMMs (torch's grouped_mm): only the routed experts' weights are read -----------------
def grouped_mm_available(device: torch.device) -> bool:
    if not hasattr(F, "grouped_mm"):
        return False
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device)[0] >= 9  # Hopper+: the fast path measured here
    return False


def grouped_experts(x: Tensor, fc: Tensor, proj: Tensor, scales: Tensor, expert_ids: Tensor) -> Tensor:
    """Sum over each token's selected experts of ``scale * proj_e(silu(gate_e x) * up_e x)``.

    The token/expert pairs are sorted by expert and both products are one ``grouped_mm`` each:
    experts nobody was routed to have empty groups and their weights are never read.  No host
    synchronisation and fixed shapes (the group offsets live on the device), so it is CUDA-graph
    capturable.  Sums in float32 like the other strategies.
    """
    k = expert_ids.shape[1]
    flat = expert_ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = (flat[:, None] == torch.arange(fc.shape[0], device=flat.device)).sum(0)
    offs = counts.cumsum(0).to(torch.int32)
    xs = x.index_select(0, torch.div(order, k, rounding_mode="floor"))
    h = F.grouped_mm(xs, fc.transpose(1, 2), offs=offs)  # [T*k, 2I]
    ys = F.grouped_mm(_swiglu(h), proj.transpose(1, 2), offs=offs)  # [T*k, H]
    y = torch.empty_like(ys).index_copy_(0, order, ys)
    T = scales.shape[0]
    return (y.view(T, k, -1).float() * scales.unsqueeze(-1)).sum(1).to(x.dtype)
