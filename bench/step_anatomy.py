"""Where a batch-1 decode step's time goes, per quantization format (docs/benchmarks.md, "step anatomy").

    PYTHONPATH=core/src python bench/step_anatomy.py --quants none,fp8,int4-wo --out anatomy.json

For each format (Mistral-7B shapes, random weights on the GPU, as ``trtlm bench --dummy-weights``):

- ``step_ms``: the engine's wall time per decode step (128-token prompt, 128 greedy tokens);
- ``replay_ms``: the GPU time of the step's CUDA graph alone (CUDA events around back-to-back
  replays), so ``step_ms - replay_ms`` is what the step costs outside the model's forward: sampling,
  the host's scheduling and input staging, and the wait for the sampled token;
- ``kernels``: one eager forward under ``torch.profiler``, CUDA time summed per kernel name and per
  class (linear, attention, norm, other), to tell the weight-streaming kernels from the fixed cost.

``--pdl off,on`` measures each format twice over the same weights, without and with programmatic
dependent launch (a fresh engine each, graphs captured anew); ``--gemv-variants`` adds engines with
GEMV tiles patched (e.g. ``'{"bk2048": {"fp8,1": {"bk": 2048}}}'``) or kernel choices changed
(``'{"mm1": {"kernels": {"INT4PACK_MAX_ROWS": 0, "MIXED_MM_MIN_ROWS": 1}}}'``), to choose by the
step they give rather than by the isolated kernel.  With PDL on, the eager profile's kernel times
include each kernel's wait for the one before; the step and replay times are what counts.
"""
from __future__ import annotations

import argparse
import json
import os
import re
from collections import defaultdict

import torch

from trtlm.bench import dummy_model, make_engine, time_latency, weight_bytes_per_step
from trtlm.runtime.cuda_graphs import context_bucket
from trtlm.runtime.loader import prepare_for_device

CLASSES = [  # first match wins
    ("attention", re.compile(r"paged_attn|attention|flash", re.I)),
    ("norm", re.compile(r"rms|norm", re.I)),
    ("linear", re.compile(r"gemm|gemv|int4pack|tinygemm|scaled_mm|dequant|mixed_mm|cutlass|sm90|cublas|nvjet|"
                          r"splitK|gemvx|_mm_kernel|matmul", re.I)),
]


def classify(name: str) -> str:
    return next((c for c, rx in CLASSES if rx.search(name)), "other")


def replay_ms(graph: torch.cuda.CUDAGraph, n: int = 50) -> float:
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(n):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / n


def kernel_profile(engine, bb: int, cb: int) -> dict:
    graphs = engine.executor.graphs
    batch = graphs._batch(bb, cb)
    model = engine.executor.model
    with torch.no_grad():
        model(batch.tokens, batch, graphs.pool)
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            model(batch.tokens, batch, graphs.pool)
            torch.cuda.synchronize()
    per_name: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            per_name[ev.name][0] += ev.device_time_total / 1000.0
            per_name[ev.name][1] += 1
    classes: dict[str, dict[str, float]] = defaultdict(lambda: {"ms": 0.0, "kernels": 0})
    for name, (ms, count) in per_name.items():
        c = classes[classify(name)]
        c["ms"] += ms
        c["kernels"] += count
    top = sorted(per_name.items(), key=lambda kv: -kv[1][0])[:20]
    return {"total_ms": sum(v[0] for v in per_name.values()), "kernels": sum(v[1] for v in per_name.values()),
            "classes": dict(classes), "top": [{"name": n[:120], "ms": round(v[0], 4), "count": v[1]} for n, v in top]}


def _patch(patch: dict[str, dict]) -> tuple[dict, dict]:
    """Apply a variant: ``"kind,wide"`` entries update ``GEMV_CONFIGS`` (``"fp8,1"``: FP8, N > 4096);
    a ``"kernels"`` entry sets constants of :mod:`trtlm.quant.kernels` (e.g. ``INT4PACK_MAX_ROWS``,
    ``MIXED_MM_MIN_ROWS``: which kernel takes how many rows).  Returns what :func:`_restore` needs."""
    from trtlm.quant import gemv, kernels

    old = ({k: dict(v) for k, v in gemv.GEMV_CONFIGS.items()},
           {name: getattr(kernels, name) for name in patch.get("kernels", {})})
    for key, upd in patch.items():
        if key == "kernels":
            for name, value in upd.items():
                setattr(kernels, name, value)
        else:
            kind, wide = key.split(",")
            gemv.GEMV_CONFIGS[kind, wide == "1"].update(upd)
    return old


def _restore(old: tuple[dict, dict]) -> None:
    from trtlm.quant import gemv, kernels

    gemv.GEMV_CONFIGS.update(old[0])
    for name, value in old[1].items():
        setattr(kernels, name, value)


def _reprepare(model: torch.nn.Module, patch: dict) -> None:
    """Kernel choices are made in ``QuantLinear.prepare()``: make them again under a patch (and after it)."""
    from trtlm.quant.runtime import QuantLinear

    if "kernels" in patch:
        for m in model.modules():
            if isinstance(m, QuantLinear) and m._prepared_on is not None:
                m.prepare()


def anatomy(quant: str | None, input_len: int, output_len: int, pdl_settings: list[str],
            variants: dict[str, dict] | None = None) -> list[dict]:
    device = torch.device("cuda")
    bm = dummy_model("mistral", "7b", "bfloat16", device, quant=quant)
    paths = prepare_for_device(bm.model)  # as `trtlm bench` does: repacking, fused fc/gate, FP8 fusions
    nbytes = weight_bytes_per_step(bm.model, 1)
    out = []
    runs = [(pdl, "default", {}) for pdl in pdl_settings]
    runs += [(pdl_settings[-1], name, patch) for name, patch in (variants or {}).items()]
    for pdl, variant, patch in runs:  # the same weights, a fresh engine (and graphs captured) per setting
        os.environ["TRTLM_PDL"] = "1" if pdl == "on" else "0"
        old = _patch(patch)
        _reprepare(bm.model, patch)
        engine = make_engine(bm, device, max_batch_size=1, max_seq_len=input_len + output_len + 16,
                             max_num_tokens=max(2048, input_len), cuda_graphs=True)
        times = time_latency(engine, device, 1, input_len, output_len, reps=2)
        step = times["decode_s"] / (output_len - 1) * 1000
        graphs = engine.executor.graphs
        bb, cb = 1, context_bucket(input_len + output_len, graphs.max_context)
        graph, _ = graphs.graphs[bb, cb]
        replay = replay_ms(graph)
        prof = kernel_profile(engine, bb, cb)
        _restore(old)
        _reprepare(bm.model, patch)
        out.append({"quant": quant or "bf16", "pdl": pdl, "variant": variant, "gemv_patch": patch,
                    "step_ms": round(step, 4), "replay_ms": round(replay, 4),
                    "outside_forward_ms": round(step - replay, 4), "weight_GB": round(nbytes / 1e9, 3),
                    "kernel_paths": paths, "profile": prof})
        engine.close()
        del engine
    del bm
    torch.cuda.empty_cache()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quants", default="none,fp8,int4-wo,int8-wo")
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--pdl", default="on", help="programmatic dependent launch: on, off, or on,off (both, "
                    "each with its own engine over the same weights)")
    ap.add_argument("--gemv-variants", type=json.loads, default={},
                    help='more engines per quantized format, GEMV tiles patched or trtlm.quant.kernels constants '
                         'set, as JSON: {"name": {"fp8,1": {"bk": 2048}}} ("fp8,1": FP8 products of more than '
                         '4096 rows), {"name": {"kernels": {"INT4PACK_MAX_ROWS": 0}}}')
    ap.add_argument("--out")
    args = ap.parse_args()
    results = []
    for q in args.quants.split(","):
        runs = anatomy(None if q in ("none", "bf16") else q, args.input_len, args.output_len, args.pdl.split(","),
                       args.gemv_variants if q not in ("none", "bf16") else None)
        results += runs
        for r in runs:
            p = r["profile"]
            print(f"{r['quant']:9s} pdl {r['pdl']:3s} {r['variant']:10s} step {r['step_ms']:.3f} ms  "
                  f"replay {r['replay_ms']:.3f} ms  "
                  f"outside {r['outside_forward_ms']:.3f} ms  eager kernels {p['total_ms']:.3f} ms ({p['kernels']})  "
                  + "  ".join(f"{c} {v['ms']:.3f}/{v['kernels']}" for c, v in sorted(p["classes"].items())), flush=True)
            for t in p["top"][:12]:
                print(f"    {t['ms']:8.3f} ms {t['count']:4d}x  {t['name']}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
