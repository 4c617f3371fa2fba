"""Peak memory of calibration: layer by layer (what ``trtlm convert`` runs) vs the whole model.

Writes a random Mistral-shaped Hugging Face checkpoint (``--layers``, ``--hidden``...) once, then
runs one calibration (``--quant int4-awq``: statistics, K/V amax and the AWQ search, the
heaviest; ``fp8``: statistics and K/V amax) in a fresh
subprocess per mode and reports its peak:

* ``--device cpu``: the peak of the process's *anonymous* resident memory (``RssAnon`` sampled
  every millisecond, minus the value just before calibration): tensors torch allocates, not the
  memory-mapped checkpoint pages the kernel can drop at will;
* ``--device cuda``: ``torch.cuda.max_memory_allocated`` (layer by layer only: the whole-model
  reference builds on the CPU).

Usage: ``python scripts/calib_memory.py --layers 8 --hidden 1024 --inter 4096`` (prints JSON).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path


def make_model(out: Path, layers: int, hidden: int, inter: int, heads: int, kv_heads: int, vocab: int,
               dtype: str) -> Path:
    import torch
    from safetensors.torch import save_file

    if (out / "model.safetensors").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    cfg = {"architectures": ["MistralForCausalLM"], "model_type": "mistral", "hidden_size": hidden,
           "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
           "num_key_value_heads": kv_heads, "head_dim": hidden // heads, "vocab_size": vocab,
           "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "sliding_window": None,
           "hidden_act": "silu", "tie_word_embeddings": False, "dtype": dtype}
    (out / "config.json").write_text(json.dumps(cfg))
    g = torch.Generator().manual_seed(0)
    dt = getattr(torch, dtype)
    hd = hidden // heads
    t = {"model.embed_tokens.weight": (vocab, hidden), "lm_head.weight": (vocab, hidden), "model.norm.weight": (hidden,)}
    for i in range(layers):
        p = f"model.layers.{i}."
        t.update({p + "self_attn.q_proj.weight": (heads * hd, hidden), p + "self_attn.k_proj.weight": (kv_heads * hd, hidden),
                  p + "self_attn.v_proj.weight": (kv_heads * hd, hidden), p + "self_attn.o_proj.weight": (hidden, heads * hd),
                  p + "mlp.gate_proj.weight": (inter, hidden), p + "mlp.up_proj.weight": (inter, hidden),
                  p + "mlp.down_proj.weight": (hidden, inter), p + "input_layernorm.weight": (hidden,),
                  p + "post_attention_layernorm.weight": (hidden,)})
    tensors = {k: (torch.ones(s) if len(s) == 1 else torch.randn(s, generator=g) * s[-1] ** -0.5).to(dt)
               for k, s in t.items()}
    save_file(tensors, str(out / "model.safetensors"))
    return out


def _rss_anon() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    return 0


def measure(model_dir: Path, mode: str, device: str, dtype: str, samples: int, seq: int, quant: str) -> dict:
    import torch

    from trtlm.convert.options import ConvertOptions
    from trtlm.convert.pipeline import load, resolve_model
    from trtlm.plugins import get_registry
    from trtlm.quant import calibrate as cal
    from trtlm.quant import layerwise
    from trtlm.quant.plan import _meta_full

    reg = get_registry()
    entry, _ = resolve_model(model_dir, None, reg)
    hooks = reg.hooks(entry)
    opts = ConvertOptions(quant=quant, kv_cache_dtype="fp8")
    awq = quant == "int4-awq"
    loaded = load(hooks, model_dir, None, opts)
    plan = hooks.trtlm_map_layers(hf_config=loaded.hf_config, options=opts)
    dense = [s for s in plan.tensors if s.quantizable and _meta_full(s).dim() == 2]
    names = [s.name[:-7] for s in dense]
    rows = {s.name[:-7]: [sh[0] for sh in s.shapes] for s in dense}
    batches = cal.random_batches(int(loaded.hf_config["vocab_size"]), 0, samples, 1, seq)
    tdtype = getattr(torch, dtype)
    layer_bytes = sum(_meta_full(s).numel() for s in plan.tensors if s.layer == 0) * tdtype.itemsize
    model_bytes = sum(_meta_full(s).numel() for s in plan.tensors) * tdtype.itemsize
    peak, stop = [0], threading.Event()
    base = _rss_anon()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_anon())
            time.sleep(0.001)
    th = threading.Thread(target=sample, daemon=True)
    th.start()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    if mode == "layerwise":
        layerwise.calibrate_layerwise(plan, loaded, hooks, opts, batches, names, kv=True,
                                      awq_rows=rows if awq else None, group_size=128, dtype=tdtype, device=device)
    else:
        model = cal.dense_model(plan, loaded, hooks, opts, dtype=tdtype)
        stats = cal.collect(model, batches, names, True, progress="off")
        if awq:
            parts = {n: list(dict(model.named_modules())[n].weight.detach().float().split(r, 0))
                     for n, r in rows.items()}
            cal.awq_search(model, batches, parts, stats, 128, progress="off")
        del model
    secs = time.perf_counter() - t0
    stop.set()
    th.join()
    res = {"mode": mode, "quant": quant, "device": device, "dtype": dtype, "seconds": round(secs, 2),
           "layers": int(loaded.hf_config["num_hidden_layers"]), "one_layer_MB": round(layer_bytes / 1e6, 1),
           "model_MB": round(model_bytes / 1e6, 1), "activations_MB": round(
               samples * seq * int(loaded.hf_config["hidden_size"]) * tdtype.itemsize / 1e6, 1),
           "peak_cpu_anon_MB": round((peak[0] - base) / 1e6, 1)}
    if device == "cuda":
        res["peak_cuda_allocated_MB"] = round(torch.cuda.max_memory_allocated() / 1e6, 1)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, default=Path("/tmp/trtlm-calib-memory"))
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--inter", type=int, default=4096)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--modes", default="layerwise,whole")
    ap.add_argument("--quant", default="int4-awq", help="int4-awq (statistics + AWQ search) or fp8 (statistics)")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    a = ap.parse_args()
    model = a.dir / f"m{a.layers}x{a.hidden}x{a.inter}-{a.dtype}"
    if a.one:
        print(json.dumps(measure(model, a.one, a.device, a.dtype, a.samples, a.seq, a.quant)))
        return
    make_model(model, a.layers, a.hidden, a.inter, a.heads, a.kv_heads, a.vocab, a.dtype)
    for mode in a.modes.split(","):
        out = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--one", mode], capture_output=True, text=True)
        print(out.stdout.strip().splitlines()[-1] if out.returncode == 0 else f"{mode}: failed\n{out.stderr[-3000:]}",
              flush=True)


if __name__ == "__main__":
    main()
