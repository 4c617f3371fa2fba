"""Decode steps replayed from CUDA graphs.

At small batch a decode step is bound by weight reads and by kernel launches;
a CUDA graph removes the launches.  A graph is captured per (batch bucket,
context bucket): the step's inputs are copied into static buffers, padded to
the bucket's batch size (padding rows write into a scratch block that no
sequence owns and attend to one token of it), and the attention kernels loop
up to the context bucket, reading each sequence's real length from the
device.  Graphs are captured the first time a bucket is used and share one
memory pool.
"""
from __future__ import annotations

from typing import Any

import torch

from trtlm.runtime.attention import ForwardBatch

BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 256, 384, 512)
MIN_CONTEXT_BUCKET = 256


def bucket(value: int, buckets) -> int | None:
    return next((b for b in buckets if b >= value), None)


def context_bucket(ctx: int, limit: int) -> int:
    b = MIN_CONTEXT_BUCKET
    while b < ctx:
        b *= 2
    return min(b, limit)


class DecodeGraphs:
    """CUDA graphs of the decode-only step for one model and one KV pool (see the module docstring)."""

    def __init__(self, model: torch.nn.Module, pool: Any, device: torch.device, max_batch_size: int,
                 max_blocks_per_seq: int):
        self.model = model
        self.pool = pool
        self.device = device
        self.max_context = max_blocks_per_seq * pool.block_size
        self.batch_buckets = tuple(b for b in BATCH_BUCKETS if b < max_batch_size) + (max_batch_size,)
        B, W = max_batch_size, max_blocks_per_seq
        self.scratch = pool.num_blocks - 1  #: the pool's last block: padding rows write here
        self.tokens = torch.zeros(B, dtype=torch.long, device=device)
        self.positions = torch.zeros(B, dtype=torch.long, device=device)
        self.slots = torch.zeros(B, dtype=torch.long, device=device)
        self.tables = torch.zeros(B, W, dtype=torch.int32, device=device)
        self.context = torch.ones(B, dtype=torch.int32, device=device)
        self.starts = torch.arange(B + 1, dtype=torch.int32, device=device)
        self.rows = torch.arange(B, dtype=torch.long, device=device)
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.mempool = None
        # pinned host staging, one asynchronous copy per buffer and step, in two sets used in turn: a
        # set is rewritten two steps after its copies were queued, when the engine has read back the
        # tokens of the step that used it (queued after those copies) -- even when it queues a step
        # before reading the previous step's tokens (Engine.advance looking ahead)
        self.host_rows = [torch.zeros(4, B, dtype=torch.long).pin_memory() for _ in range(2)]
        self.host_tables = [torch.zeros(B, W, dtype=torch.int32).pin_memory() for _ in range(2)]
        self.turn = 0

    def handles(self, inputs: Any) -> bool:
        return self.handles_rows(len(inputs.query_lens))

    def handles_rows(self, n: int) -> bool:
        return n <= self.batch_buckets[-1]

    def _batch(self, bb: int, cb: int) -> ForwardBatch:
        return ForwardBatch(tokens=self.tokens[:bb], positions=self.positions[:bb], slot_mapping=self.slots[:bb],
                            block_tables=self.tables[:bb], context_lens=self.context[:bb],
                            query_start_loc=self.starts[:bb + 1], logits_indices=self.rows[:bb],
                            query_lens_host=[1] * bb, context_lens_host=[1] * bb, decode_only=True, max_context=cb)

    def context_buckets(self) -> list[int]:
        """Every value :func:`context_bucket` can return for this pool."""
        out, b = [], MIN_CONTEXT_BUCKET
        while b < self.max_context:
            out.append(b)
            b *= 2
        return out + [self.max_context]

    def capture_all(self) -> int:
        """Capture every (batch, context) bucket now -- a server's start-up -- so that no request's
        step pays for a capture (tens of milliseconds each, lazily at the first use otherwise).
        The rows point at the scratch block: capturing runs the model, which writes K/V."""
        self.tokens.zero_()
        self.positions.zero_()
        self.slots.fill_(self.scratch * self.pool.block_size)
        self.tables.fill_(self.scratch)
        self.context.fill_(1)
        captured = 0
        for bb in self.batch_buckets:
            for cb in self.context_buckets():
                if (bb, cb) not in self.graphs:
                    self.graphs[bb, cb] = self._capture(bb, cb)
                    captured += 1
        return captured

    def _capture(self, bb: int, cb: int):
        batch = self._batch(bb, cb)
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):  # warm-up outside the graph (allocations, autotuning)
            for _ in range(2):
                self.model(batch.tokens, batch, self.pool)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        if self.mempool is None:
            self.mempool = torch.cuda.graph_pool_handle()
        with torch.cuda.graph(graph, pool=self.mempool):
            out = self.model(batch.tokens, batch, self.pool)
        return graph, out

    def run(self, inputs: Any) -> torch.Tensor:
        n = len(inputs.query_lens)
        bb = bucket(n, self.batch_buckets)
        cb = context_bucket(max(inputs.context_lens), self.max_context)
        self.turn ^= 1
        host_rows, host_tables = self.host_rows[self.turn], self.host_tables[self.turn]
        rows, tables = host_rows.numpy(), host_tables.numpy()
        rows[0, :n], rows[1, :n], rows[2, :n], rows[3, :n] = (inputs.tokens, inputs.positions, inputs.slots,
                                                             inputs.context_lens)
        rows[:, n:bb] = ((0,), (0,), (self.scratch * self.pool.block_size,), (1,))  # padding rows
        tables[:bb] = self.scratch
        for i, t in enumerate(inputs.block_tables):
            tables[i, :len(t)] = t
        staged = host_rows[:, :bb].to(self.device, non_blocking=True)
        self.tokens[:bb].copy_(staged[0])
        if inputs.device_tokens is not None:  # the previous step's samples, still on the device
            self.tokens[:n].copy_(inputs.device_tokens)
        self.positions[:bb].copy_(staged[1])
        self.slots[:bb].copy_(staged[2])
        self.context[:bb].copy_(staged[3])
        self.tables[:bb].copy_(host_tables[:bb], non_blocking=True)
        key = (bb, cb)
        if key not in self.graphs:
            self.graphs[key] = self._capture(bb, cb)
        graph, out = self.graphs[key]
        graph.replay()
        return out[:n]
