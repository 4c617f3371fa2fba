"""ALiBi (attention with linear biases) as MPT defines it.

Slopes are never stored in a checkpoint; they are derived from the head count
and ``alibi_bias_max`` (MPT's ``attn_config.alibi_bias_max``, default 8):

    n2     = 2 ** ceil(log2(H))                 (next power of two >= H)
    base_h = (h + 1) * alibi_bias_max / n2      for h in [0, n2)
    slope_h = 2 ** -base_h
    if n2 != H: slopes = cat(slopes[1::2], slopes[::2])[:H]

This is transformers' ``build_mpt_alibi_tensor`` (models/mpt/modeling_mpt.py)
and MosaicML's ``gen_slopes``.  For ``alibi_bias_max == 8`` it is the same
list, in the same order, as the original ALiBi / BLOOM / TensorRT-LLM
construction (power-of-two slopes of the closest lower power of two, then the
odd powers of the next one).  Note: transformers' MPT model ignores
``config.alibi_bias_max`` (it always uses 8); these helpers honour the value
they are given.

Pure torch; nothing else from trtlm is imported here.
"""
from __future__ import annotations

import math

import torch

__all__ = ["alibi_slopes", "alibi_slopes_for_rank", "alibi_bias"]


def alibi_slopes(num_heads: int, alibi_bias_max: float = 8.0) -> torch.Tensor:
    """Per-head ALiBi slopes, float32, shape ``[num_heads]``.

    Computed with the same float32 operation sequence as transformers'
    ``build_mpt_alibi_tensor`` (``base = arange(1, n2+1).float() *
    (alibi_bias_max / n2)``, ``slopes = 1 / 2**base``) so the result is
    bit-identical to it for ``alibi_bias_max == 8``.
    """
    num_heads = int(num_heads)
    if num_heads < 1:
        raise ValueError(f"alibi_slopes: num_heads must be >= 1, got {num_heads}")
    n2 = 2 ** math.ceil(math.log2(num_heads))
    base = torch.arange(1, n2 + 1, dtype=torch.int64).float()
    base = base * (float(alibi_bias_max) / n2)
    slopes = 1.0 / torch.pow(2, base)
    if n2 != num_heads:
        slopes = torch.cat([slopes[1::2], slopes[::2]])[:num_heads]
    return slopes.to(torch.float32).contiguous()


def alibi_slopes_for_rank(
    num_heads: int, tp_size: int, tp_rank: int, alibi_bias_max: float = 8.0
) -> torch.Tensor:
    """The slopes of the heads tensor-parallel rank ``tp_rank`` holds.

    Rank ``r`` holds heads ``[r*H/tp, (r+1)*H/tp)`` (H must divide by tp).
    """
    if tp_size < 1 or not 0 <= tp_rank < tp_size:
        raise ValueError(f"alibi_slopes_for_rank: bad tp_size={tp_size} / tp_rank={tp_rank}")
    if num_heads % tp_size:
        raise ValueError(
            f"alibi_slopes_for_rank: num_heads={num_heads} is not divisible by tp_size={tp_size}"
        )
    per = num_heads // tp_size
    return alibi_slopes(num_heads, alibi_bias_max)[tp_rank * per:(tp_rank + 1) * per].clone()


def alibi_bias(
    slopes: torch.Tensor,
    query_positions: torch.Tensor,
    key_positions: torch.Tensor,
) -> torch.Tensor:
    """Additive attention bias ``[H, Q, K]`` (float32).

    ``bias[h, i, j] = slopes[h] * (key_positions[j] - query_positions[i])``,
    i.e. ``-slope * distance``: 0 on the diagonal and negative for earlier
    keys.  Add it to the (scaled) attention scores before the causal mask and
    softmax.

    transformers' MPT instead adds ``slopes[h] * (j - (K - 1))`` (a bias that
    depends on the key position only).  The two differ by a constant per
    query row, so after softmax they give identical attention probabilities;
    this relative form keeps scores small and needs no knowledge of the total
    key length.  For a KV-cache decode step pass ``query_positions`` =
    ``[past_len]`` and ``key_positions`` = ``arange(past_len + 1)``.
    """
    slopes = slopes.to(torch.float32)
    q = query_positions.to(torch.float32)
    k = key_positions.to(device=q.device, dtype=torch.float32)
    rel = k.view(1, -1) - q.view(-1, 1)  # [Q, K]
    return slopes.view(-1, 1, 1).to(q.device) * rel.unsqueeze(0)
