"""OpenAI ``/v1/completions`` and ``/v1/chat/completions`` requests: validation and sampling parameters.

Field names, defaults and meanings follow OpenAI's API plus the extensions
vLLM and trtllm-serve accept (``top_k``, ``stop_token_ids``, ``ignore_eos``,
``min_tokens``).  Fields trtlm cannot honour (penalties, ``logit_bias``,
``suffix``, ``best_of``, JSON response formats) are rejected with a 400 that
names them instead of being silently ignored; unknown fields are ignored (as
vLLM ignores them), so clients sending extra options still work.
"""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from trtlm.serve.errors import bad_request

INT64_MAX = 2**63 - 1
#: Most sequences (prompts x n) one HTTP request may ask for.
MAX_SEQUENCES_PER_REQUEST = 128
MAX_LOGPROBS = 20


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False
    continuous_usage_stats: bool = False


class _Sampling(BaseModel):
    """Fields shared by completions and chat completions."""

    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    temperature: float | None = Field(None, ge=0.0, le=100.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1)
    n: int = Field(1, ge=1, le=MAX_SEQUENCES_PER_REQUEST)
    seed: int | None = Field(None, ge=-(2**63), le=INT64_MAX)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0)
    stream: bool = False
    stream_options: StreamOptions | None = None
    echo: bool = False
    user: str | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    best_of: int | None = None

    @field_validator("stop", mode="before")
    @classmethod
    def _stop(cls, v):
        if v is None or isinstance(v, str):
            return v
        if isinstance(v, list) and all(isinstance(s, str) for s in v):
            if any(s == "" for s in v):
                raise ValueError("stop strings must not be empty")
            return v
        raise ValueError("expected a string or a list of strings")

    @model_validator(mode="after")
    def _common(self):
        if self.stream_options is not None and not self.stream:
            raise bad_request("stream_options", "only allowed with stream: true")
        for name, neutral in (("presence_penalty", 0.0), ("frequency_penalty", 0.0), ("repetition_penalty", 1.0)):
            value = getattr(self, name)
            if value is not None and value != neutral:
                raise bad_request(name, f"not supported by trtlm (use {neutral} or leave it out)")
        if self.logit_bias:
            raise bad_request("logit_bias", "not supported by trtlm")
        if self.best_of is not None and self.best_of != self.n:
            raise bad_request("best_of", "not supported by trtlm (leave it out or set it equal to n)")
        if self.stop_token_ids is not None and any(t < 0 for t in self.stop_token_ids):
            raise bad_request("stop_token_ids", "token ids must be >= 0")
        return self

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class CompletionRequest(_Sampling):
    prompt: Any = Field(...)
    max_tokens: int | None = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    suffix: str | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt(cls, v):
        """str | list[str] | list[int] | list[list[int]] -> list of str or list[int] prompts."""
        if v is None:
            raise ValueError("required field is missing")
        if isinstance(v, str):
            return [v]
        if not isinstance(v, list) or not v:
            raise ValueError("expected a string, a list of strings, a list of token ids or a list of those")
        if all(isinstance(p, str) for p in v):
            return v
        if all(isinstance(t, int) and not isinstance(t, bool) for t in v):
            return [v]
        if all(isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p)
               for p in v):
            return v
        raise ValueError("expected a string, a list of strings, a list of token ids or a list of "
                         "non-empty token-id lists")

    @model_validator(mode="after")
    def _completion(self):
        if self.suffix:
            raise bad_request("suffix", "not supported by trtlm")
        if self.echo and self.logprobs is not None:
            raise bad_request("echo", "echo with logprobs is not supported (trtlm does not score prompt tokens)")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise bad_request("min_tokens", f"must be <= max_tokens ({self.max_tokens})")
        if len(self.prompt) * self.n > MAX_SEQUENCES_PER_REQUEST:
            raise bad_request("n", f"prompts x n must be <= {MAX_SEQUENCES_PER_REQUEST}")
        return self


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # name, tool_calls, tool_call_id... reach the template
    role: str
    content: Any = None

    @field_validator("content", mode="before")
    @classmethod
    def _content(cls, v):
        """A string, or a list of ``{"type": "text", "text"}`` parts (joined: trtlm models are text-only)."""
        if v is None or isinstance(v, str):
            return v
        if isinstance(v, list):
            texts = []
            for i, part in enumerate(v):
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise ValueError(f"part {i}: only {{\"type\": \"text\", \"text\": ...}} parts are supported")
                texts.append(part["text"])
            return "\n".join(texts)
        raise ValueError("expected a string or a list of text parts")


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    response_format: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _chat(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise bad_request("top_logprobs", "needs logprobs: true")
        if self.response_format and self.response_format.get("type") not in (None, "text"):
            raise bad_request("response_format", "only {\"type\": \"text\"} is supported by trtlm")
        if self.continue_final_message and self.add_generation_prompt:
            raise bad_request("continue_final_message", "cannot be combined with add_generation_prompt: true")
        if self.continue_final_message and self.messages[-1].role != "assistant":
            raise bad_request("continue_final_message", "the last message must be the assistant's")
        limit = self.max_completion_tokens or self.max_tokens
        if limit is not None and self.min_tokens > limit:
            raise bad_request("min_tokens", f"must be <= max_tokens ({limit})")
        return self

    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


def sampling_params(req: _Sampling, max_tokens: int, logprobs: int | None):
    """The engine's SamplingParams for a validated request."""
    from trtlm.runtime.sampling import SamplingParams

    top_k = req.top_k if req.top_k is not None and req.top_k > 0 else 0
    seed = req.seed
    return SamplingParams(max_tokens=max_tokens, min_tokens=req.min_tokens,
                          temperature=1.0 if req.temperature is None else req.temperature,
                          top_k=top_k, top_p=1.0 if req.top_p is None else req.top_p, seed=seed,
                          stop_token_ids=list(req.stop_token_ids or []), stop=req.stop_list(),
                          ignore_eos=req.ignore_eos, logprobs=logprobs, n=req.n)


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict[str, Any]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def completion_logprobs(token_text, token_ids: list[int], entries: list[dict[int, float]],
                        offset: int) -> dict[str, Any]:
    """OpenAI's legacy completions logprobs: tokens, token_logprobs, top_logprobs, text_offset."""
    tokens, token_lps, tops, offsets = [], [], [], []
    for tid, entry in zip(token_ids, entries, strict=False):
        text = token_text(tid)
        tokens.append(text)
        token_lps.append(entry.get(tid))
        ranked = sorted(entry.items(), key=lambda kv: -kv[1])
        tops.append({token_text(t): lp for t, lp in ranked})
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}


def chat_logprobs(token_text, token_ids: list[int], entries: list[dict[int, float]], top: int) -> dict[str, Any]:
    """Chat logprobs: ``{"content": [{"token", "logprob", "bytes", "top_logprobs"}]}``."""
    content = []
    for tid, entry in zip(token_ids, entries, strict=False):
        text = token_text(tid)
        ranked = sorted(((t, lp) for t, lp in entry.items()), key=lambda kv: -kv[1])[:top]
        content.append({"token": text, "logprob": entry.get(tid), "bytes": list(text.encode()),
                        "top_logprobs": [{"token": token_text(t), "logprob": lp,
                                          "bytes": list(token_text(t).encode())} for t, lp in ranked]})
    return {"content": content}

