"""Decode steps replayed from CUDA graphs: the GPU path of the torch runtime.

At batch 1 a 7B decode step is ~700 kernels over ~15 GB of weights; launched
one by one from Python the launches, not the memory, set the pace.  Here the
whole step (embedding, every layer, ``lm_head``) is captured once per
(batch, cache length bucket) as a CUDA graph and replayed with one launch.

What makes a step capturable is that it has static shapes and reads its
position from the device: :meth:`Transformer.step` with ``start_tensor`` (a
one-element device tensor the runner fills before each replay) and a fixed
``length`` (attention runs over the first ``length`` cache slots, the rest
masked).  ``length`` is the cache position rounded up to a multiple of
``bucket``, so attention does not read the whole preallocated cache from the
first step; each bucket is one graph.

:class:`GraphForward` is a drop-in ``forward(tokens, start, pad)`` +
``new_cache(batch, max_seq)`` pair for :class:`~trtlm.runtime.generate.Runner`:
prefill runs eagerly (it is one call with many tokens), decode steps replay.
With ``graphs=False`` it runs the same static-shape step eagerly, which is how
the CPU tests exercise this module and how the GPU tests get the reference
that a replay must equal bit for bit.
"""
from __future__ import annotations

import os
from typing import Any

import torch

from trtlm.runtime.fast import make_forward
from trtlm.runtime.model import Transformer


#: ``TRTLM_COMPILE=1``: the GPU path also compiles its elementwise pieces with torch.compile.
COMPILE_ENV = "TRTLM_COMPILE"


class GraphForward:
    """``forward(tokens [B, T], start, pad) -> logits [B, T, V]`` over one preallocated KV cache.

    :param model: a loaded single-process :class:`Transformer` (parameters on their device).
    :param fast: use :class:`~trtlm.runtime.fast.FastForward` where it handles the model.
    :param compile: compile the fast path's elementwise pieces (``torch.compile``); default: whether
        the environment sets ``TRTLM_COMPILE=1`` (so ``LLM``/``trtlm run`` can opt in).
    :param graphs: capture decode steps in CUDA graphs (default: when the model is on a GPU).
    :param bucket: cache-length granularity of the decode graphs (``0``: always the whole cache).
    """

    #: how often a Runner driving this forward reads tokens back to the host (EOS checks)
    SYNC_EVERY = 16

    def __init__(self, model: Transformer, *, fast: bool = True, compile: bool | None = None,
                 graphs: bool | None = None, bucket: int = 128):
        if compile is None:
            compile = os.environ.get(COMPILE_ENV, "") == "1"
        self.model = model
        self.impl = make_forward(model, fast=fast, compile=compile)
        self.device = next(model.parameters()).device
        self.graphs = self.device.type == "cuda" if graphs is None else graphs
        self.bucket = bucket
        self.cache = None
        self.shape: tuple[int, int] | None = None
        self._captured: dict[int, tuple[Any, torch.Tensor]] = {}
        self._pool = None

    def new_cache(self, batch: int, max_seq: int) -> None:
        """A cache for ``batch`` sequences of up to ``max_seq`` tokens; reused (with its graphs)
        when the shape repeats, since stale entries past a sequence's position are masked."""
        if self.shape == (batch, max_seq):
            return
        self._captured.clear()
        self._pool = None  # a pool must not outlive its graphs
        self.cache = None
        self.cache = self.model.new_cache(batch, max_seq, self.device)
        self.static_pad = torch.zeros(batch, dtype=torch.long, device=self.device)
        self.static_tokens = torch.zeros(batch, 1, dtype=torch.long, device=self.device)
        self.static_start = torch.zeros(1, dtype=torch.long, device=self.device)
        self.shape = (batch, max_seq)

    def length_for(self, position: int) -> int:
        """Cache slots a decode step at ``position`` attends over (its graph's static length)."""
        max_seq = self.cache.max_seq
        if self.bucket <= 0:
            return max_seq
        return min(max_seq, -(-(position + 1) // self.bucket) * self.bucket)

    def __call__(self, tokens: torch.Tensor, start: int, pad: torch.Tensor) -> torch.Tensor:
        if self.cache is None:
            raise RuntimeError("call new_cache(batch, max_seq) first")
        B, T = tokens.shape
        if T > 1 or start == 0:  # prefill: eager, dynamic length
            self.static_pad.copy_(pad)
            step = self.model.step(start, T, pad)
            return self.impl(tokens, step, self.cache)
        self.static_tokens.copy_(tokens)
        self.static_start.fill_(start)
        length = self.length_for(start)
        if not self.graphs:
            return self._decode(length)
        entry = self._captured.get(length)
        if entry is None:
            entry = self._captured[length] = self._capture(length)
        graph, out = entry
        graph.replay()
        return out.clone()  # the next replay overwrites ``out``

    def _decode(self, length: int) -> torch.Tensor:
        step = self.model.step(0, 1, self.static_pad, length=length, start_tensor=self.static_start)
        return self.impl(self.static_tokens, step, self.cache)

    def _capture(self, length: int):
        """Warm up (compiles, cuBLAS handles) on a side stream, then capture.  The warm-up
        steps write this step's own keys/values, which the replay then writes again."""
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._decode(length)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            out = self._decode(length)
        return graph, out
