"""The inference engine: continuous batching on a paged KV cache.

Everything that generates runs on this class — ``LLM.generate``, ``trtlm run``,
``DistributedLLM``, ``trtlm eval``, ``trtlm bench``, the servers:

* :meth:`Engine.add_request` checks a request and queues it;
* :meth:`Engine.step` runs one scheduler step: the :class:`Scheduler` picks
  sequences and token counts within the batch and token limits, the executor
  runs the packed forward over the paged KV cache, each sequence samples with
  its own settings, and the outputs of the requests that advanced come back;
* :meth:`Engine.abort` cancels a request at any step (its blocks are free at once).

``step`` is :meth:`Engine.advance` (run the step, up to its new tokens) then
:meth:`Engine.collect` (decode their text, build the outputs).  A caller that
wants the GPU busy while it does host work splits them: ``advance(overlap=f)``
calls ``f`` while the step's forward runs, which is where a server collects and
ships the previous step's outputs (the async output processing of vLLM).

Where decode steps replay CUDA graphs, a step of decodes also queues the
next decode step before its own tokens reach the host (``async_scheduling``,
see ``_look_ahead``), so the host's per-step work runs while the GPU computes.

The engine is single-threaded; ``trtlm serve`` steps it in a process of its own
(:mod:`trtlm.serve.engine_core`).
"""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable
from typing import Sequence as Seq

import torch

from trtlm.errors import UserError
from trtlm.runtime.executor import StepInputs
from trtlm.runtime.kv_cache import BlockAllocator, KVPool, blocks_for
from trtlm.runtime.limits import PromptLimits
from trtlm.runtime.outputs import CompletionOutput, EngineStats, RequestMetrics, RequestOutput
from trtlm.runtime.sampling import (
    IncrementalDetokenizer,
    SampleRow,
    SamplingParams,
    banned_ids,
    request_generator,
    sample,
    sample_on_device,
)
from trtlm.runtime.scheduler import CAPACITY_POLICIES, ScheduledSeq, Scheduler, Sequence, Status, StepPlan

#: KV pool on CPU when neither ``kv_cache_gb`` nor anything else says (enough for tests and the tiny model).
DEFAULT_CPU_KV_GB = 1.0


@dataclass
class EngineConfig:
    """Engine settings (``trtlm run`` / ``serve`` flags of the same names).

    :param max_batch_size: sequences in flight (default: the engine's build ``max_batch_size``).
    :param max_num_tokens: tokens computed per step; longer prompts are chunked.
    :param block_size: tokens per KV block (power of two; 32 on GPU, 16 on CPU).
    :param kv_cache_free_gpu_mem_fraction: GPU: share of the memory free after the weights
        and a warm-up step that the KV pool takes.
    :param kv_cache_gb: CPU (or to override the GPU sizing): the KV pool's size.
    :param capacity_policy: ``guaranteed_no_evict`` or ``max_utilization``.
    :param admission_group: while sequences decode, admit queued ones only when this many batch
        slots are free (or fewer are queued); default ``max_batch_size // 8`` when decode steps
        replay CUDA graphs (each admission step also runs an eager forward), else 1.
    :param async_scheduling: queue the next decode step before the host has read this step's
        tokens back (``Engine._look_ahead``); default: where decode
        steps replay CUDA graphs.
    """

    max_batch_size: int | None = None
    max_num_tokens: int = 8192
    block_size: int | None = None
    kv_cache_free_gpu_mem_fraction: float = 0.9
    kv_cache_gb: float | None = None
    capacity_policy: str = "guaranteed_no_evict"
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    use_cuda_graphs: bool | None = None
    admission_group: int | None = None
    async_scheduling: bool | None = None

    def validate(self) -> None:
        def need(ok: bool, name: str, rule: str) -> None:
            if not ok:
                raise UserError(f"--{name.replace('_', '-')} {getattr(self, name)!r}: {rule}")

        need(self.max_batch_size is None or self.max_batch_size >= 1, "max_batch_size", "must be >= 1")
        need(self.max_num_tokens >= 1, "max_num_tokens", "must be >= 1")
        need(self.block_size is None or (self.block_size >= 1 and self.block_size & (self.block_size - 1) == 0),
             "block_size", "must be a power of two")
        need(0 < self.kv_cache_free_gpu_mem_fraction <= 1, "kv_cache_free_gpu_mem_fraction", "must be in (0, 1]")
        need(self.kv_cache_gb is None or self.kv_cache_gb > 0, "kv_cache_gb", "must be > 0")
        need(self.admission_group is None or self.admission_group >= 1, "admission_group", "must be >= 1")
        need(self.capacity_policy in CAPACITY_POLICIES, "capacity_policy",
             f"choose one of {', '.join(CAPACITY_POLICIES)}")


@dataclass
class Request:
    request_id: str
    prompt: str | None
    prompt_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence]
    metrics: RequestMetrics
    keep_logits: bool = False
    emitted: list[int] = field(default_factory=list)  #: per completion: token ids already handed out
    stream: bool = True  #: an output after every step that advanced it (else only the final one)

    @property
    def finished(self) -> bool:
        return len(self.seqs) == self.params.n and all(s.finished for s in self.seqs)


class Engine:
    """Continuous batching over one executor (see the module docstring)."""

    def __init__(self, executor: Any, *, max_seq_len: int, max_input_len: int | None = None,
                 vocab_size: int, max_batch_size: int = 8, tokenizer: Any = None, eos_ids: Seq[int] = (),
                 config: EngineConfig | None = None, model_name: str = "model", tokenizer_error: str | None = None):
        config = config or EngineConfig()
        config.validate()
        self.config = config
        self.executor = executor
        self.tokenizer = tokenizer
        self.tokenizer_error = tokenizer_error
        self.eos_ids = tuple(eos_ids)
        self.vocab_size = vocab_size
        self.max_seq_len = max_seq_len
        self.max_input_len = min(max_input_len or max_seq_len, max_seq_len)
        self.model_name = model_name
        self.device = getattr(executor, "device", torch.device("cpu"))
        self.max_batch_size = config.max_batch_size or max_batch_size
        self.block_size = config.block_size or (32 if self.device.type == "cuda" else 16)
        self.max_blocks_per_seq = blocks_for(max_seq_len, self.block_size)
        num_blocks = self._pool_blocks()
        self.allocator = BlockAllocator(num_blocks, self.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.allocator, self.max_batch_size, config.max_num_tokens,
                                   config.capacity_policy, config.enable_chunked_prefill)
        executor.init_cache(num_blocks, self.block_size, self.max_blocks_per_seq, self.max_batch_size)
        graphs = getattr(executor, "graphs", None) is not None
        self.scheduler.admission_group = config.admission_group or (max(1, self.max_batch_size // 8) if graphs else 1)
        self.requests: dict[str, Request] = {}
        self._ids = itertools.count()
        self._seq_ids = itertools.count()
        self._fallback = torch.Generator(device="cpu").manual_seed(0)
        self.steps = 0
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        #: queue a decode step before the previous one's tokens are read back (see _look_ahead)
        self.async_scheduling = bool(getattr(executor, "accepts_device_tokens", False)) and (
            graphs if config.async_scheduling is None else config.async_scheduling)
        self.lookahead_steps = 0  #: steps queued ahead
        self._ahead: tuple[Any, list[tuple[int, int]], torch.Tensor] | None = None
        self._token_host: torch.Tensor | None = None

    # -- construction ----------------------------------------------------------------------------------
    @classmethod
    def from_engine_dir(cls, engine_dir: str | Path, *, device: str | torch.device = "cpu",
                        tokenizer_dir: str | Path | None = None, config: EngineConfig | None = None) -> "Engine":
        """A single-process engine over an engine directory (all ranks merged into this process)."""
        from trtlm.runtime.loader import load_engine

        loaded = load_engine(Path(engine_dir), device=device, tokenizer_dir=tokenizer_dir)
        from trtlm.runtime.executor import LocalExecutor

        executor = LocalExecutor(loaded.model, loaded.device,
                                 use_cuda_graphs=(config.use_cuda_graphs if config else None))
        return cls.for_loaded(loaded, executor, config)

    @classmethod
    def for_loaded(cls, loaded: Any, executor: Any, config: EngineConfig | None = None) -> "Engine":
        return cls(executor, max_seq_len=loaded.max_seq_len, max_input_len=loaded.max_input_len,
                   vocab_size=loaded.vocab_size, max_batch_size=loaded.max_batch_size, tokenizer=loaded.tokenizer,
                   eos_ids=loaded.eos_ids, config=config, model_name=loaded.name,
                   tokenizer_error=loaded.tokenizer_error)

    def _pool_blocks(self) -> int:
        """KV blocks that fit the configured memory (at least one full sequence)."""
        spec = self.executor.kv_cache_spec()
        elem = torch.empty((), dtype=spec["kv_dtype"] or spec["dtype"]).element_size()
        per_block = KVPool.bytes_per_block(spec["num_layers"], self.block_size, spec["kv_heads"], spec["head_size"],
                                           elem)
        per_block = max(per_block, 1)
        if self.config.kv_cache_gb is not None:
            budget = int(self.config.kv_cache_gb * 2 ** 30)
        elif self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            free, _total = torch.cuda.mem_get_info(self.device)
            reserve = 2 * 2 ** 30  # activations, CUDA graphs and the sampler's temporaries
            budget = int(max(0, free - reserve) * self.config.kv_cache_free_gpu_mem_fraction)
        else:
            want = self.max_batch_size * self.max_blocks_per_seq * per_block
            budget = min(want, int(DEFAULT_CPU_KV_GB * 2 ** 30))
        blocks = budget // per_block
        if blocks < self.max_blocks_per_seq and self.config.kv_cache_gb is None and self.device.type == "cpu":
            blocks = self.max_blocks_per_seq
        if blocks < 1:
            raise UserError(f"the KV cache gets no memory ({budget / 2 ** 30:.2f} GiB for blocks of "
                            f"{per_block / 2 ** 20:.1f} MiB): raise --kv-cache-free-gpu-mem-fraction or --kv-cache-gb")
        return int(blocks)

    # -- requests ---------------------------------------------------------------------------------------
    def encode(self, prompt: str | Seq[int]) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise UserError(self.tokenizer_error or "this engine has no tokenizer: give token ids "
                                "(--input-ids), or --tokenizer-dir")
            return prompt, self.tokenizer.encode(prompt)
        try:
            return None, [int(t) for t in prompt]
        except (TypeError, ValueError):
            raise UserError("a prompt is text or a list of integer token ids") from None

    def limits(self) -> PromptLimits:
        """What a prompt may be on this engine (a server in another process checks against a copy)."""
        return PromptLimits(vocab_size=self.vocab_size, max_input_len=self.max_input_len,
                            max_seq_len=self.max_seq_len, block_size=self.block_size,
                            num_blocks=self.allocator.num_blocks, max_batch_size=self.max_batch_size,
                            chunked_prefill=self.config.enable_chunked_prefill,
                            max_num_tokens=self.config.max_num_tokens)

    def check_prompt(self, ids: list[int], params: SamplingParams) -> None:
        """One clear error for a prompt this engine cannot run."""
        self.limits().check(ids, params)

    def add_request(self, prompt: str | Seq[int], params: SamplingParams | None = None,
                    request_id: str | None = None, arrival_time: float | None = None,
                    keep_logits: bool = False, stream: bool = True) -> str:
        """Check and queue a request; return its id.

        ``stream=False``: the request's output comes back once, when it finished (its text is then
        decoded once instead of token by token, unless stop strings need the text as it grows)."""
        params = params or SamplingParams()
        params.validate()
        text, ids = self.encode(prompt)
        self.check_prompt(ids, params)
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        if request_id in self.requests:
            raise UserError(f"request id {request_id!r} is already in use")
        now = arrival_time if arrival_time is not None else time.monotonic()
        req = Request(request_id, text, ids, params, [], RequestMetrics(now), keep_logits, [0] * params.n,
                      stream=stream)
        seq = self._new_seq(req, 0, ids, now)
        seq.keep_logits = keep_logits
        seq.forks = params.n - 1
        req.seqs.append(seq)
        self.requests[request_id] = req
        self.scheduler.add(seq)
        return request_id

    def warm_up(self) -> None:
        """Compile the kernels and capture the CUDA graphs before the first request (a server's
        start-up; ``trtlm bench`` too, so that both are measured warm): one prefill chunk of up to
        ``max_num_tokens`` tokens and a few decode steps, then every graph bucket.  The counters
        (steps, tokens) are reset afterwards, and the warm-up's blocks are free again."""
        fits = self.allocator.num_blocks * self.block_size // 2 - self.block_size - 4  # two at once
        length = min(self.max_input_len, self.config.max_num_tokens // 2, self.max_seq_len - 4, fits)
        if length >= 1:
            prompts = [[(7 * i + j) % self.vocab_size for j in range(length)] for i in range(2)]
            self.generate(prompts, SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True,
                                                  detokenize=False))
        capture = getattr(self.executor, "capture_graphs", None)
        if capture is not None:
            capture()
        self.steps = self.prompt_tokens_total = self.generation_tokens_total = 0

    def _new_seq(self, req: Request, index: int, ids: list[int], now: float) -> Sequence:
        params = req.params
        detok = IncrementalDetokenizer(self.tokenizer if params.detokenize else None, params.stop,
                                       lazy=not req.stream and not params.stop)
        stops = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else frozenset(self.eos_ids))
        return Sequence(next(self._seq_ids), req.request_id, index, list(ids), params, stop_ids=stops,
                        generator=request_generator(params.seed, index), detok=detok, arrival=now,
                        logprobs=[] if params.logprobs is not None else None,
                        cumulative_logprob=0.0 if params.logprobs is not None else None)

    def abort(self, request_id: str) -> bool:
        """Cancel a request now; its KV blocks are free when this returns."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return False
        for seq in req.seqs:
            if not seq.finished:
                self.scheduler.free_seq(seq)
                seq.status = Status.FINISHED
                seq.finish_reason = "abort"
        req.metrics.finished_time = time.monotonic()
        return True

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    def stats(self) -> EngineStats:
        return EngineStats(running=len(self.scheduler.running), waiting=len(self.scheduler.waiting),
                           kv_blocks_used=self.allocator.num_used, kv_blocks_total=self.allocator.num_blocks,
                           prompt_tokens_total=self.prompt_tokens_total,
                           generation_tokens_total=self.generation_tokens_total,
                           preemptions=self.scheduler.preemptions, steps=self.steps, block_size=self.block_size)

    # -- one step ---------------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one scheduler step; the outputs of the requests that advanced (finished ones last time)."""
        return self.collect(self.advance())

    def advance(self, overlap: Callable[[], None] | None = None) -> list[Request]:
        """Run one scheduler step up to its new tokens; return the requests it advanced, whose
        outputs :meth:`collect` builds.

        ``overlap`` is called once per call, while the device computes this step (after its forward
        is queued, before the host waits for its tokens), or at once when there is nothing to run.
        It is for host work that does not depend on this step -- a server builds and ships the
        previous step's outputs there (:mod:`trtlm.serve.engine_core`), so that work no longer
        leaves the GPU idle between steps."""
        plan, rows, logits = self._take_ahead()
        if plan is None:
            plan = self.scheduler.schedule()
            if not plan:
                if overlap is not None:
                    overlap()
                return []
            self.steps += 1
            inputs, rows = self._inputs(plan)
            logits = self.executor.execute(inputs)
        self.scheduler.after_step(plan)
        touched: dict[str, Request] = {}
        sample_rows: list[tuple[Sequence, int]] = []
        now = time.monotonic()
        for s, (first_row, n_rows) in zip(plan.scheduled, rows):
            seq = s.seq
            req = self.requests.get(seq.request_id)
            if req is None:
                continue
            if req.metrics.first_scheduled_time is None:
                req.metrics.first_scheduled_time = now
            if s.start < len(seq.prompt_ids):
                self.prompt_tokens_total += min(s.num_tokens, len(seq.prompt_ids) - s.start)
            if seq.keep_logits and s.start < len(seq.prompt_ids) and not seq.output_ids:
                seq.prompt_logits.append(logits[first_row:first_row + n_rows].float().cpu())
            if s.samples:
                if seq.keep_logits and seq.output_ids:
                    seq.step_logits.append(logits[first_row + n_rows - 1].float().cpu())
                sample_rows.append((seq, first_row + n_rows - 1))
                for child in self._fork(seq, req):
                    sample_rows.append((child, first_row + n_rows - 1))
            touched[req.request_id] = req
        if sample_rows:
            self._sample(logits, sample_rows, plan, overlap)
        elif overlap is not None:
            overlap()
        return list(touched.values())

    def collect(self, advanced: list[Request]) -> list[RequestOutput]:
        """The outputs of requests :meth:`advance` returned, as they stand now: every one that streams
        or finished, except those aborted since (an aborted request sends nothing more).  A finished
        request leaves the engine here."""
        return [self._output(req) for req in advanced
                if (req.stream or req.finished) and self.requests.get(req.request_id) is req]

    def _inputs(self, plan, device_tokens: torch.Tensor | None = None) -> tuple[StepInputs, list[tuple[int, int]]]:
        """The step's inputs, and per scheduled sequence ``(first logits row, rows)``.  With
        ``device_tokens`` (a decode step queued ahead) each sequence's one token is that tensor's
        row: a placeholder on the host."""
        tokens, positions, slots, qlens, clens, tables, logit_rows = [], [], [], [], [], [], []
        rows: list[tuple[int, int]] = []
        bs = self.block_size
        offset = 0
        for s in plan.scheduled:
            seq, start, n = s.seq, s.start, s.num_tokens
            tokens += seq.token_range(start, n) if device_tokens is None else [0]
            positions += range(start, start + n)
            table = seq.block_table
            if n == 1:
                slots.append(table[start // bs] * bs + start % bs)
            else:
                slots += [table[p // bs] * bs + p % bs for p in range(start, start + n)]
            qlens.append(n)
            clens.append(start + n)
            tables.append(table)
            if seq.keep_logits and start < len(seq.prompt_ids):
                rows.append((len(logit_rows), n))
                logit_rows += range(offset, offset + n)
            elif s.samples:
                rows.append((len(logit_rows), 1))
                logit_rows.append(offset + n - 1)
            else:
                rows.append((len(logit_rows), 0))
            offset += n
        return StepInputs(tokens, positions, slots, qlens, clens, tables, logit_rows, device_tokens), rows

    def _fork(self, parent: Sequence, req: Request) -> list[Sequence]:
        """Siblings of a request with ``n > 1``, made when its prompt is first computed: they share
        the prompt's full blocks and get a copy of the partial last one."""
        if parent.forks == 0 or parent.output_ids:
            return []
        children = []
        bs = self.block_size
        full = len(parent.prompt_ids) // bs
        for i in range(1, parent.forks + 1):
            child = self._new_seq(req, i, parent.prompt_ids, parent.arrival)
            child.block_table = list(parent.block_table[:full])
            for b in child.block_table:
                self.allocator.refs[b] += 1
            if len(parent.block_table) > full:  # the block the scheduler took for it (or a free one)
                child.block_table += [parent.fork_blocks.pop()] if parent.fork_blocks else self.allocator.allocate(1)
                self.executor.copy_block(parent.block_table[full], child.block_table[-1])
            child.block_hashes = list(parent.block_hashes[:full])
            child.num_computed = parent.num_computed
            child.num_cached = parent.num_cached
            child.status = Status.RUNNING
            child.admitted_once = True
            self.scheduler.running.append(child)
            req.seqs.append(child)
            children.append(child)
        parent.forks = 0
        return children

    def _sample(self, logits: torch.Tensor, rows: list[tuple[Sequence, int]], plan: Any,
                overlap: Callable[[], None] | None) -> None:
        """Sample every row, append the tokens; ``overlap`` runs before the host waits for them.
        With async scheduling the samples stay on the device until the next decode step may have
        been queued (:meth:`_look_ahead`), greedy or sampled rows alike."""
        sample_rows = []
        for seq, _ in rows:
            params = seq.params
            plain = not params.bad_words_ids and len(seq.output_ids) >= params.min_tokens
            sample_rows.append(SampleRow(params, seq.generator, seq.output_ids,
                                         () if plain else banned_ids(params, seq.output_ids, seq.stop_ids)))
        index = [r for _, r in rows]
        if index != list(range(logits.shape[0])):  # (a decode step samples every row, in order)
            logits = logits.index_select(0, torch.tensor(index).to(logits.device, non_blocking=True))
        if self.async_scheduling:
            drawn = sample_on_device(logits, sample_rows, self._fallback)
            readback = self._read_back(drawn.tensors())  # queued before the next step: it need not wait for it
            self._look_ahead(plan, rows, drawn.tokens)
            if overlap is not None:
                overlap()
            result = drawn.finish(readback())
        else:
            if overlap is not None:
                overlap()
            result = sample(logits, sample_rows, self._fallback)
        now = time.monotonic()
        for (seq, _), token, lp in zip(rows, result.token_ids, result.logprobs):
            self._append(seq, token, lp, now)

    # -- looking one decode step ahead ------------------------------------------------------------------
    # At batch 1 the host's share of a step -- reading the sampled tokens back, appending them,
    # checking stops, scheduling and staging the next step -- leaves the GPU idle between steps
    # (0.17-0.39 ms of a 3-5 ms Mistral-7B step on an H200: docs/benchmarks.md, quantized engines,
    # run 13).  When a step is all decodes, the next decode step of the same sequences is queued
    # *before* this step's tokens reach the host: its input tokens are this step's samples, still on
    # the device (``StepInputs.device_tokens``; the sampler waits for nothing, ``sample_on_device``).
    # The host then does this step's work while the GPU computes the next one (TensorRT-LLM's
    # overlap scheduler, vLLM's async scheduling).
    # A sequence that this step's tokens end (a stop id or string, an abort) has computed one token
    # too many: it is dropped from the queued step, whose writes land in blocks it no longer owns
    # before any later step (same stream) can use them.  A sequence that ends by length now is not
    # queued.  Only under ``guaranteed_no_evict`` (its blocks are reserved: growing never preempts),
    # when this step could admit nobody (nobody waits, the batch is full, or an admission group
    # waits for free slots) and with an executor that takes device tokens.  A slot that this step's
    # tokens free is then filled one step later than without looking ahead.
    def _look_ahead(self, plan: Any, rows: list[tuple[Sequence, int]], tokens: torch.Tensor) -> None:
        sched = self.scheduler
        if (sched.may_admit() or sched.policy != "guaranteed_no_evict" or len(plan.scheduled) != len(sched.running)
                or len(rows) != len(plan.scheduled)
                or any(s.num_tokens != 1 or not s.samples or s.seq.keep_logits or s.seq.forks or s.seq.finished
                       for s in plan.scheduled)):
            return
        for seq, _ in rows:
            if len(seq.output_ids) + 1 >= seq.params.max_tokens or seq.num_tokens + 1 >= self.max_seq_len:
                return  # this token ends it by length: the step would carry a row for nothing
        ahead = []
        for seq, _ in rows:
            sched.grow_ahead(seq)
            s = ScheduledSeq(seq, 1)
            s.samples = True  # its token (this step's sample) is not on the host yet
            ahead.append(s)
        ahead_plan = StepPlan(ahead)
        inputs, ahead_rows = self._inputs(ahead_plan, device_tokens=tokens)
        self.steps += 1
        self.lookahead_steps += 1
        self._ahead = (ahead_plan, ahead_rows, self.executor.execute(inputs))

    def _take_ahead(self) -> tuple[Any, list[tuple[int, int]], torch.Tensor | None]:
        """The step queued ahead, less the sequences that ended since (``(None, [], None)`` if none)."""
        ahead, self._ahead = self._ahead, None
        if ahead is None:
            return None, [], None
        plan, rows, logits = ahead
        live = [(s, r) for s, r in zip(plan.scheduled, rows)
                if not s.seq.finished and self.requests.get(s.seq.request_id) is not None]
        if not live:
            return None, [], None
        plan.scheduled = [s for s, _ in live]
        return plan, [r for _, r in live], logits

    def _read_back(self, tensors: list[torch.Tensor]) -> Callable[[], list[list]]:
        """Queue the copies of ``tensors`` (the tokens first) to the host now; the returned call
        waits for those copies only, and returns them as lists."""
        if tensors[0].device.type != "cuda":
            return lambda: [t.tolist() for t in tensors]
        tokens, n = tensors[0], tensors[0].shape[0]
        if self._token_host is None or self._token_host.shape[0] < n:
            self._token_host = torch.empty(max(n, self.max_batch_size), dtype=tokens.dtype, pin_memory=True)
        hosts = [self._token_host[:n]]
        hosts[0].copy_(tokens, non_blocking=True)
        hosts += [t.to("cpu", non_blocking=True) for t in tensors[1:]]  # (pinned: a D2H non_blocking copy)
        done = torch.cuda.Event()
        done.record()

        def wait() -> list[list]:
            done.synchronize()
            return [h.tolist() for h in hosts]
        return wait

    def _append(self, seq: Sequence, token: int, logprobs: dict[int, float] | None, now: float) -> None:
        seq.output_ids.append(token)
        self.generation_tokens_total += 1
        req = self.requests[seq.request_id]
        if req.metrics.first_token_time is None:
            req.metrics.first_token_time = now
        if seq.first_token_time is None:
            seq.first_token_time = now
        if logprobs is not None and seq.logprobs is not None:
            seq.logprobs.append(logprobs)
            seq.cumulative_logprob += logprobs[token]
        params = seq.params
        if token in seq.stop_ids and len(seq.output_ids) >= params.min_tokens:
            self._finish(seq, "stop", token)
            return
        if seq.detok.stop:  # stop strings end the sequence: its text is decoded as it grows
            found = seq.detok.add(token)
            if found is not None:
                self._finish(seq, "stop", found)
                return
        if len(seq.output_ids) >= params.max_tokens or seq.num_tokens >= self.max_seq_len:
            self._finish(seq, "length", None)

    def _finish(self, seq: Sequence, reason: str, stop_reason: int | str | None) -> None:
        seq.finish_reason, seq.stop_reason = reason, stop_reason
        self.scheduler.free_seq(seq)
        seq.status = Status.FINISHED

    @staticmethod
    def _decode(seq: Sequence) -> None:
        """Bring the sequence's text up to its ids (without stop strings nothing depends on the
        text before its output is built, which may overlap the next step: see :meth:`advance`)."""
        end = len(seq.output_ids)
        if seq.finish_reason == "stop" and not isinstance(seq.stop_reason, str):
            end -= 1  # a stop id is not part of the text
        for token in seq.output_ids[len(seq.detok.ids):end]:
            seq.detok.add(token)
        if seq.finished:
            seq.detok.finish()

    def _output(self, req: Request) -> RequestOutput:
        outs = []
        for i, seq in enumerate(req.seqs):
            self._decode(seq)
            new_ids = seq.output_ids[req.emitted[i]:]
            req.emitted[i] = len(seq.output_ids)
            new_text = seq.detok.take(final=seq.finished)  # all of it once finished
            outs.append(CompletionOutput(
                index=seq.index, token_ids=list(seq.output_ids), text=seq.detok.text[:seq.detok.emitted],
                new_token_ids=new_ids, new_text=new_text,
                logprobs=list(seq.logprobs) if seq.logprobs is not None else None,
                cumulative_logprob=seq.cumulative_logprob, finish_reason=seq.finish_reason,
                stop_reason=seq.stop_reason))
        finished = req.finished
        if finished:
            req.metrics.finished_time = time.monotonic()
            self.requests.pop(req.request_id, None)
        seq0 = req.seqs[0]
        prompt_logits = torch.cat(seq0.prompt_logits) if seq0.prompt_logits else None
        return RequestOutput(req.request_id, req.prompt, req.prompt_ids, outs, finished,
                             num_cached_tokens=seq0.num_cached, metrics=req.metrics, prompt_logits=prompt_logits,
                             step_logits=list(seq0.step_logits))

    # -- convenience ------------------------------------------------------------------------------------
    def generate(self, prompts: Seq[str | Seq[int]], params: SamplingParams | Seq[SamplingParams] | None = None,
                 keep_logits: bool = False,
                 on_output: Callable[[int, RequestOutput], None] | None = None) -> list[RequestOutput]:
        """Run ``prompts`` to completion (queued within the engine's limits); outputs in prompt order."""
        params_list = list(params) if isinstance(params, (list, tuple)) else [params or SamplingParams()] * len(prompts)
        if len(params_list) != len(prompts):
            raise UserError(f"{len(params_list)} sampling settings for {len(prompts)} prompts")
        ids = []
        try:
            for prompt, p in zip(prompts, params_list):
                ids.append(self.add_request(prompt, p, keep_logits=keep_logits, stream=on_output is not None))
        except BaseException:
            for rid in ids:
                self.abort(rid)
            raise
        order = {rid: i for i, rid in enumerate(ids)}
        final: dict[str, RequestOutput] = {}
        try:
            while len(final) < len(ids):
                for out in self.step():
                    if out.request_id in order:
                        if on_output is not None:
                            on_output(order[out.request_id], out)
                        if out.finished:
                            final[out.request_id] = out
        except BaseException:
            for rid in ids:
                self.abort(rid)
            raise
        return [final[rid] for rid in ids]

    def close(self) -> None:
        for rid in list(self.requests):
            self.abort(rid)
        self._ahead = None
        self.executor.shutdown()
