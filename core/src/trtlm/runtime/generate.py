"""Batched generation on a preallocated KV cache: prefill, then one token per step.

Prompts of different lengths are left-padded onto one timeline so every
sequence writes the cache at the same index; each sequence's positions
start at 0 after its padding, and padding is masked out of attention.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch


@dataclass
class SamplingParams:
    max_new_tokens: int = 32
    temperature: float = 0.0  #: 0 = greedy
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    eos_ids: tuple[int, ...] = ()
    stop_at_eos: bool = True


@dataclass
class Generation:
    output_ids: list[list[int]]
    prompt_logits: torch.Tensor | None = None  #: [B, T, V] when asked for
    step_logits: list[torch.Tensor] = field(default_factory=list)  #: per decode step [B, V]


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """Next token per row of ``logits [B, V]`` (greedy, or temperature/top-k/top-p sampling)."""
    if params.temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / params.temperature
    if params.top_k > 0:
        kth = torch.topk(logits, min(params.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > params.top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs.cpu() if generator is not None and generator.device.type == "cpu" else probs,
                             1, generator=generator).squeeze(-1).to(logits.device)


class Runner:
    """Drives a forward function (one process, or rank 0 of many) through generation.

    ``forward(tokens [B, T], start, pad) -> logits [B, T, V]`` must append to its own
    KV cache; :meth:`trtlm.api.LLM` supplies it.
    """

    def __init__(self, forward: Callable, new_cache: Callable[[int, int], None], device: torch.device):
        self.forward = forward
        self.new_cache = new_cache
        self.device = device

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], params: SamplingParams,
                 on_tokens: Callable[[int, list[int]], None] | None = None,
                 keep_logits: bool = False) -> Generation:
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        B, T = len(prompts), max(len(p) for p in prompts)
        pad = torch.tensor([T - len(p) for p in prompts], device=self.device)
        tokens = torch.zeros(B, T, dtype=torch.long, device=self.device)
        for b, p in enumerate(prompts):
            tokens[b, T - len(p):] = torch.tensor(p, dtype=torch.long)
        self.new_cache(B, T + params.max_new_tokens)
        generator = None
        if params.seed is not None and params.temperature > 0:
            generator = torch.Generator(device="cpu").manual_seed(params.seed)
        logits = self.forward(tokens, 0, pad)
        result = Generation([[] for _ in range(B)], logits if keep_logits else None)
        done = torch.zeros(B, dtype=torch.bool, device=self.device)
        eos = torch.tensor(list(params.eos_ids) or [-1], device=self.device)
        last = logits[:, -1]
        for i in range(params.max_new_tokens):
            nxt = sample(last, params, generator)
            ids = nxt.tolist()
            finished = done.tolist()
            new = []
            for b in range(B):
                if not finished[b]:
                    result.output_ids[b].append(ids[b])
                new.append(-1 if finished[b] else ids[b])
            if on_tokens:
                on_tokens(i, new)
            if params.stop_at_eos:
                done = done | torch.isin(nxt, eos)
                if bool(done.all()):
                    break
            if i == params.max_new_tokens - 1:
                break
            logits = self.forward(nxt[:, None], T + i, pad)
            last = logits[:, -1]
            if keep_logits:
                result.step_logits.append(last)
        return result


def batched(items: Iterable, size: int):
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
