"""What the engine hands back for a request: the same shape in every API (Python, CLI, servers)."""
from __future__ import annotations

from dataclasses import dataclass, field, replace


@dataclass
class CompletionOutput:
    """One of a request's ``n`` completions, as it stands after a step."""

    index: int
    token_ids: list[int]  #: every generated id so far (a stop token is the last id)
    text: str  #: the text so far: complete characters only, stop strings cut off
    new_token_ids: list[int]  #: ids added since this request's previous output
    new_text: str  #: text added since this request's previous output
    logprobs: list[dict[int, float]] | None = None  #: per generated token: {id: logprob} (sampled + top-k)
    cumulative_logprob: float | None = None
    finish_reason: str | None = None  #: None while running; "stop", "length" or "abort"
    stop_reason: int | str | None = None  #: the stop id or stop string that ended it

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0  #: prompt tokens served by the prefix cache
    metrics: RequestMetrics | None = None
    prompt_logits: object = None  #: [T, V] when the request asked to keep logits
    step_logits: list = field(default_factory=list)  #: per decode step [V] (completion 0)

    def after(self, earlier: RequestOutput) -> RequestOutput:
        """This output with ``earlier``'s new tokens and text in front of its own: what one output
        would have said for both steps (a stream that fell behind sends one chunk, not one per step)."""
        prior = {c.index: c for c in earlier.outputs}
        outs = [replace(c, new_token_ids=prior[c.index].new_token_ids + c.new_token_ids,
                        new_text=prior[c.index].new_text + c.new_text) if c.index in prior else c
                for c in self.outputs]
        return replace(self, outputs=outs)


@dataclass
class EngineStats:
    running: int
    waiting: int
    kv_blocks_used: int
    kv_blocks_total: int
    prompt_tokens_total: int
    generation_tokens_total: int
    preemptions: int
    steps: int
    block_size: int

    @property
    def kv_usage(self) -> float:
        return self.kv_blocks_used / self.kv_blocks_total if self.kv_blocks_total else 0.0
