"""Which sequences run in the next step, and how many of their tokens.

Continuous ("in-flight") batching: every step the scheduler looks at the
running sequences and the waiting queue and packs one step of work within two
limits — ``max_batch_size`` sequences in flight and ``max_num_tokens`` tokens
computed per step.  Decodes (one token per sequence) go first so generation
keeps flowing; a long prompt is split across steps (chunked prefill) and
shares each step with the decodes.

Two capacity policies, with TensorRT-LLM's names:

* ``guaranteed_no_evict`` (default): a request is admitted only when the KV
  blocks its prompt *and* all of its ``max_tokens`` could ever need are free
  after what the running sequences may still claim, so nothing admitted ever
  waits for memory or is evicted;
* ``max_utilization``: admit as long as this step's blocks are free; when a
  running sequence needs a block and none is left, the newest running
  sequence is preempted: its blocks are freed and it goes back to the front of
  the queue, to be recomputed (prompt and generated tokens) later.
"""
from __future__ import annotations

import enum
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from trtlm.runtime.kv_cache import BlockAllocator, CachedPrefix, blocks_for
from trtlm.runtime.sampling import IncrementalDetokenizer, SamplingParams

CAPACITY_POLICIES = ("guaranteed_no_evict", "max_utilization")


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """One completion of one request: its tokens, its blocks and where its computation stands."""

    seq_id: int
    request_id: str
    index: int
    prompt_ids: list[int]
    params: SamplingParams
    stop_ids: frozenset[int] = frozenset()  #: token ids that end it (its stop ids, and EOS unless ignored)
    generator: Any = None
    detok: IncrementalDetokenizer | None = None
    output_ids: list[int] = field(default_factory=list)
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)  #: chained hashes of the full blocks, in order
    num_computed: int = 0  #: tokens whose keys/values are in the cache
    num_cached: int = 0  #: prompt tokens served by the prefix cache at first admission
    status: Status = Status.WAITING
    arrival: float = field(default_factory=time.monotonic)
    first_token_time: float | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    logprobs: list[dict[int, float]] | None = None
    cumulative_logprob: float | None = None
    keep_logits: bool = False
    prompt_logits: list[Any] = field(default_factory=list)
    step_logits: list[Any] = field(default_factory=list)
    forks: int = 0  #: siblings (n > 1) to fork from this sequence once its prompt is computed
    fork_blocks: list[int] = field(default_factory=list)  #: taken for the siblings' copies of the partial block
    admitted_once: bool = False

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    def token_range(self, start: int, n: int) -> list[int]:
        """Tokens ``start .. start + n - 1`` of prompt + output, without copying the whole sequence
        (a decode step needs one token of a sequence thousands long)."""
        p = len(self.prompt_ids)
        if start >= p:
            return self.output_ids[start - p:start - p + n]
        if start + n <= p:
            return self.prompt_ids[start:start + n]
        return self.prompt_ids[start:] + self.output_ids[:start + n - p]

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_tokens: int  #: tokens computed for it in this step
    start: int = -1  #: the first of them (the sequence's computed tokens when scheduled)
    samples: bool = False  #: whether this step reaches its last known token (a new token is sampled)

    def __post_init__(self) -> None:
        self.start = self.seq.num_computed
        self.samples = self.start + self.num_tokens == self.seq.num_tokens


@dataclass
class StepPlan:
    scheduled: list[ScheduledSeq]
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.scheduled)

    def __bool__(self) -> bool:
        return bool(self.scheduled)


class Scheduler:
    """Waiting and running queues over one :class:`BlockAllocator`."""

    def __init__(self, allocator: BlockAllocator, max_batch_size: int, max_num_tokens: int,
                 capacity_policy: str = "guaranteed_no_evict", enable_chunked_prefill: bool = True):
        if capacity_policy not in CAPACITY_POLICIES:
            raise ValueError(f"capacity policy {capacity_policy!r}: choose one of {', '.join(CAPACITY_POLICIES)}")
        self.allocator = allocator
        self.block_size = allocator.block_size
        self.max_batch_size = max_batch_size
        self.max_num_tokens = max_num_tokens
        self.policy = capacity_policy
        self.chunked = enable_chunked_prefill
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.preemptions = 0
        #: admit waiting sequences into a step that has decodes only once this many batch slots are
        #: free (or the queue is shorter): each admission step runs an extra eager forward on the GPU
        #: beside the decode graph, so admitting one request per step would pay it every step
        self.admission_group = 1

    # -- bookkeeping ---------------------------------------------------------------------------
    def worst_case_blocks(self, seq: Sequence) -> int:
        return blocks_for(len(seq.prompt_ids) + seq.params.max_tokens, self.block_size)

    def outstanding(self) -> int:
        """Blocks the running sequences may still claim (``guaranteed_no_evict``)."""
        return sum(max(0, (1 + s.forks) * self.worst_case_blocks(s) - len(s.block_table) - len(s.fork_blocks))
                   for s in self.running)

    def batch_slots_taken(self) -> int:
        """Running sequences, and the siblings (n > 1) they will fork once their prompt is computed."""
        return sum(1 + s.forks for s in self.running)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def free_seq(self, seq: Sequence) -> None:
        """Give a sequence's blocks back and take it out of the queues."""
        self.allocator.release(seq.block_table)
        self.allocator.release(seq.fork_blocks)
        seq.block_table = []
        seq.fork_blocks = []
        seq.block_hashes = []
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)

    # -- one step ------------------------------------------------------------------------------
    def schedule(self) -> StepPlan:
        plan = StepPlan([])
        budget = self.max_num_tokens
        # 1. running sequences: decodes first, then prompt chunks still to compute
        for decode_pass in (True, False):
            for seq in list(self.running):
                if seq.status is not Status.RUNNING or budget <= 0:
                    continue
                remaining = seq.num_tokens - seq.num_computed
                if (remaining == 1) != decode_pass or remaining <= 0:
                    continue
                n = min(remaining, budget)
                if not self._grow(seq, n, plan):
                    continue
                plan.scheduled.append(ScheduledSeq(seq, n))
                budget -= n
        # 2. admit waiting sequences
        if plan.scheduled and self._group_waits():
            return plan
        # a request with n > 1 brings its siblings into the batch when its prompt is done: count them now
        while self.waiting and budget > 0 and \
                self.batch_slots_taken() + 1 + self.waiting[0].forks <= self.max_batch_size:
            seq = self.waiting[0]
            n = self._admit(seq, budget)
            if n == 0:
                break
            self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
            plan.scheduled.append(ScheduledSeq(seq, n))
            budget -= n
        return plan

    def _group_waits(self) -> bool:
        """While sequences decode: the queue waits until ``admission_group`` batch slots are free."""
        return self.admission_group > 1 and len(self.waiting) >= self.admission_group and \
            self.max_batch_size - self.batch_slots_taken() < self.admission_group

    def may_admit(self) -> bool:
        """Whether a step of the running decodes could admit a waiting sequence now (the engine
        queues a decode step ahead only when it could not)."""
        return bool(self.waiting) and not self._group_waits() and \
            self.batch_slots_taken() + 1 + self.waiting[0].forks <= self.max_batch_size

    def _grow(self, seq: Sequence, n: int, plan: StepPlan) -> bool:
        """Make room for ``n`` more tokens of a running sequence (preempting under max_utilization)."""
        forks = self._fork_need(seq, seq.num_computed + n)
        need = blocks_for(seq.num_computed + n, self.block_size) - len(seq.block_table)
        while need + forks > self.allocator.num_free:
            if self.policy == "guaranteed_no_evict":  # cannot happen: reserved at admission
                raise AssertionError("KV cache over-committed under guaranteed_no_evict")
            victim = self.running[-1]
            self.preempt(victim, plan)
            if victim is seq:
                return False
        if need > 0:
            seq.block_table += self.allocator.allocate(need)
        seq.fork_blocks += self.allocator.allocate(forks)
        return True

    def grow_ahead(self, seq: Sequence) -> None:
        """Room for one more token of a decoding ``seq`` whose last token is not known yet (the
        engine queues its next decode step ahead).  Under ``guaranteed_no_evict`` only: its blocks
        were reserved at admission, so this never preempts."""
        if self.policy != "guaranteed_no_evict" or not self._grow(seq, 1, StepPlan([])):
            raise AssertionError("a decode step is queued ahead only under guaranteed_no_evict")

    def _fork_need(self, seq: Sequence, computed: int) -> int:
        """Blocks the ``n > 1`` siblings of ``seq`` take when its prompt is complete at ``computed``
        tokens (this step): a copy each of the prompt's partial last block (full blocks are shared).
        They are taken with the step's own blocks, so the fork after the step always finds them."""
        if not seq.forks or seq.output_ids or computed < len(seq.prompt_ids) or \
                len(seq.prompt_ids) % self.block_size == 0:
            return 0
        return seq.forks - len(seq.fork_blocks)

    def preempt(self, seq: Sequence, plan: StepPlan | None = None) -> None:
        """Free a running sequence's blocks and queue it first, to be recomputed."""
        self.free_seq(seq)
        seq.num_computed = 0
        if not seq.output_ids:  # its prompt is computed again: so are the prompt logits it keeps
            seq.prompt_logits.clear()
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        self.preemptions += 1
        if plan is not None:
            plan.preempted.append(seq)
            plan.scheduled = [s for s in plan.scheduled if s.seq is not seq]

    def _admit(self, seq: Sequence, budget: int) -> int:
        """Tokens of ``seq`` to compute in this step if it can be admitted now (taking its
        cached prefix and blocks), else 0."""
        alloc = self.allocator
        tokens = seq.all_ids
        # a request that keeps its prompt logits computes every prompt token (a cached one has none)
        prefix = CachedPrefix([], []) if seq.keep_logits and not seq.output_ids else alloc.match_prefix(tokens)
        if prefix.num_blocks * self.block_size >= len(tokens):  # keep one token to compute (its logits)
            prefix.blocks.pop()
            prefix.hashes.pop()
        cached = prefix.num_blocks * self.block_size
        remaining = len(tokens) - cached
        n = min(remaining, budget) if self.chunked else (remaining if remaining <= budget else 0)
        if n == 0:
            return 0
        held = prefix.num_blocks - alloc.new_blocks_needed(prefix)  # cached blocks someone holds: no cost
        if self.policy == "guaranteed_no_evict":
            need = (1 + seq.forks) * self.worst_case_blocks(seq) - held
            if need > alloc.num_free - self.outstanding():
                return 0
        else:
            need = blocks_for(cached + n, self.block_size) - held + self._fork_need(seq, cached + n)
            if need > alloc.num_free:
                return 0
        seq.block_table = alloc.take_prefix(prefix)
        seq.block_hashes = list(prefix.hashes)
        seq.num_computed = cached
        if not seq.admitted_once:
            seq.num_cached = cached
            seq.admitted_once = True
        fresh = blocks_for(cached + n, self.block_size) - len(seq.block_table)
        seq.block_table += alloc.allocate(fresh)
        seq.fork_blocks += alloc.allocate(self._fork_need(seq, cached + n))
        return n

    def after_step(self, plan: StepPlan) -> None:
        """Advance each scheduled sequence past its computed tokens and register blocks that are now full."""
        bs = self.block_size
        for s in plan.scheduled:
            seq = s.seq
            seq.num_computed += s.num_tokens
            ids = None
            while len(seq.block_hashes) < seq.num_computed // bs:
                i = len(seq.block_hashes)
                ids = ids if ids is not None else seq.all_ids
                prev = seq.block_hashes[-1] if seq.block_hashes else None
                seq.block_hashes.append(self.allocator.register_full(seq.block_table[i], prev,
                                                                     ids[i * bs:(i + 1) * bs]))
