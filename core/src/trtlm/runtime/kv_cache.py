"""The paged KV cache: one pool of fixed-size blocks, block tables, reference counts, prefix caching.

The pool (:class:`KVPool`) holds, per layer, keys and values as
``[num_blocks, block_size, kv_heads, head_size]`` — in the model's dtype, or
FP8/INT8 with the checkpoint's per-layer scale when the KV cache is
quantized.  A sequence owns a *block table*: the ids of the blocks that hold
its tokens in order, so token ``t`` lives in block ``table[t // block_size]``
at offset ``t % block_size``.

:class:`BlockAllocator` does the bookkeeping (no tensors, no torch):

* reference counts: a block is free when no sequence holds it;
* prefix caching: each *full* block is registered under a chained hash of its
  tokens (the hash of the previous block and the block's own tokens), with the
  tokens themselves kept to confirm a hit (a hash collision never shares a
  wrong block).  A new sequence whose prompt starts with the same full blocks
  takes them (reference count + 1) instead of computing them again.  Shared
  blocks are full and never written: a sequence only writes into blocks past
  its cached prefix;
* free blocks keep their contents and hash until they are handed out again,
  least recently freed first, so a prefix survives as long as memory allows.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Sequence


def blocks_for(tokens: int, block_size: int) -> int:
    return -(-tokens // block_size)


def chain_hash(prev: int | None, tokens: Sequence[int]) -> int:
    return hash((prev, tuple(tokens)))


@dataclass
class CachedPrefix:
    blocks: list[int]
    hashes: list[int]

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)


class BlockAllocator:
    """Block ids, reference counts and the prefix cache of one KV pool."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1:
            raise ValueError("the KV cache needs at least one block")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.refs = [0] * num_blocks
        self.free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))
        self.by_hash: dict[int, int] = {}
        self.hash_of: dict[int, int] = {}
        self.tokens_of: dict[int, tuple[int, ...]] = {}

    # -- queries -------------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        return len(self.free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self.free)

    def all_free(self) -> bool:
        return len(self.free) == self.num_blocks and not any(self.refs)

    def match_prefix(self, tokens: Sequence[int]) -> CachedPrefix:
        """The cached full blocks that ``tokens`` starts with (nothing is taken yet)."""
        found = CachedPrefix([], [])
        if not self.enable_prefix_caching:
            return found
        bs, prev = self.block_size, None
        for i in range(len(tokens) // bs):
            chunk = tuple(tokens[i * bs:(i + 1) * bs])
            h = chain_hash(prev, chunk)
            block = self.by_hash.get(h)
            if block is None or self.tokens_of.get(block) != chunk:
                break
            found.blocks.append(block)
            found.hashes.append(h)
            prev = h
        return found

    def new_blocks_needed(self, prefix: CachedPrefix) -> int:
        """Blocks of ``prefix`` that are free now (taking them uses up free blocks)."""
        return sum(1 for b in prefix.blocks if self.refs[b] == 0)

    # -- changes -------------------------------------------------------------------------------
    def take_prefix(self, prefix: CachedPrefix) -> list[int]:
        for b in prefix.blocks:
            if self.refs[b] == 0:
                del self.free[b]
            self.refs[b] += 1
        return list(prefix.blocks)

    def allocate(self, count: int) -> list[int]:
        """``count`` fresh blocks (the least recently freed first); raises when too few are free."""
        if count > len(self.free):
            raise MemoryError(f"KV cache: {count} blocks wanted, {len(self.free)} free")
        out = []
        for _ in range(count):
            b, _ = self.free.popitem(last=False)
            self._forget(b)
            self.refs[b] = 1
            out.append(b)
        return out

    def release(self, blocks: Sequence[int]) -> None:
        """Drop one reference to each block (a sequence finished, was aborted or preempted)."""
        for b in reversed(blocks):  # the tail first: shared prefixes stay cached longest
            self.refs[b] -= 1
            if self.refs[b] < 0:
                raise AssertionError(f"KV block {b} released more often than taken")
            if self.refs[b] == 0:
                self.free[b] = None

    def register_full(self, block: int, prev_hash: int | None, tokens: Sequence[int]) -> int:
        """Record a block that has just been filled with ``tokens``; return its chained hash."""
        chunk = tuple(tokens)
        h = chain_hash(prev_hash, chunk)
        if self.enable_prefix_caching and h not in self.by_hash:
            self._forget(block)
            self.by_hash[h] = block
            self.hash_of[block] = h
            self.tokens_of[block] = chunk
        return h

    def _forget(self, block: int) -> None:
        h = self.hash_of.pop(block, None)
        if h is not None and self.by_hash.get(h) == block:
            del self.by_hash[h]
        self.tokens_of.pop(block, None)


class KVPool:
    """The cache tensors of one rank: ``k[layer]``, ``v[layer]`` ``[num_blocks, block_size, kv_heads, head_size]``.

    A quantized cache (``kv_dtype`` float8_e4m3fn or int8) stores ``x / scale`` and is read
    back as ``stored * scale`` with the layer's scale from the checkpoint."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, kv_heads: int, head_size: int,
                 dtype: Any, device: Any, kv_dtype: Any = None):
        import torch

        self.num_blocks, self.block_size = num_blocks, block_size
        self.dtype = kv_dtype or dtype
        shape = (num_blocks, block_size, kv_heads, head_size)
        self.k = [torch.zeros(shape, dtype=self.dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=self.dtype, device=device) for _ in range(num_layers)]

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, kv_heads: int, head_size: int, element_size: int) -> int:
        return 2 * num_layers * block_size * kv_heads * head_size * element_size

    def copy_block(self, src: int, dst: int) -> None:
        """Copy one block's contents in every layer (a sequence forked from a partial block)."""
        for k, v in zip(self.k, self.v):
            k[dst].copy_(k[src])
            v[dst].copy_(v[src])
