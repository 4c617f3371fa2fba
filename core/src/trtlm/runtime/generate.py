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
    if generator is not None and generator.device != probs.device:
        # A seeded CPU generator gives the same tokens on every device.
        return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(-1).to(logits.device)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


#: ``sampler(last_logits [B, V] or None, params, generator, batch) -> next tokens [B]``.
Sampler = Callable[[torch.Tensor | None, SamplingParams, torch.Generator | None, int], torch.Tensor]


def local_sampler(last: torch.Tensor | None, params: SamplingParams, generator: torch.Generator | None,
                  batch: int) -> torch.Tensor:
    """One process: sample from the logits it has."""
    return sample(last, params, generator)


class Runner:
    """Drives a forward function through generation: the one loop of both the
    single-process :class:`trtlm.api.LLM` and every rank of a multi-process job.

    ``forward(tokens [B, T], start, pad) -> logits [B, T, V]`` must append to its own
    KV cache; on a rank without logits (a pipeline stage before the last) it returns
    ``None``.  ``sampler`` turns the last position's logits into the next tokens;
    across ranks it samples on one rank and broadcasts, so every rank runs the same
    loop with the same tokens and stops at the same step.

    ``sync_every``: sampled tokens stay on the device and are read back (EOS checks,
    ``on_tokens``) every this many steps, so a GPU decode loop does not wait for the
    host after each token.  Outputs, ``on_tokens`` calls and logits are the same for
    any value; with ``n > 1`` up to ``n - 1`` steps past the last EOS are computed
    and discarded.
    """

    def __init__(self, forward: Callable, new_cache: Callable[[int, int], None], device: torch.device,
                 sampler: Sampler = local_sampler, sync_every: int = 1):
        self.forward = forward
        self.new_cache = new_cache
        self.device = device
        self.sampler = sampler
        self.sync_every = max(1, int(sync_every))

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
        finished = [False] * B
        eos = set(params.eos_ids)
        pending: list[torch.Tensor] = []  # sampled, not yet read back
        last = logits[:, -1] if logits is not None else None
        for i in range(params.max_new_tokens):
            nxt = self.sampler(last, params, generator, B)
            pending.append(nxt)
            final = i == params.max_new_tokens - 1
            if len(pending) >= self.sync_every or final:
                stop = self._emit(torch.stack(pending).tolist(), i + 1 - len(pending), result, finished, eos,
                                  params.stop_at_eos, on_tokens)
                pending = []
                if stop is not None:  # every sequence ended at step ``stop``: drop the steps computed past it
                    del result.step_logits[stop:]
                    break
            if final:
                break
            logits = self.forward(nxt[:, None], T + i, pad)
            last = logits[:, -1] if logits is not None else None
            if keep_logits and last is not None:
                result.step_logits.append(last)
        return result

    @staticmethod
    def _emit(steps: list[list[int]], first: int, result: Generation, finished: list[bool], eos: set[int],
              stop_at_eos: bool, on_tokens) -> int | None:
        """Record the tokens of steps ``first, first + 1, ...``; the step at which every
        sequence has finished, or ``None``."""
        for j, ids in enumerate(steps):
            new = []
            for b, tok in enumerate(ids):
                if not finished[b]:
                    result.output_ids[b].append(tok)
                new.append(-1 if finished[b] else tok)
            if on_tokens:
                on_tokens(first + j, new)
            if stop_at_eos:
                for b, tok in enumerate(ids):
                    finished[b] = finished[b] or tok in eos
                if all(finished):
                    return first + j
        return None


def batched(items: Iterable, size: int):
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
