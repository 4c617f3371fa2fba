"""Per-request sampling: settings, the batched sampler, stop conditions and streaming text.

Every row of a step's logits belongs to one sequence with its own
:class:`SamplingParams`, so the sampler works row-wise where settings differ
and batched where they agree.  A seeded request draws from its own generator
(Gumbel/exponential race: ``argmax(p / q)`` with ``q ~ Exp(1)`` drawn from that
generator), so its tokens do not depend on what else is in the batch.

Text is produced incrementally (:class:`IncrementalDetokenizer`): only the
newly completed characters are emitted, never half of a multi-byte UTF-8
character, and stop strings are matched on the text across token boundaries,
holding back the few characters that could still turn into a stop string.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import AbstractSet, Sequence

import torch

from trtlm.errors import UserError


@dataclass
class SamplingParams:
    """What one request asks of generation (OpenAI / vLLM / TensorRT-LLM names).

    :param max_tokens: generated tokens at most (``finish_reason="length"``).
    :param min_tokens: EOS and stop tokens are masked until this many were generated.
    :param temperature: 0 = greedy.
    :param top_k: keep the k most likely tokens (0 = all).
    :param top_p: nucleus sampling (1 = all).
    :param seed: a per-request generator: the same tokens whatever else is batched.
    :param stop_token_ids: extra ids that end the sequence (the model's EOS ids end it too
        unless ``ignore_eos``).
    :param stop: strings that end the sequence, matched on the detokenized text (not
        included in the text).
    :param logprobs: ``None``: none; ``k``: the sampled token's log-probability and the
        top-``k`` alternatives, per generated token.
    :param n: completions for the prompt (the prompt is computed once).
    :param bad_words_ids: token sequences that are never generated.
    """

    max_tokens: int = 16
    min_tokens: int = 0
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: Sequence[int] = ()
    stop: Sequence[str] = ()
    ignore_eos: bool = False
    logprobs: int | None = None
    n: int = 1
    bad_words_ids: Sequence[Sequence[int]] = ()
    detokenize: bool = True

    def validate(self) -> None:
        """Raise :class:`UserError` naming the first field that is out of range."""
        def need(ok: bool, name: str, rule: str) -> None:
            if not ok:
                raise UserError(f"{name}={getattr(self, name)!r}: {rule}")

        need(isinstance(self.max_tokens, int) and self.max_tokens >= 1, "max_tokens", "must be an integer >= 1")
        need(isinstance(self.min_tokens, int) and 0 <= self.min_tokens <= self.max_tokens, "min_tokens",
             "must be an integer between 0 and max_tokens")
        need(self.temperature >= 0, "temperature", "must be >= 0 (0 = greedy)")
        need(isinstance(self.top_k, int) and self.top_k >= 0, "top_k", "must be an integer >= 0 (0 = off)")
        need(0 < self.top_p <= 1, "top_p", "must be in (0, 1]")
        need(isinstance(self.n, int) and 1 <= self.n <= 128, "n", "must be an integer between 1 and 128")
        need(self.logprobs is None or (isinstance(self.logprobs, int) and 0 <= self.logprobs <= 20), "logprobs",
             "must be an integer between 0 and 20")
        need(self.seed is None or isinstance(self.seed, int), "seed", "must be an integer")
        need(all(isinstance(s, str) and s for s in self.stop), "stop", "must be non-empty strings")
        need(all(isinstance(t, int) for t in self.stop_token_ids), "stop_token_ids", "must be integers")
        need(all(len(w) > 0 for w in self.bad_words_ids), "bad_words_ids", "must be non-empty token sequences")

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0


# -- sampling -------------------------------------------------------------------------------------
@dataclass
class SampleRow:
    """One row of the step's logits to sample from, with the sequence's state."""

    params: SamplingParams
    generator: torch.Generator | None
    output_ids: list[int]
    masked_ids: tuple[int, ...] = ()  #: ids banned at this step (EOS before min_tokens...)


@dataclass
class Sampled:
    token_ids: list[int]
    logprobs: list[dict[int, float] | None] = field(default_factory=list)


def banned_ids(params: SamplingParams, output_ids: list[int], stop_ids: AbstractSet[int]) -> tuple[int, ...]:
    """Tokens the sequence may not produce next: stop ids before ``min_tokens``, and the last
    token of every bad-word sequence whose other tokens the output just produced."""
    banned: list[int] = []
    if len(output_ids) < params.min_tokens:
        banned.extend(stop_ids)
    for word in params.bad_words_ids:
        prefix = list(word[:-1])
        if not prefix or output_ids[len(output_ids) - len(prefix):] == prefix:
            banned.append(int(word[-1]))
    return tuple(banned)


def _filter_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Row-wise top-k (0 = off) and top-p (1 = off) on ``logits [M, V]`` (float32)."""
    V = logits.shape[-1]
    sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
    ranks = torch.arange(V, device=logits.device)[None, :]
    k = torch.where(top_k > 0, top_k, torch.full_like(top_k, V))
    drop = ranks >= k[:, None]
    probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(-1)
    drop |= (probs.cumsum(-1) - probs) > top_p[:, None]
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)


def argmax_only(rows: list[SampleRow]) -> bool:
    """Whether every row takes the plain argmax (greedy, no log-probabilities, nothing masked): the
    tokens are then one kernel's output."""
    return all(r.params.greedy and r.params.logprobs is None and not r.masked_ids for r in rows)


def _on(device: torch.device, values, dtype: torch.dtype) -> torch.Tensor:
    """Host values as a tensor on ``device`` without waiting for the GPU: a copy from pageable
    memory would first wait for every kernel queued on the stream (the step's forward)."""
    host = torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return host
    return host.pin_memory().to(device, non_blocking=True)


@dataclass
class DeviceSampled:
    """A step's samples before they reach the host: ``tokens [M]`` on the logits' device and, for
    the rows in ``want`` (those that asked for log-probabilities), the sampled token's
    log-probability and the top-``k`` alternatives.  :meth:`tensors` lists what to copy back
    (``Engine`` queues the copy, then possibly the next step, then waits); :meth:`finish` turns
    those copies into :class:`Sampled`."""

    tokens: torch.Tensor
    rows: list[SampleRow]
    want: list[int] = field(default_factory=list)
    chosen_lp: torch.Tensor | None = None
    top_values: torch.Tensor | None = None
    top_indices: torch.Tensor | None = None

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.tokens, self.chosen_lp, self.top_values, self.top_indices) if t is not None]

    def finish(self, host: list[list]) -> Sampled:
        """:class:`Sampled` from the host copies of :meth:`tensors`, in order."""
        token_ids = host[0]
        out = Sampled(token_ids, [None] * len(self.rows))
        if self.want:
            chosen_lp, rest = host[1], host[2:]
            for j, i in enumerate(self.want):
                entry = {token_ids[i]: chosen_lp[j]}
                if rest:
                    values, indices = rest
                    n = self.rows[i].params.logprobs
                    for t, v in zip(indices[j][:n], values[j][:n]):
                        entry.setdefault(t, v)
                out.logprobs[i] = entry
        return out


def sample_on_device(logits: torch.Tensor, rows: list[SampleRow],
                     fallback: torch.Generator | None = None) -> DeviceSampled:
    """Next token for each row of ``logits [M, V]``, left on the device, with no wait for the GPU
    (host values travel through pinned memory); log-probabilities where asked.

    Greedy rows take the argmax; the others sample from the temperature-scaled, top-k /
    top-p filtered distribution by an exponential race, with the row's own generator
    when it has one (seeded) and ``fallback`` otherwise -- CPU generators (``request_generator``),
    whose draws are then the same on every device."""
    if argmax_only(rows):
        return DeviceSampled(logits.argmax(dim=-1), rows)  # the common case: one kernel
    dev = logits.device
    logits = logits.float()
    M, V = logits.shape
    masked = [(i, t) for i, r in enumerate(rows) for t in r.masked_ids if 0 <= t < V]
    if masked:
        logits = logits.clone()
        logits[_on(dev, [i for i, _ in masked], torch.long), _on(dev, [t for _, t in masked], torch.long)] = \
            float("-inf")
    chosen = logits.argmax(dim=-1)
    random_rows = [i for i, r in enumerate(rows) if not r.params.greedy]
    if random_rows:
        idx = _on(dev, random_rows, torch.long)
        sub = logits[idx] / _on(dev, [rows[i].params.temperature for i in random_rows], torch.float32)[:, None]
        top_k = [rows[i].params.top_k for i in random_rows]
        top_p = [rows[i].params.top_p for i in random_rows]
        if any(k > 0 for k in top_k) or any(p < 1 for p in top_p):
            sub = _filter_top_k_top_p(sub, _on(dev, top_k, torch.long), _on(dev, top_p, torch.float32))
        probs = sub.softmax(-1)
        # Exp(1) noise from each row's generator, drawn on the host
        noise = torch.empty((len(random_rows), V), pin_memory=dev.type == "cuda")
        for j, i in enumerate(random_rows):
            noise[j].exponential_(generator=rows[i].generator or fallback)
        chosen[idx] = (probs / noise.to(dev, non_blocking=True)).argmax(dim=-1)
    out = DeviceSampled(chosen, rows)
    want = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
    if want:
        sel = _on(dev, want, torch.long)
        lp = torch.log_softmax(logits[sel], dim=-1)
        out.want = want
        out.chosen_lp = lp.gather(1, chosen[sel][:, None])[:, 0]
        k = max(rows[i].params.logprobs for i in want)
        if k > 0:
            out.top_values, out.top_indices = lp.topk(k, dim=-1)
    return out


def sample(logits: torch.Tensor, rows: list[SampleRow], fallback: torch.Generator | None = None) -> Sampled:
    """:func:`sample_on_device`, read back (the host waits for the GPU here)."""
    drawn = sample_on_device(logits, rows, fallback)
    return drawn.finish([t.tolist() for t in drawn.tensors()])


def request_generator(seed: int | None, index: int = 0) -> torch.Generator | None:
    """The generator of completion ``index`` of a seeded request (CPU: same draws on every device)."""
    if seed is None:
        return None
    return torch.Generator(device="cpu").manual_seed((int(seed) + 7919 * index) % (2 ** 63))


# -- text -----------------------------------------------------------------------------------------
class IncrementalDetokenizer:
    """Streams the text of a growing list of token ids, one complete character at a time.

    Decoding only a window of recent ids keeps the cost per token constant (what
    TGI and vLLM do): the text of ``ids[prefix:read]`` is known, and the new text is
    what ``ids[prefix:]`` adds to it, unless it ends in an incomplete character
    (U+FFFD), which waits for the next token.
    """

    def __init__(self, tokenizer, stop: Sequence[str] = (), lazy: bool = False):
        self.tokenizer = tokenizer
        self.lazy = lazy  #: nobody reads the text before the end: decode once, in finish()
        self.ids: list[int] = []
        self.prefix = 0
        self.read = 0
        self.text = ""  #: all complete text so far (a stop string, once found, is cut off)
        self.emitted = 0  #: characters of ``text`` already handed out
        self.stop = tuple(stop)
        self.hold = max((len(s) for s in self.stop), default=1) - 1

    def add(self, token_id: int) -> str | None:
        """Append one id; return the stop string when the text now contains one."""
        self.ids.append(token_id)
        if self.tokenizer is None or self.lazy:
            return None
        before = self.tokenizer.decode(self.ids[self.prefix:self.read])
        after = self.tokenizer.decode(self.ids[self.prefix:])
        if after.endswith("\ufffd") or len(after) <= len(before):
            return None
        start = len(self.text)
        self.text += after[len(before):]
        self.prefix, self.read = self.read, len(self.ids)
        for s in self.stop:
            at = self.text.find(s, max(0, start - len(s) + 1))
            if at >= 0:
                self.text = self.text[:at]
                return s
        return None

    def take(self, final: bool) -> str:
        """Text not yet handed out; while running, minus what could still become a stop string."""
        end = len(self.text) if final else max(self.emitted, len(self.text) - self.hold)
        new = self.text[self.emitted:end]
        self.emitted = end
        return new

    def finish(self) -> None:
        """At the end, what the window held back as incomplete is decoded as it is."""
        if self.tokenizer is not None and self.read < len(self.ids):
            tail = self.tokenizer.decode(self.ids[self.prefix:])[len(self.tokenizer.decode(
                self.ids[self.prefix:self.read])):]
            self.text += tail
            self.prefix = self.read = len(self.ids)
