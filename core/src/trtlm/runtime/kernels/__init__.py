"""Attention ops over the paged KV cache: the GPU kernels of the engine's forward path.

Three ops, each dispatched on the device of its tensors:

* CUDA tensors and Triton importable -> the Triton kernels of :mod:`.triton_ops` (K/V read in
  place through the block table, CUDA-graph capturable decode);
* otherwise (CPU, or no Triton) -> the pure-torch references of :mod:`.reference`, which are also
  the oracle of ``tests/test_paged_kernels.py``.

The cache layout, the meaning of ``context_lens`` / ``slot_mapping`` and the masking rules are
documented in :mod:`.reference`.  Arguments are checked here (shapes and dtypes only: no device
reads), so both paths reject the same mistakes with a :class:`ValueError` naming the tensor.
"""
from __future__ import annotations

import functools
import importlib.util

import torch

from trtlm.runtime.kernels import reference
from trtlm.runtime.kernels.reference import (
    dequantize_kv,
    is_quantized_cache,
    paged_decode_attention_ref,
    paged_prefill_attention_ref,
    quantize_kv,
    write_kv_ref,
)

__all__ = [
    "write_kv", "paged_decode_attention", "paged_prefill_attention", "triton_available",
    "write_kv_ref", "paged_decode_attention_ref", "paged_prefill_attention_ref",
    "quantize_kv", "dequantize_kv", "is_quantized_cache", "reference",
]


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    """Whether the Triton kernels can be used (Triton installed and a CUDA device present)."""
    return importlib.util.find_spec("triton") is not None and torch.cuda.is_available()


def _triton(t: torch.Tensor):
    """The Triton module when ``t`` lives on a CUDA device and Triton is installed, else None."""
    if t.is_cuda and triton_available():
        from trtlm.runtime.kernels import triton_ops
        return triton_ops
    return None


def _check_cache(k_cache: torch.Tensor, v_cache: torch.Tensor, k_scale, v_scale) -> None:
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache/v_cache must both be [num_blocks, block_size, kv_heads, head_size], got "
                         f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    if k_cache.dtype != v_cache.dtype:
        raise ValueError(f"k_cache is {k_cache.dtype} but v_cache is {v_cache.dtype}")
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("k_cache/v_cache must be contiguous in head_size")
    if is_quantized_cache(k_cache) and (k_scale is None or v_scale is None):
        raise ValueError(f"a {k_cache.dtype} KV cache needs k_scale and v_scale (one float32 scale per layer)")


def _check_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                     context_lens: torch.Tensor, window, alibi_slopes, k_scale, v_scale) -> None:
    _check_cache(k_cache, v_cache, k_scale, v_scale)
    if q.dim() != 3 or q.shape[2] != k_cache.shape[3]:
        raise ValueError(f"q must be [tokens, heads, {k_cache.shape[3]}], got {tuple(q.shape)}")
    if q.shape[1] % k_cache.shape[2]:
        raise ValueError(f"q has {q.shape[1]} heads, not a multiple of the cache's {k_cache.shape[2]} KV heads")
    if block_tables.dim() != 2 or block_tables.dtype != torch.int32:
        raise ValueError(f"block_tables must be int32 [num_seqs, max_blocks], got {block_tables.dtype} "
                         f"{tuple(block_tables.shape)}")
    if context_lens.dtype != torch.int32 or tuple(context_lens.shape) != (block_tables.shape[0],):
        raise ValueError(f"context_lens must be int32 [{block_tables.shape[0]}], got {context_lens.dtype} "
                         f"{tuple(context_lens.shape)}")
    if window is not None and int(window) < 1:
        raise ValueError(f"window must be >= 1 or None, got {window}")
    if alibi_slopes is not None and tuple(alibi_slopes.shape) != (q.shape[1],):
        raise ValueError(f"alibi_slopes must be [{q.shape[1]}], got {tuple(alibi_slopes.shape)}")


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor, k_scale: torch.Tensor | float | None = None,
             v_scale: torch.Tensor | float | None = None) -> None:
    """Store this step's K/V ``[N, kv_heads, head_size]`` in the paged cache, in place.

    Token ``i`` goes to block ``slot_mapping[i] // block_size``, offset ``slot_mapping[i] %
    block_size``; ``-1`` skips it (padding rows).  A float8_e4m3fn / int8 cache stores
    ``clamp(x / scale)`` (int8 rounded half to even), with one float32 scale per layer.
    """
    _check_cache(k_cache, v_cache, k_scale, v_scale)
    if k.dim() != 3 or k.shape != v.shape or k.shape[1:] != k_cache.shape[2:]:
        raise ValueError(f"k/v must both be [tokens, {k_cache.shape[2]}, {k_cache.shape[3]}], got "
                         f"{tuple(k.shape)} and {tuple(v.shape)}")
    if slot_mapping.dtype != torch.int64 or tuple(slot_mapping.shape) != (k.shape[0],):
        raise ValueError(f"slot_mapping must be int64 [{k.shape[0]}], got {slot_mapping.dtype} "
                         f"{tuple(slot_mapping.shape)}")
    ops = _triton(k)
    if ops is not None:
        ops.write_kv(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)
    else:
        write_kv_ref(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float, *,
                           window: int | None = None, alibi_slopes: torch.Tensor | None = None,
                           k_scale: torch.Tensor | float | None = None,
                           v_scale: torch.Tensor | float | None = None,
                           max_context_len: int | None = None,
                           out_fp8_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Decode attention, one query token per sequence: ``q [B, H, D]`` -> ``[B, H, D]``.

    The query of sequence ``b`` sits at position ``context_lens[b] - 1`` (its own K/V already
    written).  ``max_context_len`` (optional, a host int >= every ``context_lens[b]``, e.g. the
    caller's CUDA-graph length bucket) bounds the grid of the Triton kernel; without it the grid
    covers ``block_tables.shape[1] * block_size`` tokens (programs past a sequence's length exit
    at once).  Either way the launch depends on shapes only, so the call can be captured in a
    CUDA graph.

    With ``out_fp8_scale`` (an FP8 output projection's static input scale, ``[1]`` float32) the
    output is that projection's input already quantized: ``float8_e4m3fn(clamp(out / scale))`` of
    the output in ``q``'s dtype, written by the kernel that writes the output.
    """
    _check_attention(q, k_cache, v_cache, block_tables, context_lens, window, alibi_slopes, k_scale, v_scale)
    if block_tables.shape[0] != q.shape[0]:
        raise ValueError(f"block_tables has {block_tables.shape[0]} rows but q has {q.shape[0]} sequences")
    ops = _triton(q)
    if ops is not None:
        return ops.paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale, window=window,
                                          alibi_slopes=alibi_slopes, k_scale=k_scale, v_scale=v_scale,
                                          max_context_len=max_context_len, out_fp8_scale=out_fp8_scale)
    out = paged_decode_attention_ref(q, k_cache, v_cache, block_tables, context_lens, scale, window=window,
                                     alibi_slopes=alibi_slopes, k_scale=k_scale, v_scale=v_scale,
                                     max_context_len=max_context_len)
    if out_fp8_scale is None:
        return out
    from trtlm.quant.formats import quantize_fp8  # (what QuantLinear does to an FP8 linear's input)

    return quantize_fp8(out, out_fp8_scale)


def paged_prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            block_tables: torch.Tensor, query_start_loc: torch.Tensor,
                            context_lens: torch.Tensor, scale: float, *, window: int | None = None,
                            alibi_slopes: torch.Tensor | None = None,
                            k_scale: torch.Tensor | float | None = None,
                            v_scale: torch.Tensor | float | None = None,
                            max_query_len: int | None = None) -> torch.Tensor:
    """Attention of packed variable-length query chunks ``q [N, H, D]`` -> ``[N, H, D]``.

    Sequence ``s`` owns rows ``query_start_loc[s]:query_start_loc[s+1]`` (int32 ``[S+1]``), the
    last ``q_len`` of its ``context_lens[s]`` cached tokens: they attend to every earlier cached
    token of the sequence (prefix-cached blocks, earlier chunks) and causally within the chunk.
    Decode rows (``q_len == 1``) may be mixed in.  ``max_query_len`` (host int) saves the Triton
    path one device read.
    """
    _check_attention(q, k_cache, v_cache, block_tables, context_lens, window, alibi_slopes, k_scale, v_scale)
    if query_start_loc.dtype != torch.int32 or tuple(query_start_loc.shape) != (block_tables.shape[0] + 1,):
        raise ValueError(f"query_start_loc must be int32 [{block_tables.shape[0] + 1}], got "
                         f"{query_start_loc.dtype} {tuple(query_start_loc.shape)}")
    ops = _triton(q)
    fn = ops.paged_prefill_attention if ops is not None else paged_prefill_attention_ref
    return fn(q, k_cache, v_cache, block_tables, query_start_loc, context_lens, scale, window=window,
              alibi_slopes=alibi_slopes, k_scale=k_scale, v_scale=v_scale, max_query_len=max_query_len)
