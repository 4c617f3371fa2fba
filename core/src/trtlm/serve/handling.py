"""The steps every generate route shares: read and validate the body, tokenize, check lengths against
the engine, submit (503 when the queue is full), and account for the result."""
from __future__ import annotations

import json
import logging
import re
import traceback
from typing import Any

from trtlm.errors import UserError
from trtlm.serve.engine_client import EngineDeadError, QueueFullError
from trtlm.serve.errors import APIError, bad_request, from_validation_error
from trtlm.serve.generation import Generation, Prompt, RequestTimeout
from trtlm.serve.state import ServerState
from trtlm.serve.streaming import until_disconnect

log = logging.getLogger("trtlm.serve")
_FIELD = re.compile(r"^([a-z_]+)=")


async def read_json(request) -> Any:
    """The JSON body, or a 400 naming ``body`` (empty, not UTF-8, not JSON)."""
    body = await request.body()
    if not body.strip():
        raise bad_request("body", "the request body is empty (expected a JSON object)")
    try:
        return json.loads(body)
    except UnicodeDecodeError:
        raise bad_request("body", "the request body is not UTF-8") from None
    except json.JSONDecodeError as exc:
        raise bad_request("body", f"not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None


def validate(model_cls, body: Any):
    """``model_cls`` from a JSON object, or a 400 naming the first bad field."""
    from pydantic import ValidationError

    if not isinstance(body, dict):
        raise bad_request("body", f"expected a JSON object, got {type(body).__name__}")
    try:
        return model_cls.model_validate(body)
    except ValidationError as exc:
        raise from_validation_error(exc) from None


def user_error(exc: UserError, default_param: str | None = None) -> APIError:
    """An engine-side UserError (``max_tokens=0: must be ...``) as a 400 naming the field."""
    message = " ".join(str(exc).split())
    match = _FIELD.match(message)
    return APIError(400, message, param=match.group(1) if match else default_param)


def field_name(param: str, index: int, count: int) -> str:
    """``prompt[2]`` for the third of several prompts, ``prompt`` for a single one."""
    return f"{param}[{index}]" if count > 1 else param


#: Texts longer than this are tokenized on a worker thread, so one huge prompt does not stall the streams.
OFFLOAD_CHARS = 16384


async def off_loop(fn, text: str):
    """``fn(text)``, on a worker thread when ``text`` is long (tokenizers release the GIL)."""
    if len(text) > OFFLOAD_CHARS:
        import asyncio

        return await asyncio.to_thread(fn, text)
    return fn(text)


async def tokenize_prompt(state: ServerState, prompt: str | list[int], param: str, echo: bool = False) -> Prompt:
    """Token ids of a text or token-id prompt (ids checked against the vocabulary); the prompt's
    text too when it is to be echoed."""
    engine = state.engine
    if isinstance(prompt, str):
        if engine.tokenizer is None:
            raise bad_request(param, "this model has no tokenizer: send token ids instead of text")
        return Prompt(list(await off_loop(engine.tokenizer.encode, prompt)), prompt)
    bad = next((t for t in prompt if not 0 <= t < engine.vocab_size), None)
    if bad is not None:
        raise bad_request(param, f"token id {bad} is outside the vocabulary (0..{engine.vocab_size - 1})")
    text = engine.tokenizer.decode(list(prompt)) if echo and engine.tokenizer is not None else None
    return Prompt(list(prompt), text)


def token_budget(state: ServerState, prompts: list[Prompt], max_tokens: int | None, param: str,
                 prompt_param: str) -> int:
    """``max_tokens`` checked against the engine's lengths (``None``: all that fits)."""
    engine = state.engine
    for i, p in enumerate(prompts):
        name = field_name(prompt_param, i, len(prompts))
        if not p.token_ids:
            raise bad_request(name, "the prompt is empty")
        if len(p.token_ids) > engine.max_input_len:
            raise bad_request(name, f"the prompt is {len(p.token_ids)} tokens; this engine takes at most "
                                    f"{engine.max_input_len} (max_input_len)")
    longest = max(len(p.token_ids) for p in prompts)
    room = engine.max_seq_len - longest
    if room < 1:
        raise bad_request(prompt_param, f"the prompt ({longest} tokens) leaves no room to generate within "
                                        f"max_seq_len {engine.max_seq_len}")
    if max_tokens is None:
        return room
    if max_tokens > room:
        raise bad_request(param, f"{max_tokens} tokens after a {longest}-token prompt exceed this engine's "
                                 f"max_seq_len {engine.max_seq_len}: ask for at most {room}")
    return max_tokens


async def start_generation(state: ServerState, request, prompts: list[Prompt], params) -> Generation:
    """Validate the sampling parameters, submit, and wait for the first outputs (503 when the queue is full)."""
    try:
        params.validate()
    except UserError as exc:
        raise user_error(exc) from None
    gen = Generation(state, prompts, params, timeout_s=state.settings.request_timeout_s)
    request.scope.setdefault("trtlm", {})["request_id"] = gen.request_id
    try:
        await until_disconnect(request.receive, gen.start())
    except QueueFullError:
        state.metrics.error("queue_full")
        raise APIError(503, "the server's request queue is full; retry later (--max-queue-size)", code="queue_full",
                       headers={"Retry-After": str(state.settings.retry_after_s)}) from None
    except EngineDeadError as exc:
        state.metrics.error("unavailable")
        raise APIError(503, str(exc), code="unavailable",
                       headers={"Retry-After": str(state.settings.retry_after_s)}) from None
    except UserError as exc:
        raise user_error(exc) from None
    except RequestTimeout as exc:
        state.metrics.error("timeout")
        raise APIError(504, str(exc), code="timeout") from None
    return gen


def record_usage(request, gen: Generation) -> None:
    prompt, completion, cached = gen.usage_counts()
    info = request.scope.setdefault("trtlm", {})
    info.update(prompt_tokens=prompt, completion_tokens=completion, cached_tokens=cached)
    reasons = sorted({gen.finish_reason(i, c) or "none" for i in range(len(gen.prompts)) for c in gen.completions(i)})
    info["finish_reason"] = ",".join(reasons)


def internal_error(state: ServerState, exc: BaseException) -> APIError:
    """The answer to an exception no route expected: 503 when the engine died under the request
    (``/health`` says so too), else 500 for this request alone, logged with its traceback."""
    if isinstance(exc, EngineDeadError):
        state.metrics.error("unavailable")
        return APIError(503, str(exc), code="unavailable",
                        headers={"Retry-After": str(state.settings.retry_after_s)})
    state.metrics.error("internal")
    log.error("request failed: %s", "".join(traceback.format_exception(exc)).rstrip())
    return APIError(500, f"internal error: {type(exc).__name__}: {exc}", code="internal_error")


def token_text_fn(state: ServerState):
    tok = state.engine.tokenizer
    if tok is None:
        return str
    cache: dict[int, str] = {}

    def text(tid: int) -> str:
        if tid not in cache:
            cache[tid] = tok.decode([tid])
        return cache[tid]

    return text


async def drain_outputs(gen: Generation) -> None:
    """Read a generation to its end (non-streamed answers)."""
    while await gen.next() is not None:
        pass
