"""The server-sent event streams of the OpenAI completions, chat and Triton generate_stream routes.

Each is a generator of ``data:`` events over a :class:`~trtlm.serve.generation.Generation`; they
share :func:`stream_events`, which ends every stream cleanly -- a final ``finish_reason`` for choices
an abort cut off, the usage chunk when asked for, ``[DONE]`` -- or with one error event when the
request timed out or failed, and always closes the generation (aborting what is unfinished).
"""
from __future__ import annotations

import time

from trtlm.errors import UserError
from trtlm.serve.errors import APIError
from trtlm.serve.generation import Generation, RequestTimeout
from trtlm.serve.handling import internal_error, record_usage, token_text_fn, user_error
from trtlm.serve.state import ServerState
from trtlm.serve.streaming import sse


async def stream_events(state: ServerState, request, gen: Generation, emit, finish, error_event):
    """Shared SSE loop: ``emit(idx, out)`` -> events per output; ``finish()`` -> closing events."""
    try:
        while (item := await gen.next()) is not None:
            for event in emit(*item):
                yield event
        gen.e2e_done()
        record_usage(request, gen)
        for event in finish():
            yield event
    except RequestTimeout as exc:
        state.metrics.error("timeout")
        yield error_event(APIError(504, str(exc), code="timeout"))
    except UserError as exc:
        yield error_event(user_error(exc))
    except Exception as exc:  # noqa: BLE001 - one request fails, the stream still ends cleanly
        yield error_event(internal_error(state, exc))
    finally:
        await gen.close()


async def completion_stream(state: ServerState, request, gen: Generation, req):
    from trtlm.serve import openai_protocol as oai

    created, rid = int(time.time()), f"cmpl-{gen.request_id}"
    token_text = token_text_fn(state)
    sent_finish: set[int] = set()
    started: set[int] = set()
    offsets: dict[int, int] = {}
    logprob_counts: dict[int, int] = {}

    def chunk(choices, usage=None):
        return sse({"id": rid, "object": "text_completion", "created": created, "model": state.settings.model_name,
                    "choices": choices, "usage": usage})

    def emit(idx, out):
        choices = []
        for c in out.outputs:
            index = idx * req.n + c.index
            if index in sent_finish:
                continue
            text = c.new_text
            if req.echo and index not in started:
                text = (gen.prompts[idx].text or "") + text
            started.add(index)
            reason = gen.finish_reason(idx, c) if out.finished or c.finish_reason else None
            lp = None
            if req.logprobs is not None and c.logprobs is not None:
                done = logprob_counts.get(index, 0)
                lp = oai.completion_logprobs(token_text, c.token_ids[done:], c.logprobs[done:], offsets.get(index, 0))
                logprob_counts[index] = len(c.logprobs)
                offsets[index] = offsets.get(index, 0) + sum(len(t) for t in lp["tokens"])
            if not text and reason is None and not (lp and lp["tokens"]):
                continue
            if reason is not None:
                sent_finish.add(index)
            choices.append({"index": index, "text": text, "logprobs": lp, "finish_reason": reason,
                            "stop_reason": c.stop_reason if reason else None})
        if choices:
            yield chunk(choices)

    def finish():
        closing = []
        for idx in range(len(gen.prompts)):  # choices cut off by an abort still get their finish_reason
            for i in range(req.n):
                if idx * req.n + i not in sent_finish:
                    closing.append({"index": idx * req.n + i, "text": "", "logprobs": None,
                                    "finish_reason": "abort", "stop_reason": None})
        if closing:
            yield chunk(closing)
        if req.stream_options is not None and req.stream_options.include_usage:
            yield chunk([], oai.usage(*gen.usage_counts()))
        yield sse("[DONE]")

    def error_event(err: APIError):
        return sse(err.openai_body()) + sse("[DONE]")

    async for event in stream_events(state, request, gen, emit, finish, error_event):
        yield event


async def chat_stream(state: ServerState, request, gen: Generation, req, echo: str):
    from trtlm.serve import openai_protocol as oai

    created, rid = int(time.time()), f"chatcmpl-{gen.request_id}"
    token_text = token_text_fn(state)
    sent_finish: set[int] = set()
    logprob_counts: dict[int, int] = {}

    def chunk(choices, usage=None):
        return sse({"id": rid, "object": "chat.completion.chunk", "created": created,
                    "model": state.settings.model_name, "choices": choices, "usage": usage})

    def emit(idx, out):
        choices = []
        for c in out.outputs:
            if c.index in sent_finish:
                continue
            reason = gen.finish_reason(idx, c) if out.finished or c.finish_reason else None
            lp = None
            if req.logprobs and c.logprobs is not None:
                done = logprob_counts.get(c.index, 0)
                lp = oai.chat_logprobs(token_text, c.token_ids[done:], c.logprobs[done:], req.top_logprobs or 0)
                logprob_counts[c.index] = len(c.logprobs)
            if not c.new_text and reason is None and not (lp and lp["content"]):
                continue
            delta = {"content": c.new_text} if c.new_text else {}
            if reason is not None:
                sent_finish.add(c.index)
            choices.append({"index": c.index, "delta": delta, "logprobs": lp, "finish_reason": reason})
        if choices:
            yield chunk(choices)

    def finish():
        closing = [{"index": i, "delta": {}, "logprobs": None, "finish_reason": "abort"}
                   for i in range(req.n) if i not in sent_finish]
        if closing:
            yield chunk(closing)
        if req.stream_options is not None and req.stream_options.include_usage:
            yield chunk([], oai.usage(*gen.usage_counts()))
        yield sse("[DONE]")

    def error_event(err: APIError):
        return sse(err.openai_body()) + sse("[DONE]")

    # The role comes first, once per choice, as OpenAI sends it.
    yield chunk([{"index": i, "delta": {"role": "assistant", "content": echo}, "logprobs": None,
                  "finish_reason": None} for i in range(req.n)])
    async for event in stream_events(state, request, gen, emit, finish, error_event):
        yield event


async def triton_stream(state: ServerState, request, gen: Generation, req, model: str):
    from trtlm.serve import triton_protocol as tri

    def emit(idx, out):  # streamed outputs carry only the new text, as tensorrtllm_backend streams it
        c = out.outputs[0]
        text = c.new_text
        if not text and not out.finished:
            return
        event = tri.response(model, text, req, c, final=out.finished)
        if req.return_log_probs and c.logprobs is not None:
            n_new = len(c.new_token_ids)
            event["output_log_probs"] = [e.get(t) for t, e in zip(c.token_ids[-n_new:] if n_new else [],
                                                                   c.logprobs[-n_new:] if n_new else [], strict=False)]
        yield sse(event)

    def finish():
        c = gen.completions(0)[0] if gen.completions(0) else None
        if c is None or c.finish_reason is None:  # cut off by an abort
            event = tri.response(model, "", req, c)
            event["finish_reason"] = "abort"
            yield sse(event)

    def error_event(err: APIError):
        return sse(err.triton_body())

    async for event in stream_events(state, request, gen, emit, finish, error_event):
        yield event
