"""``trtlm serve`` end to end: real servers (``python -m trtlm.cli serve`` in a subprocess) on a free
port, real HTTP over a socket, the real ``openai`` client and raw SSE, on the bundled tiny model.

Two servers per module run:

* ``server`` (API key, chat template added to a copy of the tiny model, batch 64) for the API,
  concurrency, disconnect, bad-input and auth tests;
* a small one per test in :func:`test_backpressure_timeout_and_sigterm` (batch 2, queue 2, the
  model's own files without a chat template) that is filled, timed out and then SIGTERM'd.

Every server a test starts is stopped in a ``finally`` (SIGTERM, then SIGKILL after a timeout).
Greedy outputs are compared for equality with ``trtlm run``: the tiny model is float32 and its
greedy choices have clear margins, so batching differences in summation order do not flip them.
"""
from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="trtlm[serve] is not installed")
pytest.importorskip("uvicorn", reason="trtlm[serve] is not installed")
pytest.importorskip("prometheus_client", reason="trtlm[serve] is not installed")
openai = pytest.importorskip("openai", reason="the openai client is not installed (trtlm[test])")
httpx = pytest.importorskip("httpx", reason="httpx is not installed (trtlm[test])")

from conftest import run_cli  # noqa: E402

TINY = Path(__file__).resolve().parent.parent / "core" / "src" / "trtlm" / "data" / "tiny-mistral"
API_KEY = "sk-test-7f3c"
MODEL = "tiny"
#: A Mistral-style template (with raise_exception, as real templates use it).
TEMPLATE = ("{{ bos_token }}{% for message in messages %}"
            "{% if message['role'] == 'system' %}{{ message['content'] + '\\n\\n' }}"
            "{% elif message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
            "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
            "{% else %}{{ raise_exception('Only system, user and assistant roles are supported!') }}"
            "{% endif %}{% endfor %}")
PROMPTS = ["def fibonacci(n):", "import os\n", "class Stack:", "    for line in f"]


# ----------------------------------------------------------------------------------------------- servers
class Server:
    """A ``trtlm serve`` subprocess; ``url`` once it printed ``ready at``."""

    def __init__(self, args: list[str], log_dir: Path, env: dict[str, str] | None = None):
        self.log = open(log_dir / f"serve-{time.monotonic_ns()}.log", "w+")
        self.proc = subprocess.Popen([sys.executable, "-m", "trtlm.cli", "serve", "--port", "0", *map(str, args)],
                                     stdout=subprocess.PIPE, stderr=self.log, text=True,
                                     env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
        self.url = None
        self.loading_health = None
        self.lines: list[str] = []
        deadline = time.monotonic() + 120
        while self.url is None:
            line = self.proc.stdout.readline()
            if not line:
                raise AssertionError(f"trtlm serve exited ({self.proc.wait()}): {self.stderr()}")
            self.lines.append(line)
            if (m := re.search(r"listening on (http://\S+)", line)) and self.loading_health is None:
                r = httpx.get(m.group(1) + "/health")  # the engine is still loading (importing torch alone takes >1 s)
                self.loading_health = (r.status_code, r.json())
            if m := re.search(r"ready at (http://\S+)", line):
                self.url = m.group(1)
            if time.monotonic() > deadline:
                raise AssertionError("trtlm serve did not become ready in 120 s")
        threading.Thread(target=self._drain_stdout, daemon=True).start()

    def _drain_stdout(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)

    def stderr(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def stop(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode


def metric(text: str, name: str, **labels: str) -> float:
    """The value of ``name`` (with at least ``labels``) in a Prometheus text page; 0 when absent."""
    for m in re.finditer(rf"^{re.escape(name)}\{{([^}}]*)\}} ([0-9.e+-]+)$", text, re.M):
        have = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
        if all(have.get(k) == v for k, v in labels.items()):
            return float(m.group(2))
    return 0.0


def wait_until(condition, what: str, timeout: float = 10) -> None:
    """Poll ``condition`` until it holds; fail naming ``what`` (and the last value) after ``timeout``
    seconds.  Servers act a moment after a client sees its answer; how long that moment lasts depends on
    the machine's load, so tests wait for the effect rather than sleeping a fixed time."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, f"{what} (after {timeout} s: {value!r})"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory) -> Path:
    """The tiny model with a chat template in its tokenizer_config.json."""
    out = tmp_path_factory.mktemp("tiny-chat") / "model"
    shutil.copytree(TINY, out)
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    cfg["chat_template"] = TEMPLATE
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))
    return out


def build_engine(model_dir: Path, out: Path) -> Path:
    for argv in (("convert", "--model-dir", model_dir, "--output-dir", out / "ckpt"),
                 ("build", "--checkpoint-dir", out / "ckpt", "--output-dir", out / "engine")):
        r = run_cli(*argv)
        assert r.exit_code == 0, r.stderr
    return out / "engine"


@pytest.fixture(scope="module")
def engine_dir(chat_model, tmp_path_factory) -> Path:
    return build_engine(chat_model, tmp_path_factory.mktemp("serve-engine"))


@pytest.fixture(scope="module")
def server(engine_dir, tmp_path_factory):
    s = Server(["--engine-dir", engine_dir, "--served-model-name", MODEL, "--api-key", API_KEY,
                "--max-batch-size", 64, "--max-queue-size", 512], tmp_path_factory.mktemp("logs"))
    try:
        yield s
    finally:
        code = s.stop()
        assert code == 0, s.stderr()[-3000:]


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)


def auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {API_KEY}"}


_RUN_CACHE: dict = {}


def trtlm_run(engine: Path, prompt: str | list[int], max_tokens: int) -> dict:
    """``trtlm run --json`` (greedy) for one prompt: {"text", "output_ids", ...}."""
    key = (str(engine), str(prompt), max_tokens)
    if key not in _RUN_CACHE:
        src = ("--input-ids", ",".join(map(str, prompt))) if isinstance(prompt, list) else ("--input-text", prompt)
        r = run_cli("run", "--engine-dir", engine, *src, "--max-output-len", max_tokens, "--json")
        assert r.exit_code == 0, r.stderr
        out = json.loads(r.stdout)["outputs"][0]
        if out.get("text") is None:  # token ids in, token ids out: decode with the engine's tokenizer
            from trtlm.runtime.tokenizer import load_tokenizer

            out["text"] = load_tokenizer(engine).decode(out["output_ids"])
        _RUN_CACHE[key] = out
    return _RUN_CACHE[key]


def sse_events(lines) -> list:
    """Parse ``data:`` lines of an SSE body; ``[DONE]`` kept as the string."""
    events = []
    for line in lines:
        if line.startswith("data: "):
            payload = line[len("data: "):]
            events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


# ----------------------------------------------------------------------------------------------- OpenAI API
def test_completions_equal_trtlm_run(server, client, engine_dir):
    for prompt in PROMPTS[:2]:
        ref = trtlm_run(engine_dir, prompt, 24)
        r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0)
        assert r.choices[0].text == ref["text"]
        assert r.choices[0].finish_reason == ref["finish_reason"]
        assert r.usage.completion_tokens == len(ref["output_ids"])
        assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
        # Streamed through the openai client: same text, usage in a final chunk with no choices.
        chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0,
                                                stream=True, stream_options={"include_usage": True}))
        assert "".join(c.choices[0].text for c in chunks if c.choices) == ref["text"]
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(ref["output_ids"])
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == ref["finish_reason"]
    # A 40-token prompt twice: the second time its full KV blocks come from the prefix cache.
    long_prompt = list(range(600, 640))
    first = client.completions.create(model=MODEL, prompt=long_prompt, max_tokens=4, temperature=0)
    again = client.completions.create(model=MODEL, prompt=long_prompt, max_tokens=4, temperature=0)
    assert again.choices[0].text == first.choices[0].text
    assert again.usage.prompt_tokens == 40 and again.usage.prompt_tokens_details.cached_tokens >= 16
    # Token-id prompts, raw SSE framing: `data: {...}\n\n` ... `data: [DONE]\n\n`.
    ids = trtlm_run(engine_dir, PROMPTS[2], 4)["output_ids"]
    body = {"model": MODEL, "prompt": ids, "max_tokens": 16, "temperature": 0, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, headers=auth(), timeout=60) as resp:
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        raw = resp.read().decode()
    assert raw.endswith("data: [DONE]\n\n") and all(b.startswith("data: ") for b in raw.split("\n\n") if b)
    events = sse_events(raw.split("\n\n"))
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == trtlm_run(engine_dir, ids, 16)["text"]


def test_chat_applies_the_template_as_transformers_does(server, client, engine_dir, chat_model):
    from transformers import AutoTokenizer

    messages = [{"role": "system", "content": "You write Python."},
                {"role": "user", "content": "def add(a, b):"}]
    ids = AutoTokenizer.from_pretrained(chat_model).apply_chat_template(messages, add_generation_prompt=True,
                                                                        tokenize=True, return_dict=False)
    ref = trtlm_run(engine_dir, list(ids), 20)
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20, temperature=0)
    assert r.usage.prompt_tokens == len(ids)
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == ref["text"]
    assert r.choices[0].finish_reason == ref["finish_reason"]
    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ref["text"]
    assert chunks[-1].usage.prompt_tokens == len(ids)
    # A role the template rejects (raise_exception) is the client's mistake: 400 naming messages.
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model=MODEL, messages=[{"role": "tool", "content": "x"}], max_tokens=4)
    assert exc.value.body["param"] == "messages" and "Only system, user and assistant" in exc.value.body["message"]


def test_sampling_fields(server, client, engine_dir):
    prompt = PROMPTS[0]
    ref = trtlm_run(engine_dir, prompt, 24)
    # n, seed: sampled completions are reproducible for a seed, and there are n of them.
    a = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=1.0, top_p=0.9, n=3,
                                  seed=7, extra_body={"top_k": 50})
    b = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=1.0, top_p=0.9, n=3,
                                  seed=7, extra_body={"top_k": 50})
    assert sorted(c.index for c in a.choices) == [0, 1, 2]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert len({c.text for c in a.choices}) > 1, "n=3 sampled completions were all the same"
    # A list of prompts: one choice per prompt, in order.
    many = client.completions.create(model=MODEL, prompt=PROMPTS[:2], max_tokens=24, temperature=0)
    assert [c.text for c in sorted(many.choices, key=lambda c: c.index)] == \
        [trtlm_run(engine_dir, p, 24)["text"] for p in PROMPTS[:2]]
    # echo, stop strings, logprobs.
    echo = client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0, echo=True)
    assert echo.choices[0].text == prompt + ref["text"]
    word = ref["text"].strip().split()[1]
    stopped = client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0, stop=[word])
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].text == ref["text"][:ref["text"].index(word)]
    lp = client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0, logprobs=2)
    info = lp.choices[0].logprobs
    assert len(info.tokens) == len(info.token_logprobs) == 6 and all(x <= 0 for x in info.token_logprobs)
    assert "".join(info.tokens) == lp.choices[0].text
    # Greedy: the chosen token is the most likely of the top alternatives.
    pairs = zip(info.top_logprobs, info.token_logprobs, strict=True)
    assert all(max(top.values()) == pytest.approx(chosen, abs=1e-6) for top, chosen in pairs)
    chat_lp = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                             temperature=0, logprobs=True, top_logprobs=2)
    assert len(chat_lp.choices[0].logprobs.content) == 4
    assert len(chat_lp.choices[0].logprobs.content[0].top_logprobs) == 2
    # stop_token_ids: the first generated id stops it at once; ignore_eos + min_tokens run to the length.
    first = ref["output_ids"][0]
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0,
                                  extra_body={"stop_token_ids": [first]})
    assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens == 1
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=30, temperature=0,
                                  extra_body={"ignore_eos": True, "min_tokens": 30})
    assert r.usage.completion_tokens == 30 and r.choices[0].finish_reason == "length"
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]


def test_triton_generate(server, engine_dir):
    ref = trtlm_run(engine_dir, PROMPTS[1], 16)
    url = server.url + "/v2/models/ensemble"
    r = httpx.post(url + "/generate", json={"text_input": PROMPTS[1], "max_tokens": 16, "bad_words": "",
                                            "stop_words": "", "temperature": 0.0, "top_k": 1}, headers=auth())
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["model_name"] == "ensemble" and out["model_version"] == "1"
    assert out["text_output"] == PROMPTS[1] + ref["text"]  # the ensemble echoes the prompt by default
    r = httpx.post(server.url + f"/v2/models/{MODEL}/generate", headers=auth(),
                   json={"text_input": PROMPTS[1], "parameters": {"max_tokens": 16, "exclude_input_in_output": True,
                                                                  "return_log_probs": True}})
    assert r.json()["text_output"] == ref["text"] and len(r.json()["output_log_probs"]) == 16
    with httpx.stream("POST", url + "/generate_stream", headers=auth(), timeout=60,
                      json={"text_input": PROMPTS[1], "max_tokens": 16, "stream": True}) as resp:
        events = sse_events(resp.iter_lines())
    assert "".join(e["text_output"] for e in events) == ref["text"]
    assert events[-1]["finish_reason"] == ref["finish_reason"]
    for path, code in (("/v2/health/live", 200), ("/v2/health/ready", 200), ("/v2/models/ensemble/ready", 200),
                       (f"/v2/models/{MODEL}/ready", 200), ("/v2/models/nope/ready", 400)):
        assert httpx.get(server.url + path, headers=auth()).status_code == code, path
    r = httpx.post(server.url + "/v2/models/nope/generate", json={"text_input": "x", "max_tokens": 2}, headers=auth())
    assert r.status_code == 404 and "nope" in r.json()["error"]


# ----------------------------------------------------------------------------------------------- load
def test_64_concurrent_streams_get_what_each_gets_alone(server, engine_dir):
    ids = trtlm_run(engine_dir, PROMPTS[0], 40)["output_ids"]
    # 64 different prompts (token ids) and lengths; each alone first, one request at a time.
    jobs = [(ids[: 4 + i % 24] + [100 + i], 6 + (i * 7) % 30) for i in range(64)]
    alone = []
    with httpx.Client(base_url=server.url, headers=auth(), timeout=60) as h:
        for prompt, n in jobs:
            r = h.post("/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": n, "temperature": 0})
            alone.append(r.json()["choices"][0]["text"])

    running_seen = []

    async def main():
        aclient = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)
        stop = asyncio.Event()

        async def watch():
            async with httpx.AsyncClient() as h:
                while not stop.is_set():
                    running_seen.append(metric((await h.get(server.url + "/metrics")).text,
                                               "trtlm:num_requests_running"))
                    await asyncio.sleep(0.02)

        async def one(prompt, n):
            text = ""
            async for chunk in await aclient.completions.create(model=MODEL, prompt=prompt, max_tokens=n,
                                                                temperature=0, stream=True):
                text += chunk.choices[0].text
            return text

        watcher = asyncio.ensure_future(watch())
        try:
            return await asyncio.gather(*(one(p, n) for p, n in jobs))
        finally:
            stop.set()
            await watcher
            await aclient.close()

    together = asyncio.run(main())
    assert together == alone
    assert max(running_seen) > 1, "the engine never batched two requests"


def test_disconnects_free_the_kv_cache(server):
    async def one(i):
        body = {"model": MODEL, "prompt": [300 + i, 40, 41, 42], "max_tokens": 500, "temperature": 0,
                "ignore_eos": True, "stream": True}
        async with httpx.AsyncClient(headers=auth(), timeout=60) as h:
            async with h.stream("POST", server.url + "/v1/completions", json=body) as resp:
                assert resp.status_code == 200
                got = 0
                async for line in resp.aiter_lines():
                    got += line.startswith("data: ")
                    if got >= 3:
                        break  # leaving the block closes the connection mid-stream

    async def gone(i):  # non-streamed: the client gives up (read timeout) while the server generates
        async with httpx.AsyncClient(headers=auth(), timeout=0.3) as h:
            with pytest.raises(httpx.ReadTimeout):
                await h.post(server.url + "/v1/completions", json={"model": MODEL, "prompt": [500 + i, 9],
                                                                   "max_tokens": 500, "ignore_eos": True})

    async def main():
        await asyncio.gather(*(one(i) for i in range(20)), *(gone(i) for i in range(4)))

    before = metric(httpx.get(server.url + "/metrics").text, "trtlm:generation_tokens_total")
    asyncio.run(main())
    def idle() -> bool:
        nonlocal text
        text = httpx.get(server.url + "/metrics").text
        return not any(metric(text, m) for m in ("trtlm:kv_cache_blocks_used", "trtlm:num_requests_running",
                                                 "trtlm:num_requests_waiting"))

    text = ""
    wait_until(idle, "requests of disconnected clients kept running")
    # 20 x 500 tokens were asked for; aborted after 3 chunks, they generated a few steps' worth each
    # (the engine keeps stepping between a disconnect and its abort: allow 20 steps per client).
    generated = metric(text, "trtlm:generation_tokens_total")
    assert generated - before <= 20 * (3 + 20) + 4 * 200, generated - before
    r = httpx.post(server.url + "/v1/completions", headers=auth(),
                   json={"model": MODEL, "prompt": "x = ", "max_tokens": 4, "temperature": 0})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
    assert metric(httpx.get(server.url + "/metrics").text, "trtlm:generation_tokens_total") - generated <= 4
    assert metric(text, "trtlm:request_errors_total", kind="disconnect") >= 20


# ----------------------------------------------------------------------------------------------- faults
BAD = [
    # (path, body, field named in the error)
    ("/v1/completions", b"{not json", "body"),
    ("/v1/completions", b"[1, 2]", "body"),
    ("/v1/completions", {"model": MODEL}, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": 5}, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": []}, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": [1, 999999]}, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": [5] * 5000}, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 0}, "max_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": -3}, "max_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": "ten"}, "max_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 100000}, "max_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "temperature": -1}, "temperature"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "top_p": 0}, "top_p"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "n": 0}, "n"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "logprobs": 50}, "logprobs"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "stop": [1, 2]}, "stop"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "seed": "abc"}, "seed"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "stream_options": {"include_usage": True}},
     "stream_options"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "presence_penalty": 0.5}, "presence_penalty"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 4, "min_tokens": 9}, "min_tokens"),
    ("/v1/chat/completions", {"model": MODEL, "messages": []}, "messages"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"content": "hi"}]}, "messages[0].role"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": 3}]}, "messages[0].content"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2},
     "top_logprobs"),
    ("/v2/models/ensemble/generate", {"max_tokens": 4}, "text_input"),
    ("/v2/models/ensemble/generate", {"text_input": "x", "max_tokens": "many"}, "max_tokens"),
    ("/v2/models/ensemble/generate", {"text_input": "x", "max_tokens": 4, "top_p": 2.0}, "top_p"),
    ("/v2/models/ensemble/generate", {"text_input": "x", "max_tokens": 4, "beam_width": 4}, "beam_width"),
    ("/v2/models/ensemble/generate", {"text_input": "x", "max_tokens": 4, "end_id": 10**6}, "end_id"),
    ("/v1/completions", b'{"model": "tiny", "prompt": "' + b"a" * (9 * 1024 * 1024) + b'"}', "body"),
]


def test_bad_inputs_are_400_naming_the_field(server):
    assert len(BAD) >= 15
    with httpx.Client(base_url=server.url, headers=auth(), timeout=60) as h:
        for path, body, field in BAD:
            content = body if isinstance(body, bytes) else json.dumps(body).encode()
            r = h.post(path, content=content, headers={"content-type": "application/json"})
            assert r.status_code == 400, (path, body if len(content) < 200 else "<big>", r.status_code, r.text)
            err = r.json()["error"]
            if path.startswith("/v1"):
                assert err["param"] == field and err["type"] == "invalid_request_error", (body, err)
                message = err["message"]
            else:
                message = err
            assert message.startswith(field), (field, message)
        # Still alive and well: the engine was never touched by any of them.
        r = h.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 2, "temperature": 0})
        assert r.status_code == 200
        assert h.get("/health").status_code == 200
        r = h.post("/v1/completions", json={"model": "other", "prompt": "x"})
        assert r.status_code == 404 and r.json()["error"]["param"] == "model"
    assert 'kind="internal"' not in httpx.get(server.url + "/metrics").text


def test_api_key_is_required_on_v1_and_v2(server):
    for method, path in (("GET", "/v1/models"), ("POST", "/v1/completions"), ("POST", "/v1/chat/completions"),
                         ("POST", "/v2/models/ensemble/generate"), ("GET", "/v2/health/ready"),
                         ("GET", "/v2/models/ensemble/ready")):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
            r = httpx.request(method, server.url + path, headers=headers, json={"prompt": "x"})
            assert r.status_code == 401, (path, headers)
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.completions.create(model=MODEL, prompt="x", max_tokens=2)
    assert httpx.get(server.url + "/health").status_code == 200  # operations routes stay open
    assert httpx.get(server.url + "/metrics").status_code == 200
    # The structured access log: one JSON object per request on stderr.
    ok = httpx.post(server.url + "/v1/completions", headers=auth(), json={"model": MODEL, "prompt": "y", "max_tokens": 2})
    assert ok.status_code == 200

    def records() -> list[dict]:
        return [json.loads(line) for line in server.stderr().splitlines() if line.startswith('{"ts"')]

    def completed() -> list[dict]:
        return [r for r in records() if r["path"] == "/v1/completions" and r["status"] == 200]

    wait_until(completed, "no access-log record of the completed request")
    assert any(r["path"] == "/v1/completions" and r["status"] == 401 for r in records())
    done = completed()
    assert done and {"request_id", "prompt_tokens", "completion_tokens", "finish_reason", "duration_ms"} <= set(done[0])


def test_bench_serve_client(server):
    from click.testing import CliRunner

    from trtlm.serve.benchmark import bench_serve

    r = CliRunner().invoke(bench_serve, ["--base-url", server.url, "--api-key", API_KEY, "--num-prompts", 12,
                                         "--random-input-len", 16, "--random-output-len", 8, "--max-concurrency", 4,
                                         "--random-vocab-size", 2000, "--json"])
    assert r.exit_code == 0, r.output
    s = json.loads(r.output)
    assert (s["completed"], s["failed"], s["total_output_tokens"], s["total_input_tokens"]) == (12, 0, 96, 192)
    assert s["model"] == MODEL
    assert 0 < s["ttft_ms"]["p50"] <= s["ttft_ms"]["p99"] and 0 < s["tpot_ms"]["mean"] and s["itl_ms"]["p50"] > 0
    assert s["output_token_throughput"] == pytest.approx(96 / s["duration_s"])


def stream_events(url: str, body: dict, results: dict, key) -> None:
    """POST a streaming request; store [status, headers, events] (events: the JSON body for errors)."""
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as resp:
        if resp.status_code != 200:
            results[key] = [resp.status_code, dict(resp.headers), json.loads(resp.read())]
        else:
            results[key] = [200, dict(resp.headers), sse_events(resp.iter_lines())]


def long_stream(i: int) -> dict:
    return {"model": MODEL, "prompt": [400 + i, 7, 8], "max_tokens": 1000, "temperature": 0, "ignore_eos": True,
            "stream": True}


def alone_seconds(engine: Path) -> float:
    """How long one ``long_stream`` request takes alone on this machine (in this process, the engine
    the server runs): the timeout below is a fraction of it, so no machine is fast enough to finish
    a request before its timeout."""
    from trtlm.api import LLM
    from trtlm.runtime.sampling import SamplingParams

    llm = LLM(engine)
    body = long_stream(0)
    start = time.monotonic()
    llm.generate([body["prompt"]], sampling_params=SamplingParams(max_tokens=body["max_tokens"], ignore_eos=True))
    return time.monotonic() - start


def test_queue_full_and_request_timeout(tmp_path):
    """Batch 2, queue 2, a timeout of half the time one request takes alone, the model's own files (no
    chat template): a 5th request is refused with 503 + Retry-After; the others end by the timeout
    (504 before the first token, an error event and [DONE] after it) and free their KV blocks; chat
    answers 400 (no template).  Requests arrive a tenth of the timeout apart, so the 5th and 6th come
    while all 4 are still in flight."""
    engine = build_engine(TINY, tmp_path)
    timeout = max(0.2, round(alone_seconds(engine) / 2, 3))
    s = Server(["--engine-dir", engine, "--served-model-name", MODEL, "--max-batch-size", 2, "--max-queue-size", 2,
                "--request-timeout", timeout], tmp_path)
    try:
        assert s.loading_health == (503, {"status": "loading", "detail": "the model is still loading"})
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        with pytest.raises(openai.BadRequestError) as exc:
            client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
        assert exc.value.body["code"] == "chat_template_missing"
        results: dict = {}
        threads = []
        for i in range(6):
            threads.append(threading.Thread(target=stream_events, args=(s.url, long_stream(i), results, i)))
            threads[-1].start()
            time.sleep(timeout / 10)
        for t in threads:
            t.join(timeout=30)
        refused = [r for r in results.values() if r[0] == 503]
        accepted = [r for r in results.values() if r[0] != 503]
        # 2 run + 2 wait; the 5th and 6th arrive while all 4 are still in flight.
        assert refused and len(accepted) <= 4, {k: v[0] for k, v in results.items()}
        assert all(r[1].get("retry-after") == "1" and r[2]["error"]["code"] == "queue_full" for r in refused)
        for status, _, body in results.values():
            if status == 504:
                assert body["error"]["code"] == "timeout"
            elif status == 200:  # started streaming, then ran out of time
                assert body[-1] == "[DONE]" and body[-2]["error"]["code"] == "timeout", body[-3:]
            else:
                assert status == 503
        text = httpx.get(s.url + "/metrics").text
        assert metric(text, "trtlm:kv_cache_blocks_used") == 0 and metric(text, "trtlm:num_requests_running") == 0
        assert metric(text, "trtlm:request_errors_total", kind="timeout") == len(accepted)
        assert metric(text, "trtlm:request_errors_total", kind="queue_full") == len(refused)
    finally:
        assert s.stop() == 0


@pytest.mark.parametrize("grace", [3, 0])
def test_sigterm_drains_in_flight_requests_and_exits_0(tmp_path, grace):
    """SIGTERM with 3 requests running (two of 1000 tokens, one of 300) and 1 waiting: the listener
    closes at once, every stream ends with exactly one finish reason and ``[DONE]``, and the process
    exits 0 soon after the grace period.  With a 3 s grace the short one finishes (``length``: 300
    tokens need only 100 tokens/s, a fraction of what the tiny model does on any CPU), the others
    finish or are aborted when it ends, depending on the machine's speed; with no grace every request
    is aborted at once (``abort``: none can finish in the milliseconds before the signal lands)."""
    engine = build_engine(TINY, tmp_path)
    s = Server(["--engine-dir", engine, "--served-model-name", MODEL, "--max-batch-size", 3, "--shutdown-grace",
                grace], tmp_path)

    def wait_for(running: int, waiting: int) -> None:
        def now() -> tuple[float, float]:
            text = httpx.get(s.url + "/metrics").text
            return metric(text, "trtlm:num_requests_running"), metric(text, "trtlm:num_requests_waiting")

        wait_until(lambda: now() == (running, waiting), f"(running, waiting) never became {(running, waiting)}")

    try:
        results: dict = {}
        bodies = [long_stream(0), long_stream(1), {**long_stream(2), "max_tokens": 300}, long_stream(3)]
        threads = [threading.Thread(target=stream_events, args=(s.url, b, results, i)) for i, b in enumerate(bodies)]
        for t in threads[:3]:
            t.start()
        wait_for(3, 0)
        threads[3].start()
        wait_for(3, 1)
        s.proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()

        def refused() -> bool:
            try:
                httpx.get(s.url + "/health")
            except (httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError):
                # refused, or taken into the backlog just before the listener closed and reset with it
                return True
            return False

        # the listener closes at once: well before a 3 s grace period ends, however loaded the machine
        wait_until(refused, "the server still accepts connections after SIGTERM", timeout=2)
        assert s.proc.wait(timeout=30) == 0, s.stderr()[-3000:]
        assert time.monotonic() - signalled < grace + 5  # the grace period, then a prompt exit
        for t in threads:
            t.join(timeout=10)
        assert sorted(results) == [0, 1, 2, 3]
        reasons = {}
        for i, (status, _, events) in results.items():
            assert status == 200 and events[-1] == "[DONE]", (status, events)
            finish = [c["finish_reason"] for e in events[:-1] for c in e["choices"] if c["finish_reason"]]
            assert len(finish) == 1, finish  # exactly one final finish_reason per stream
            reasons[i] = finish[0]
        if grace:
            assert reasons[2] == "length" and set(reasons.values()) <= {"abort", "length"}, reasons
        else:
            assert set(reasons.values()) == {"abort"}, reasons
        assert "trtlm serve: stopped" in "".join(s.lines)
    finally:
        s.stop()


# ----------------------------------------------------------------------------------------------- several ranks
def children(pid: int) -> list[int]:
    """Processes whose parent is ``pid`` (Linux /proc)."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry.name))
    return out


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


#: Forwards of the engine's start-up warm-up (``Engine.warm_up``: two prompts prefilled in one step,
#: then three decode steps to their 4 tokens), counted by the fault injection's forward numbering.
WARM_UP_FORWARDS = 4


@pytest.fixture(scope="module")
def tp2_engine(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tp2")
    for argv in (("convert", "--model-dir", TINY, "--output-dir", out / "ckpt", "--tp-size", 2),
                 ("build", "--checkpoint-dir", out / "ckpt", "--output-dir", out / "engine")):
        r = run_cli(*argv)
        assert r.exit_code == 0, r.stderr
    return out / "engine"


def test_tp2_engine_served_end_to_end(tp2_engine, tmp_path):
    """A tp2 (gloo) engine: two rank processes under the HTTP process; the same text as `trtlm run` (one
    process per rank too); SIGTERM mid-stream ends the stream cleanly, every rank exits, exit 0."""
    ref = trtlm_run(tp2_engine, PROMPTS[0], 24)
    s = Server(["--engine-dir", tp2_engine, "--served-model-name", MODEL, "--shutdown-grace", 0.5], tmp_path)
    try:
        ranks = children(s.proc.pid)
        assert len(ranks) == 2, ranks
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        r = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=24, temperature=0)
        assert r.choices[0].text == ref["text"]
        streamed = "".join(c.choices[0].text for c in client.completions.create(
            model=MODEL, prompt=PROMPTS[0], max_tokens=24, temperature=0, stream=True))
        assert streamed == ref["text"]
        results: dict = {}
        t = threading.Thread(target=stream_events, args=(s.url, long_stream(0), results, 0))
        t.start()
        wait_until(lambda: metric(httpx.get(s.url + "/metrics").text, "trtlm:generation_tokens_total") >= 60,
                   "the stream generated no 60 tokens")
        s.proc.send_signal(signal.SIGTERM)
        assert s.proc.wait(timeout=30) == 0, s.stderr()[-3000:]
        t.join(timeout=10)
        status, _, events = results[0]
        assert status == 200 and events[-1] == "[DONE]"
        assert [c["finish_reason"] for e in events[:-1] for c in e["choices"]][-1] == "abort"
        assert not [p for p in ranks if alive(p)], "rank processes outlived trtlm serve"
    finally:
        s.stop()


def test_tp2_engine_merged_into_one_engine_process(tp2_engine, tmp_path):
    """``--launch single``: the tp2 engine's ranks merged into one engine process under the HTTP
    process, answering what ``trtlm run`` answers."""
    ref = trtlm_run(tp2_engine, PROMPTS[1], 16)
    s = Server(["--engine-dir", tp2_engine, "--served-model-name", MODEL, "--launch", "single"], tmp_path)
    try:
        assert len(children(s.proc.pid)) == 1
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        r = client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=16, temperature=0)
        assert r.choices[0].text == ref["text"]
    finally:
        assert s.stop() == 0, s.stderr()[-3000:]


def test_tp2_rank_failure_stops_the_server(tp2_engine, tmp_path):
    """Rank 1 dies at its 4th forward of the request (test-only fault injection; the count includes the
    start-up warm-up's WARM_UP_FORWARDS): the launcher kills rank 0 too and
    `trtlm serve` fails with one line naming rank 1; the client sees its connection end."""
    s = Server(["--engine-dir", tp2_engine, "--served-model-name", MODEL], tmp_path,
               env={"TRTLM_TEST_FAULT": f"1:{WARM_UP_FORWARDS + 4}:exit"})
    try:
        ranks = children(s.proc.pid)
        try:  # the request fails one way or the other: an error answer, or the connection ends
            r = httpx.post(s.url + "/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 50},
                           timeout=30)
            assert r.status_code >= 500, r.text
        except httpx.TransportError:
            pass
        assert s.proc.wait(timeout=30) == 1
        err = [line for line in s.stderr().splitlines() if line.startswith("error:")]
        assert err and "rank 1 failed" in err[-1], s.stderr()[-2000:]
        assert not [p for p in ranks if alive(p)]
    finally:
        s.stop()


def test_engine_failure_makes_health_503(tp2_engine, tmp_path):
    """Rank 0's engine step raises (test-only fault injection at the request's 4th forward): the request in
    flight fails with a 5xx, /health and new requests answer 503 naming the failure, and SIGTERM then
    ends `trtlm serve` with one error line (exit 1) and no rank left behind."""
    s = Server(["--engine-dir", tp2_engine, "--served-model-name", MODEL], tmp_path,
               env={"TRTLM_TEST_FAULT": f"0:{WARM_UP_FORWARDS + 4}:raise"})
    try:
        ranks = children(s.proc.pid)
        r = httpx.post(s.url + "/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 50}, timeout=30)
        assert r.status_code == 503 and "injected fault" in r.json()["error"]["message"], r.text
        health = httpx.get(s.url + "/health")
        assert health.status_code == 503 and "injected fault" in health.json()["detail"]
        r = httpx.post(s.url + "/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 5}, timeout=30)
        assert r.status_code == 503 and r.headers.get("retry-after")
        assert httpx.get(s.url + "/v2/health/ready").status_code == 400
        s.proc.send_signal(signal.SIGTERM)
        assert s.proc.wait(timeout=30) == 1
        err = [line for line in s.stderr().splitlines() if line.startswith("error:")]
        assert err and "injected fault" in err[-1], s.stderr()[-2000:]
        assert not [p for p in ranks if alive(p)]
    finally:
        s.stop()


def test_engine_process_killed_mid_stream_stops_the_server_with_one_line(engine_dir, tmp_path):
    """HTTP and the engine are separate processes: when the engine process dies (SIGKILL, as the
    kernel's OOM killer would), the stream in flight ends with an error event naming the cause and
    ``[DONE]``, and `trtlm serve` exits 1 with one line
    saying so -- never a server that accepts requests it can no longer run."""
    s = Server(["--engine-dir", engine_dir, "--served-model-name", MODEL], tmp_path)
    try:
        [engine_pid] = children(s.proc.pid)
        results: dict = {}
        t = threading.Thread(target=lambda: _stream_or_fail(s.url, results))
        t.start()
        wait_until(lambda: metric(httpx.get(s.url + "/metrics").text, "trtlm:generation_tokens_total") >= 20,
                   "the stream generated no 20 tokens")
        os.kill(engine_pid, signal.SIGKILL)
        assert s.proc.wait(timeout=30) == 1
        t.join(timeout=10)
        events = results["events"]  # the stream ends with an error event naming the cause, then [DONE]
        assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == "unavailable", events[-3:]
        assert "killed by signal SIGKILL" in events[-2]["error"]["message"]
        err = [line for line in s.stderr().splitlines() if line.startswith("error:")]
        assert len(err) == 1 and "the engine process failed: killed by signal SIGKILL" in err[0], s.stderr()[-2000:]
        assert "Traceback" not in s.stderr()
    finally:
        s.stop()


def _stream_or_fail(url: str, results: dict) -> None:
    try:
        with httpx.stream("POST", url + "/v1/completions", json=long_stream(0), timeout=60) as resp:
            results["events"] = sse_events(resp.iter_lines())
    except httpx.HTTPError as exc:
        results["error"] = repr(exc)


def test_engine_that_fails_to_load_stops_the_server_with_one_line(engine_dir, tmp_path):
    """The socket is bound before the weights load; a weight file that cannot be read ends the server
    with exit 1 and one error line naming the file (never a server stuck answering 503)."""
    broken = tmp_path / "engine"
    shutil.copytree(engine_dir, broken)
    data = (broken / "rank0.safetensors").read_bytes()
    (broken / "rank0.safetensors").write_bytes(data[:1000])
    r = subprocess.run([sys.executable, "-m", "trtlm.cli", "serve", "--engine-dir", broken, "--port", "0"],
                       capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 1 and "listening on" in r.stdout and "ready" not in r.stdout
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "rank0.safetensors" in errors[0] and "Traceback" not in r.stderr, r.stderr


# ----------------------------------------------------------------------------------------------- no server
def test_serve_without_the_extra_names_the_pip_command():
    """Without fastapi/uvicorn (blocked the way Python blocks an import: ``sys.modules[name] = None``)."""
    code = ("import sys; sys.modules['fastapi'] = None; sys.modules['uvicorn'] = None\n"
            "from trtlm.cli import main; main(['serve', '--engine-dir', 'anything'])")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr == "error: trtlm serve needs fastapi, uvicorn: pip install 'trtlm[serve]'\n"


def test_chat_templates_render_as_transformers_renders_them(chat_model, tmp_path):
    """tokenizer_config.json templates, a named-template list, and chat_template.jinja (which wins),
    rendered by trtlm and by transformers for the same conversations."""
    from transformers import AutoTokenizer

    from trtlm.runtime.tokenizer import load_tokenizer
    from trtlm.serve.chat_template import ChatTemplate, encode_rendered

    conversations = [
        [{"role": "user", "content": "def add(a, b):"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "x"},
         {"role": "assistant", "content": "y = 1"}, {"role": "user", "content": "café → λ"}],
    ]
    jinja_dir = tmp_path / "jinja"
    shutil.copytree(chat_model, jinja_dir)
    (jinja_dir / "chat_template.jinja").write_text(
        "{% for m in messages %}{{ m['role'] | upper }}: {{ m['content'] | trim }}\n{% endfor %}"
        "{% if add_generation_prompt %}ASSISTANT:{% endif %}")
    named_dir = tmp_path / "named"
    shutil.copytree(chat_model, named_dir)
    cfg = json.loads((named_dir / "tokenizer_config.json").read_text())
    cfg["chat_template"] = [{"name": "default", "template": TEMPLATE}, {"name": "tool_use", "template": "T"}]
    (named_dir / "tokenizer_config.json").write_text(json.dumps(cfg))
    for directory in (chat_model, jinja_dir, named_dir):
        ours = ChatTemplate.from_directory(directory)
        theirs = AutoTokenizer.from_pretrained(directory)
        tok = load_tokenizer(directory)
        for messages in conversations:
            for gen_prompt in (True, False):
                text = ours.render(messages, add_generation_prompt=gen_prompt)
                assert text == theirs.apply_chat_template(messages, add_generation_prompt=gen_prompt, tokenize=False)
                assert encode_rendered(tok, text) == list(theirs.apply_chat_template(
                    messages, add_generation_prompt=gen_prompt, tokenize=True, return_dict=False))
    assert ChatTemplate.from_directory(TINY) is None


def test_a_stream_that_fell_behind_gets_what_it_missed_in_one_chunk():
    """Outputs queued behind one another for the same prompt are sent as one (their new tokens and
    text concatenated, in order); an output of another prompt, or the end, is not merged."""
    from trtlm.runtime.outputs import CompletionOutput, RequestOutput
    from trtlm.serve.generation import Generation, Prompt
    from trtlm.serve.state import ServerState, ServeSettings

    def out(ids, new, text, new_text, finished=False):
        c = CompletionOutput(index=0, token_ids=ids, text=text, new_token_ids=new, new_text=new_text,
                             finish_reason="length" if finished else None)
        return RequestOutput("r", None, [1, 2], [c], finished)

    async def scenario():
        gen = Generation(ServerState(ServeSettings(model_name="m")), [Prompt([1, 2]), Prompt([3])], params=None)
        gen.ended = [False, False]
        for item in [(0, "out", out([5], [5], "a", "a")), (0, "out", out([5, 6], [6], "ab", "b")),
                     (0, "out", out([5, 6, 7], [7], "abc", "c", finished=True)), (1, "out", out([9], [9], "z", "z")),
                     (1, "out", out([9, 8], [8], "zy", "y"))]:
            gen.queue.put_nowait(item)
        return [await gen.next() for _ in range(2)]

    (i0, first), (i1, second) = asyncio.run(scenario())
    assert (i0, first.finished) == (0, True)
    c = first.outputs[0]
    assert (c.new_token_ids, c.new_text, c.token_ids, c.text) == ([5, 6, 7], "abc", [5, 6, 7], "abc")
    assert i1 == 1 and second.outputs[0].new_text == "zy" and second.outputs[0].new_token_ids == [9, 8]
