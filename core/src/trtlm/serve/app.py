"""The FastAPI application of ``trtlm serve``: OpenAI and Triton routes, health and metrics.

Every route reads its own body and validates it (:mod:`trtlm.serve.openai_protocol`,
:mod:`trtlm.serve.triton_protocol`, :mod:`trtlm.serve.handling`), so a client mistake
is a 400 naming the field, in the error shape of the API it called, before anything
reaches the engine.  :func:`create_app` wraps the app in the middleware of
:mod:`trtlm.serve.middleware` (access log, body limit, API key).
"""
from __future__ import annotations

import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from trtlm.serve.engine_client import EngineDeadError
from trtlm.serve.errors import APIError, bad_request
from trtlm.serve.generation import Prompt
from trtlm.serve.handling import (
    drain_outputs,
    field_name,
    internal_error,
    off_loop,
    read_json,
    record_usage,
    start_generation,
    token_budget,
    token_text_fn,
    tokenize_prompt,
    validate,
)
from trtlm.serve.middleware import AccessLog, ApiKey, BodyLimit, error_response
from trtlm.serve.state import ServerState
from trtlm.serve.streaming import ClientDisconnected, EventStream, until_disconnect
from trtlm.serve.streams import chat_stream, completion_stream, triton_stream


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
        if state.engine is not None:
            card["max_model_len"] = state.engine.max_seq_len
        return {"object": "list", "data": [card]}

    async def run_to_end(request: Request, gen) -> None:
        """A request answered in one response: wait for all its outputs (aborted if the client
        leaves first), then record its end-to-end latency and token usage."""
        try:
            await until_disconnect(request.receive, drain_outputs(gen))
        except Exception as exc:
            if isinstance(exc, EngineDeadError):  # a 503 naming the cause, not a logged traceback
                raise internal_error(state, exc) from None
            raise
        finally:
            await gen.close()
        gen.e2e_done()
        record_usage(request, gen)

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = validate(oai.CompletionRequest, await read_json(request))
        state.require_ready()
        check_model(req.model)
        prompts = [await tokenize_prompt(state, p, field_name("prompt", i, len(req.prompt)), echo=req.echo)
                   for i, p in enumerate(req.prompt)]
        max_tokens = token_budget(state, prompts, req.max_tokens, "max_tokens", "prompt")
        params = oai.sampling_params(req, max_tokens, req.logprobs)
        gen = await start_generation(state, request, prompts, params)
        if req.stream:
            return EventStream(completion_stream(state, request, gen, req),
                               on_disconnect=lambda: state.metrics.error("disconnect"))
        await run_to_end(request, gen)
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
        if state.engine.tokenizer is None:
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
        prompt = Prompt(await off_loop(lambda t: encode_rendered(state.engine.tokenizer, t), text), text)
        max_tokens = token_budget(state, [prompt], req.token_limit(),
                                  "max_completion_tokens" if req.max_completion_tokens else "max_tokens", "messages")
        params = oai.sampling_params(req, max_tokens, req.num_logprobs())
        echo = ""
        if req.echo and messages[-1].get("role") == "assistant":
            echo = messages[-1].get("content") or ""
        gen = await start_generation(state, request, [prompt], params)
        if req.stream:
            return EventStream(chat_stream(state, request, gen, req, echo),
                               on_disconnect=lambda: state.metrics.error("disconnect"))
        await run_to_end(request, gen)
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
        if state.engine.tokenizer is None:
            raise bad_request("text_input", "this model has no tokenizer, which text_input needs")
        prompt = await tokenize_prompt(state, req.text_input, "text_input")
        req.max_tokens = token_budget(state, [prompt], req.max_tokens, "max_tokens", "text_input")
        params = tri.sampling_params(req, state.engine.tokenizer, state.engine.vocab_size)
        gen = await start_generation(state, request, [prompt], params)
        if req.stream:
            return EventStream(triton_stream(state, request, gen, req, model),
                               on_disconnect=lambda: state.metrics.error("disconnect"))
        await run_to_end(request, gen)
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
