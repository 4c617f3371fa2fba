"""Drive an :class:`~trtlm.runtime.engine.Engine` by hand, as a server would: requests arrive at
given steps (some while others decode), some are aborted, and every step is checked.

Shared by ``test_engine.py`` and the rank-0 script of ``test_engine_multiprocess.py`` (so a
multi-process job and the single-process reference see exactly the same arrivals), hence a
plain module with no pytest import.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass
class EngineRun:
    """What :func:`drive` saw."""

    token_ids: list[list[int]]  #: per request, completion 0's ids (what it had when aborted)
    texts: list[str]  #: per request, completion 0's final text
    finish_reasons: list[str | None]
    streamed_ids: list[list[int]]  #: concatenated ``new_token_ids`` deltas (completion 0)
    streamed_texts: list[str]  #: concatenated ``new_text`` deltas (completion 0)
    outputs: list[Any]  #: per request, the last RequestOutput seen (None if it never produced one)
    num_cached_tokens: list[int]
    completions: list[list[list[int]]] = field(default_factory=list)  #: per request, every completion's ids
    max_running: int = 0
    max_waiting_below_batch_limit: int = 0  #: most requests waiting while the batch had room (memory-bound)
    partial_prefill_steps: int = 0  #: steps after which some prompt was only partly computed (chunked)
    preemptions: int = 0
    preempted: set[int] = field(default_factory=set)  #: requests sent back to the queue after generating
    steps: int = 0
    stats: list[Any] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """JSON-able view (what a rank-0 script sends back)."""
        return {"token_ids": self.token_ids, "completions": self.completions, "texts": self.texts,
                "finish_reasons": self.finish_reasons, "num_cached_tokens": self.num_cached_tokens,
                "preemptions": self.preemptions, "partial_prefill_steps": self.partial_prefill_steps,
                "max_running": self.max_running}


def drive(engine: Any, requests: Sequence[tuple[Any, Any]], arrivals: Sequence[int],
          aborts: dict[int, int] | None = None, max_steps: int = 10_000) -> EngineRun:
    """Run ``requests`` (``(prompt, SamplingParams)``) through ``engine``: request ``i`` is added
    before step ``arrivals[i]`` and, if ``aborts`` has ``i``, aborted before step ``aborts[i]``.

    After every step: at most ``max_batch_size`` sequences run, the KV pool is not over-used,
    and each request's streamed token deltas add up to its ids so far."""
    aborts = dict(aborts or {})
    n = len(requests)
    rids: list[str | None] = [None] * n
    last: list[Any] = [None] * n
    streamed_ids: list[list[int]] = [[] for _ in range(n)]
    streamed_texts = [""] * n
    run = EngineRun([], [], [], streamed_ids, streamed_texts, last, [])
    index: dict[str, int] = {}
    step = 0
    while True:
        for i in range(n):
            if arrivals[i] == step:
                rids[i] = engine.add_request(requests[i][0], requests[i][1], request_id=f"r{i}")
                index[rids[i]] = i
            if aborts.get(i) == step:
                assert engine.abort(rids[i]) is True
                assert engine.abort(rids[i]) is False  # a second abort finds nothing
        if step > max(arrivals) and not engine.has_unfinished():
            break
        for out in engine.step():
            i = index[out.request_id]
            last[i] = out
            streamed_ids[i] += out.outputs[0].new_token_ids
            streamed_texts[i] += out.outputs[0].new_text
            assert streamed_ids[i] == out.outputs[0].token_ids, (i, streamed_ids[i], out.outputs[0].token_ids)
        st = engine.stats()
        run.stats.append(st)
        assert st.running <= engine.max_batch_size, (step, st)
        assert 0 <= st.kv_blocks_used <= st.kv_blocks_total, (step, st)
        run.max_running = max(run.max_running, st.running)
        if st.running < engine.max_batch_size:
            run.max_waiting_below_batch_limit = max(run.max_waiting_below_batch_limit, st.waiting)
        if any(0 < s.num_computed < s.num_tokens - 1 for s in engine.scheduler.running):
            run.partial_prefill_steps += 1
        run.preempted |= {index[s.request_id] for s in engine.scheduler.waiting if s.output_ids}
        step += 1
        assert step < max_steps, "the engine did not finish"
    run.steps = engine.stats().steps
    run.preemptions = engine.stats().preemptions
    for i in range(n):
        out = last[i]
        comp = out.outputs[0] if out is not None else None
        run.token_ids.append(list(comp.token_ids) if comp else [])
        run.texts.append(comp.text if comp else "")
        run.finish_reasons.append("abort" if i in aborts else (comp.finish_reason if comp else None))
        run.num_cached_tokens.append(out.num_cached_tokens if out is not None else 0)
        run.completions.append([list(c.token_ids) for c in out.outputs] if out is not None else [])
        if i not in aborts:
            assert out is not None and out.finished, f"request {i} did not finish"
    return run
