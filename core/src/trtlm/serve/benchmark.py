"""``trtlm bench serve``: load-test any OpenAI-compatible server (trtlm, vLLM, trtllm-serve...).

Measures what vLLM's ``bench serve`` measures, the same way, so numbers are
comparable across servers: requests are streamed with
``stream_options.include_usage``; TTFT is the time to the first chunk that
carries generated text; ITL the gaps between later text chunks; TPOT is
``(e2e - TTFT) / (output tokens - 1)``; output tokens come from the final
usage chunk.  Requests arrive as a Poisson process at ``--request-rate``
(``inf``: all at once) and/or under a ``--max-concurrency`` cap.

Datasets: ``random`` (token-id prompts, seeded: exact input lengths without
a tokenizer, which every OpenAI-compatible completions endpoint accepts) or
a file: JSON lines ``{"prompt": "..." | [ids], "output_len": N}`` (or
``"messages"`` for chat), or a ShareGPT JSON list (first human turn).

The click command object is :data:`bench_serve` (``trtlm bench serve``).
"""
from __future__ import annotations

import asyncio
import json
import math
import random
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from trtlm.commands.options import NON_NEGATIVE_FLOAT, POSITIVE, POSITIVE_FLOAT


@dataclass
class BenchRequest:
    prompt: Any  # str, list[int] (completions) or list of messages (chat)
    output_len: int
    prompt_len: int | None = None


@dataclass
class Result:
    ok: bool
    prompt_len: int | None = None
    output_tokens: int = 0
    ttft: float | None = None
    e2el: float | None = None
    itl: list[float] = field(default_factory=list)
    error: str | None = None


def random_dataset(n: int, input_len: int, output_len: int, range_ratio: float, vocab: int,
                   seed: int) -> list[BenchRequest]:
    """``n`` token-id prompts; lengths uniform in ``[L * (1 - r), L * (1 + r)]``."""
    rng = random.Random(seed)

    def length(base: int) -> int:
        lo, hi = max(1, int(base * (1 - range_ratio))), max(1, int(base * (1 + range_ratio)))
        return rng.randint(lo, hi)

    out = []
    for _ in range(n):
        il, ol = length(input_len), length(output_len)
        out.append(BenchRequest([rng.randrange(10, vocab) for _ in range(il)], ol, il))
    return out


def file_dataset(path: Path, n: int, output_len: int, chat: bool, seed: int) -> list[BenchRequest]:
    """Requests from JSON lines or a ShareGPT-style JSON list (cycled to ``n``)."""
    from trtlm.errors import UserError

    if not path.is_file():
        raise UserError(f"--dataset {path}: no such file (or use --dataset random)")
    text = path.read_text()
    try:
        rows = json.loads(text) if text.lstrip().startswith("[") else \
            [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as exc:
        raise UserError(f"--dataset {path}: not JSON lines or a JSON list ({exc.msg} at line {exc.lineno})") from None
    reqs = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise UserError(f"--dataset {path}: entry {i} is not an object")
        ol = int(row.get("output_len", output_len))
        if "conversations" in row:  # ShareGPT: the first human turn
            turns = [t.get("value", "") for t in row["conversations"] if t.get("from") in ("human", "user")]
            if not turns:
                continue
            prompt: Any = turns[0]
        elif "messages" in row:
            prompt = row["messages"]
        elif "prompt" in row:
            prompt = row["prompt"]
        else:
            raise UserError(f"--dataset {path}: entry {i} has no \"prompt\", \"messages\" or \"conversations\"")
        if chat and isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
        if chat and not (isinstance(prompt, list) and all(isinstance(m, dict) for m in prompt)):
            raise UserError(f"--dataset {path}: entry {i}: chat needs text or messages, not token ids")
        reqs.append(BenchRequest(prompt, ol, len(prompt) if isinstance(prompt, list) and not chat else None))
    if not reqs:
        raise UserError(f"--dataset {path}: no requests in it")
    rng = random.Random(seed)
    rng.shuffle(reqs)
    return [reqs[i % len(reqs)] for i in range(n)]


def percentiles(values: list[float], scale: float = 1000.0) -> dict[str, float | None]:
    """mean / p50 / p99 (nearest-rank on the sorted values), in ms by default."""
    if not values:
        return {"mean": None, "p50": None, "p99": None}
    ordered = sorted(values)

    def pct(p: float) -> float:
        k = max(0, min(len(ordered) - 1, math.ceil(p / 100 * len(ordered)) - 1))
        return ordered[k] * scale

    return {"mean": statistics.fmean(ordered) * scale, "p50": pct(50), "p99": pct(99)}


async def _one(session, url: str, headers: dict[str, str], model: str, req: BenchRequest, chat: bool,
               stream: bool, ignore_eos: bool, temperature: float, timeout_s: float) -> Result:
    import aiohttp

    payload: dict[str, Any] = {"model": model, "max_tokens": req.output_len, "temperature": temperature,
                               "stream": stream, "ignore_eos": ignore_eos}
    if chat:
        payload["messages"] = req.prompt
    else:
        payload["prompt"] = req.prompt
    if stream:
        payload["stream_options"] = {"include_usage": True}
    start = time.perf_counter()
    result = Result(ok=False, prompt_len=req.prompt_len)
    last = start
    chunks = 0
    try:
        async with session.post(url, json=payload, headers=headers,
                                timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
            if resp.status != 200:
                body = (await resp.text())[:300]
                result.error = f"HTTP {resp.status}: {' '.join(body.split())}"
                return result
            if not stream:
                data = await resp.json()
                result.e2el = result.ttft = time.perf_counter() - start
                usage = data.get("usage") or {}
                result.output_tokens = int(usage.get("completion_tokens", 0))
                result.prompt_len = usage.get("prompt_tokens", result.prompt_len)
                result.ok = True
                return result
            async for raw in resp.content:
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    break
                obj = json.loads(data)
                if "error" in obj:
                    err = obj["error"]
                    result.error = err.get("message", str(err)) if isinstance(err, dict) else str(err)
                    return result
                choices = obj.get("choices") or []
                if choices:
                    c = choices[0]
                    text = c.get("text") if not chat else (c.get("delta") or {}).get("content")
                    if text:
                        now = time.perf_counter()
                        if result.ttft is None:
                            result.ttft = now - start
                        else:
                            result.itl.append(now - last)
                        last = now
                        chunks += 1
                usage = obj.get("usage")
                if usage:
                    result.output_tokens = int(usage.get("completion_tokens", 0))
                    result.prompt_len = usage.get("prompt_tokens", result.prompt_len)
            result.e2el = time.perf_counter() - start
            if not result.output_tokens:
                result.output_tokens = chunks  # servers without usage in streams: one token per chunk
            result.ok = result.ttft is not None or result.output_tokens == 0
            if not result.ok:
                result.error = "the stream ended without any generated text"
    except asyncio.TimeoutError:
        result.error = f"no answer within --timeout {timeout_s:g} s"
    except Exception as exc:  # noqa: BLE001 - every failure is counted, the benchmark goes on
        result.error = f"{type(exc).__name__}: {exc}"
    return result


async def run_benchmark(base_url: str, requests: list[BenchRequest], *, model: str | None = None,
                        api_key: str | None = None, chat: bool = False, stream: bool = True,
                        request_rate: float = math.inf, max_concurrency: int | None = None, ignore_eos: bool = True,
                        temperature: float = 0.0, timeout_s: float = 600.0, seed: int = 0) -> dict[str, Any]:
    """Send ``requests`` and return the summary (see :func:`summarize`)."""
    import aiohttp

    base = base_url.rstrip("/")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    async with aiohttp.ClientSession(connector=connector, trust_env=False) as session:
        if model is None:
            from trtlm.errors import UserError

            try:
                async with session.get(f"{base}/v1/models", headers=headers) as resp:
                    if resp.status != 200:
                        raise UserError(f"{base}/v1/models answered HTTP {resp.status}: give --model (and "
                                        f"--api-key if the server needs one)")
                    model = (await resp.json())["data"][0]["id"]
            except aiohttp.ClientError as exc:
                raise UserError(f"--base-url {base}: cannot reach the server ({exc})") from None
            except (KeyError, IndexError, ValueError):
                raise UserError(f"{base}/v1/models: no model listed; give --model") from None
        url = f"{base}/v1/chat/completions" if chat else f"{base}/v1/completions"
        gate = asyncio.Semaphore(max_concurrency) if max_concurrency else None
        rng = random.Random(seed)

        async def limited(req: BenchRequest) -> Result:
            if gate is None:
                return await _one(session, url, headers, model, req, chat, stream, ignore_eos, temperature, timeout_s)
            async with gate:
                return await _one(session, url, headers, model, req, chat, stream, ignore_eos, temperature, timeout_s)

        start = time.perf_counter()
        tasks = []
        for req in requests:
            tasks.append(asyncio.ensure_future(limited(req)))
            if request_rate != math.inf:
                await asyncio.sleep(rng.expovariate(request_rate))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    summary = summarize(results, duration)
    summary.update(base_url=base, model=model, endpoint="chat" if chat else "completions", stream=stream,
                   request_rate=None if request_rate == math.inf else request_rate, max_concurrency=max_concurrency)
    return summary


def summarize(results: list[Result], duration: float) -> dict[str, Any]:
    """Throughputs and latency statistics (ms) of finished requests, plus error counts."""
    ok = [r for r in results if r.ok]
    errors: dict[str, int] = {}
    for r in results:
        if not r.ok:
            errors[r.error or "unknown"] = errors.get(r.error or "unknown", 0) + 1
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_len or 0 for r in ok)
    tpot = [(r.e2el - r.ttft) / (r.output_tokens - 1) for r in ok
            if r.output_tokens > 1 and r.ttft is not None and r.e2el is not None]
    return {
        "duration_s": duration, "completed": len(ok), "failed": len(results) - len(ok),
        "errors": [{"message": m, "count": c} for m, c in sorted(errors.items(), key=lambda kv: -kv[1])[:10]],
        "total_input_tokens": in_tokens, "total_output_tokens": out_tokens,
        "request_throughput": len(ok) / duration if duration > 0 else None,
        "output_token_throughput": out_tokens / duration if duration > 0 else None,
        "total_token_throughput": (in_tokens + out_tokens) / duration if duration > 0 else None,
        "ttft_ms": percentiles([r.ttft for r in ok if r.ttft is not None]),
        "tpot_ms": percentiles(tpot),
        "itl_ms": percentiles([x for r in ok for x in r.itl]),
        "e2el_ms": percentiles([r.e2el for r in ok if r.e2el is not None]),
    }


def format_summary(s: dict[str, Any]) -> str:
    def ms(d, key):
        v = d[key]
        return "-" if v is None else f"{v:.2f}"

    lines = [f"{'Endpoint':<34}{s['base_url']} ({s['endpoint']}, model {s['model']})",
             f"{'Successful requests':<34}{s['completed']}", f"{'Failed requests':<34}{s['failed']}",
             f"{'Benchmark duration (s)':<34}{s['duration_s']:.2f}",
             f"{'Total input tokens':<34}{s['total_input_tokens']}",
             f"{'Total output tokens':<34}{s['total_output_tokens']}",
             f"{'Request throughput (req/s)':<34}{(s['request_throughput'] or 0):.2f}",
             f"{'Output token throughput (tok/s)':<34}{(s['output_token_throughput'] or 0):.2f}",
             f"{'Total token throughput (tok/s)':<34}{(s['total_token_throughput'] or 0):.2f}"]
    for key, name in (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT"), ("itl_ms", "ITL"), ("e2el_ms", "E2E latency")):
        d = s[key]
        lines.append(f"{name + ' (ms) mean / p50 / p99':<34}{ms(d, 'mean')} / {ms(d, 'p50')} / {ms(d, 'p99')}")
    for e in s["errors"]:
        lines.append(f"error x{e['count']}: {e['message']}")
    return "\n".join(lines)


@click.command("serve")
@click.option("--base-url", default="http://127.0.0.1:8000", show_default=True,
              help="The server's root URL (any OpenAI-compatible server).")
@click.option("--endpoint", type=click.Choice(["completions", "chat"]), default="completions", show_default=True,
              help="/v1/completions (token ids or text) or /v1/chat/completions (messages; text datasets only).")
@click.option("--model", help="The `model` to send (default: the first of GET /v1/models).")
@click.option("--api-key", envvar=["TRTLM_API_KEY", "OPENAI_API_KEY"], help="Sent as a Bearer token.")
@click.option("--dataset", default="random", show_default=True,
              help="`random`, or a JSON-lines file ({\"prompt\", \"output_len\"}) or ShareGPT JSON.")
@click.option("--num-prompts", default=100, show_default=True, type=POSITIVE, help="Requests sent in all.")
@click.option("--random-input-len", default=128, show_default=True, type=POSITIVE,
              help="Prompt tokens of each random prompt.")
@click.option("--random-output-len", default=128, show_default=True, type=POSITIVE,
              help="Also the output length of file prompts without one.")
@click.option("--random-range-ratio", default=0.0, show_default=True, type=click.FloatRange(0.0, 1.0, max_open=True),
              help="Lengths are uniform in [L*(1-r), L*(1+r)].")
@click.option("--random-vocab-size", default=1000, show_default=True, type=click.IntRange(min=11),
              help="Random prompt ids are drawn from [10, this).")
@click.option("--request-rate", default="inf", show_default=True,
              help="Requests per second (Poisson arrivals); inf: all at once.")
@click.option("--max-concurrency", type=POSITIVE, help="Requests in flight at most.")
@click.option("--ignore-eos/--no-ignore-eos", default=True, show_default=True,
              help="Ask for exactly the output length (ignore_eos).")
@click.option("--temperature", default=0.0, show_default=True, type=NON_NEGATIVE_FLOAT,
              help="Sampling temperature sent with each request; 0 = greedy.")
@click.option("--stream/--no-stream", default=True, show_default=True,
              help="Streamed responses (TTFT and ITL need them; without, TTFT is the whole latency).")
@click.option("--timeout", default=600.0, show_default=True, type=POSITIVE_FLOAT, help="Seconds per request.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the prompts (random ids, file order) and the arrival times.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
@click.option("--output", type=click.Path(path_type=Path), help="Also write the JSON document here.")
def bench_serve(base_url, endpoint, model, api_key, dataset, num_prompts, random_input_len, random_output_len,
                random_range_ratio, random_vocab_size, request_rate, max_concurrency, ignore_eos, temperature, stream,
                timeout, seed, as_json, output):
    """Load-test an OpenAI-compatible server: throughput, TTFT, TPOT, ITL."""
    from trtlm.errors import UserError

    try:
        rate = math.inf if request_rate.strip().lower() in ("inf", "infinity") else float(request_rate)
    except ValueError:
        raise UserError(f"--request-rate {request_rate!r}: expected requests per second or inf") from None
    if rate <= 0:
        raise UserError(f"--request-rate {request_rate}: must be > 0 (inf: all at once)")
    if not base_url.startswith(("http://", "https://")):
        raise UserError(f"--base-url {base_url}: expected http://HOST:PORT")
    chat = endpoint == "chat"
    if dataset == "random":
        if chat:
            raise UserError("--dataset random sends token ids, which chat cannot take: use --endpoint completions "
                            "or a dataset file")
        requests = random_dataset(num_prompts, random_input_len, random_output_len, random_range_ratio,
                                  random_vocab_size, seed)
    else:
        requests = file_dataset(Path(dataset), num_prompts, random_output_len, chat, seed)
    summary = asyncio.run(run_benchmark(base_url, requests, model=model, api_key=api_key, chat=chat, stream=stream,
                                        request_rate=rate, max_concurrency=max_concurrency, ignore_eos=ignore_eos,
                                        temperature=temperature, timeout_s=timeout, seed=seed))
    summary["num_prompts"] = num_prompts
    summary["dataset"] = dataset
    if output is not None:
        output.write_text(json.dumps(summary, indent=2) + "\n")
    click.echo(json.dumps(summary, indent=2) if as_json else format_summary(summary))

