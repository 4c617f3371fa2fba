"""Attention over the paged KV cache, for one packed step of many sequences.

A step packs the new tokens of every scheduled sequence into one flat batch
of ``N`` tokens (no padding): sequence ``s`` contributes ``query_lens[s]``
tokens — a whole prompt, a prompt chunk, or one decode token — at positions
``context_lens[s] - query_lens[s] ... context_lens[s] - 1``.  Each token's
keys and values are written to its slot (``slot_mapping``: block id ×
block size + offset); each query then attends to its own sequence's cached
tokens through the block table — causally, within the sliding window, with
the ALiBi bias when the model has one.

Two implementations of the same function:

* :func:`paged_attention_reference` below (any device): per sequence, take its
  blocks (a view when their ids are consecutive) and run SDPA in the model's
  dtype, as transformers computes attention — what the CPU runs, and the
  reason float32 logits match transformers' to ~1e-7;
* on CUDA, the Triton kernels of :mod:`trtlm.runtime.kernels`, which read the
  blocks in place (no gathered copy) and are CUDA-graph capturable; they are
  tested against that package's float32 oracle (``kernels.reference``), which
  is a test oracle, not a runtime path.

Writing the cache is one op everywhere (:func:`trtlm.runtime.kernels.write_kv`).

FP8/INT8 caches store ``x / scale`` and are read back as ``stored × scale``
(the checkpoint's per-layer scale), in the same blocks.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from trtlm.runtime import kernels


@dataclass
class ForwardBatch:
    """Everything one forward needs about the packed step (built by the engine)."""

    tokens: torch.Tensor  #: [N] token ids
    positions: torch.Tensor  #: [N]
    slot_mapping: torch.Tensor  #: [N] int64 cache slot of each token
    block_tables: torch.Tensor  #: [S, max_blocks] int32
    context_lens: torch.Tensor  #: [S] int32, tokens in the cache after this step
    query_start_loc: torch.Tensor  #: [S + 1] int32
    logits_indices: torch.Tensor  #: [M] rows of the step whose logits are wanted
    query_lens_host: list[int]  #: [S] host copies (the reference ops loop over sequences)
    context_lens_host: list[int]
    decode_only: bool  #: every sequence contributes one token
    max_context: int  #: longest context of the step (the kernels' loop bound, bucketed for graphs)
    block_tables_host: list[list[int]] | None = None  #: host copy (the reference ops take views of runs)
    memo: dict = field(default_factory=dict)  #: per-step values every layer shares (reference masks)

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.shape[0])


def _as_dtype(stored: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """Cache contents in the activation dtype (dequantized when the cache is FP8/INT8)."""
    return kernels.dequantize_kv(stored, scale).to(dtype) if stored.dtype in _QUANTIZED else stored


_QUANTIZED = (torch.float8_e4m3fn, torch.int8)


def attention_bias(q_len: int, ctx: int, window: int | None, slopes: torch.Tensor | None,
                   device: torch.device) -> torch.Tensor:
    """``[1 or H, q_len, ctx]`` additive bias: causal (queries are the last ``q_len`` of ``ctx``
    positions), sliding window, ALiBi ``slope × (key_pos - query_pos)``."""
    q_pos = torch.arange(ctx - q_len, ctx, device=device)
    k_pos = torch.arange(ctx, device=device)
    rel = q_pos[:, None] - k_pos[None, :]
    ok = rel >= 0
    if window is not None:
        ok &= rel < window
    bias = torch.zeros(rel.shape, dtype=torch.float32, device=device).masked_fill(~ok, float("-inf"))[None]
    if slopes is not None:
        bias = bias + slopes.float()[:, None, None] * (-rel).float()[None]
    return bias


def _mask(batch: ForwardBatch, s: int, q_len: int, ctx: int, window, slopes, dtype) -> torch.Tensor | None:
    """Sequence ``s``'s attention bias, computed once per step and shared by every layer
    (None when nothing is masked: a decode token that sees its whole context)."""
    key = (s, window, dtype)
    if key not in batch.memo:
        plain = slopes is None and q_len == 1 and (window is None or ctx <= window)
        batch.memo[key] = None if plain else attention_bias(q_len, ctx, window, slopes, batch.tokens.device).to(dtype)
    return batch.memo[key]


def _contiguous_run(batch: ForwardBatch, s: int, nb: int) -> int | None:
    """The first block id when sequence ``s``'s first ``nb`` blocks are consecutive ids, else None."""
    key = ("run", s)
    if key not in batch.memo:
        table = batch.block_tables_host[s] if batch.block_tables_host is not None else None
        first = None
        if table is not None and table[:nb] == list(range(table[0], table[0] + nb)):
            first = table[0]
        batch.memo[key] = first
    return batch.memo[key]


_SDPA_GQA = "enable_gqa" in (F.scaled_dot_product_attention.__doc__ or "")


def paged_attention_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, batch: ForwardBatch,
                              scale: float, window: int | None = None, slopes: torch.Tensor | None = None,
                              kv_scale: torch.Tensor | None = None) -> torch.Tensor:
    """``q [N, H, D]`` over each sequence's cached keys/values -> ``[N, H, D]`` (SDPA per sequence)."""
    N, H, D = q.shape
    KV = k_cache.shape[2]
    bs = k_cache.shape[1]
    out = torch.empty_like(q)
    tables = batch.block_tables
    start = 0
    for s, (q_len, ctx) in enumerate(zip(batch.query_lens_host, batch.context_lens_host)):
        nb = -(-ctx // bs)
        first = _contiguous_run(batch, s, nb)
        if first is not None:  # consecutive block ids (the usual case): a view, no gather
            k_seq, v_seq = k_cache[first:first + nb], v_cache[first:first + nb]
        else:
            blocks = tables[s, :nb].long()
            k_seq, v_seq = k_cache[blocks], v_cache[blocks]
        keys = _as_dtype(k_seq.reshape(nb * bs, KV, D)[:ctx], kv_scale, q.dtype)
        values = _as_dtype(v_seq.reshape(nb * bs, KV, D)[:ctx], kv_scale, q.dtype)
        # 4-D [1, heads, tokens, D]: SDPA's CPU kernels take a fast path for 4-D inputs only
        qs = q[start:start + q_len].transpose(0, 1)[None]  # [1, H, q, D]
        keys, values = keys.transpose(0, 1)[None], values.transpose(0, 1)[None]  # [1, KV, ctx, D]
        gqa = {}
        if KV != H:
            if _SDPA_GQA:
                gqa = {"enable_gqa": True}
            else:
                keys = keys.repeat_interleave(H // KV, dim=1)
                values = values.repeat_interleave(H // KV, dim=1)
        bias = _mask(batch, s, q_len, ctx, window, slopes, q.dtype)
        o = F.scaled_dot_product_attention(qs, keys, values, attn_mask=bias, scale=scale, **gqa)
        out[start:start + q_len] = o[0].transpose(0, 1)
        start += q_len
    return out


def _kernels():
    """The Triton kernels, when this process can run them (CUDA and Triton present)."""
    return kernels if kernels.triton_available() else None


def kernels_available(device: torch.device) -> bool:
    """Whether the Triton kernels run on ``device`` (CUDA with Triton)."""
    return torch.device(device).type == "cuda" and _kernels() is not None


def write_kv(k, v, k_cache, v_cache, slot_mapping, scale=None) -> None:
    """This step's keys and values into their cache slots (quantized for an FP8/INT8 cache)."""
    kernels.write_kv(k, v, k_cache, v_cache, slot_mapping, scale, scale)


def paged_attention(q, k_cache, v_cache, batch: ForwardBatch, scale: float, window=None, slopes=None,
                    kv_scale=None, out_fp8_scale=None) -> torch.Tensor:
    """Attention of the step's queries over the paged cache (kernels on CUDA, reference elsewhere).

    ``out_fp8_scale``: the output projection's FP8 input scale, where it takes FP8 input.  A decode
    step on the GPU then returns FP8 codes quantized with it by the attention kernel (one pass over
    the output instead of a quantization in every program of the projection's GEMV); every other
    path returns the activation dtype, and the projection quantizes its input itself."""
    kern = _kernels() if q.is_cuda else None
    if kern is None:
        return paged_attention_reference(q, k_cache, v_cache, batch, scale, window, slopes, kv_scale)
    if batch.decode_only:
        return kern.paged_decode_attention(q, k_cache, v_cache, batch.block_tables, batch.context_lens, scale,
                                           window=window, alibi_slopes=slopes, k_scale=kv_scale, v_scale=kv_scale,
                                           max_context_len=batch.max_context, out_fp8_scale=out_fp8_scale)
    return kern.paged_prefill_attention(q, k_cache, v_cache, batch.block_tables, batch.query_start_loc,
                                        batch.context_lens, scale, window=window, alibi_slopes=slopes,
                                        k_scale=kv_scale, v_scale=kv_scale,
                                        max_query_len=max(batch.query_lens_host))
