"""The FastAPI application of ``trtlm serve``: OpenAI and Triton routes, health, metrics, auth, limits, logs.

Every route reads its own body and validates it (:mod:`trtlm.serve.openai_protocol`,
:mod:`trtlm.serve.triton_protocol`), so a client mistake is a 400 naming the
field, in the error shape of the API it called, before anything reaches the
engine.  The pure-ASGI middleware around the app, outermost first:

* access log -- one JSON line per request (``trtlm.serve.access`` logger);
* body limit -- reads the request body up front, 400 beyond ``max_body_bytes``;
* API key   -- ``Authorization: Bearer KEY`` on every ``/v1`` and ``/v2`` path,
  compared in constant time (:func:`hmac.compare_digest`).
"""
from __future__ import annotations

import hmac
import json
import logging
import re
import time
import traceback
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from trtlm.errors import UserError
from trtlm.serve.errors import APIError, bad_request, from_validation_error
from trtlm.serve.generation import Generation, Prompt, RequestTimeout
from trtlm.serve.streaming import ClientDisconnected, EventStream, sse, until_disconnect

log = logging.getLogger("trtlm.serve")
access_log = logging.getLogger("trtlm.serve.access")

DEFAULT_MAX_BODY_BYTES = 8 * 1024 * 1024
_FIELD = re.compile(r"^([a-z_]+)=")


@dataclass
class ServeSettings:
    """What the HTTP layer needs to know (the engine's own settings live in the engine)."""

    model_name: str
    api_key: str | None = None
    request_timeout_s: float | None = None
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    shutdown_grace_s: float = 30.0
    retry_after_s: int = 1


class ServerState:
    """Everything the routes share: the engine (``None`` while loading), templates, metrics, requests."""

    def __init__(self, settings: ServeSettings):
        from trtlm.serve.metrics import Metrics

        self.settings = settings
        self.engine = None  # AsyncEngine
        self.core = None  # its Engine (tokenizer, limits)
        self.chat_template = None
        self.status = "loading"  # loading | ready | failed | draining
        self.error: str | None = None
        self.generations: dict[str, Generation] = {}
        self.created = int(time.time())
        self.metrics = Metrics(settings.model_name, self.stats)

    def stats(self):
        return self.engine.stats() if self.engine is not None else None

    def set_ready(self, async_engine, engine, chat_template) -> None:
        self.engine, self.core, self.chat_template = async_engine, engine, chat_template
        if self.status == "loading":
            self.status = "ready"

    def set_failed(self, message: str) -> None:
        self.status, self.error = "failed", message

    def problem(self) -> str | None:
        """Why the server cannot take a request now, or ``None``."""
        if self.status == "loading":
            return "the model is still loading"
        if self.status == "failed":
            return f"the engine failed to load: {self.error}"
        if self.status == "draining":
            return "the server is shutting down"
        if self.engine is not None and not getattr(self.engine, "healthy", True):
            err = getattr(self.engine, "error", None)
            return f"the engine stopped: {type(err).__name__}: {err}" if err is not None else "the engine stopped"
        return None

    def require_ready(self) -> None:
        problem = self.problem()
        if problem is not None:
            self.metrics.error("unavailable")
            raise APIError(503, problem, code="unavailable", headers={"Retry-After": str(self.settings.retry_after_s)})

    async def drain(self, grace_s: float) -> None:
        """SIGTERM: refuse new requests, let in-flight ones finish for ``grace_s``, then abort the rest
        (their clients get a final ``finish_reason: "abort"`` and a clean end of stream)."""
        import asyncio

        if self.status == "ready":
            self.status = "draining"
        deadline = time.monotonic() + grace_s
        while self.generations and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.generations:
            log.warning("shutdown grace period (%.1f s) over: aborting %d in-flight request(s)", grace_s,
                        len(self.generations))
            await asyncio.gather(*(g.abort() for g in list(self.generations.values())), return_exceptions=True)


# ----------------------------------------------------------------------------------------------- ASGI middleware
def _is_api_path(path: str) -> bool:
    return path == "/v1" or path.startswith("/v1/") or path == "/v2" or path.startswith("/v2/")


def error_response(path: str, err: APIError):
    """An error answer in the shape of the API ``path`` belongs to."""
    body = err.triton_body() if path.startswith("/v2") else err.openai_body()
    return JSONResponse(body, status_code=err.status, headers=err.headers)


class AccessLog:
    """One JSON line per request: time, client, method, path, status, duration and the request's usage."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.monotonic()
        info: dict[str, Any] = {}
        scope["trtlm"] = info
        status = [0]

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            client = scope.get("client")
            record = {"ts": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                      "client": f"{client[0]}:{client[1]}" if client else None, "method": scope.get("method"),
                      "path": scope.get("path"), "status": status[0] or None,
                      "duration_ms": round((time.monotonic() - start) * 1000, 2), **info}
            access_log.info(json.dumps(record, separators=(",", ":")))


class BodyLimit:
    """Read the whole body first (at most ``limit`` bytes; more is a 400 naming ``body``), then replay it."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        too_big = None
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            too_big = int(declared)
        chunks, size = [], 0
        if too_big is None:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > self.limit:
                    too_big = size
                    break
                chunks.append(chunk)
                if not message.get("more_body", False):
                    break
        if too_big is not None:
            err = bad_request("body", f"the request body is {'at least ' if declared is None else ''}{too_big} bytes; "
                                      f"the limit is {self.limit} (--max-body-size)")
            return await error_response(scope["path"], err)(scope, receive, send)
        body = b"".join(chunks)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


class ApiKey:
    """``Authorization: Bearer KEY`` on every ``/v1`` and ``/v2`` path; 401 otherwise."""

    def __init__(self, app, key: str, metrics):
        self.app, self.key, self.metrics = app, key.encode(), metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and _is_api_path(scope["path"]):
            auth = dict(scope.get("headers") or []).get(b"authorization", b"")
            scheme, _, token = auth.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.key):
                self.metrics.error("unauthorized")
                err = APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                               code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
                return await error_response(scope["path"], err)(scope, receive, send)
        await self.app(scope, receive, send)


# ----------------------------------------------------------------------------------------------- helpers
async def read_json(request) -> Any:
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


def _engine_errors() -> tuple[type[BaseException], type[BaseException]]:
    """(QueueFullError, EngineDeadError) of the engine (imported late: they live with torch)."""
    from trtlm.runtime.async_engine import EngineDeadError, QueueFullError

    return QueueFullError, EngineDeadError


def _field_name(param: str, index: int, count: int) -> str:
    return f"{param}[{index}]" if count > 1 else param


def tokenize_prompt(state: ServerState, prompt: str | list[int], param: str) -> Prompt:
    """Token ids of a text or token-id prompt, checked against the vocabulary and the engine's limits."""
    core = state.core
    if isinstance(prompt, str):
        if core.tokenizer is None:
            raise bad_request(param, "this model has no tokenizer: send token ids instead of text")
        ids = list(core.tokenizer.encode(prompt))
        return Prompt(ids, prompt)
    bad = next((t for t in prompt if not 0 <= t < core.vocab_size), None)
    if bad is not None:
        raise bad_request(param, f"token id {bad} is outside the vocabulary (0..{core.vocab_size - 1})")
    text = core.tokenizer.decode(list(prompt)) if core.tokenizer is not None else None
    return Prompt(list(prompt), text)


def token_budget(state: ServerState, prompts: list[Prompt], max_tokens: int | None, param: str,
                 prompt_param: str) -> int:
    """``max_tokens`` checked against the engine's lengths (``None``: all that fits)."""
    core = state.core
    for i, p in enumerate(prompts):
        name = _field_name(prompt_param, i, len(prompts))
        if not p.token_ids:
            raise bad_request(name, "the prompt is empty")
        if len(p.token_ids) > core.max_input_len:
            raise bad_request(name, f"the prompt is {len(p.token_ids)} tokens; this engine takes at most "
                                    f"{core.max_input_len} (max_input_len)")
    longest = max(len(p.token_ids) for p in prompts)
    room = core.max_seq_len - longest
    if room < 1:
        raise bad_request(prompt_param, f"the prompt ({longest} tokens) leaves no room to generate within "
                                        f"max_seq_len {core.max_seq_len}")
    if max_tokens is None:
        return room
    if max_tokens > room:
        raise bad_request(param, f"{max_tokens} tokens after a {longest}-token prompt exceed this engine's "
                                 f"max_seq_len {core.max_seq_len}: ask for at most {room}")
    return max_tokens


async def start_generation(state: ServerState, request, prompts: list[Prompt], params) -> Generation:
    """Validate the sampling parameters, submit, and wait for the first outputs (503 when the queue is full)."""
    try:
        params.validate()
    except UserError as exc:
        raise user_error(exc) from None
    gen = Generation(state, prompts, params, timeout_s=state.settings.request_timeout_s)
    request.scope.setdefault("trtlm", {})["request_id"] = gen.request_id
    queue_full, engine_dead = _engine_errors()
    try:
        await until_disconnect(request.receive, gen.start())
    except queue_full:
        state.metrics.error("queue_full")
        raise APIError(503, "the server's request queue is full; retry later (--max-queue-size)", code="queue_full",
                       headers={"Retry-After": str(state.settings.retry_after_s)}) from None
    except engine_dead as exc:
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
    state.metrics.error("internal")
    log.error("request failed: %s", "".join(traceback.format_exception(exc)).rstrip())
    return APIError(500, f"internal error: {type(exc).__name__}: {exc}", code="internal_error")


def token_text_fn(state: ServerState):
    tok = state.core.tokenizer
    if tok is None:
        return str
    cache: dict[int, str] = {}

    def text(tid: int) -> str:
        if tid not in cache:
            cache[tid] = tok.decode([tid])
        return cache[tid]

    return text


# ----------------------------------------------------------------------------------------------- the app
def create_app(state: ServerState):
    """The ASGI application (FastAPI inside the access-log / body-limit / API-key middleware)."""
    from trtlm.serve import openai_protocol as oai
    from trtlm.serve import triton_protocol as tri

    app = FastAPI(title="trtlm", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.trtlm = state
    settings = state.settings

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        if exc.status == 400:
            state.metrics.error("bad_request")
        request.scope.setdefault("trtlm", {})["error"] = exc.message[:200]
        return error_response(request.url.path, exc)

    @app.exception_handler(404)
    async def _not_found(request: Request, exc):
        return error_response(request.url.path, APIError(404, f"no route {request.method} {request.url.path}"))

    @app.exception_handler(405)
    async def _bad_method(request: Request, exc):
        return error_response(request.url.path, APIError(405, f"{request.method} is not allowed on "
                                                              f"{request.url.path}"))

    def check_model(name: str | None, param: str = "model") -> None:
        if name is not None and name != settings.model_name:
            raise APIError(404, f"model {name!r} does not exist; this server serves {settings.model_name!r}",
                           param=param, code="model_not_found")

    # -- operations ------------------------------------------------------------------------------------
    @app.get("/health")
    async def health():
        problem = state.problem()
        if problem is None:
            return {"status": "ok"}
        return JSONResponse({"status": state.status if state.status != "ready" else "failed", "detail": problem},
                            status_code=503)

    @app.get("/metrics")
    async def metrics():
        body, content_type = state.metrics.render()
        return Response(body, media_type=content_type)

    # -- OpenAI ----------------------------------------------------------------------------------------
    @app.get("/v1/models")
    async def models():
        card = {"id": settings.model_name, "object": "model", "created": state.created, "owned_by": "trtlm"}
        if state.core is not None:
            card["max_model_len"] = state.core.max_seq_len
        return {"object": "list", "data": [card]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = validate(oai.CompletionRequest, await read_json(request))
        state.require_ready()
        check_model(req.model)
        prompts = [tokenize_prompt(state, p, _field_name("prompt", i, len(req.prompt)))
                   for i, p in enumerate(req.prompt)]
        max_tokens = token_budget(state, prompts, req.max_tokens, "max_tokens", "prompt")
        params = oai.sampling_params(req, max_tokens, req.logprobs)
        gen = await start_generation(state, request, prompts, params)
        if req.stream:
            return EventStream(_completion_stream(state, request, gen, req),
                               on_disconnect=lambda: state.metrics.error("disconnect"))
        try:
            await until_disconnect(request.receive, _drain(gen))
        finally:
            await gen.close()
        gen.e2e_done()
        record_usage(request, gen)
        token_text = token_text_fn(state)
        choices = []
        for i, prompt in enumerate(gen.prompts):
            for c in gen.completions(i):
                text = (prompt.text or "") + c.text if req.echo else c.text
                choice = {"index": i * req.n + c.index, "text": text, "logprobs": None,
                          "finish_reason": gen.finish_reason(i, c), "stop_reason": c.stop_reason}
                if req.logprobs is not None and c.logprobs is not None:
                    choice["logprobs"] = oai.completion_logprobs(token_text, c.token_ids, c.logprobs, 0)
                choices.append(choice)
        return {"id": f"cmpl-{gen.request_id}", "object": "text_completion", "created": int(time.time()),
                "model": settings.model_name, "choices": choices, "usage": oai.usage(*gen.usage_counts())}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        from trtlm.serve.chat_template import ChatTemplateError, encode_rendered

        req = validate(oai.ChatCompletionRequest, await read_json(request))
        state.require_ready()
        check_model(req.model)
        if state.chat_template is None:
            raise APIError(400, "this model has no chat template (no chat_template in its tokenizer_config.json, "
                                "no chat_template.jinja): use /v1/completions, or start trtlm serve with "
                                "--chat-template FILE", param="messages", code="chat_template_missing")
        if state.core.tokenizer is None:
            raise APIError(400, "this model has no tokenizer, which chat needs: use /v1/completions with token "
                                "ids", param="messages")
        messages = [m.model_dump(exclude_none=False) for m in req.messages]
        kwargs = dict(req.chat_template_kwargs or {})
        if req.tools:
            kwargs["tools"] = req.tools
        try:
            text = state.chat_template.render(messages, add_generation_prompt=req.add_generation_prompt, **kwargs)
        except ChatTemplateError as exc:
            raise bad_request("messages", f"the chat template rejected them: {exc}") from None
        if req.continue_final_message:
            final = messages[-1].get("content") or ""
            cut = text.rfind(final) if final else -1
            if cut >= 0:
                text = text[:cut + len(final)]
        prompt = Prompt(encode_rendered(state.core.tokenizer, text), text)
        max_tokens = token_budget(state, [prompt], req.token_limit(),
                                  "max_completion_tokens" if req.max_completion_tokens else "max_tokens", "messages")
        params = oai.sampling_params(req, max_tokens, req.num_logprobs())
        echo = ""
        if req.echo and messages[-1].get("role") == "assistant":
            echo = messages[-1].get("content") or ""
        gen = await start_generation(state, request, [prompt], params)
        if req.stream:
            return EventStream(_chat_stream(state, request, gen, req, echo),
                               on_disconnect=lambda: state.metrics.error("disconnect"))
        try:
            await until_disconnect(request.receive, _drain(gen))
        finally:
            await gen.close()
        gen.e2e_done()
        record_usage(request, gen)
        token_text = token_text_fn(state)
        choices = []
        for c in gen.completions(0):
            choice = {"index": c.index, "message": {"role": "assistant", "content": echo + c.text},
                      "logprobs": None, "finish_reason": gen.finish_reason(0, c), "stop_reason": c.stop_reason}
            if req.logprobs and c.logprobs is not None:
                choice["logprobs"] = oai.chat_logprobs(token_text, c.token_ids, c.logprobs, req.top_logprobs or 0)
            choices.append(choice)
        return {"id": f"chatcmpl-{gen.request_id}", "object": "chat.completion", "created": int(time.time()),
                "model": settings.model_name, "choices": choices, "usage": oai.usage(*gen.usage_counts())}

    # -- Triton ----------------------------------------------------------------------------------------
    def triton_model(model: str) -> None:
        if model != settings.model_name and model not in tri.TRITON_ALIASES:
            raise APIError(404, f"unknown model {model!r}; this server serves {settings.model_name!r} "
                                f"(also as {', '.join(tri.TRITON_ALIASES)})")

    async def triton_generate(request: Request, model: str, stream: bool):
        triton_model(model)
        req = tri.parse(await read_json(request))
        state.require_ready()
        if stream:
            req.stream = True
        if state.core.tokenizer is None:
            raise bad_request("text_input", "this model has no tokenizer, which text_input needs")
        prompt = tokenize_prompt(state, req.text_input, "text_input")
        req.max_tokens = token_budget(state, [prompt], req.max_tokens, "max_tokens", "text_input")
        params = tri.sampling_params(req, state.core.tokenizer, state.core.vocab_size)
        gen = await start_generation(state, request, [prompt], params)
        if req.stream:
            return EventStream(_triton_stream(state, request, gen, req, model),
                               on_disconnect=lambda: state.metrics.error("disconnect"))
        try:
            await until_disconnect(request.receive, _drain(gen))
        finally:
            await gen.close()
        gen.e2e_done()
        record_usage(request, gen)
        c = gen.completions(0)[0]
        text = c.text if req.exclude_input_in_output else req.text_input + c.text
        out = tri.response(model, text, req, c)
        out["finish_reason"] = gen.finish_reason(0, c)
        return out

    for prefix in ("/v2/models/{model}", "/v2/models/{model}/versions/{version}"):
        async def generate(request: Request, model: str):
            return await triton_generate(request, model, stream=False)

        async def generate_stream(request: Request, model: str):
            return await triton_generate(request, model, stream=True)

        async def model_ready(model: str):
            ok = state.problem() is None and (model == settings.model_name or model in tri.TRITON_ALIASES)
            return Response(status_code=200 if ok else 400)

        app.add_api_route(prefix + "/generate", generate, methods=["POST"])
        app.add_api_route(prefix + "/generate_stream", generate_stream, methods=["POST"])
        app.add_api_route(prefix + "/ready", model_ready, methods=["GET"])

    @app.get("/v2/health/live")
    async def live():
        return Response(status_code=200)

    @app.get("/v2/health/ready")
    async def ready():
        return Response(status_code=200 if state.problem() is None else 400)

    @app.exception_handler(ClientDisconnected)
    async def _gone(request: Request, exc: ClientDisconnected):
        state.metrics.error("disconnect")
        request.scope.setdefault("trtlm", {})["error"] = "client disconnected"
        return Response(status_code=499)  # nginx's "client closed request"; nobody reads it

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        return error_response(request.url.path, internal_error(state, exc))

    asgi = ApiKey(app, settings.api_key, state.metrics) if settings.api_key else app
    return AccessLog(BodyLimit(asgi, settings.max_body_bytes))


# ----------------------------------------------------------------------------------------------- responses
async def _drain(gen: Generation) -> None:
    while await gen.next() is not None:
        pass


async def _stream_events(state: ServerState, request, gen: Generation, emit, finish, error_event):
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


async def _completion_stream(state: ServerState, request, gen: Generation, req):
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

    async for event in _stream_events(state, request, gen, emit, finish, error_event):
        yield event


async def _chat_stream(state: ServerState, request, gen: Generation, req, echo: str):
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
    async for event in _stream_events(state, request, gen, emit, finish, error_event):
        yield event


async def _triton_stream(state: ServerState, request, gen: Generation, req, model: str):
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
                                                                   c.logprobs[-n_new:] if n_new else [])]
        yield sse(event)

    def finish():
        c = gen.completions(0)[0] if gen.completions(0) else None
        if c is None or c.finish_reason is None:  # cut off by an abort
            event = tri.response(model, "", req, c)
            event["finish_reason"] = "abort"
            yield sse(event)

    def error_event(err: APIError):
        return sse(err.triton_body())

    async for event in _stream_events(state, request, gen, emit, finish, error_event):
        yield event

