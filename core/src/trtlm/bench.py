"""``trtlm bench``: the engine's speed — latency against the memory roofline, and offline throughput.

Everything runs through the same :class:`~trtlm.runtime.engine.Engine` that
``LLM.generate``, ``trtlm run`` and the servers use.

*latency* mode: batches of equal prompts; the prefill step (time to first
token) and the decode steps.

Decode at small batch reads every weight once per step, so its floor is
``weight bytes read per step / memory bandwidth``.  The bandwidth is measured
in the same run (a large device-to-device copy, bytes read plus bytes
written, as the copy engine's ceiling), and each result reports the fraction
of that roofline the decode step reached.  For MoE models only the experts
that tokens are routed to count (``top_k`` of ``E`` at batch 1; the expected
number of distinct experts under uniform routing at larger batches).

Models come from an engine directory or, with ``--dummy-weights``, straight
from a family preset: the network is built from the preset's TensorRT-LLM
config (the family's ``map_layers`` plan, no weights read) on the target
device and filled with random values there, so a 7B benchmark writes nothing
to disk.  ``--compare-hf`` times transformers' own model (random weights, same
dtype, eager ``generate``) in the same process.

*offline* mode: many requests of random (seeded) or file-given lengths,
submitted at once: requests/s, output and total tokens/s, TTFT and TPOT
percentiles, KV blocks used — and the same requests through static batching
(the next batch starts when the whole previous one ended, on the same engine
and kernels) and, with ``--compare-hf``, through transformers' batched
``generate``, all in the same run.
"""
from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from trtlm.errors import UserError

MODES = ("latency", "offline")
MODE_HELP = ("latency: batches of equal prompts, time to first token and decode speed against the roofline; "
             "offline: many requests of random lengths submitted at once (throughput, TTFT/TPOT percentiles), "
             "the same requests through static batching and, with --compare-hf, transformers' generate")


@dataclass
class BenchModel:
    model: Any
    config: dict[str, Any]  #: TensorRT-LLM config
    hf_config: dict[str, Any] | None
    source: str


@dataclass
class BenchOptions:
    batch_sizes: list[int] = field(default_factory=lambda: [1, 8, 64])
    input_len: int = 128
    output_len: int = 256
    modes: list[str] = field(default_factory=lambda: ["latency"])
    reps: int = 3
    compare_hf: bool = False
    hf_batch_sizes: list[int] | None = None  #: default: ``batch_sizes``
    seed: int = 0
    cuda_graphs: bool = True
    #: offline mode: number of requests, input/output length ranges (uniform), or a JSONL dataset
    num_requests: int = 1000
    input_range: tuple[int, int] = (128, 1024)
    output_range: tuple[int, int] = (128, 512)
    dataset: Path | None = None
    max_batch_size: int = 256
    max_num_tokens: int = 8192
    static_baseline: bool = True


# -- models ----------------------------------------------------------------------------------
def fill_random(model: torch.nn.Module, seed: int = 0, std: float = 0.02) -> None:
    """Random weights in place, on the parameters' own device: norms 1, biases 0, the rest N(0, std)."""
    gens: dict[torch.device, torch.Generator] = {}
    for name, p in model.named_parameters():
        if not p.dtype.is_floating_point:
            continue
        g = gens.get(p.device)
        if g is None:
            g = gens[p.device] = torch.Generator(p.device).manual_seed(seed)
        with torch.no_grad():
            if "layernorm" in name or "ln_f" in name:
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            else:
                p.normal_(0.0, std, generator=g)


def fill_random_codes(model: torch.nn.Module, seed: int = 0, std: float = 0.02) -> None:
    """Random stored tensors for every quantized layer, shaped like a quantizer's output for
    N(0, ``std``) weights: codes spread over the format's range (fp8: N(0, 64); int8: uniform
    [-127, 127]; int4: any byte, i.e. two uniform codes in [-8, 7]), weight scales that map the
    codes' spread back to ``std``, unit pre-quant scales and activation scales for inputs of
    magnitude ~4.  What a benchmark needs: the bytes, layouts and kernels of a real quantized
    checkpoint (values do not change the speed)."""
    from trtlm.quant.runtime import QuantExpertWeights, QuantLinear

    spread = {"fp8": 64.0, "int8": 73.0, "int4": 4.6}  # std of the codes drawn below
    act_max = {"fp8": 448.0, "int8": 127.0}
    for i, m in enumerate(x for x in model.modules() if isinstance(x, (QuantLinear, QuantExpertWeights))):
        fmt = m.fmt
        with torch.no_grad():
            for name, buf in m.named_buffers(recurse=False):
                g = torch.Generator(buf.device).manual_seed(seed + 7919 * i)
                if name == "weight":
                    if buf.dtype == torch.float8_e4m3fn:
                        codes = torch.randn(buf.shape, generator=g, device=buf.device).mul_(64).clamp_(-448, 448)
                        buf.copy_(codes.to(buf.dtype))
                    else:
                        low = -128 if fmt.weight == "int4" else -127
                        buf.copy_(torch.randint(low, 128, buf.shape, generator=g, device=buf.device,
                                                dtype=torch.int8))
                elif name == "weights_scaling_factor":
                    buf.fill_(std / spread[fmt.weight])
                elif name == "activation_scaling_factor":
                    buf.fill_(4.0 / act_max.get(fmt.activation or "fp8", 448.0))
                elif name == "prequant_scaling_factor":
                    buf.fill_(1.0)


def dummy_model(family: str, preset: str, dtype: str, device: str | torch.device, layers: int | None = None,
                seed: int = 0, quant: str | None = None) -> BenchModel:
    """The preset's network built on ``device`` with random weights (no checkpoint on disk);
    ``quant``: a ``--quant`` format, its layers holding random codes (:func:`fill_random_codes`)."""
    from trtlm.build import BuildOptions
    from trtlm.convert.options import ConvertOptions
    from trtlm.convert.pipeline import final_config
    from trtlm.mapping import Mapping
    from trtlm.plugins import get_registry
    from trtlm.runtime.distributed import rank_network
    from trtlm.runtime.model import TORCH_DTYPES

    if dtype not in TORCH_DTYPES:
        raise UserError(f"--dtype {dtype!r}: expected one of {', '.join(TORCH_DTYPES)}")
    registry = get_registry()
    entry = registry.family(family)
    presets = entry.family.presets
    if preset not in presets:
        raise UserError(f"--preset {preset!r} is not a preset of family {family} "
                        f"(presets: {', '.join(sorted(presets)) or 'none'})")
    hf_config = dict(presets[preset])
    if layers:
        hf_config["num_hidden_layers"] = int(layers)
    hf_config["dtype"] = dtype
    hooks = registry.hooks(entry)
    options = ConvertOptions(dtype=dtype, dummy_weights=True, seed=seed)
    plan = hooks.trtlm_map_layers(hf_config=hf_config, options=options)
    config = final_config(plan, Mapping(1, 1, 0, 0), dtype)
    if quant:
        from trtlm.quant import schemes
        from trtlm.quant.plan import quantization_block

        if quant not in schemes.FORMATS:
            raise UserError(f"--quant {quant!r}: choose one of {', '.join(schemes.names())}")
        if quant not in entry.family.capabilities.quantization:
            raise UserError(f"--quant {quant} is not supported by family {family} (supported: "
                            f"{', '.join(entry.family.capabilities.quantization) or 'none'})")
        routers = [s.name[: -len(".weight")] for s in plan.tensors if s.name.endswith("mlp.router.weight")]
        group = 128  # TensorRT-LLM's default; halved for small presets whose widths it does not divide
        widths = [int(config.get(k) or 0) for k in ("hidden_size", "intermediate_size")]
        while group > 16 and any(w % group for w in widths):
            group //= 2
        config["quantization"] = quantization_block(quant, None, group, routers)
    model = rank_network(hooks, config, Mapping.from_config(config), 0, BuildOptions(), device=device,
                         dtype=TORCH_DTYPES[dtype])
    fill_random(model, seed)
    fill_random_codes(model, seed)
    name = f"{family}:{preset}:dummy" + (f":{quant}" if quant else "")
    return BenchModel(model.eval(), config, hf_config, name)


def engine_model(engine_dir: Path, device: str | torch.device) -> BenchModel:
    from trtlm.runtime.loader import load_engine_config, merged_model, resolve

    cfg = load_engine_config(engine_dir)
    config = cfg["pretrained_config"]
    model = merged_model(engine_dir, config, resolve(device))
    return BenchModel(model, config, None, str(engine_dir))


# -- measurements ----------------------------------------------------------------------------
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device: torch.device, nbytes: int | None = None, iters: int = 20) -> float:
    """Bytes per second of a large device-to-device copy, counting bytes read plus bytes written."""
    nbytes = nbytes or (2 << 30 if device.type == "cuda" else 256 << 20)
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(iters):
        synchronize(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        synchronize(device)
        times.append(time.perf_counter() - t0)
    del src, dst
    return 2 * nbytes / statistics.median(times)


def weight_bytes_per_token(model: torch.nn.Module, batch: int = 1) -> int:
    """Weight bytes one decode step of ``batch`` sequences reads, counted from real storage.

    Every stored tensor of the model counts once at its stored size: parameters *and* persistent
    buffers, so a quantized linear counts its packed codes plus its scales (int4: half a byte per
    weight; fp8/int8: one byte), not a float copy.  Only ``batch`` rows of the embedding are read,
    and for MoE layers only the experts tokens are routed to: every tensor of the expert stacks
    (codes and per-expert scales alike, leading dimension ``E``) scales by the expected fraction of
    distinct experts hit, ``1 - (1 - k/E)^batch`` under uniform routing (exactly ``k/E`` at batch 1).
    Non-persistent buffers (RoPE tables and the like) are not weights and are not counted.
    """
    from trtlm.runtime.model import MoE

    top_k: dict[str, tuple[int, int]] = {}
    for name, m in model.named_modules():
        if isinstance(m, MoE):
            fc = m.fc.weight
            top_k[name] = (m.top_k, fc.shape[0])
    total = 0.0
    for name, t in model.state_dict(keep_vars=True).items():
        if t is None or t.is_meta:
            continue
        n = t.numel() * t.element_size()
        if name.endswith("vocab_embedding.weight"):
            n = min(batch, t.shape[0]) * t.shape[1] * t.element_size()
        else:
            parts = name.rsplit(".", 2)  # "...mlp", "fc", "weight"
            owner = parts[0]
            if owner in top_k and len(parts) == 3 and parts[1] in ("fc", "proj") and t.dim() >= 2:
                k, E = top_k[owner]
                if t.shape[0] == E:
                    n = n * (1 - (1 - k / E) ** batch)  # = n * distinct / E
        total += n
    return int(total)


def weight_bytes_per_step(model: torch.nn.Module, batch: int) -> int:
    """Alias of :func:`weight_bytes_per_token` (kept for callers of the old name)."""
    return weight_bytes_per_token(model, batch)


# -- transformers ---------------------------------------------------------------------------------
def hf_model(hf_config: dict[str, Any], dtype: torch.dtype, device: torch.device, seed: int = 0):
    """transformers' own model for ``hf_config`` with random weights, built on ``device``."""
    import transformers

    from trtlm.testing.models import transformers_class

    cls = transformers_class(hf_config)
    if cls is None:
        raise UserError(f"--compare-hf: transformers has no class for {hf_config.get('architectures')}")
    kwargs = {k: v for k, v in hf_config.items() if k not in ("model_type", "architectures", "dtype")}
    cfg = transformers.AutoConfig.for_model(hf_config["model_type"], **kwargs)
    torch.manual_seed(seed)
    with torch.device(device):
        model = cls._from_config(cfg, dtype=dtype)
    return model.eval()


def time_hf(model, device, batch: int, input_len: int, output_len: int, seed: int = 0) -> dict[str, float]:
    """transformers' eager greedy ``generate``: time to first token and the decode rate."""
    g = torch.Generator("cpu").manual_seed(seed)
    ids = torch.randint(3, 1000, (batch, input_len), generator=g).to(device)
    mask = torch.ones_like(ids)
    kw = dict(attention_mask=mask, do_sample=False, pad_token_id=0, eos_token_id=None)

    def gen(n: int) -> float:
        synchronize(device)
        t0 = time.perf_counter()
        with torch.inference_mode():
            model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kw)
        synchronize(device)
        return time.perf_counter() - t0

    gen(2)  # warm-up
    ttft = gen(1)
    total = gen(output_len)
    decode = max(total - ttft, 1e-9)
    steps = max(output_len - 1, 1)
    return {"ttft_ms": ttft * 1e3, "prefill_tokens_per_s": batch * input_len / ttft,
            "decode_step_ms": decode / steps * 1e3, "decode_tokens_per_s_per_seq": steps / decode,
            "decode_tokens_per_s_total": batch * steps / decode, "generate_s": total}



# -- the engine under test ----------------------------------------------------------------------------
def make_engine(bm: BenchModel, device: torch.device, max_batch_size: int, max_seq_len: int,
                max_num_tokens: int, cuda_graphs: bool) -> Any:
    """An :class:`~trtlm.runtime.engine.Engine` over the benchmark's model (no tokenizer: token ids only)."""
    from trtlm.runtime.engine import Engine, EngineConfig
    from trtlm.runtime.executor import LocalExecutor

    config = EngineConfig(max_batch_size=max_batch_size, max_num_tokens=max_num_tokens,
                          enable_prefix_caching=False, use_cuda_graphs=cuda_graphs)
    executor = LocalExecutor(bm.model, device, use_cuda_graphs=cuda_graphs)
    return Engine(executor, max_seq_len=max_seq_len, vocab_size=int(bm.config["vocab_size"]),
                  max_batch_size=max_batch_size, config=config, model_name=bm.source)


def _greedy(max_tokens: int):
    from trtlm.runtime.sampling import SamplingParams

    return SamplingParams(max_tokens=max_tokens, ignore_eos=True, detokenize=False)


def random_prompt(g: torch.Generator, length: int, vocab: int) -> list[int]:
    return torch.randint(3, min(vocab, 32000), (length,), generator=g).tolist()


def time_latency(engine, device, batch: int, input_len: int, output_len: int, reps: int,
                 seed: int = 0) -> dict[str, float]:
    """``batch`` prompts of ``input_len`` tokens, ``output_len`` greedy tokens each: the prefill step
    (time to first token) and the decode steps, median over ``reps`` runs after a warm-up."""
    g = torch.Generator("cpu").manual_seed(seed)
    prompts = [random_prompt(g, input_len, engine.vocab_size) for _ in range(batch)]

    def once() -> tuple[float, float]:
        for p in prompts:
            engine.add_request(p, _greedy(output_len), stream=False)
        synchronize(device)
        t0 = time.perf_counter()
        engine.step()  # every prompt in one step (max_num_tokens >= batch * input_len)
        synchronize(device)
        t1 = time.perf_counter()
        while engine.has_unfinished():
            engine.step()
        synchronize(device)
        return t1 - t0, time.perf_counter() - t1

    once()  # warm-up: CUDA graph capture, kernel autotuning, allocator
    runs = [once() for _ in range(reps)]
    return {"prefill_s": statistics.median(r[0] for r in runs), "decode_s": statistics.median(r[1] for r in runs)}


def latency_row(model, batch, input_len, output_len, times, bandwidth, device) -> dict:
    steps = max(output_len - 1, 1)
    step_s = times["decode_s"] / steps
    wbytes = weight_bytes_per_token(model, batch)
    roofline_s = wbytes / bandwidth
    return {
        "mode": "latency", "batch_size": batch, "input_len": input_len, "output_len": output_len,
        "ttft_ms": times["prefill_s"] * 1e3,
        "prefill_tokens_per_s": batch * input_len / times["prefill_s"],
        "decode_step_ms": step_s * 1e3,
        "decode_tokens_per_s_per_seq": 1.0 / step_s,
        "decode_tokens_per_s_total": batch / step_s,
        "weight_bytes_per_step": wbytes,
        "roofline_step_ms": roofline_s * 1e3,
        "roofline_tokens_per_s_per_seq": 1.0 / roofline_s,
        "roofline_fraction": roofline_s / step_s,
        "peak_gpu_memory_gb": (torch.cuda.max_memory_allocated(device) / 2**30) if device.type == "cuda" else None,
    }


# -- offline throughput ---------------------------------------------------------------------------------
def offline_requests(opts: BenchOptions, vocab: int) -> list[tuple[list[int], int]]:
    """(prompt ids, output length) pairs: seeded uniform lengths, or a JSONL file of
    ``{"input_len", "output_len"}`` (or ``{"prompt_ids", "output_len"}``) lines."""
    g = torch.Generator("cpu").manual_seed(opts.seed)
    if opts.dataset is not None:
        out = []
        for n, line in enumerate(opts.dataset.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                ids = rec.get("prompt_ids") or random_prompt(g, int(rec["input_len"]), vocab)
                out.append((list(map(int, ids)), int(rec["output_len"])))
            except (ValueError, KeyError, TypeError) as exc:
                raise UserError(f"--dataset {opts.dataset}:{n}: expected JSON with input_len (or prompt_ids) and "
                                f"output_len ({exc})") from None
        return out
    lo_i, hi_i = opts.input_range
    lo_o, hi_o = opts.output_range
    lens_in = torch.randint(lo_i, hi_i + 1, (opts.num_requests,), generator=g).tolist()
    lens_out = torch.randint(lo_o, hi_o + 1, (opts.num_requests,), generator=g).tolist()
    return [(random_prompt(g, i, vocab), o) for i, o in zip(lens_in, lens_out)]


def _percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"mean": float("nan"), "p50": float("nan"), "p99": float("nan")}
    t = torch.tensor(values, dtype=torch.float64)
    return {"mean": float(t.mean()), "p50": float(t.quantile(0.5)), "p99": float(t.quantile(0.99))}


def run_offline(engine, device, requests: list[tuple[list[int], int]], static: bool = False) -> dict[str, Any]:
    """All requests at once through continuous batching (or, ``static``, in batches of
    ``max_batch_size`` where the next batch starts only when the whole previous one ended —
    TensorRT-LLM's old V1 batching on the same engine and kernels)."""
    pending = list(enumerate(requests))
    outs: dict[int, Any] = {}
    ids: dict[str, int] = {}
    peak_blocks = 0
    synchronize(device)
    start = time.monotonic()
    t0 = time.perf_counter()
    while pending or engine.has_unfinished():
        if pending and (not static or not engine.has_unfinished()):
            take = pending if not static else pending[:engine.max_batch_size]
            for i, (prompt, n) in take:
                ids[engine.add_request(prompt, _greedy(n), arrival_time=start, stream=False)] = i
            pending = pending[len(take):]
        for out in engine.step():
            if out.finished:
                outs[ids[out.request_id]] = out
        peak_blocks = max(peak_blocks, engine.allocator.num_used)
    synchronize(device)
    elapsed = time.perf_counter() - t0
    output_tokens = sum(len(o.outputs[0].token_ids) for o in outs.values())
    input_tokens = sum(len(p) for p, _ in requests)
    ttft = [(o.metrics.first_token_time - o.metrics.arrival_time) * 1e3 for o in outs.values()]
    tpot = [(o.metrics.finished_time - o.metrics.first_token_time) * 1e3 / (len(o.outputs[0].token_ids) - 1)
            for o in outs.values() if len(o.outputs[0].token_ids) > 1]
    return {"batching": "static" if static else "continuous", "requests": len(requests), "elapsed_s": elapsed,
            "requests_per_s": len(requests) / elapsed, "output_tokens_per_s": output_tokens / elapsed,
            "total_tokens_per_s": (input_tokens + output_tokens) / elapsed, "input_tokens": input_tokens,
            "output_tokens": output_tokens, "ttft_ms": _percentiles(ttft), "tpot_ms": _percentiles(tpot),
            "kv_blocks_peak": peak_blocks, "kv_blocks_total": engine.allocator.num_blocks,
            "kv_block_size": engine.block_size, "preemptions": engine.stats().preemptions}


def time_hf_offline(model, device, requests, batch: int) -> dict[str, Any]:
    """transformers' batched ``generate`` over the same requests (left-padded batches of ``batch``)."""
    t0 = time.perf_counter()
    produced = 0
    for i in range(0, len(requests), batch):
        chunk = requests[i:i + batch]
        T = max(len(p) for p, _ in chunk)
        n = max(o for _, o in chunk)
        ids = torch.zeros(len(chunk), T, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for b, (p, _) in enumerate(chunk):
            ids[b, T - len(p):] = torch.tensor(p)
            mask[b, T - len(p):] = 1
        with torch.inference_mode():
            model.generate(ids.to(device), attention_mask=mask.to(device), max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, pad_token_id=0, eos_token_id=None)
        produced += sum(o for _, o in chunk)  # the tokens asked for (it computes up to n for every row)
    synchronize(device)
    elapsed = time.perf_counter() - t0
    return {"batching": "transformers-generate", "batch_size": batch, "requests": len(requests),
            "elapsed_s": elapsed, "output_tokens_per_s": produced / elapsed, "requests_per_s": len(requests) / elapsed}


# -- the whole benchmark --------------------------------------------------------------------------
def run_bench(bm: BenchModel, device: torch.device, opts: BenchOptions, log: Callable[[str], None] = lambda s: None
              ) -> dict[str, Any]:
    from trtlm.runtime.loader import prepare_for_device

    kernels = getattr(bm.model, "kernel_paths", None)
    if kernels is None:  # quantized layers pick their kernels once (before any CUDA graph)
        kernels = prepare_for_device(bm.model)
    for layer, path in kernels.items():
        log(f"quantized {layer}: {path}")
    bandwidth = copy_bandwidth(device)
    log(f"copy bandwidth {bandwidth / 1e9:.0f} GB/s (read + write)")
    info: dict[str, Any] = {
        "model": bm.source, "device": str(device), "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "dtype": str(bm.model.dtype).replace("torch.", ""),
        "layers": len(bm.model.transformer.layers),
        "parameters": sum(p.numel() for p in bm.model.parameters()),
        "parameter_bytes": sum(p.numel() * p.element_size() for p in bm.model.parameters()),
        "copy_bandwidth_GBps": bandwidth / 1e9,
        "weight_bytes_per_token": weight_bytes_per_token(bm.model, 1),
        "quant_kernels": kernels, "cuda_graphs": opts.cuda_graphs,
        "results": [], "offline": [], "hf": [],
    }
    vocab = int(bm.config["vocab_size"])
    if "latency" in opts.modes:
        max_b = max(opts.batch_sizes)
        engine = make_engine(bm, device, max_b, opts.input_len + opts.output_len,
                             max(8192, max_b * opts.input_len), opts.cuda_graphs)
        for batch in opts.batch_sizes:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            times = time_latency(engine, device, batch, opts.input_len, opts.output_len, opts.reps, opts.seed)
            row = latency_row(bm.model, batch, opts.input_len, opts.output_len, times, bandwidth, device)
            info["results"].append(row)
            log(f"latency batch {batch:>3}: ttft {row['ttft_ms']:.1f} ms, decode "
                f"{row['decode_tokens_per_s_per_seq']:.1f} tok/s/seq, {row['decode_tokens_per_s_total']:.0f} "
                f"tok/s total, {100 * row['roofline_fraction']:.0f}% of roofline")
        engine.close()
        del engine
    if "offline" in opts.modes:
        requests = offline_requests(opts, vocab)
        longest = max(len(p) + n for p, n in requests)
        engine = make_engine(bm, device, opts.max_batch_size, longest, opts.max_num_tokens, opts.cuda_graphs)
        engine.warm_up()  # as `trtlm serve` starts: kernels compiled, every CUDA graph captured
        run_offline(engine, device, requests[:min(len(requests), 2 * opts.max_batch_size)][:16])
        for static in ([False, True] if opts.static_baseline else [False]):
            row = run_offline(engine, device, requests, static=static)
            info["offline"].append(row)
            log(f"offline {row['batching']:>10}: {row['requests_per_s']:.2f} req/s, "
                f"{row['output_tokens_per_s']:.0f} output tok/s, TTFT p50 {row['ttft_ms']['p50']:.0f} ms, "
                f"TPOT p50 {row['tpot_ms']['p50']:.1f} ms, peak KV blocks {row['kv_blocks_peak']}"
                f"/{row['kv_blocks_total']}")
        if len(info["offline"]) == 2:
            info["continuous_over_static"] = (info["offline"][0]["output_tokens_per_s"]
                                              / info["offline"][1]["output_tokens_per_s"])
        engine.close()
        del engine
    if opts.compare_hf:
        if bm.hf_config is None:
            raise UserError("--compare-hf needs --family/--preset (an engine carries no transformers config)")
        dtype = bm.model.dtype
        bm.model = None  # room for transformers' copy
        if device.type == "cuda":
            torch.cuda.empty_cache()
        hf = hf_model(bm.hf_config, dtype, device, opts.seed)
        if "latency" in opts.modes:
            for batch in opts.hf_batch_sizes or opts.batch_sizes:
                row = {"batch_size": batch, **time_hf(hf, device, batch, opts.input_len, opts.output_len, opts.seed)}
                for r in info["results"]:
                    if r["batch_size"] == batch:
                        r["speedup_vs_hf"] = r["decode_tokens_per_s_total"] / row["decode_tokens_per_s_total"]
                info["hf"].append(row)
                log(f"transformers batch {batch:>3}: ttft {row['ttft_ms']:.1f} ms, decode "
                    f"{row['decode_tokens_per_s_per_seq']:.1f} tok/s/seq")
        if "offline" in opts.modes:
            requests = offline_requests(opts, vocab)
            hf_batch = (opts.hf_batch_sizes or [64])[0]
            row = time_hf_offline(hf, device, requests, hf_batch)
            info["offline"].append(row)
            log(f"offline transformers (batch {hf_batch}): {row['output_tokens_per_s']:.0f} output tok/s")
        del hf
    return info
