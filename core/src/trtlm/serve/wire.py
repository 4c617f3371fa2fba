"""What crosses the pipe between the API process and the engine process, per step.

The engine's :class:`~trtlm.runtime.outputs.RequestOutput` carries every token
and the whole text so far; sending that each step would cost O(length) per
request per step.  The engine process sends only what changed (new token ids,
new text, new logprobs; the final text and ids once, at the end), and the API
process's :class:`OutputAssembler` rebuilds the same ``RequestOutput`` the
engine produced, so everything above it is unaware of the process boundary.

One delta is ``(request_id, finished, num_cached_tokens, completions)``; one
completion is ``(index, new_token_ids, new_text, finish_reason, stop_reason,
new_logprobs, cumulative_logprob, final)`` with ``final = (text, token_ids)``
when it finished, else ``None``.
"""
from __future__ import annotations

from typing import Any

from trtlm.runtime.outputs import CompletionOutput, RequestOutput


def encode_outputs(outputs: list[RequestOutput]) -> list[tuple]:
    """The engine process's side: one step's outputs as deltas."""
    deltas = []
    for out in outputs:
        completions = []
        for c in out.outputs:
            new = len(c.new_token_ids)
            new_logprobs = None if c.logprobs is None else (c.logprobs[len(c.logprobs) - new:] if new else [])
            final = (c.text, c.token_ids) if c.finish_reason is not None else None
            completions.append((c.index, c.new_token_ids, c.new_text, c.finish_reason, c.stop_reason, new_logprobs,
                                c.cumulative_logprob, final))
        deltas.append((out.request_id, out.finished, out.num_cached_tokens, completions))
    return deltas


def merge_steps(steps: list[list[tuple]]) -> list[tuple]:
    """Several steps' deltas as one step's: what the API process does when it fell behind the engine
    (its per-token work then shrinks to per-request work, so it catches up instead of lagging more)."""
    if len(steps) == 1:
        return steps[0]
    merged: dict[str, tuple] = {}
    for deltas in steps:
        for delta in deltas:
            earlier = merged.get(delta[0])
            merged[delta[0]] = delta if earlier is None else _merge(earlier, delta)
    return list(merged.values())


def _merge(earlier: tuple, later: tuple) -> tuple:
    request_id, finished, num_cached, completions = later
    before = {c[0]: c for c in earlier[3]}
    out = []
    for c in completions:
        b = before.pop(c[0], None)
        if b is None:
            out.append(c)
            continue
        logprobs = c[5] if b[5] is None else b[5] + (c[5] or [])
        out.append((c[0], b[1] + c[1], b[2] + c[2], c[3], c[4], logprobs, c[6], c[7]))
    out.extend(before.values())  # a completion that did not advance in the later step
    return (request_id, finished, num_cached, out)


class _Completion:
    __slots__ = ("token_ids", "text", "logprobs")

    def __init__(self) -> None:
        self.token_ids: list[int] = []
        self.text = ""
        self.logprobs: list[dict[int, float]] | None = None


class OutputAssembler:
    """The API process's side: deltas back into whole :class:`RequestOutput` objects."""

    def __init__(self) -> None:
        self._requests: dict[str, tuple[list[int], dict[int, _Completion]]] = {}

    def start(self, request_id: str, prompt_token_ids: list[int]) -> None:
        self._requests[request_id] = (prompt_token_ids, {})

    def forget(self, request_id: str) -> None:
        self._requests.pop(request_id, None)

    def assemble(self, delta: tuple[Any, ...]) -> RequestOutput | None:
        """The output of one delta; ``None`` for a request nobody waits for any more."""
        request_id, finished, num_cached, completions = delta
        entry = self._requests.get(request_id)
        if entry is None:
            return None
        prompt_ids, done = entry
        outs = []
        for index, new_ids, new_text, reason, stop_reason, new_logprobs, cumulative, final in completions:
            acc = done.get(index)
            if acc is None:
                acc = done[index] = _Completion()
            if final is not None:
                acc.text, acc.token_ids = final[0], list(final[1])
            else:
                acc.text += new_text
                acc.token_ids.extend(new_ids)
            if new_logprobs is not None:
                if acc.logprobs is None:
                    acc.logprobs = []
                acc.logprobs.extend(new_logprobs)
            # A running output's ``token_ids`` is the request's live list (the streams read only the
            # newest output of a request; copying it every step costs O(length) per token).  With
            # logprobs the streams slice ids and logprobs together, so both are copied then.
            live = acc.logprobs is None and final is None
            outs.append(CompletionOutput(index=index, token_ids=acc.token_ids if live else list(acc.token_ids),
                                         text=acc.text, new_token_ids=new_ids, new_text=new_text,
                                         logprobs=None if acc.logprobs is None else list(acc.logprobs),
                                         cumulative_logprob=cumulative, finish_reason=reason,
                                         stop_reason=stop_reason))
        if finished:
            self._requests.pop(request_id, None)
        return RequestOutput(request_id=request_id, prompt=None, prompt_token_ids=prompt_ids, outputs=outs,
                             finished=finished, num_cached_tokens=num_cached)
