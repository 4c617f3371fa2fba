"""``trtlm bench``: prefill and decode speed of the torch runtime, against the memory roofline.

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
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from trtlm.errors import UserError

MODES = ("graph", "compile", "plain-graph", "eager")
MODE_HELP = ("graph: fast forward, decode steps replayed from CUDA graphs (the LLM's GPU path); "
             "compile: graph + torch.compile'd elementwise ops; plain-graph: the model's own forward in CUDA "
             "graphs; eager: the model's own forward step by step (the CPU path)")


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
    modes: list[str] = field(default_factory=lambda: ["graph"])
    reps: int = 3
    compare_hf: bool = False
    hf_batch_sizes: list[int] | None = None  #: default: ``batch_sizes``
    seed: int = 0


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


def dummy_model(family: str, preset: str, dtype: str, device: str | torch.device, layers: int | None = None,
                seed: int = 0) -> BenchModel:
    """The preset's network built on ``device`` with random weights (no checkpoint on disk)."""
    from trtlm.convert.mapping import Mapping
    from trtlm.convert.options import ConvertOptions
    from trtlm.convert.pipeline import final_config
    from trtlm.plugins import get_registry
    from trtlm.runtime.distributed import rank_network
    from trtlm.runtime.engine import BuildOptions
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
    model = rank_network(hooks, config, Mapping.from_config(config), 0, BuildOptions(), device=device,
                         dtype=TORCH_DTYPES[dtype])
    fill_random(model, seed)
    return BenchModel(model.eval(), config, hf_config, f"{family}:{preset}:dummy")


def engine_model(engine_dir: Path, device: str | torch.device) -> BenchModel:
    from trtlm.api import load_engine_config, load_model

    cfg = load_engine_config(engine_dir)
    config = cfg["pretrained_config"]
    model = load_model(engine_dir, config, torch.device(device))
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


def weight_bytes_per_step(model: torch.nn.Module, batch: int) -> int:
    """Weight bytes one decode step of ``batch`` sequences reads: every parameter once, but only
    ``batch`` rows of the embedding and, for MoE layers, the experts tokens are routed to
    (``top_k`` of ``E`` at batch 1; the expected distinct count under uniform routing beyond)."""
    from trtlm.runtime.model import MoE

    top_k = {}
    for name, m in model.named_modules():
        if isinstance(m, MoE):
            top_k[name] = m.top_k
    total = 0.0
    for name, p in model.named_parameters():
        n = p.numel() * p.element_size()
        if name.endswith("vocab_embedding.weight"):
            n = min(batch, p.shape[0]) * p.shape[1] * p.element_size()
        else:
            owner = name.rsplit(".", 2)[0]  # "...mlp" of "...mlp.fc.weight"
            if owner in top_k and p.dim() == 3:
                E, k = p.shape[0], top_k[owner]
                n = n * (1 - (1 - k / E) ** batch)  # = n * distinct / E
        total += n
    return int(total)


def make_forward(model: torch.nn.Module, mode: str) -> tuple[Callable, Callable[[int, int], None], bool]:
    """``(forward(tokens, start, pad), new_cache(batch, max_seq), uses_graphs)`` for a mode."""
    from trtlm.runtime.cuda_graph import GraphForward

    if mode == "eager":
        state: dict[str, Any] = {}

        def new_cache(batch: int, max_seq: int) -> None:
            state["cache"] = model.new_cache(batch, max_seq)

        def forward(tokens, start, pad):
            return model(tokens, model.step(start, tokens.shape[1], pad), state["cache"])

        return forward, new_cache, False
    if mode not in MODES:
        raise UserError(f"--mode {mode!r}: expected some of {', '.join(MODES)}")
    gf = GraphForward(model, fast=mode != "plain-graph", compile=mode == "compile")
    return gf, gf.new_cache, gf.graphs


def time_generation(forward, new_cache, device, batch: int, input_len: int, output_len: int, reps: int,
                    seed: int = 0) -> dict[str, float]:
    """Median prefill (to the first token) and decode times of greedy generation, random prompts."""
    g = torch.Generator("cpu").manual_seed(seed)
    tokens = torch.randint(3, 1000, (batch, input_len), generator=g).to(device)
    pad = torch.zeros(batch, dtype=torch.long, device=device)

    def once() -> tuple[float, float]:
        new_cache(batch, input_len + output_len)
        synchronize(device)
        t0 = time.perf_counter()
        logits = forward(tokens, 0, pad)
        nxt = logits[:, -1].argmax(-1)
        synchronize(device)
        t1 = time.perf_counter()
        for i in range(output_len - 1):
            logits = forward(nxt[:, None], input_len + i, pad)
            nxt = logits[:, -1].argmax(-1)
        synchronize(device)
        return t1 - t0, time.perf_counter() - t1

    once()  # warm-up: CUDA graph capture, compilation, allocator
    runs = [once() for _ in range(reps)]
    return {"prefill_s": statistics.median(r[0] for r in runs), "decode_s": statistics.median(r[1] for r in runs)}


def time_runner(forward, new_cache, device, batch: int, input_len: int, output_len: int, sync_every: int) -> float:
    """Seconds of one :class:`~trtlm.runtime.generate.Runner` greedy generation (what ``LLM.generate`` runs)."""
    from trtlm.runtime.generate import Runner, SamplingParams

    runner = Runner(forward, new_cache, device, sync_every=sync_every)
    prompts = [[5 + (b + i) % 900 for i in range(input_len)] for b in range(batch)]
    params = SamplingParams(max_new_tokens=output_len, stop_at_eos=False)
    synchronize(device)
    t0 = time.perf_counter()
    runner.generate(prompts, params)
    synchronize(device)
    return time.perf_counter() - t0


def result_row(model, batch, input_len, output_len, mode, graphs, times, bandwidth, device, generate_s) -> dict:
    steps = max(output_len - 1, 1)
    step_s = times["decode_s"] / steps
    wbytes = weight_bytes_per_step(model, batch)
    roofline_s = wbytes / bandwidth
    row = {
        "mode": mode, "cuda_graphs": graphs, "batch_size": batch, "input_len": input_len, "output_len": output_len,
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
    if generate_s is not None:
        row["generate_s"] = generate_s
        row["generate_tokens_per_s_total"] = batch * output_len / generate_s
    return row


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


# -- the whole benchmark --------------------------------------------------------------------------
def run_bench(bm: BenchModel, device: torch.device, opts: BenchOptions, log: Callable[[str], None] = lambda s: None
              ) -> dict[str, Any]:
    from trtlm.runtime.cuda_graph import GraphForward

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
        "results": [], "hf": [],
    }
    with torch.inference_mode():
        for mode in opts.modes:
            forward, new_cache, graphs = make_forward(bm.model, mode)
            for batch in opts.batch_sizes:
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                times = time_generation(forward, new_cache, device, batch, opts.input_len, opts.output_len,
                                        opts.reps, opts.seed)
                gen_s = None
                if mode != "eager":
                    gen_s = time_runner(forward, new_cache, device, batch, opts.input_len, opts.output_len,
                                        GraphForward.SYNC_EVERY)
                row = result_row(bm.model, batch, opts.input_len, opts.output_len, mode, graphs, times, bandwidth,
                                 device, gen_s)
                info["results"].append(row)
                log(f"{mode:>11} batch {batch:>3}: ttft {row['ttft_ms']:.1f} ms, decode "
                    f"{row['decode_tokens_per_s_per_seq']:.1f} tok/s/seq, {row['decode_tokens_per_s_total']:.0f} "
                    f"tok/s total, {100 * row['roofline_fraction']:.0f}% of roofline")
            del forward, new_cache
    if opts.compare_hf:
        if bm.hf_config is None:
            raise UserError("--compare-hf needs --family/--preset (an engine carries no transformers config)")
        dtype = bm.model.dtype
        bm.model = None  # room for transformers' copy
        if device.type == "cuda":
            torch.cuda.empty_cache()
        hf = hf_model(bm.hf_config, dtype, device, opts.seed)
        for batch in opts.hf_batch_sizes or opts.batch_sizes:
            row = {"batch_size": batch, **time_hf(hf, device, batch, opts.input_len, opts.output_len, opts.seed)}
            ours = [r for r in info["results"] if r["batch_size"] == batch]
            for r in ours:
                r["speedup_vs_hf"] = r["decode_tokens_per_s_total"] / row["decode_tokens_per_s_total"]
            info["hf"].append(row)
            log(f"transformers batch {batch:>3}: ttft {row['ttft_ms']:.1f} ms, decode "
                f"{row['decode_tokens_per_s_per_seq']:.1f} tok/s/seq")
        del hf
    return info
