"""`trtlm triton-repo` (issue 14): repositories for torch and tensorrt-llm engines, served by a real Triton.

The server is the real ``tritonserver`` (Triton 2.51) that the nvidia-pytriton
0.7.0 wheel ships.  The wheel is fetched once with pip (``pip download
--no-deps``) and unpacked into a cache, not installed: installing it would pin
numpy < 2 into the test environment.  Triton 2.51's Python backend needs
numpy < 2 in the interpreter its stub embeds, so the stub runs a small venv
holding numpy < 2 in front of this environment's packages
(:func:`trtlm.triton.server.stub_venv`, cached too).  Cache:
``$TRTLM_TEST_CACHE`` or ``~/.cache/trtlm-test``.  Where the wheel cannot be had
(not Linux x86_64, glibc < 2.35, no package index) the server tests skip saying
why; with ``CI`` set they fail instead, so CI always runs them.

One server (module fixture, always stopped) serves three repositories: the
bundled tiny Mistral (decoupled, written to one place and *moved* before
serving), the same engine without decoupling, and a tiny Mixtral engine with
expert parallelism 2.  Every expected text comes from ``trtlm run`` or the
engine itself, never from constants.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from conftest import run_cli

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "core" / "src" / "trtlm" / "data" / "tiny-mistral"
FIXTURES = Path(__file__).parent / "fixtures" / "triton"
TEMPLATES = REPO / "core" / "src" / "trtlm" / "triton" / "templates" / "inflight_batcher_llm"
PYTRITON = "nvidia-pytriton==0.7.0"
CACHE = Path(os.environ.get("TRTLM_TEST_CACHE") or Path.home() / ".cache" / "trtlm-test")
PROMPT = "def fibonacci(n):"
MAX_TOKENS = 24


# ------------------------------------------------------------------------------------- protobuf text format
def parse_pbtxt(text: str) -> dict[str, list[Any]]:
    """A small parser of protobuf text format (what config.pbtxt is): field -> list of values
    (scalars as strings, messages as dicts), so generated configs can be compared field by field."""
    tokens = re.findall(r'"(?:[^"\\]|\\.)*"|\$\{\w+\}|[{}\[\]:,]|[^\s{}\[\]:,"#]+|#[^\n]*', text)
    tokens = [t for t in tokens if not t.startswith("#")]
    pos = 0

    def value():
        nonlocal pos
        tok = tokens[pos]
        if tok == "{":
            pos += 1
            msg = message("}")
            pos += 1
            return msg
        if tok == "[":
            pos += 1
            items = []
            while tokens[pos] != "]":
                items.append(value())
                if tokens[pos] == ",":
                    pos += 1
            pos += 1
            return items
        pos += 1
        return tok[1:-1] if tok.startswith('"') else tok

    def message(end):
        nonlocal pos
        out: dict[str, list[Any]] = {}
        while pos < len(tokens) and tokens[pos] != end:
            name = tokens[pos]
            pos += 1
            if tokens[pos] == ":":
                pos += 1
            v = value()
            out.setdefault(name, []).extend(v if isinstance(v, list) and name in ("input", "output",
                                                                                 "instance_group") else [v])
        return out

    return message(None)


def params_of(cfg: dict[str, list[Any]]) -> dict[str, str]:
    return {p["key"][0]: p["value"][0]["string_value"][0] for p in cfg.get("parameters", [])}


def tensors_of(cfg: dict[str, list[Any]], kind: str) -> dict[str, dict[str, list[Any]]]:
    return {t["name"][0]: t for t in cfg.get(kind, [])}


# ------------------------------------------------------------------------------------- the Triton server
def _unavailable(reason: str):
    if os.environ.get("CI"):
        pytest.fail(f"CI must run the Triton tests: {reason}")
    pytest.skip(reason)


def fetch_pytriton() -> Path:
    """Where an nvidia-pytriton 0.7.0 tree lies: an installed one, or the wheel unpacked into the cache."""
    if sys.platform != "linux" or platform.machine() != "x86_64":
        _unavailable(f"{PYTRITON} ships tritonserver for Linux x86_64 only (this is {sys.platform} "
                     f"{platform.machine()})")
    libc, version = platform.libc_ver()
    if libc != "glibc" or tuple(int(x) for x in version.split(".")[:2]) < (2, 35):
        _unavailable(f"{PYTRITON}'s tritonserver needs glibc >= 2.35 (found {libc} {version})")
    spec = importlib.util.find_spec("pytriton")
    if spec is not None and spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0]).parent
    root = CACHE / "nvidia-pytriton-0.7.0"
    if (root / "pytriton" / "tritonserver" / "bin" / "tritonserver").exists():
        return root
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        proc = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps",
                               "--disable-pip-version-check", "-d", tmp, PYTRITON],
                              capture_output=True, text=True, timeout=600)
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            _unavailable(f"pip download {PYTRITON} failed: {(proc.stderr or proc.stdout).strip()[-300:]}")
        unpacked = Path(tmp) / "tree"
        with zipfile.ZipFile(wheels[0]) as wheel:
            for info in wheel.infolist():
                wheel.extract(info, unpacked)
                mode = info.external_attr >> 16
                if mode:
                    os.chmod(unpacked / info.filename, mode & 0o777)
        shutil.rmtree(root, ignore_errors=True)
        unpacked.rename(root)
    return root


@pytest.fixture(scope="module")
def pytriton_dir() -> Path:
    return fetch_pytriton()


@pytest.fixture(scope="module")
def triton(pytriton_dir):
    """A :class:`trtlm.triton.server.TritonInstall` for the wheel's tritonserver, its stub running
    this environment's packages (behind numpy < 2), as ``trtlm triton-repo --launch`` sets it up."""
    from trtlm.errors import UserError
    from trtlm.triton.server import pytriton_install, stub_python

    work = CACHE / "triton"
    try:
        python = stub_python(work)  # pip-installs numpy<2 into a small venv the first time
    except UserError as exc:
        _unavailable(str(exc))
    return pytriton_install(pytriton_dir, work, python)


# ------------------------------------------------------------------------------------- engines and repositories
def cli_ok(*argv) -> str:
    result = run_cli(*argv)
    assert result.exit_code == 0, result.stderr
    return result.stdout


@pytest.fixture(scope="module")
def mistral_engine(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("triton-mistral")
    cli_ok("convert", "--model-dir", TINY, "--output-dir", out / "ckpt")
    cli_ok("build", "--checkpoint-dir", out / "ckpt", "--output-dir", out / "engine")
    return out / "engine"


@pytest.fixture(scope="module")
def mixtral_engine(tmp_path_factory, make_tiny_hf) -> Path:
    """A tiny Mixtral split over two ranks by expert parallelism (tp 2 = moe_ep 2)."""
    hf = make_tiny_hf("mixtral", tokenizer=True)
    out = tmp_path_factory.mktemp("triton-mixtral")
    cli_ok("convert", "--model-dir", hf, "--output-dir", out / "ckpt", "--tp-size", 2, "--moe-ep-size", 2)
    cli_ok("build", "--checkpoint-dir", out / "ckpt", "--output-dir", out / "engine")
    cfg = json.loads((out / "engine" / "config.json").read_text())["pretrained_config"]["mapping"]
    assert cfg["world_size"] == 2 and cfg.get("moe_ep_size") == 2, cfg
    return out / "engine"


def trtlm_run(engine: Path, prompt: str | list[str], max_tokens: int) -> str | list[str]:
    """``trtlm run``'s greedy text (the generated part) for a prompt, or for each of a list of prompts."""
    prompts = [prompt] if isinstance(prompt, str) else prompt
    args = [a for p in prompts for a in ("--input-text", p)]
    out = json.loads(cli_ok("run", "--engine-dir", engine, *args, "--max-output-len", max_tokens, "--json"))
    texts = [o["text"] for o in out["outputs"]]
    return texts[0] if isinstance(prompt, str) else texts


@pytest.fixture(scope="module")
def repos(mistral_engine, mixtral_engine, tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("triton-repos")
    cli_ok("triton-repo", "--engine-dir", mistral_engine, "--output-dir", base / "written")
    (base / "written").rename(base / "moved")  # the repository holds no absolute path: it can move
    cli_ok("triton-repo", "--engine-dir", mistral_engine, "--output-dir", base / "sync", "--model-name",
           "ensemble_sync", "--no-decoupled")
    cli_ok("triton-repo", "--engine-dir", mixtral_engine, "--output-dir", base / "mixtral", "--model-name", "mixtral")
    return {"ensemble": base / "moved", "ensemble_sync": base / "sync", "mixtral": base / "mixtral"}


@pytest.fixture(scope="module")
def server(triton, repos, tmp_path_factory):
    from trtlm.triton.server import TritonServer

    first, *rest = repos.values()
    log = tmp_path_factory.mktemp("triton-log") / "tritonserver.log"
    srv = TritonServer(triton, first, log,
                       extra_args=[f"--model-repository={r}" for r in rest] + ["--exit-timeout-secs=3"])
    srv.start()
    try:
        srv.wait_ready(300)
        yield srv
    finally:
        srv.stop()


def post(url: str, body: Any) -> tuple[int, str]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def generate(server, body: dict[str, Any], model: str = "ensemble") -> dict[str, Any]:
    status, text = post(f"{server.url}/v2/models/{model}/generate", body)
    assert status == 200, text
    return json.loads(text)


def stream(server, body: dict[str, Any], model: str = "ensemble") -> list[dict[str, Any]]:
    status, text = post(f"{server.url}/v2/models/{model}/generate_stream", {**body, "stream": True})
    assert status == 200, text
    events = [json.loads(chunk[len("data: "):]) for chunk in text.split("\n\n") if chunk.startswith("data: ")]
    assert all("error" not in e for e in events), events
    return events


# ------------------------------------------------------------------------------------- served: torch engines
def test_generate_is_trtlm_run_greedy_text(server, mistral_engine):
    """tensorrtllm_backend's documented curl body, unchanged; the prompt is echoed as its ensemble does."""
    for prompt in (PROMPT, "import os\n", "class Foo(object):"):
        expected = trtlm_run(mistral_engine, prompt, MAX_TOKENS)
        out = generate(server, {"text_input": prompt, "max_tokens": MAX_TOKENS, "bad_words": "", "stop_words": ""})
        assert out["model_name"] == "ensemble"
        assert out["text_output"] == prompt + expected
        alone = generate(server, {"text_input": prompt, "max_tokens": MAX_TOKENS, "exclude_input_in_output": True})
        assert alone["text_output"] == expected


def test_generate_stream_deltas_add_up(server, mistral_engine):
    expected = trtlm_run(mistral_engine, PROMPT, MAX_TOKENS)
    events = stream(server, {"text_input": PROMPT, "max_tokens": MAX_TOKENS})
    assert len(events) > 3  # deltas, not one final text
    assert "".join(e["text_output"] for e in events) == expected


def test_stop_words(server, mistral_engine):
    full = trtlm_run(mistral_engine, PROMPT, MAX_TOKENS)
    word = [w for w in re.findall(r"[A-Za-z]+", full) if len(w) > 2][1]
    expected = full[:full.index(word) + len(word)]  # generation ends at the stop word, which stays (as TRT-LLM)
    assert expected != full
    for stop_words in ([word], f"zzqx,{word}", ["zzqx", word]):
        out = generate(server, {"text_input": PROMPT, "max_tokens": MAX_TOKENS, "stop_words": stop_words,
                                "exclude_input_in_output": True})
        assert out["text_output"] == expected, stop_words
    events = stream(server, {"text_input": PROMPT, "max_tokens": MAX_TOKENS, "stop_words": [word]})
    assert "".join(e["text_output"] for e in events) == expected


def test_bad_words(server, mistral_engine):
    """A banned word changes the output exactly as the engine's ``bad_words_ids`` does for its tokens."""
    from trtlm.runtime.engine import Engine
    from trtlm.runtime.sampling import SamplingParams
    from trtlm.runtime.tokenizer import load_tokenizer

    full = trtlm_run(mistral_engine, PROMPT, MAX_TOKENS)
    word = [w for w in re.findall(r"[A-Za-z]+", full) if len(w) > 2][0]
    tok = load_tokenizer(mistral_engine)
    ids = tok.encode(word)
    ids = ids[1:] if tok.add_bos and ids[:1] == [tok.bos_id] else ids
    engine = Engine.from_engine_dir(mistral_engine)
    try:
        expected = engine.generate([PROMPT], SamplingParams(max_tokens=MAX_TOKENS, bad_words_ids=[ids]))
    finally:
        engine.close()
    out = generate(server, {"text_input": PROMPT, "max_tokens": MAX_TOKENS, "bad_words": [word],
                            "exclude_input_in_output": True})
    assert out["text_output"] == expected[0].outputs[0].text
    assert out["text_output"] != full


def test_log_probs(server):
    out = generate(server, {"text_input": PROMPT, "max_tokens": 6, "return_log_probs": True})
    per_token = out["output_log_probs"]
    per_token = per_token if isinstance(per_token, list) else [per_token]
    assert len(per_token) == 6 and all(lp <= 0 for lp in per_token)
    # float32 sums in another order: a relative tolerance, not equality
    assert out["cum_log_probs"] == pytest.approx(sum(per_token), rel=1e-5, abs=1e-5)
    assert "cum_log_probs" not in generate(server, {"text_input": PROMPT, "max_tokens": 6})


def test_16_concurrent_requests_each_get_their_own_text(server):
    lines = [ln for ln in (TINY / "eval.txt").read_text().splitlines() if len(ln.strip()) > 8][:16]
    assert len(lines) == 16
    body = lambda p: {"text_input": p, "max_tokens": 16, "exclude_input_in_output": True}  # noqa: E731
    alone = [generate(server, body(p))["text_output"] for p in lines]
    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(lambda p: generate(server, body(p))["text_output"], lines))
    assert together == alone
    with ThreadPoolExecutor(8) as pool:  # streams interleaved with plain requests
        streamed = list(pool.map(lambda p: "".join(e["text_output"] for e in stream(server, body(p))), lines[:8]))
    assert streamed == alone[:8]


def test_malformed_requests_get_triton_error_json_and_server_keeps_serving(server):
    url = f"{server.url}/v2/models/ensemble/generate"
    # (body, status, a word the error names): Triton 2.51 answers what it cannot parse with 500 and a request
    # it rejects (missing input) with 400; the model's own refusals come back as 400 too.
    cases = [
        (b"{not json", 500, "JSON"),
        ({"text_input": PROMPT, "max_tokens": "many"}, 500, "data"),
        ({"text_input": PROMPT}, 400, "max_tokens"),
        ({"text_input": PROMPT, "max_tokens": 8, "temperature": -1.0}, 400, "temperature"),
        ({"text_input": PROMPT, "max_tokens": 100000}, 400, "max_seq_len"),
        ({"text_input": PROMPT, "max_tokens": 0}, 400, "max_tokens"),
    ]
    for body, want, name in cases:
        status, text = post(url, body)
        assert status == want, (body, status, text)
        error = json.loads(text)
        assert set(error) == {"error"} and name in error["error"], text
    status, text = post(f"{server.url}/v2/models/ensemble_sync/generate_stream",
                        {"text_input": PROMPT, "max_tokens": 4, "stream": True})
    assert "decoupled" in text, text
    with urllib.request.urlopen(f"{server.url}/v2/health/ready", timeout=10) as r:
        assert r.status == 200
    assert generate(server, {"text_input": PROMPT, "max_tokens": 4})["text_output"].startswith(PROMPT)


def metrics(server) -> dict[tuple[str, str], float]:
    """tensorrtllm_backend-named gauges of model ``ensemble`` from Triton's /metrics: (family, type) -> value."""
    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10) as r:
        text = r.read().decode()
    out = {}
    for m in re.finditer(r'^(nv_trt_llm_\w+)\{([^}]*)\} (\S+)$', text, re.M):
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2)))
        if labels.get("model") == "ensemble":
            out[(m.group(1), labels.get("request_type") or labels.get("kv_cache_block_type"))] = float(m.group(3))
    return out


def test_metrics_and_client_disconnect_aborts(server):
    """Engine stats under tensorrtllm_backend's metric names; a streaming client that goes away has its
    request aborted (KV blocks freed) long before the generation would have ended."""
    import http.client

    requests, blocks = "nv_trt_llm_request_metrics", "nv_trt_llm_kv_cache_block_metrics"
    idle = metrics(server)
    assert idle[(requests, "max")] == 8 and idle[(requests, "active")] == 0  # 8: the engine's build max_batch_size
    assert idle[(blocks, "used")] == 0 and idle[(blocks, "max")] == idle[(blocks, "free")] > 0
    assert idle[(blocks, "tokens_per")] > 0
    body = {"text_input": PROMPT, "max_tokens": 900, "end_id": 2047}  # a long generation (rare end id)
    start = time.monotonic()
    generate(server, body)
    full_s = time.monotonic() - start
    conn = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=60)
    conn.request("POST", "/v2/models/ensemble/generate_stream", body=json.dumps({**body, "stream": True}))
    response = conn.getresponse()
    assert response.status == 200 and response.fp.readline()  # the first chunk arrived: it is generating
    seen = time.monotonic()  # gauges are refreshed every 0.1 s while the engine runs
    while not (metrics(server)[(requests, "active")] == 1 and metrics(server)[(blocks, "used")] > 0):
        assert time.monotonic() - seen < full_s / 3, "the running request never showed in the metrics"
        time.sleep(0.01)
    conn.sock.shutdown(2)
    conn.close()
    gone = time.monotonic()
    # Both gauges must reach 0 within the bound.  They are set one after the other, so a scrape can
    # land between the two updates, seeing active 0 with the blocks not yet updated.
    while (now := metrics(server))[(requests, "active")] != 0 or now[(blocks, "used")] != 0:
        assert time.monotonic() - gone < full_s / 2, \
            f"not aborted and freed within {full_s / 2:.2f} s (full run {full_s:.2f} s): {now}"
        time.sleep(0.02)


def test_non_decoupled_model(server, mistral_engine):
    expected = trtlm_run(mistral_engine, PROMPT, MAX_TOKENS)
    out = generate(server, {"text_input": PROMPT, "max_tokens": MAX_TOKENS}, model="ensemble_sync")
    assert out["text_output"] == PROMPT + expected


def test_mixtral_ep2_served(server, mixtral_engine):
    """A Mixtral engine with two expert-parallel ranks, merged into the model instance, against `trtlm run`."""
    prompts = ["The quick brown fox", "def main():"]
    for prompt, expected in zip(prompts, trtlm_run(mixtral_engine, prompts, 12)):  # one two-rank job
        out = generate(server, {"text_input": prompt, "max_tokens": 12}, model="mixtral")
        assert out["text_output"] == prompt + expected


# ------------------------------------------------------------------------------------- repository files
def test_torch_repo_files(mistral_engine, tmp_path):
    repo = tmp_path / "repo"
    cli_ok("triton-repo", "--engine-dir", mistral_engine, "--output-dir", repo, "--max-batch-size", 4,
           "--instance-count", 2, "--max-queue-delay-us", 100, "--kv-cache-free-gpu-mem-fraction", 0.5)
    text = (repo / "ensemble" / "config.pbtxt").read_text()
    assert "${" not in text
    cfg = parse_pbtxt(text)
    assert cfg["name"] == ["ensemble"] and cfg["backend"] == ["python"] and cfg["max_batch_size"] == ["4"]
    assert cfg["model_transaction_policy"][0]["decoupled"] == ["true"]
    assert cfg["dynamic_batching"][0]["max_queue_delay_microseconds"] == ["100"]
    assert cfg["instance_group"][0]["count"] == ["2"]
    params = params_of(cfg)
    assert params["kv_cache_free_gpu_mem_fraction"] == "0.5"
    assert not any(v.startswith("/") for v in params.values())  # relative: the repository can move
    # Each input/output has the name, type, dims and optionality of tensorrtllm_backend's ensemble.
    ensemble = parse_pbtxt((TEMPLATES / "ensemble" / "config.pbtxt").read_text())
    for kind in ("input", "output"):
        theirs = tensors_of(ensemble, kind)
        for name, ours in tensors_of(cfg, kind).items():
            assert name in theirs, name
            for key in ("data_type", "dims", "optional"):
                assert ours.get(key) == theirs[name].get(key), (name, key)
    assert {"text_input", "max_tokens", "bad_words", "stop_words", "end_id", "pad_id", "temperature", "top_k",
            "top_p", "seed", "stream", "exclude_input_in_output", "return_log_probs"} <= set(tensors_of(cfg, "input"))
    engine_copy = repo / "ensemble" / "1" / "engine"
    assert (engine_copy / "rank0.safetensors").is_file() and not (engine_copy / "rank0.safetensors").is_symlink()
    assert (repo / "ensemble" / "1" / "model.py").read_text().count("class TritonPythonModel") == 1

    with_tok = tmp_path / "with-tokenizer"
    cli_ok("triton-repo", "--engine-dir", mistral_engine, "--output-dir", with_tok, "--tokenizer-dir", TINY)
    assert params_of(parse_pbtxt((with_tok / "ensemble" / "config.pbtxt").read_text()))["tokenizer_dir"] == "1/tokenizer"
    assert (with_tok / "ensemble" / "1" / "tokenizer" / "tokenizer.json").read_bytes() == \
        (TINY / "tokenizer.json").read_bytes()

    linked = tmp_path / "linked"
    cli_ok("triton-repo", "--engine-dir", mistral_engine, "--output-dir", linked, "--link")
    assert (linked / "ensemble" / "1" / "engine").is_symlink()
    assert (linked / "ensemble" / "1" / "engine").resolve() == mistral_engine.resolve()


def test_force_and_bad_inputs(mistral_engine, tmp_path):
    repo = tmp_path / "repo"
    cli_ok("triton-repo", "--engine-dir", mistral_engine, "--output-dir", repo)
    again = run_cli("triton-repo", "--engine-dir", mistral_engine, "--output-dir", repo)
    assert again.exit_code == 1 and len(again.stderr_lines) == 1 and "--force" in again.stderr
    cli_ok("triton-repo", "--engine-dir", mistral_engine, "--output-dir", repo, "--force", "--model-name", "tiny")
    assert (repo / "tiny" / "config.pbtxt").is_file() and not (repo / "ensemble").exists()
    for argv, names in [
        (("--engine-dir", tmp_path / "nowhere"), "--engine-dir"),
        (("--engine-dir", TINY), "config.json"),  # a HF checkpoint, not an engine
        (("--engine-dir", mistral_engine, "--model-name", "a/b"), "--model-name"),
        (("--engine-dir", mistral_engine, "--max-batch-size", 0), "--max-batch-size"),
        (("--engine-dir", mistral_engine, "--kv-cache-free-gpu-mem-fraction", 1.5), "--kv-cache-free-gpu-mem"),
        (("--engine-dir", mistral_engine, "--tokenizer-dir", tmp_path / "none"), "--tokenizer-dir"),
    ]:
        out = tmp_path / "out"
        result = run_cli("triton-repo", *argv, "--output-dir", out)
        assert result.exit_code == 1, (argv, result.stderr)
        assert len(result.stderr_lines) == 1 and result.stderr.startswith("error:") and names in result.stderr
        assert not out.exists()  # nothing half-written


@pytest.fixture
def trtllm_engine(tmp_path) -> Path:
    """A tensorrt-llm engine directory: TensorRT-LLM's own engine config.json (fixture) and a stand-in
    rank0.engine (the writer copies engine bytes without reading them)."""
    engine = tmp_path / "trtllm-engine"
    engine.mkdir()
    shutil.copy(FIXTURES / "trtllm-engine-config.json", engine / "config.json")
    (engine / "rank0.engine").write_bytes(b"serialized TensorRT engine bytes")
    return engine


def git_blob_id(path: Path) -> str:
    data = path.read_bytes()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def test_templates_are_tensorrtllm_backend_files():
    upstream = json.loads((TEMPLATES / "UPSTREAM.json").read_text())
    assert upstream["commit"].startswith("c2e65b8")
    for rel, blob in upstream["blobs"].items():
        assert git_blob_id(TEMPLATES / rel) == blob, rel


def test_trtllm_repo_field_by_field(trtllm_engine, tmp_path):
    from trtlm.triton.trtllm_repo import MODELS, UNSET

    repo = tmp_path / "repo"
    no_tok = run_cli("triton-repo", "--engine-dir", trtllm_engine, "--output-dir", repo)
    assert no_tok.exit_code == 1 and "--tokenizer-dir" in no_tok.stderr and len(no_tok.stderr_lines) == 1
    summary = json.loads(cli_ok("triton-repo", "--engine-dir", trtllm_engine, "--output-dir", repo,
                                "--tokenizer-dir", TINY, "--no-decoupled", "--instance-count", 3,
                                "--max-queue-delay-us", 500, "--kv-cache-free-gpu-mem-fraction", 0.8, "--json"))
    assert summary["kind"] == "tensorrt-llm" and summary["models"] == list(MODELS)
    engine_cfg = json.loads((FIXTURES / "trtllm-engine-config.json").read_text())
    build = engine_cfg["build_config"]
    expect = {  # placeholder -> value the engine config and options call for
        "triton_backend": "tensorrtllm", "triton_max_batch_size": str(build["max_batch_size"]),
        "decoupled_mode": "false", "max_queue_delay_microseconds": "500", "max_queue_size": "0",
        "engine_dir": os.path.abspath(repo / "tensorrt_llm" / "1" / "engine"),
        "tokenizer_dir": os.path.abspath(repo / "preprocessing" / "1" / "tokenizer"),
        "batching_strategy": "inflight_fused_batching", "max_beam_width": str(build["max_beam_width"]),
        "kv_cache_free_gpu_mem_fraction": "0.8", "batch_scheduler_policy": "guaranteed_no_evict",
        "enable_kv_cache_reuse": "false", "enable_chunked_context": "false",  # no paged context FMHA here
        "max_attention_window_size": str(build["max_seq_len"]), "logits_datatype": "TYPE_FP32",
        "encoder_input_features_data_type": "TYPE_FP16", "preprocessing_instance_count": "3",
        "postprocessing_instance_count": "3", "bls_instance_count": "3",
    }
    values = summary["parameters"]
    for key, value in expect.items():
        assert values[key] == value, key
    placeholder = re.compile(r"\$\{(\w+)\}")
    for model in MODELS:
        template_text = (TEMPLATES / model / "config.pbtxt").read_text()
        text = (repo / model / "config.pbtxt").read_text()
        assert "${" not in text, model
        template, ours = parse_pbtxt(template_text), parse_pbtxt(text)
        # every field other than parameters: the template's, with its placeholder filled
        for field in set(template) | set(ours):
            if field == "parameters":
                continue
            want = json.loads(placeholder.sub(lambda m: values[m.group(1)], json.dumps(template[field])))
            assert ours.get(field) == want, (model, field)
        # parameters: each of the template's, filled, or removed when it is a feature this engine lacks
        theirs_p, ours_p = params_of(template), params_of(ours)
        for key, tvalue in theirs_p.items():
            m = placeholder.fullmatch(tvalue)
            if m and m.group(1) in UNSET and m.group(1) not in values:
                assert key not in ours_p, (model, key)
            else:
                assert ours_p[key] == placeholder.sub(lambda mm: values[mm.group(1)], tvalue), (model, key)
        assert set(ours_p) <= set(theirs_p)
    assert (repo / "tensorrt_llm" / "1" / "engine" / "rank0.engine").is_file()
    assert (repo / "preprocessing" / "1" / "tokenizer" / "tokenizer.json").is_file()
    for rel in ("preprocessing/1/model.py", "postprocessing/1/model.py", "tensorrt_llm_bls/1/model.py",
                "tensorrt_llm_bls/1/lib/decode.py", "tensorrt_llm_bls/1/lib/triton_decoder.py"):
        assert (repo / rel).read_bytes() == (TEMPLATES / rel).read_bytes(), rel


def test_trtllm_repo_from_engine_config(trtllm_engine, tmp_path):
    """Values follow the engine: paged context FMHA enables KV reuse and chunked context; a sliding window
    (runtime_defaults) becomes max_attention_window_size; bf16 engines get TYPE_BF16; --model-name renames."""
    cfg = json.loads((trtllm_engine / "config.json").read_text())
    cfg["build_config"]["plugin_config"]["use_paged_context_fmha"] = True
    cfg["build_config"]["max_batch_size"] = 64
    cfg["pretrained_config"]["dtype"] = "bfloat16"
    cfg["pretrained_config"]["runtime_defaults"] = {"max_attention_window": [4096], "sink_token_length": None}
    (trtllm_engine / "config.json").write_text(json.dumps(cfg))
    repo = tmp_path / "repo"
    cli_ok("triton-repo", "--engine-dir", trtllm_engine, "--output-dir", repo, "--tokenizer-dir", TINY,
           "--model-name", "mixtral", "--max-batch-size", 16)
    trt = params_of(parse_pbtxt((repo / "tensorrt_llm" / "config.pbtxt").read_text()))
    assert trt["enable_kv_cache_reuse"] == "true" and trt["enable_chunked_context"] == "true"
    assert trt["max_attention_window_size"] == "4096"
    assert "sink_token_length" not in trt
    ens = parse_pbtxt((repo / "mixtral" / "config.pbtxt").read_text())
    assert ens["name"] == ["mixtral"] and ens["max_batch_size"] == ["16"]
    assert not (repo / "ensemble").exists()
    trt_cfg = parse_pbtxt((repo / "tensorrt_llm" / "config.pbtxt").read_text())
    assert tensors_of(trt_cfg, "input")["encoder_input_features"]["data_type"] == ["TYPE_BF16"]
    assert trt_cfg["model_transaction_policy"][0]["decoupled"] == ["true"]


# ------------------------------------------------------------------------------------- --launch
def test_launch_serves_until_interrupted(pytriton_dir, mistral_engine, tmp_path):
    """`trtlm triton-repo --launch` as a user runs it: writes, starts tritonserver, serves, and Ctrl-C
    (SIGINT) stops the server too."""
    import signal

    from trtlm.triton.server import free_port

    port = free_port()
    env = {**os.environ, "TRTLM_PYTRITON_DIR": str(pytriton_dir), "TRTLM_CACHE": str(CACHE)}
    proc = subprocess.Popen([sys.executable, "-m", "trtlm.cli", "triton-repo", "--engine-dir", str(mistral_engine),
                             "--output-dir", str(tmp_path / "repo"), "--launch", "--http-port", str(port)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "tritonserver did not become ready"
            try:
                with urllib.request.urlopen(url + "/v2/health/ready", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.25)
        status, text = post(url + "/v2/models/ensemble/generate", {"text_input": PROMPT, "max_tokens": 4})
        assert status == 200 and json.loads(text)["text_output"].startswith(PROMPT), text
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            out, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
    assert proc.returncode == 0, err
    with pytest.raises(OSError):
        urllib.request.urlopen(url + "/v2/health/ready", timeout=2)


def test_launch_without_triton_says_how_to_install(mistral_engine, tmp_path, monkeypatch):
    if importlib.util.find_spec("pytriton") is not None:
        pytest.skip("nvidia-pytriton is installed here, so --launch finds a tritonserver")
    monkeypatch.delenv("TRTLM_PYTRITON_DIR", raising=False)
    monkeypatch.setenv("PATH", os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep)
                                               if not (Path(p) / "tritonserver").exists()))
    result = run_cli("triton-repo", "--engine-dir", mistral_engine, "--output-dir", tmp_path / "repo", "--launch")
    assert result.exit_code == 1 and len(result.stderr_lines) == 1
    assert "pip install 'trtlm[triton]'" in result.stderr
    assert (tmp_path / "repo" / "ensemble" / "config.pbtxt").is_file()  # the repository is written first


def test_trtllm_repo_loads_in_real_triton(triton, trtllm_engine, tmp_path):
    """The tensorrt-llm layout in Triton 2.51 itself: tensorrtllm_backend's own Python models
    (preprocessing, postprocessing, BLS) load with the filled configs and tokenize with the copied
    tokenizer; ``tensorrt_llm`` and ``ensemble`` pass Triton's config checks and fail only for the
    missing ``tensorrtllm`` backend library, which only Triton's TRT-LLM images carry."""
    from transformers import AutoTokenizer

    from trtlm.triton.server import TritonServer

    repo = tmp_path / "repo"
    cli_ok("triton-repo", "--engine-dir", trtllm_engine, "--output-dir", repo, "--tokenizer-dir", TINY)
    srv = TritonServer(triton, repo, tmp_path / "tritonserver.log",
                       extra_args=["--model-control-mode=explicit", "--load-model=preprocessing",
                                   "--load-model=postprocessing", "--load-model=tensorrt_llm_bls",
                                   "--exit-timeout-secs=3"])
    srv.start()
    try:
        srv.wait_ready(300)
        tok = AutoTokenizer.from_pretrained(repo / "preprocessing" / "1" / "tokenizer")
        status, text = post(f"{srv.url}/v2/models/preprocessing/infer", {"inputs": [
            {"name": "QUERY", "shape": [1, 1], "datatype": "BYTES", "data": [PROMPT]},
            {"name": "REQUEST_OUTPUT_LEN", "shape": [1, 1], "datatype": "INT32", "data": [8]}]})
        assert status == 200, text
        outputs = {o["name"]: o["data"] for o in json.loads(text)["outputs"]}
        ids = tok.encode(PROMPT)
        assert outputs["INPUT_ID"] == ids and outputs["REQUEST_INPUT_LEN"] == [len(ids)]
        assert outputs["OUT_END_ID"] == [tok.eos_token_id]
        status, text = post(f"{srv.url}/v2/models/postprocessing/infer", {"inputs": [
            {"name": "TOKENS_BATCH", "shape": [1, 1, len(ids)], "datatype": "INT32", "data": ids},
            {"name": "SEQUENCE_LENGTH", "shape": [1, 1], "datatype": "INT32", "data": [len(ids)]}]})
        assert status == 200, text
        assert json.loads(text)["outputs"][0]["data"] == [tok.decode(ids, skip_special_tokens=True)]
        status, text = post(f"{srv.url}/v2/repository/models/tensorrt_llm/load", {})
        assert status == 400 and "unable to find backend library for backend 'tensorrtllm'" in text, text
        status, text = post(f"{srv.url}/v2/repository/models/ensemble/load", {})
        assert status == 400 and "depends on 'tensorrt_llm' which has no loaded version" in text, text
    finally:
        srv.stop()
