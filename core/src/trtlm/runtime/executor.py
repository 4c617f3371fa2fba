"""Running one engine step on the model: in this process, or on every rank of a job.

The engine (scheduler, sampling) lives in one process — rank 0 — and describes
each step as :class:`StepInputs`: plain lists (token ids, positions, cache
slots, block tables), small enough to broadcast.  An executor turns them into
a :class:`~trtlm.runtime.attention.ForwardBatch` on its device, runs the
forward over its KV pool and returns the logits rows the engine asked for.

* :class:`LocalExecutor`: one process holds the whole model (ranks merged).
* :class:`DistributedExecutor`: rank 0's side of a tensor/pipeline-parallel
  job.  Each step is broadcast to every rank; every rank runs its own shard
  over its own pool (all pools have the same blocks, since the one scheduler
  assigns them); pipeline stages pass hidden states on; the last stage's
  logits reach rank 0.  The other ranks run :func:`follow`, which executes
  what rank 0 broadcasts until it says stop.

On CUDA, decode rows replay CUDA graphs (:mod:`trtlm.runtime.cuda_graphs`) captured
per bucketed batch size: a decode-only step entirely, a mixed step (decodes first, as the
scheduler orders them, then prompt chunks) as a graph replay for its decodes followed by
an eager forward of its prompt tokens.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from trtlm.runtime.attention import ForwardBatch
from trtlm.runtime.kv_cache import KVPool


@dataclass
class StepInputs:
    tokens: list[int]
    positions: list[int]
    slots: list[int]
    query_lens: list[int]
    context_lens: list[int]
    block_tables: list[list[int]]
    logits_indices: list[int]
    #: the step's tokens as a device tensor -- the previous step's samples, not yet read back to the
    #: host (``Engine`` looking a decode step ahead); ``tokens`` then holds placeholders
    device_tokens: torch.Tensor | None = None

    @property
    def decode_only(self) -> bool:
        return all(q == 1 for q in self.query_lens)

    def leading_decodes(self) -> int:
        """How many sequences at the front are decode rows (one token, its logits wanted, in row
        order) with prompt work after them: the part of a mixed step a decode graph can run."""
        d = 0
        for q in self.query_lens:
            if q != 1:
                break
            d += 1
        if d == len(self.query_lens) or self.logits_indices[:d] != list(range(d)):
            return 0
        return d if all(i >= d for i in self.logits_indices[d:]) else 0

    def split(self, d: int) -> tuple["StepInputs", "StepInputs"]:
        """The first ``d`` sequences (``d`` tokens) and the rest, as two steps."""
        head = StepInputs(self.tokens[:d], self.positions[:d], self.slots[:d], self.query_lens[:d],
                          self.context_lens[:d], self.block_tables[:d], list(range(d)))
        tail = StepInputs(self.tokens[d:], self.positions[d:], self.slots[d:], self.query_lens[d:],
                          self.context_lens[d:], self.block_tables[d:], [i - d for i in self.logits_indices[d:]])
        return head, tail


def to_batch(inputs: StepInputs, device: torch.device) -> ForwardBatch:
    """The tensors of one step on ``device`` (block tables padded with block 0): two host tensors
    (int64 and int32 fields packed), two copies.  Each field starts 16-byte aligned, whatever the
    step's sizes: Triton specializes a kernel on the alignment of its pointers, so a field at a
    size-dependent offset would compile a new variant of the attention kernel mid-serving."""
    S, N, M = len(inputs.query_lens), len(inputs.tokens), len(inputs.logits_indices)
    width = max(len(t) for t in inputs.block_tables)
    starts = [0]
    for q in inputs.query_lens:
        starts.append(starts[-1] + q)
    tables = [x for t in inputs.block_tables for x in t + [0] * (width - len(t))]
    longs, long_sizes = _aligned([inputs.tokens, inputs.positions, inputs.slots, inputs.logits_indices], 2)
    ints, int_sizes = _aligned([tables, inputs.context_lens, starts], 4)
    longs, ints = torch.tensor(longs, dtype=torch.long), torch.tensor(ints, dtype=torch.int32)
    if device.type != "cpu":
        longs, ints = longs.to(device, non_blocking=True), ints.to(device, non_blocking=True)
    tokens, positions, slots, rows = (t[:n] for t, n in zip(longs.split(long_sizes), (N, N, N, M)))
    if inputs.device_tokens is not None:
        tokens = inputs.device_tokens
    table_t, context, starts_t = (t[:n] for t, n in zip(ints.split(int_sizes), (S * width, S, S + 1)))
    return ForwardBatch(tokens=tokens, positions=positions, slot_mapping=slots, block_tables=table_t.view(S, width),
                        context_lens=context, query_start_loc=starts_t, logits_indices=rows,
                        query_lens_host=list(inputs.query_lens), context_lens_host=list(inputs.context_lens),
                        decode_only=inputs.decode_only, max_context=max(inputs.context_lens),
                        block_tables_host=inputs.block_tables)


def _aligned(fields: list[list[int]], per: int) -> tuple[list[int], list[int]]:
    """``fields`` concatenated, each padded with zeros to a multiple of ``per`` elements (16 bytes
    of its dtype), and the padded sizes to split them apart again."""
    flat: list[int] = []
    sizes = []
    for f in fields:
        pad = -len(f) % per
        flat += f
        flat += [0] * pad
        sizes.append(len(f) + pad)
    return flat, sizes


class LocalExecutor:
    """The whole model in this process."""

    #: steps may carry their tokens as a device tensor (``StepInputs.device_tokens``)
    accepts_device_tokens = True

    def __init__(self, model: torch.nn.Module, device: torch.device, use_cuda_graphs: bool | None = None):
        self.model = model
        self.device = torch.device(device)
        self.pool: KVPool | None = None
        self.graphs = None
        self.use_cuda_graphs = self.device.type == "cuda" if use_cuda_graphs is None else use_cuda_graphs
        self.split_steps = 0  #: mixed steps whose decode rows replayed a graph

    def kv_cache_spec(self) -> dict[str, Any]:
        return self.model.kv_cache_spec()

    def init_cache(self, num_blocks: int, block_size: int, max_blocks_per_seq: int, max_batch_size: int) -> None:
        from trtlm.runtime.attention import kernels_available

        graphs = self.use_cuda_graphs and kernels_available(self.device)
        # CUDA graphs pad their batches with rows that write into one extra block no sequence owns
        self.pool = _make_pool(self.model, num_blocks + int(graphs), block_size, self.device)
        if graphs:
            from trtlm.runtime.cuda_graphs import DecodeGraphs

            self.graphs = DecodeGraphs(self.model, self.pool, self.device, max_batch_size, max_blocks_per_seq)

    @torch.inference_mode()
    def execute(self, inputs: StepInputs) -> torch.Tensor:
        if self.graphs is not None:
            if inputs.decode_only and self.graphs.handles(inputs):
                return self.graphs.run(inputs)
            d = inputs.leading_decodes()
            if d and self.graphs.handles_rows(d):
                # a mixed step: its decode rows replay a graph, its prompt tokens run eagerly after
                # (each sequence's cache blocks are its own, so the two halves are independent)
                head, tail = inputs.split(d)
                self.split_steps += 1
                decoded = self.graphs.run(head)
                batch = to_batch(tail, self.device)
                return torch.cat([decoded, self.model(batch.tokens, batch, self.pool)])
        batch = to_batch(inputs, self.device)
        return self.model(batch.tokens, batch, self.pool)

    def copy_block(self, src: int, dst: int) -> None:
        self.pool.copy_block(src, dst)

    @torch.inference_mode()
    def capture_graphs(self) -> int:
        """Every CUDA graph the decode steps can use, captured now (0 without graphs)."""
        return self.graphs.capture_all() if self.graphs is not None else 0

    def shutdown(self) -> None:
        self.graphs = None


# -- several ranks ------------------------------------------------------------------------------------
class DistributedExecutor:
    """Rank 0 of a multi-process job: broadcasts each step, runs its own shard, gathers the logits."""

    def __init__(self, model: torch.nn.Module, state: Any):
        self.model = model
        self.state = state
        self.device = state.device
        self.pool: KVPool | None = None

    def kv_cache_spec(self) -> dict[str, Any]:
        return self.model.kv_cache_spec()

    def _send(self, message: tuple) -> None:
        from trtlm.runtime.distributed import broadcast_object

        broadcast_object(message, src=0)

    def init_cache(self, num_blocks: int, block_size: int, max_blocks_per_seq: int, max_batch_size: int) -> None:
        self._send(("init", num_blocks, block_size))
        self.pool = _make_pool(self.model, num_blocks, block_size, self.device)

    @torch.inference_mode()
    def execute(self, inputs: StepInputs) -> torch.Tensor:
        self._send(("step", inputs))
        return run_step(self.model, self.state, self.pool, inputs)

    def copy_block(self, src: int, dst: int) -> None:
        self._send(("copy", src, dst))
        self.pool.copy_block(src, dst)

    def release(self, payload: Any = None) -> None:
        """Let the followers return from :func:`follow` (with ``payload``), e.g. at the end of a
        collective ``generate``."""
        self._send(("done", payload))

    def shutdown(self) -> None:
        self._send(("stop",))


def _make_pool(model, num_blocks: int, block_size: int, device) -> KVPool:
    spec = model.kv_cache_spec()
    return KVPool(spec["num_layers"], num_blocks, block_size, spec["kv_heads"], spec["head_size"], spec["dtype"],
                  device, spec["kv_dtype"])


def run_step(model, state, pool: KVPool, inputs: StepInputs) -> torch.Tensor | None:
    """This rank's part of one step; the logits on rank 0 (None elsewhere)."""
    from trtlm.runtime.distributed import maybe_inject_fault

    state.calls = getattr(state, "calls", 0) + 1
    maybe_inject_fault(state.rank, state.calls)
    batch = to_batch(inputs, state.device)
    N = batch.num_tokens
    if state.first:
        x = batch.tokens
    else:
        x = _recv(state, (N, model.d.hidden), model.dtype, state.prev_rank)
    out = model(x, batch, pool)
    if not state.last:
        _send(state, out, state.next_rank)
        out = None
    if state.sampling_rank != 0:  # the logits live on the last stage: rank 0 needs them
        M = len(inputs.logits_indices)
        if state.rank == state.sampling_rank:
            _send(state, out, 0)
        elif state.rank == 0:
            out = _recv(state, (M, model.d.vocab), model.dtype, state.sampling_rank)
    return out if state.rank == 0 else None


def _send(state, x: torch.Tensor, dst: int) -> None:
    import torch.distributed as dist

    x = x.cpu() if state.p2p_via_cpu else x.contiguous()
    dist.send(x, dst, group=state.group)


def _recv(state, shape, dtype, src: int) -> torch.Tensor:
    import torch.distributed as dist

    x = torch.empty(shape, dtype=dtype, device="cpu" if state.p2p_via_cpu else state.device)
    dist.recv(x, src, group=state.group)
    return x.to(state.device)


@torch.inference_mode()
def follow(model: torch.nn.Module, state: Any, pool_box: dict | None = None) -> tuple[str, Any]:
    """A rank other than 0: execute what rank 0 broadcasts until it says ``done`` (return
    ``("done", payload)``) or ``stop`` (return ``("stop", None)``).  ``pool_box`` keeps the KV
    pool between calls."""
    from trtlm.runtime.distributed import broadcast_object

    box = pool_box if pool_box is not None else {}
    while True:
        message = broadcast_object(None, src=0)
        kind = message[0]
        if kind == "step":
            run_step(model, state, box["pool"], message[1])
        elif kind == "init":
            box["pool"] = _make_pool(model, message[1], message[2], state.device)
        elif kind == "copy":
            box["pool"].copy_block(message[1], message[2])
        elif kind == "done":
            return "done", message[1]
        elif kind == "stop":
            return "stop", None
        elif kind == "error":
            from trtlm.runtime.distributed import RemoteError

            raise RemoteError(message[1])
        else:
            raise RuntimeError(f"unknown message from rank 0: {kind!r}")


class TeacherForcing:
    """``batch`` sequences driven by hand through a model's forward, outside the engine: each call
    appends ``ids [batch, T]`` to every sequence and returns the logits of all those positions
    ``[batch, T, V]`` (teacher forcing).  Calibration, perplexity and tests use it; generation
    goes through the engine."""

    def __init__(self, model: torch.nn.Module, batch: int, max_len: int, device: Any = None, block_size: int = 16):
        from trtlm.runtime.kv_cache import blocks_for

        self.model = model
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        per_seq = blocks_for(max_len, block_size)
        self.block_size = block_size
        self.pool = _make_pool(model, batch * per_seq, block_size, self.device)
        self.tables = [list(range(b * per_seq, (b + 1) * per_seq)) for b in range(batch)]
        self.lens = [0] * batch

    @torch.inference_mode()
    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        B, T = ids.shape
        bs = self.block_size
        positions, slots = [], []
        for b in range(B):
            for p in range(self.lens[b], self.lens[b] + T):
                positions.append(p)
                slots.append(self.tables[b][p // bs] * bs + p % bs)
        self.lens = [n + T for n in self.lens]
        inputs = StepInputs(ids.reshape(-1).tolist(), positions, slots, [T] * B, list(self.lens), self.tables,
                            list(range(B * T)))
        batch = to_batch(inputs, self.device)
        return self.model(batch.tokens, batch, self.pool).view(B, T, -1)
