"""Pure-torch paged-attention ops: the CPU path and the oracle the Triton kernels are tested against.

Cache layout (shared with the engine's paged KV cache and the Triton kernels):

* ``k_cache`` / ``v_cache``: ``[num_blocks, block_size, kv_heads, head_size]`` in the model dtype,
  or ``float8_e4m3fn`` / ``int8`` for a quantized cache with one float32 scale per layer
  (stored = ``clamp(x / scale)``, rounded to nearest-even for int8; read = ``stored * scale``).
* ``block_tables``: int32 ``[num_seqs, max_blocks_per_seq]``; entries past a sequence's last
  block are arbitrary (never read).
* ``context_lens``: int32 ``[num_seqs]``, tokens in the cache for the sequence *including* this
  step's tokens (the new K/V are written with :func:`write_kv_ref` before attention runs).
* ``slot_mapping``: int64 ``[num_tokens]``, ``block_id * block_size + offset`` of each new token,
  ``-1`` to skip it.

Query head ``h`` reads KV head ``h // (H // KV)`` (GQA/MQA).  The query of token ``i`` of a
sequence sits at position ``qpos = context_len - q_len + i``; it sees keys ``kpos <= qpos`` and,
with a sliding ``window``, only ``kpos > qpos - window``.  ALiBi adds
``slope_h * (kpos - qpos)`` to the scaled scores.  Everything is computed in float32 and returned
in the query dtype.  These functions are written for clarity, not speed: they gather the cache
blocks into contiguous tensors and may synchronise with the device (``.tolist()``).
"""
from __future__ import annotations

import torch

__all__ = [
    "FP8_MAX", "INT8_MIN", "INT8_MAX", "quantize_kv", "dequantize_kv", "is_quantized_cache",
    "write_kv_ref", "paged_decode_attention_ref", "paged_prefill_attention_ref", "gather_kv",
]

FP8_MAX = 448.0  #: largest finite float8_e4m3fn value
INT8_MIN, INT8_MAX = -128.0, 127.0  #: trtlm's static int8 KV range (quant.runtime.fake_quant_int8)


def is_quantized_cache(cache: torch.Tensor) -> bool:
    """Whether ``cache`` stores quantized values (float8_e4m3fn or int8) that need a scale."""
    return cache.dtype in (torch.float8_e4m3fn, torch.int8)


def _scale(scale, like: torch.Tensor) -> torch.Tensor:
    """The per-layer scale as a float32 0-d tensor on ``like``'s device (no host sync)."""
    if scale is None:
        raise ValueError("a quantized KV cache (float8_e4m3fn/int8) needs k_scale and v_scale")
    if isinstance(scale, torch.Tensor):
        if scale.numel() != 1:
            raise ValueError(f"KV-cache scale must have one element, got shape {tuple(scale.shape)}")
        return scale.to(device=like.device, dtype=torch.float32).reshape(())
    return torch.tensor(float(scale), dtype=torch.float32, device=like.device)


def quantize_kv(x: torch.Tensor, cache_dtype: torch.dtype, scale) -> torch.Tensor:
    """``x`` as stored in a cache of ``cache_dtype`` (float32 math; identity cast if unquantized)."""
    if cache_dtype == torch.float8_e4m3fn:
        return (x.float() / _scale(scale, x)).clamp(-FP8_MAX, FP8_MAX).to(cache_dtype)
    if cache_dtype == torch.int8:
        return (x.float() / _scale(scale, x)).round().clamp(INT8_MIN, INT8_MAX).to(cache_dtype)
    return x.to(cache_dtype)


def dequantize_kv(stored: torch.Tensor, scale) -> torch.Tensor:
    """Cache contents as float32 values (``stored * scale`` for a quantized cache)."""
    if is_quantized_cache(stored):
        return stored.float() * _scale(scale, stored)
    return stored.float()


def write_kv_ref(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 slot_mapping: torch.Tensor, k_scale=None, v_scale=None) -> None:
    """Store the new tokens' K/V ``[N, KV, D]`` at ``slot_mapping`` (in place; ``-1`` skips)."""
    slots = slot_mapping.long()
    # Skipped rows are masked out; on the CPU a step without any (the engine's case) skips the
    # masking copies (the check would be a device sync elsewhere, so other devices always mask).
    if slots.device.type != "cpu" or bool((slots < 0).any()):
        keep = slots >= 0
        slots, k, v = slots[keep], k[keep], v[keep]
    for x, cache, scale in ((k, k_cache, k_scale), (v, v_cache, v_scale)):
        flat, new = _bytes(cache.view(-1, *cache.shape[2:])), _bytes(quantize_kv(x, cache.dtype, scale))
        flat.index_copy_(0, slots, new)


def _bytes(x: torch.Tensor) -> torch.Tensor:
    """float8 tensors as their bytes: indexing kernels do not exist for float8 on every device."""
    return x.view(torch.uint8) if x.dtype == torch.float8_e4m3fn else x


def gather_kv(cache: torch.Tensor, block_table_row: torch.Tensor, length: int, scale=None) -> torch.Tensor:
    """The first ``length`` tokens of one sequence, ``[length, KV, D]`` float32 (dequantized)."""
    block_size = cache.shape[1]
    nblocks = -(-length // block_size)
    blocks = _bytes(cache)[block_table_row[:nblocks].long()].view(cache.dtype)  # [nblocks, bs, KV, D]
    flat = blocks.reshape(nblocks * block_size, cache.shape[2], cache.shape[3])[:length]
    return dequantize_kv(flat, scale)


def _bias_and_mask(qpos: torch.Tensor, kpos: torch.Tensor, window: int | None,
                   alibi_slopes: torch.Tensor | None, num_heads: int) -> torch.Tensor:
    """Additive float32 bias ``[H, Q, K]``: ALiBi (if any) and -inf for keys the query cannot see."""
    rel = (kpos.view(1, -1) - qpos.view(-1, 1)).float()  # [Q, K], <= 0 where visible
    visible = rel <= 0
    if window is not None:
        visible &= rel > -window
    if alibi_slopes is not None:
        bias = alibi_slopes.float().to(rel.device).view(-1, 1, 1) * rel.unsqueeze(0)
    else:
        bias = torch.zeros(num_heads, *rel.shape, device=rel.device)
    return bias.masked_fill(~visible.unsqueeze(0), float("-inf"))


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, scale: float) -> torch.Tensor:
    """``q [Q, H, D]`` float32 over ``k``/``v`` ``[K, KV, D]`` float32 -> ``[Q, H, D]`` float32."""
    heads, kv_heads = q.shape[1], k.shape[1]
    group = heads // kv_heads
    k = k.repeat_interleave(group, dim=1).transpose(0, 1)  # [H, K, D]
    v = v.repeat_interleave(group, dim=1).transpose(0, 1)
    # explicit float32 matmul + softmax, not SDPA: no backend choice (TF32, fused kernels) to vary
    scores = torch.matmul(q.transpose(0, 1), k.transpose(1, 2)) * scale + bias  # [H, Q, K]
    return torch.matmul(torch.softmax(scores, dim=-1), v).transpose(0, 1)


def _check_window(window: int | None) -> int | None:
    if window is not None and int(window) < 1:
        raise ValueError(f"window must be >= 1 or None, got {window}")
    return None if window is None else int(window)


def paged_prefill_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                block_tables: torch.Tensor, query_start_loc: torch.Tensor,
                                context_lens: torch.Tensor, scale: float, *, window: int | None = None,
                                alibi_slopes: torch.Tensor | None = None, k_scale=None, v_scale=None,
                                max_query_len: int | None = None) -> torch.Tensor:
    """Attention of packed query chunks ``q [N, H, D]`` over the paged cache -> ``[N, H, D]``.

    Sequence ``s`` owns query rows ``query_start_loc[s]:query_start_loc[s+1]``; they are the last
    ``q_len`` of its ``context_lens[s]`` cached tokens (earlier tokens: prefix-cached blocks or
    previous chunks).  ``max_query_len`` is accepted for signature parity and ignored.
    """
    window = _check_window(window)
    out = torch.zeros_like(q)
    starts = query_start_loc.tolist()
    lens = context_lens.tolist()
    for s, ctx in enumerate(lens):
        q0, q1 = starts[s], starts[s + 1]
        if q1 == q0:
            continue
        k = gather_kv(k_cache, block_tables[s], ctx, k_scale)
        v = gather_kv(v_cache, block_tables[s], ctx, v_scale)
        qpos = torch.arange(ctx - (q1 - q0), ctx, device=q.device)
        kpos = torch.arange(ctx, device=q.device)
        bias = _bias_and_mask(qpos, kpos, window, alibi_slopes, q.shape[1])
        out[q0:q1] = _attend(q[q0:q1].float(), k, v, bias, scale).to(q.dtype)
    return out


def paged_decode_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                               block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float, *,
                               window: int | None = None, alibi_slopes: torch.Tensor | None = None,
                               k_scale=None, v_scale=None, max_context_len: int | None = None) -> torch.Tensor:
    """One query token per sequence (``q [B, H, D]``, at position ``context_lens[b] - 1``) -> ``[B, H, D]``."""
    qsl = torch.arange(q.shape[0] + 1, dtype=torch.int32, device=q.device)
    return paged_prefill_attention_ref(q, k_cache, v_cache, block_tables, qsl, context_lens, scale,
                                       window=window, alibi_slopes=alibi_slopes,
                                       k_scale=k_scale, v_scale=v_scale)
