"""A/B of the `compile` GPU decode path's kernel cuts, in one process on one model (bench/results/h100_run4).

Variants, all `compile` mode (fast forward + torch.compile'd pieces + CUDA graphs), Mistral-7B shapes,
random bf16 weights, batch 1, prompt 128, 256 new tokens (as `trtlm bench`):

* ``base``: RoPE and the two KV-cache writes as three kernels per layer, the step's positions/mask
  eager (the code of h100_run3);
* ``fused_write``: RoPE + both cache writes as one compiled op (``FastForward.fuse_cache_write``);
* ``fused_write+step``: also the step's positions and mask (``Transformer.step``, ~12 small kernels per
  step) compiled, by :class:`CompiledStepForward` below.  It changed nothing (6.028 vs 6.027 ms/step on
  the H100), so the runtime keeps ``fused_write`` only and this variant lives here.

Then transformers' eager ``generate`` at batch 1 (``--compare-hf``), and a check that the variants
generate the same tokens.  Usage: ``python3 bench/gpu_decode_ab.py OUT_DIR [DEVICE PRESET]`` (``cpu tiny``: a smoke test).
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from trtlm import bench
from trtlm.runtime.cuda_graph import GraphForward
from trtlm.runtime.fast import _Compiled
from trtlm.runtime.generate import Runner, SamplingParams
from trtlm.runtime.model import Step

VARIANTS = {"base": (False, False), "fused_write": (True, False), "fused_write+step": (True, True)}


def decode_step_tensors(model, pad: torch.Tensor, start: torch.Tensor, length: int):
    step = model.step(0, 1, pad, length=length, start_tensor=start)
    return step.positions, step.mask


class CompiledStepForward(GraphForward):
    """GraphForward whose decode step builds its positions and mask in a torch.compile'd function."""

    def __init__(self, model, **kw):
        super().__init__(model, **kw)
        self.step_tensors = _Compiled(decode_step_tensors)

    def _decode(self, length: int) -> torch.Tensor:
        positions, mask = self.step_tensors(self.model, self.static_pad, self.static_start, length)
        return self.impl(self.static_tokens, Step(self.static_start, length, positions, mask), self.cache)


def graph_forward(model, fused_write: bool, compiled_step: bool) -> GraphForward:
    gf = (CompiledStepForward if compiled_step else GraphForward)(model, compile=True)
    gf.impl.fuse_cache_write = fused_write
    return gf


def main(out: Path, device_name: str = "cuda", preset: str = "7b") -> None:
    out.mkdir(parents=True, exist_ok=True)
    torch._dynamo.config.recompile_limit = 64  # three variants x three cache-length buckets
    device = torch.device(device_name)
    t0 = time.perf_counter()
    bm = bench.dummy_model("mistral", preset, "bfloat16", device)
    print(f"model built in {time.perf_counter() - t0:.0f} s", flush=True)
    bw = bench.copy_bandwidth(device)
    print(f"copy bandwidth {bw / 1e9:.0f} GB/s", flush=True)
    info = {"model": bm.source, "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None, "torch": torch.__version__,
            "copy_bandwidth_GBps": bw / 1e9, "results": [], "hf": [], "tokens_equal_to_base": {}}
    prompts = [[5 + i % 900 for i in range(128)]]
    tokens = {}
    with torch.inference_mode():
        for name, (fw, cs) in VARIANTS.items():
            torch._dynamo.reset()
            gf = graph_forward(bm.model, fw, cs)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            t0 = time.perf_counter()
            times = bench.time_generation(gf, gf.new_cache, device, 1, 128, 256, 3)
            gen_s = bench.time_runner(gf, gf.new_cache, device, 1, 128, 256, GraphForward.SYNC_EVERY)
            row = bench.result_row(bm.model, 1, 128, 256, "compile", True, times, bw, device, gen_s)
            row["variant"] = name
            tokens[name] = Runner(gf, gf.new_cache, device).generate(
                prompts, SamplingParams(max_new_tokens=64, stop_at_eos=False)).output_ids
            info["results"].append(row)
            print(f"{name:>17}: decode {row['decode_tokens_per_s_per_seq']:.1f} tok/s "
                  f"({row['decode_step_ms']:.3f} ms/step), {100 * row['roofline_fraction']:.1f}% of roofline, "
                  f"ttft {row['ttft_ms']:.1f} ms, generate {row['generate_tokens_per_s_total']:.1f} tok/s "
                  f"[{time.perf_counter() - t0:.0f} s]", flush=True)
            del gf
            (out / "ab.json").write_text(json.dumps(info, indent=1))
        for name in VARIANTS:
            info["tokens_equal_to_base"][name] = tokens[name] == tokens["base"]
        print("same tokens as base:", info["tokens_equal_to_base"], flush=True)
        hf_config, dtype = bm.hf_config, bm.model.dtype
        bm.model = None
        if device.type == "cuda":
            torch.cuda.empty_cache()
        hf = bench.hf_model(hf_config, dtype, device)
        row = {"batch_size": 1, **bench.time_hf(hf, device, 1, 128, 256)}
        info["hf"].append(row)
        for r in info["results"]:
            r["speedup_vs_hf"] = r["decode_tokens_per_s_total"] / row["decode_tokens_per_s_total"]
        print(f"transformers: decode {row['decode_tokens_per_s_per_seq']:.2f} tok/s; speedups "
              + ", ".join(f"{r['variant']} {r['speedup_vs_hf']:.2f}x" for r in info["results"]), flush=True)
    (out / "ab.json").write_text(json.dumps(info, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "bench/results/h100_run4"), *sys.argv[2:])
