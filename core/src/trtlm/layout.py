"""How each TensorRT-LLM tensor is split across tensor-parallel ranks.

TensorRT-LLM's model classes know, per parameter, whether it is column
parallel (split on its output dim), row parallel (split on its input dim),
replicated, or an MoE expert tensor; its loader slices checkpoints
accordingly.  This module holds the same knowledge as one table keyed by
tensor-name suffix, used everywhere a split matters: the converter's
``shard`` step, the runtime when it merges rank files back together, the
build step's shape check and the conformance suite's round trip.
"""
from __future__ import annotations

import abc
import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from trtlm.config import CheckpointConfig, as_checkpoint_config
from trtlm.mapping import Mapping
from trtlm.meta import cat

if TYPE_CHECKING:  # pragma: no cover
    import torch


class SplitRule(abc.ABC):
    """Take one tp rank's part of a full tensor, and put parts back together."""

    @abc.abstractmethod
    def take(self, t: torch.Tensor, mapping: Mapping, tp_rank: int) -> torch.Tensor:
        """The part of full tensor ``t`` that tensor-parallel rank ``tp_rank`` holds."""

    @abc.abstractmethod
    def merge(self, parts: list[torch.Tensor], mapping: Mapping) -> torch.Tensor:
        """The full tensor from every rank's part (inverse of :meth:`take`)."""

    def index(self, shape: tuple[int, ...], mapping: Mapping, tp_rank: int) -> tuple[int, list[int]] | None:
        """What :meth:`take` selects from a full tensor of ``shape``, without torch:
        ``(dim, indices)`` when the part is the full tensor indexed along ``dim`` (``-1`` marks a
        zero padding slice), ``None`` when it is something else.  The byte-copying converter
        (:mod:`trtlm.convert.bytecopy`) turns it into file ranges; tests check it against
        :meth:`take`.  Raises ``ValueError`` where :meth:`take` would."""
        return None


@dataclass(frozen=True)
class Replicate(SplitRule):
    def take(self, t, mapping, tp_rank):
        return t

    def merge(self, parts, mapping):
        return parts[0]

    def index(self, shape, mapping, tp_rank):
        return 0, list(range(shape[0])) if shape else [0]


@dataclass(frozen=True)
class Split(SplitRule):
    """Equal chunks along ``dim``; ``pad`` zero-pads that dim up to a multiple of tp
    (vocabulary rows of lm_head and a parallel embedding)."""

    dim: int
    pad: bool = False

    def take(self, t, mapping, tp_rank):
        n = mapping.tp_size
        size = t.shape[self.dim]
        if size % n:
            if not self.pad:
                raise ValueError(f"dimension {self.dim} of size {size} does not divide by tp={n}")
            padded = -(-size // n) * n
            pad_shape = list(t.shape)
            pad_shape[self.dim] = padded - size
            t = cat([t, t.new_zeros(pad_shape)], dim=self.dim)
        return t.chunk(n, dim=self.dim)[tp_rank]

    def merge(self, parts, mapping):
        return cat(parts, dim=self.dim)

    def index(self, shape, mapping, tp_rank):
        n, size = mapping.tp_size, shape[self.dim]
        if size % n and not self.pad:
            raise ValueError(f"dimension {self.dim} of size {size} does not divide by tp={n}")
        step = -(-size // n)
        return self.dim % len(shape), [i if i < size else -1 for i in range(tp_rank * step, (tp_rank + 1) * step)]


@dataclass(frozen=True)
class QKVSplit(SplitRule):
    """Fused ``cat(q, k, v)`` along dim 0, split by heads.

    When there are fewer KV heads than ranks each KV head is repeated
    ``tp / kv`` times contiguously (h0, h0, h1, h1, ...) before the split,
    as TensorRT-LLM's Llama converter does, so every rank holds one.
    """

    num_heads: int
    num_kv_heads: int
    head_size: int

    def _parts(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q = self.num_heads * self.head_size
        kv = self.num_kv_heads * self.head_size
        if t.shape[0] != q + 2 * kv:
            raise ValueError(f"fused qkv has {t.shape[0]} rows, expected {q + 2 * kv}")
        return t[:q], t[q:q + kv], t[q + kv:]

    def take(self, t, mapping, tp_rank):
        n = mapping.tp_size
        q, k, v = self._parts(t)
        q = q.chunk(n, dim=0)[tp_rank]
        if self.num_kv_heads >= n:
            k, v = k.chunk(n, dim=0)[tp_rank], v.chunk(n, dim=0)[tp_rank]
        else:
            head = tp_rank * self.num_kv_heads // n
            sl = slice(head * self.head_size, (head + 1) * self.head_size)
            k, v = k[sl], v[sl]
        return cat([q, k, v], dim=0)

    def index(self, shape, mapping, tp_rank):
        n, d = mapping.tp_size, self.head_size
        q, kv = self.num_heads * d, self.num_kv_heads * d
        if shape[0] != q + 2 * kv:
            raise ValueError(f"fused qkv has {shape[0]} rows, expected {q + 2 * kv}")
        if q % n or (self.num_kv_heads >= n and kv % n):
            return None  # torch.chunk's uneven parts: leave it to take()
        qs = q // n
        rows = list(range(tp_rank * qs, (tp_rank + 1) * qs))
        if self.num_kv_heads >= n:
            ks = kv // n
            k = range(q + tp_rank * ks, q + (tp_rank + 1) * ks)
        else:
            head = tp_rank * self.num_kv_heads // n
            k = range(q + head * d, q + (head + 1) * d)
        return 0, rows + list(k) + [i + kv for i in k]

    def merge(self, parts, mapping):
        n = len(parts)
        qh = self.num_heads // n * self.head_size
        kvh = max(self.num_kv_heads // n, 1) * self.head_size
        qs = [p[:qh] for p in parts]
        ks = [p[qh:qh + kvh] for p in parts]
        vs = [p[qh + kvh:] for p in parts]
        if self.num_kv_heads < n:  # undo the duplication: every (tp/kv)-th rank's copy
            step = n // self.num_kv_heads
            ks, vs = ks[::step], vs[::step]
        return cat(qs + ks + vs, dim=0)


@dataclass(frozen=True)
class ExpertSplit(SplitRule):
    """MoE tensors ``[E, ...]``: expert-parallel ranks hold a contiguous block of
    experts; expert tensor parallelism splits ``inner_dim`` (``halves=2`` for
    the fused up|gate ``fc``, whose two halves are split separately)."""

    inner_dim: int | None
    halves: int = 1

    def take(self, t, mapping, tp_rank):
        ep, mtp = mapping.moe_ep_size, mapping.moe_tp_size
        if t.shape[0] % ep:
            raise ValueError(f"{t.shape[0]} experts do not divide by moe_ep={ep}")
        t = t.chunk(ep, dim=0)[mapping.moe_ep_rank(tp_rank)]
        if self.inner_dim is None or mtp == 1:
            return t
        r = mapping.moe_tp_rank(tp_rank)
        halves = t.chunk(self.halves, dim=self.inner_dim)
        for h in halves:
            if h.shape[self.inner_dim] % mtp:
                raise ValueError(f"expert dimension {h.shape[self.inner_dim]} does not divide by moe_tp={mtp}")
        return cat([h.chunk(mtp, dim=self.inner_dim)[r] for h in halves], dim=self.inner_dim)

    def index(self, shape, mapping, tp_rank):
        ep = mapping.moe_ep_size
        if self.inner_dim is not None and mapping.moe_tp_size != 1:
            return None
        if shape[0] % ep:
            raise ValueError(f"{shape[0]} experts do not divide by moe_ep={ep}")
        per = shape[0] // ep
        first = mapping.moe_ep_rank(tp_rank) * per
        return 0, list(range(first, first + per))

    def merge(self, parts, mapping):
        ep, mtp = mapping.moe_ep_size, mapping.moe_tp_size
        blocks = []
        for e in range(ep):
            ranks = [parts[tp_rank] for tp_rank in range(len(parts)) if mapping.moe_ep_rank(tp_rank) == e]
            if self.inner_dim is None or mtp == 1:
                blocks.append(ranks[0])
                continue
            halves = [r.chunk(self.halves, dim=self.inner_dim) for r in ranks]
            blocks.append(cat([cat([h[i] for h in halves], dim=self.inner_dim)
                                     for i in range(self.halves)], dim=self.inner_dim))
        return cat(blocks, dim=0)


_LAYER = re.compile(r"^transformer\.layers\.\d+\.")
# Column-parallel linears split their output dim (0), row-parallel ones their input dim (1).
_COLUMN = ("attention.qkv", "mlp.fc", "mlp.gate")
_ROW = ("attention.dense", "mlp.proj")


def split_rule(name: str, config: CheckpointConfig | dict[str, Any], shape: tuple[int, ...] | None = None) -> SplitRule:
    """The split rule of TensorRT-LLM tensor ``name`` (full ``shape``) under ``config``.

    Quantization tensors follow their weight: per-output-channel scales split
    like a column-parallel weight's rows, group scales ``[out, in/group]`` of
    row-parallel weights split on dim 1, pre-quantization scales (one per
    input channel) split only for row-parallel layers, and per-tensor scales
    (one element, or ``[E, 1]`` per expert) are replicated across tensor
    ranks (expert ranks still take their own experts' rows).
    """
    cfg = as_checkpoint_config(config)  # callers splitting many tensors parse once and pass the object
    heads, kv, head_size = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_size
    if name in ("lm_head.weight", "lm_head.bias"):
        return Split(0, pad=True)
    if name == "transformer.vocab_embedding.weight":
        if not cfg.use_parallel_embedding:
            return Replicate()
        return Split(cfg.embedding_sharding_dim, pad=True)
    module, _, param = _LAYER.sub("", name).rpartition(".")
    per_tensor = shape is not None and math.prod(shape) == 1 and param != "weight"
    if cfg.moe is not None and module in ("mlp.fc", "mlp.proj"):
        if param == "weight":
            return ExpertSplit(1 if module == "mlp.fc" else 2, halves=2 if module == "mlp.fc" else 1)
        if param == "weights_scaling_factor" and shape is not None and len(shape) >= 2:
            if module == "mlp.proj":  # per-channel [E, H] follows the unsplit output rows; groups [E, H, I/g] split
                return ExpertSplit(2 if len(shape) == 3 else None)
            return ExpertSplit(None if shape[-1] == 1 else 1, halves=2)
        if param == "prequant_scaling_factor" and module == "mlp.proj":
            return Split(0)
        return Replicate()
    if module in _COLUMN:
        if param in ("weight", "bias") or (param in ("weights_scaling_factor", "per_channel_scale") and not per_tensor):
            return QKVSplit(heads, kv, head_size) if module == "attention.qkv" else Split(0)
        return Replicate()
    if module in _ROW:
        if param == "weight":
            return Split(1)
        if param == "prequant_scaling_factor":
            return Split(0)
        if param == "weights_scaling_factor" and shape is not None and len(shape) == 2 and not per_tensor:
            return Split(1)  # group scales [out, in/group]
        return Replicate()
    return Replicate()
