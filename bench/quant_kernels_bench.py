"""Quantized linear kernels vs a bf16 ``F.linear`` on one GPU (docs/benchmarks.md, "quantized kernels").

    PYTHONPATH=core/src python bench/quant_kernels_bench.py --out results.json [--sweep]
    PYTHONPATH=core/src python bench/quant_kernels_bench.py --out mixed.json --mixed-mm   # < 90 s

For each format and Mistral-7B linear shape (out x in: 4096x4096, 14336x4096, 4096x14336) at 1 and
64 rows: the module's chosen path (``QuantLinear.prepare``) and the candidates (Triton
dequant-matmul, ``torch._weight_int4pack_mm``, ``torch._weight_int8pack_mm``, ``torch._scaled_mm``,
``torch._int_mm``), each checked against the emulation (max |err| / max |ref| <= 2**-6, i.e. a few
bf16 ulps at the output's largest value) and timed.  Timing: one CUDA graph replays the op over a
rotation of weight copies totalling >= 256 MB (so the 50 MB L2 never holds the next weight),
microseconds per call = median over replays / calls.  Mixtral expert layers (E=8, H=4096,
I=14336, top-2) are timed through ``quant_moe_forward`` against ``moe_forward`` in bf16.

``--gemv`` times only the one-row GEMV (``trtlm.quant.gemv``) over a tile sweep at Mistral-7B's
decode shapes, against bf16 and the module's path (< 20 s).

``--mixed-mm`` times only the mixed-input GEMM ``qk.mixed_mm`` (weights repacked K-major once) at
32/64/128 rows over a small config sweep, against bf16 ``F.linear`` and today's path (the module's
forward, i.e. the tiled ``dequant_mm``), for int4-wo, int8-wo and int4-awq.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys

import torch
import torch.nn.functional as F

from trtlm.quant import formats as qf
from trtlm.quant import kernels as qk
from trtlm.quant.runtime import QuantExpertWeights, QuantLinear, quant_moe_forward

SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336)]  # (out, in)
ROWS = [1, 64]
FORMATS = {
    "fp8": ("FP8", {}),
    "int8-wo": ("W8A16", {}),
    "int4-wo": ("W4A16_AWQ", {"group_size": 128, "pre_quant_scale": False}),
    "int4-awq": ("W4A16_AWQ", {"group_size": 128, "pre_quant_scale": True}),
    "int8-sq": ("W8A8_SQ_PER_CHANNEL", {}),
}
TOL = 2.0 ** -6
DT = torch.bfloat16
ROTATE_BYTES = 256 << 20
OUT_PATH = [""]
MOE_TOKENS = [1, 64]
SWEEP_BN = (16, 32, 64)
SWEEP_BK = (256, 512)
SWEEP_SPLIT = (0, 1, 2, 4)  # 0: the default rule


def quant_module(name: str, out: int, inp: int, gen: torch.Generator) -> QuantLinear:
    algo, q = FORMATS[name]
    m = QuantLinear(algo, {"quantization": {"quant_algo": algo, **q}}, inp, out, False, DT, "cuda")
    w = torch.randn(out, inp, device="cuda", generator=gen) * 0.02
    b = dict(m.named_buffers())
    x_amax = 4.0
    with torch.no_grad():
        if name == "fp8":
            s = qf.fp8_weight_scale(w)
            b["weight"].copy_(qf.quantize_fp8(w, s)); b["weights_scaling_factor"].copy_(s)
            b["activation_scaling_factor"].copy_(qf.fp8_activation_scale(x_amax))
        elif name == "int8-wo":
            s = qf.int8_weight_scale(w)
            b["weight"].copy_(qf.quantize_int8(w, s)); b["weights_scaling_factor"].copy_(s)
        elif name.startswith("int4"):
            p = torch.rand(inp, device="cuda", generator=gen) + 0.5 if name == "int4-awq" else None
            ws = w / p if p is not None else w
            s = qf.int4_group_scales(ws, 128)
            b["weight"].copy_(qf.pack_int4(qf.quantize_int4(ws, s, 128))); b["weights_scaling_factor"].copy_(s)
            if p is not None:
                b["prequant_scaling_factor"].copy_(p.to(DT))
        else:  # int8-sq
            p = torch.rand(inp, device="cuda", generator=gen) + 0.5
            ws = w / p
            s = qf.int8_weight_scale(ws)
            b["weight"].copy_(qf.quantize_int8(ws, s)); b["weights_scaling_factor"].copy_(s)
            b["prequant_scaling_factor"].copy_(p.to(DT))
            b["activation_scaling_factor"].copy_(torch.tensor([x_amax * 1.5 / 127]))
    m.prepare()
    return m


def nbytes(m: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in m.state_dict().values())


def time_op(make_call, per_copy_bytes: int, reps: int = 5) -> float:
    """Microseconds per call of ``make_call(i)`` (a closure over copy ``i``), CUDA-graph replayed."""
    copies = max(2, min(64, ROTATE_BYTES // max(per_copy_bytes, 1)))
    calls = [make_call(i) for i in range(copies)]
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for c in calls:  # warm up (Triton compile, cuBLAS heuristics) outside the graph
            c()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    n_loops = 4
    with torch.cuda.graph(g):
        for _ in range(n_loops):
            for c in calls:
                c()
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        g.replay()
        e1.record()
        torch.cuda.synchronize()
        times.append(e0.elapsed_time(e1) * 1e3 / (n_loops * len(calls)))
    del g
    return statistics.median(times)


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


def candidates(name: str, m: QuantLinear, rows: int):
    """name -> (callable(module, x), description) of every kernel worth timing for this format."""
    out = {"chosen": (lambda mod, x: mod(x), f"{m.kernel_path}")}
    if name == "fp8":
        out["scaled_mm"] = (lambda mod, x: qk.fp8_scaled_mm(x, mod.weight, mod.weights_scaling_factor,
                                                             mod.activation_scaling_factor), "torch._scaled_mm")
        if rows == 1:
            out["triton_fp8"] = (lambda mod, x: qk.dequant_mm(qf.fake_quant_fp8(x, mod.activation_scaling_factor),
                                                               mod.weight, mod.weights_scaling_factor,
                                                               weight_kind="fp8", scale_kind="tensor"),
                                 "tiled Triton fp8-weight kernel")
    if name.startswith("int4") and rows <= qk.INT4PACK_MAX_ROWS:
        out["triton"] = (lambda mod, x: qk.dequant_mm(
            x, mod.weight, mod.weights_scaling_factor, weight_kind="int4", scale_kind="group", group_size=128,
            prequant=getattr(mod, "prequant_scaling_factor", None)), "Triton int4 GEMV")
        out["int4pack"] = (lambda mod, x: qk.int4pack_mm(x, *mod._cand_packed, 128,
                                                         getattr(mod, "prequant_scaling_factor", None)),
                           "torch._weight_int4pack_mm")
    if name in ("int8-wo", "int4-wo") and rows > 1:
        wk, sk = ("int8", "channel") if name == "int8-wo" else ("int4", "group")
        out["dequant+linear"] = (lambda mod, x: F.linear(x, qk.dequantize_fast(
            mod.weight, mod.weights_scaling_factor, weight_kind=wk, scale_kind=sk, group_size=128, dtype=x.dtype,
            out_features=mod.out_features)), "Triton dequantize + cuBLAS")
    return out


def bench_linears(results: dict, log) -> None:
    gen = torch.Generator("cuda").manual_seed(0)
    for out_f, in_f in SHAPES:
        w16 = torch.randn(out_f, in_f, device="cuda", generator=gen, dtype=DT) * 0.02
        for rows in ROWS:
            x = torch.randn(rows, in_f, device="cuda", generator=gen, dtype=DT)
            ws = [w16] + [w16.clone() for _ in range(max(1, ROTATE_BYTES // w16.nbytes) - 1)]
            t_bf16 = time_op(lambda i: (lambda: F.linear(x, ws[i % len(ws)])), w16.nbytes)
            key = f"{out_f}x{in_f} rows={rows}"
            results["linear"][key] = {"bf16_us": t_bf16, "bf16_bytes": w16.nbytes}
            log(f"{key}: bf16 F.linear {t_bf16:.1f} us")
            del ws
            for name in FORMATS:
                m = quant_module(name, out_f, in_f, gen)
                ref = m.emulate(x)
                row = {"kernel_path": m.kernel_path, "why": m.kernel_reason, "bytes": nbytes(m)}
                if name.startswith("int4"):
                    try:
                        m._cand_packed = qk.repack_int4pack(m.weight, m.weights_scaling_factor)
                    except Exception as e:  # noqa: BLE001 - report, do not stop the run
                        m._cand_packed = None
                        row["int4pack_error"] = f"{type(e).__name__}: {e}"[:200]
                mods = [m] + [copy.deepcopy(m) for _ in range(max(1, ROTATE_BYTES // nbytes(m)) - 1)]
                for cname, (fn, desc) in candidates(name, m, rows).items():
                    try:
                        err = rel_err(fn(m, x), ref)
                        us = time_op(lambda i: (lambda: fn(mods[i % len(mods)], x)), nbytes(m))
                        row[cname] = {"us": us, "speedup_vs_bf16": t_bf16 / us, "rel_err": err, "ok": err <= TOL,
                                      "what": desc}
                        log(f"  {name:9s} {cname:10s} {us:8.1f} us  x{t_bf16 / us:5.2f}  err {err:.2e} "
                            f"{'ok' if err <= TOL else 'WRONG'}  ({desc})")
                    except Exception as e:  # noqa: BLE001
                        row[cname] = {"error": f"{type(e).__name__}: {e}"[:300]}
                        log(f"  {name:9s} {cname:10s} error {type(e).__name__}: {str(e)[:150]}")
                results["linear"][key][name] = row
                del mods, m
                torch.cuda.empty_cache()


def sweep(results: dict, log) -> None:
    """Triton GEMV tile/split-K sweep at one row (the defaults GEMV_BN/GEMV_BK come from this)."""
    gen = torch.Generator("cuda").manual_seed(1)
    for out_f, in_f in SHAPES:
        for name in ("int4-wo", "int8-wo", "fp8"):
            m = quant_module(name, out_f, in_f, gen)
            mods = [m] + [copy.deepcopy(m) for _ in range(max(1, ROTATE_BYTES // nbytes(m)) - 1)]
            wk, sk = {"int4-wo": ("int4", "group"), "int8-wo": ("int8", "channel"), "fp8": ("fp8", "tensor")}[name]
            x = torch.randn(1, in_f, device="cuda", generator=gen, dtype=DT)
            if name == "fp8":
                x = qf.fake_quant_fp8(x, m.activation_scaling_factor)
            ref = m.emulate(x)
            best = None
            for bn in SWEEP_BN:
                for bk in ((128,) if name == "int4-wo" else SWEEP_BK):
                    for split in SWEEP_SPLIT:
                        cfg = {"bn": bn, "bk": bk, **({"split": split} if split else {})}
                        try:
                            fn = lambda mod, x, cfg=cfg: qk.dequant_mm(x, mod.weight, mod.weights_scaling_factor,
                                                                       weight_kind=wk, scale_kind=sk, group_size=128,
                                                                       config=cfg)
                            err = rel_err(fn(m, x), ref)
                            us = time_op(lambda i: (lambda: fn(mods[i % len(mods)], x)), nbytes(m), reps=3)
                        except Exception as e:  # noqa: BLE001
                            log(f"  sweep {name} {cfg} error {type(e).__name__}: {str(e)[:100]}")
                            continue
                        results["sweep"].append({"format": name, "shape": [out_f, in_f], "rows": 1, **cfg,
                                                 "us": us, "rel_err": err})
                        if err <= TOL and (best is None or us < best[0]):
                            best = (round(us, 1), cfg)
            log(f"sweep {name} {out_f}x{in_f} rows=1: best {best}")
            with open(OUT_PATH[0], "w") as f:
                json.dump(results, f, indent=1)
            del mods, m
            torch.cuda.empty_cache()


def bench_moe(results: dict, log) -> None:
    from trtlm.runtime.moe import moe_forward

    gen = torch.Generator("cuda").manual_seed(2)
    E, H, I, k = 8, 4096, 14336, 2
    router = torch.randn(E, H, device="cuda", generator=gen) * 0.02
    fc16 = torch.randn(E, 2 * I, H, device="cuda", generator=gen, dtype=DT) * 0.02
    pr16 = torch.randn(E, H, I, device="cuda", generator=gen, dtype=DT) * 0.02
    for T in MOE_TOKENS:
        x = torch.randn(T, H, device="cuda", generator=gen, dtype=DT)
        t16 = time_op(lambda i: (lambda: moe_forward(x, router, fc16, pr16, k, 1)), 3 * fc16.nbytes, reps=3)
        row = {"bf16_us": t16}
        log(f"mixtral experts T={T}: bf16 moe_forward {t16:.0f} us")
        for name in ("fp8", "int8-wo", "int4-wo"):
            algo, q = FORMATS[name]
            cfg = {"quantization": {"quant_algo": algo, **q}}
            fc = QuantExpertWeights(algo, cfg, E, 2 * I, H, DT, "cuda")
            pr = QuantExpertWeights(algo, cfg, E, H, I, DT, "cuda")
            with torch.no_grad():
                for mod, w in ((fc, fc16), (pr, pr16)):
                    b = dict(mod.named_buffers())
                    if name == "fp8":
                        s = qf.fp8_expert_weight_scale(w.float())
                        b["weight"].copy_(qf.quantize_fp8(w, s)); b["weights_scaling_factor"].copy_(s)
                        b["activation_scaling_factor"].copy_(qf.fp8_activation_scale(4.0))
                    elif name == "int8-wo":
                        s = qf.int8_weight_scale(w.float())
                        b["weight"].copy_(qf.quantize_int8(w, s)); b["weights_scaling_factor"].copy_(s)
                    else:
                        s = qf.int4_group_scales(w.float(), 128)
                        b["weight"].copy_(qf.pack_int4(qf.quantize_int4(w, s, 128)))
                        b["weights_scaling_factor"].copy_(s)
            fc.prepare(); pr.prepare()
            try:
                y = quant_moe_forward(x, router, fc, pr, k, 1)
                emulated = [qf.dequantize(m.algo, dict(m.named_buffers()), DT) for m in (fc, pr)]
                ref = moe_forward(fc.quantize_input(x), router, *emulated, k, 1)
                err = rel_err(y, ref)
                us = time_op(lambda i: (lambda: quant_moe_forward(x, router, fc, pr, k, 1)), nbytes(fc) + nbytes(pr),
                             reps=3)
                row[name] = {"us": us, "speedup_vs_bf16": t16 / us, "rel_err": err, "ok": err <= TOL,
                             "kernel_path": fc.kernel_path}
                log(f"  {name:8s} {us:8.0f} us  x{t16 / us:5.2f}  err {err:.2e} {'ok' if err <= TOL else 'WRONG'}")
            except Exception as e:  # noqa: BLE001
                row[name] = {"error": f"{type(e).__name__}: {e}"[:300]}
                log(f"  {name:8s} error {type(e).__name__}: {str(e)[:200]}")
            del fc, pr
            torch.cuda.empty_cache()
        results["moe"][f"T={T}"] = row


# ----------------------------------------------------------------------------- mixed-input GEMM (--mixed-mm)

MIXED_ROWS = [32, 64, 128]
#: overrides of qk._mm_config's defaults ({}: the defaults); split-K follows the default rule for
#: the tiles unless given.  Duplicates (after resolving) are timed once.
MIXED_CONFIGS = [
    {},
    {"bm": 64, "bn": 64, "bk": 128, "num_warps": 4, "num_stages": 4},
    {"bm": 64, "bn": 128, "bk": 64, "num_warps": 4, "num_stages": 4},
    {"bm": 64, "bn": 128, "bk": 128, "num_warps": 8, "num_stages": 3},
    {"bm": 64, "bn": 256, "bk": 64, "num_warps": 8, "num_stages": 3},
    {"bm": 32, "bn": 128, "bk": 128, "num_warps": 4, "num_stages": 4},
    {"bm": 32, "bn": 64, "bk": 128, "num_warps": 4, "num_stages": 3},
    {"bm": 64, "bn": 128, "bk": 128, "num_warps": 4, "num_stages": 4, "split": 1},
]
#: the same for up to 16 rows (decode at small batches, where tinygemm is the module's path)
MIXED_CONFIGS_FEW_ROWS = [
    {},
    {"bm": 16, "bn": 128, "bk": 128, "num_warps": 4, "num_stages": 4},
    {"bm": 16, "bn": 64, "bk": 128, "num_warps": 4, "num_stages": 6},
    {"bm": 16, "bn": 64, "bk": 128, "num_warps": 4, "num_stages": 4, "split": 4},
    {"bm": 16, "bn": 64, "bk": 256, "num_warps": 4, "num_stages": 3},
    {"bm": 16, "bn": 32, "bk": 128, "num_warps": 2, "num_stages": 4},
]


def _cfg_name(c: dict) -> str:
    return f"bm{c['bm']} bn{c['bn']} bk{c['bk']} w{c['num_warps']} s{c['num_stages']} split{c['split']}"


def bench_mixed_mm(results: dict, log, budget_s: float, row_counts=None) -> None:
    """``qk.mixed_mm`` (K-major repacked weight, one dot per K step) against bf16 ``F.linear`` and
    the module's forward (what the engine runs at that many rows: tinygemm up to 16 rows for int4),
    int4-wo / int8-wo over MIXED_CONFIGS (MIXED_CONFIGS_FEW_ROWS up to 16 rows), int4-wo with bf16
    scales and int4-awq at the default config, at ``row_counts`` (default MIXED_ROWS).  Stops
    starting new measurements after ``budget_s`` seconds (Triton compiles dominate a cold run)."""
    import time

    t0 = time.monotonic()
    gen = torch.Generator("cuda").manual_seed(3)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    out = results["mixed_mm"]
    for out_f, in_f in SHAPES:
        w16 = torch.randn(out_f, in_f, device="cuda", generator=gen, dtype=DT) * 0.02
        ws = [w16] + [w16.clone() for _ in range(max(1, ROTATE_BYTES // w16.nbytes) - 1)]
        mods = {}
        for name in ("int4-wo", "int8-wo", "int4-awq"):
            m = quant_module(name, out_f, in_f, gen)
            copies = [m] + [copy.deepcopy(m) for _ in range(max(1, ROTATE_BYTES // nbytes(m)) - 1)]
            wk = "int8" if name == "int8-wo" else "int4"
            packed = {"f32": [qk.repack_for_mm(c.weight, c.weights_scaling_factor, wk, 128) for c in copies]}
            if name == "int4-wo":
                packed["bf16"] = [qk.repack_for_mm(c.weight, c.weights_scaling_factor, wk, 128, scale_dtype=DT)
                                  for c in copies]
            mods[name] = (copies, packed)
        for rows in row_counts or MIXED_ROWS:
            key = f"{out_f}x{in_f} rows={rows}"
            x = torch.randn(rows, in_f, device="cuda", generator=gen, dtype=DT)
            t16 = time_op(lambda i: (lambda: F.linear(x, ws[i % len(ws)])), w16.nbytes, reps=3)
            out[key] = {"bf16_us": t16}
            log(f"{key}: bf16 F.linear {t16:.1f} us")
            for name, (copies, packed) in mods.items():
                m, ref = copies[0], copies[0].emulate(x)
                p = getattr(m, "prequant_scaling_factor", None)
                row = out[key][name] = {"configs": []}

                def record(label, fn, per_copy, extra):
                    if time.monotonic() - t0 > budget_s:
                        row.setdefault("skipped", []).append(label)
                        return
                    try:
                        err = rel_err(fn(0), ref)
                        us = time_op(lambda i: (lambda: fn(i)), per_copy, reps=3)
                        r = {"us": us, "x_bf16": t16 / us, "rel_err": err, "ok": err <= TOL, **extra}
                        log(f"  {name:8s} {label:56s} {us:8.1f} us  x{t16 / us:5.2f}  err {err:.1e}"
                            f" {'ok' if err <= TOL else 'WRONG'}")
                    except Exception as e:  # noqa: BLE001 - report, keep sweeping
                        r = {"error": f"{type(e).__name__}: {e}"[:300], **extra}
                        log(f"  {name:8s} {label:56s} error {type(e).__name__}: {str(e)[:120]}")
                    if "config" in extra:
                        row["configs"].append(r)
                    else:
                        row[label.split()[0]] = r

                record(f"current ({m.kernel_path}: the module's forward)", lambda i: copies[i % len(copies)](x), nbytes(m),
                       {"what": "module forward (the engine's kernel at this row count)"})
                seen = []
                sweep_cfgs = (MIXED_CONFIGS if rows > 16 else MIXED_CONFIGS_FEW_ROWS) if name != "int4-awq" else [{}]
                for sd, mws in packed.items():
                    per_copy = mws[0].weight.nbytes + mws[0].scales.nbytes
                    for over in (sweep_cfgs if sd == "f32" else [{}]):
                        cfg = qk._mm_config(rows, out_f, in_f, mws[0].group_size, sms, over)
                        if (sd, cfg) in seen:
                            continue
                        seen.append((sd, cfg))
                        record(f"mixed {_cfg_name(cfg)}" + ("" if sd == "f32" else " scales=bf16"),
                               lambda i, cfg=cfg, mws=mws: qk.mixed_mm(x, mws[i % len(mws)], prequant=p, config=cfg),
                               per_copy, {"config": cfg, "scales": sd})
                ok = [c for c in row["configs"] if c.get("ok")]
                if ok:
                    best = min(ok, key=lambda c: c["us"])
                    row["best"] = best
                    cur = row.get("current", {}).get("us")
                    log(f"  {name:8s} best mixed {best['us']:.1f} us x{best['x_bf16']:.2f} bf16"
                        + (f", x{cur / best['us']:.2f} vs current" if cur else "") + f"  [{_cfg_name(best['config'])}"
                        + f" scales={best['scales']}]")
            with open(OUT_PATH[0], "w") as f:
                json.dump(results, f, indent=1)
        del ws, mods
        torch.cuda.empty_cache()
    log(f"mixed-mm: {time.monotonic() - t0:.0f} s")


#: decode shapes of Mistral-7B (out x in): qkv, dense, fc+gate fused, fc, proj
GEMV_SHAPES = [(6144, 4096), (4096, 4096), (28672, 4096), (14336, 4096), (4096, 14336)]
GEMV_SWEEP = {
    "int8": [{"bn": bn, "bk": bk, "num_warps": w, "num_stages": st} for bn, bk, w, st in (
        (4, 512, 4, 3), (8, 512, 4, 4), (8, 1024, 8, 3), (4, 1024, 8, 3), (4, 1024, 4, 3), (8, 1024, 8, 4),
        (8, 2048, 8, 3), (4, 2048, 8, 3), (16, 1024, 8, 3), (16, 2048, 16, 3), (2, 1024, 4, 3), (8, 1024, 4, 3))],
    "int4": [{"bn": bn, "bk": 128, "num_warps": w, "num_stages": st} for bn, w, st in (
        (16, 4, 4), (32, 8, 4), (64, 8, 4))],
}
GEMV_SWEEP["fp8"] = GEMV_SWEEP["int8"] + [dict(c, fp8_bits=1) for c in GEMV_SWEEP["int8"][:3]]
GEMV_FORMATS = ("int8-wo", "int4-wo", "int4-awq", "fp8")


def bench_gemv(results: dict, log, budget_s: float, formats=GEMV_FORMATS, shapes=None) -> None:
    """The one-row GEMV (:func:`trtlm.quant.gemv.gemv`) over a tile sweep, against bf16 ``F.linear``
    and the module's current path at one row, for int8-wo, int4-wo, int4-awq and fp8 (FP8 input
    quantized in the kernel, FP8 codes handed over as the fused RMSNorm/SwiGLU do, and a separate
    quantization kernel before the GEMV on codes)."""
    import time

    from trtlm.quant.gemv import GEMV_CONFIGS, gemv

    t0 = time.monotonic()
    gen = torch.Generator("cuda").manual_seed(5)
    out = results["gemv"]
    for out_f, in_f in shapes or GEMV_SHAPES:
        key = f"{out_f}x{in_f}"
        w16 = torch.randn(out_f, in_f, device="cuda", generator=gen, dtype=DT) * 0.02
        ws = [w16] + [w16.clone() for _ in range(max(1, ROTATE_BYTES // w16.nbytes) - 1)]
        x = torch.randn(1, in_f, device="cuda", generator=gen, dtype=DT)
        t16 = time_op(lambda i: (lambda: F.linear(x, ws[i % len(ws)])), w16.nbytes, reps=3)
        out[key] = {"bf16_us": t16, "bf16_TBps": w16.nbytes / t16 / 1e6}
        log(f"{key}: bf16 F.linear {t16:.1f} us ({w16.nbytes / t16 / 1e6:.2f} TB/s)")
        del ws
        for name in formats:
            m = quant_module(name, out_f, in_f, gen)
            copies = [m] + [copy.deepcopy(m) for _ in range(max(1, ROTATE_BYTES // nbytes(m)) - 1)]
            wk, sk = {"int8-wo": ("int8", "channel"), "fp8": ("fp8", "tensor")}.get(name, ("int4", "group"))
            ref = m.emulate(x)
            row = out[key][name] = {"bytes": nbytes(m), "configs": []}
            inputs = [("x", x)]
            if name == "fp8":
                xq = qf.quantize_fp8(x, m.activation_scaling_factor)
                inputs.append(("fp8 codes", xq))

            def call(c, xin, cfg):
                return gemv(xin, c.weight, c.weights_scaling_factor, weight_kind=wk, scale_kind=sk, group_size=128,
                            prequant=getattr(c, "prequant_scaling_factor", None),
                            input_scale=getattr(c, "activation_scaling_factor", None), out_dtype=DT, config=cfg)

            def record(label, fn, extra):
                if time.monotonic() - t0 > budget_s:
                    row.setdefault("skipped", []).append(label)
                    return None
                try:
                    err = rel_err(fn(0), ref)
                    us = time_op(lambda i: (lambda: fn(i)), nbytes(m), reps=3)
                    r = {"us": us, "x_bf16": t16 / us, "TBps": nbytes(m) / us / 1e6, "rel_err": err,
                         "ok": err <= TOL, **extra}
                    log(f"  {name:8s} {label:60s} {us:7.1f} us  x{t16 / us:5.2f}  {r['TBps']:.2f} TB/s  "
                        f"err {err:.1e} {'ok' if err <= TOL else 'WRONG'}")
                except Exception as e:  # noqa: BLE001 - report, keep sweeping
                    r = {"error": f"{type(e).__name__}: {e}"[:300], **extra}
                    log(f"  {name:8s} {label:60s} error {type(e).__name__}: {str(e)[:160]}")
                return r

            row["current"] = record(f"current ({m.kernel_path})", lambda i: copies[i % len(copies)](x), {})
            if name == "fp8":  # the alternative to quantizing in the GEMV: a quantization kernel first
                row["quantize_then_codes"] = record(
                    "quantize kernel, then gemv[fp8 codes]",
                    lambda i: call(copies[i % len(copies)],
                                   qk.quantize_activation(x, m.activation_scaling_factor, "fp8"), None), {})
            if wk == "int4":  # the tensor-core GEMV (trtlm.quant.w4_gemv) on the module's repacked tiles, over its configs
                from trtlm.quant.w4_gemv import w4_gemv, w4_gemv_config, w4_configs
                tg = [qk.repack_int4pack(c.weight, c.weights_scaling_factor) for c in copies]
                row["tinygemm"] = record("torch._weight_int4pack_mm", lambda i: qk.int4pack_mm(
                    x, *tg[i % len(tg)], 128, getattr(m, "prequant_scaling_factor", None)), {})
                sweep_cfgs = [c for c in w4_configs(out_f, in_f) if c != w4_gemv_config(out_f, in_f)]
                for cfg in [w4_gemv_config(out_f, in_f)] + sweep_cfgs[::max(1, len(sweep_cfgs) // 24)]:
                    r = record(f"w4_gemv {tuple(cfg)}",
                               lambda i, cfg=cfg: w4_gemv(x, copies[i % len(copies)]._w4, prequant=getattr(
                                   copies[i % len(copies)], "prequant_scaling_factor", None), config=cfg),
                               {"config": cfg._asdict(), "input": "w4_gemv"})
                    if r is not None:
                        row["configs"].append(r)
            default = GEMV_CONFIGS[wk, out_f > 4096]
            # FP8: the whole sweep on codes, the default on quantize-in-kernel; int4: none (the Triton
            # GEMV lost to tinygemm, run 15)
            for what, xin in inputs if wk != "int4" else ():
                no_prmt = [dict(default, no_prmt=1)] if wk == "int8" else []  # the byte-masking conversion
                cfgs = [default] + no_prmt + [c for c in GEMV_SWEEP[wk] if c != default]
                for cfg in (cfgs if what == inputs[-1][0] else cfgs[:1] + [dict(default, fp8_bits=1)]):
                    r = record(f"gemv[{what}] " + " ".join(f"{k}{v}" for k, v in cfg.items()),
                               lambda i, cfg=cfg, xin=xin: call(copies[i % len(copies)], xin, cfg),
                               {"config": cfg, "input": what})
                    if r is not None:
                        row["configs"].append(r)
            ok = [c for c in row["configs"] if c.get("ok")]
            if ok:
                row["best"] = best = min(ok, key=lambda c: c["us"])
                log(f"  {name:8s} BEST {best['us']:.1f} us x{best['x_bf16']:.2f} bf16 {best['TBps']:.2f} TB/s "
                    f"{best['config']} [{best['input']}]")
            with open(OUT_PATH[0], "w") as f:
                json.dump(results, f, indent=1)
            del copies, m
            torch.cuda.empty_cache()
    log(f"gemv: {time.monotonic() - t0:.0f} s")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--no-moe", action="store_true")
    ap.add_argument("--quick", action="store_true", help="MoE at 1 token only, a smaller GEMV sweep")
    ap.add_argument("--mixed-mm", action="store_true",
                    help="only the mixed-input GEMM (qk.mixed_mm) config sweep at 32/64/128 rows against bf16 "
                         "F.linear and today's dequant_mm path")
    ap.add_argument("--gemv", action="store_true",
                    help="only the one-row GEMV (trtlm.quant.gemv) tile sweep against bf16 F.linear and today's path")
    ap.add_argument("--mixed-rows", help="--mixed-mm: row counts (comma-separated; default 32,64,128)")
    ap.add_argument("--gemv-formats", default=",".join(GEMV_FORMATS), help="--gemv: the formats (comma-separated)")
    ap.add_argument("--gemv-shapes", help="--gemv: OUTxIN products (comma-separated; default: Mistral-7B's)")
    ap.add_argument("--budget-s", type=float, default=80.0,
                    help="--mixed-mm: start no new measurement after this many seconds (default 80)")
    args = ap.parse_args()
    if args.quick:
        global ROTATE_BYTES, MOE_TOKENS, SWEEP_BK, SWEEP_SPLIT
        ROTATE_BYTES, MOE_TOKENS, SWEEP_BK, SWEEP_SPLIT = 192 << 20, [1], (256,), (0,)
    OUT_PATH[0] = args.out
    import triton

    results = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
               "dtype": "bfloat16", "linear": {}, "moe": {}, "sweep": [], "mixed_mm": {}, "gemv": {}}

    def log(s: str) -> None:
        print(s, flush=True)

    def save() -> None:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)

    import signal

    def on_term(*_):  # `timeout` sends SIGTERM: keep what was measured
        raise SystemExit(124)

    signal.signal(signal.SIGTERM, on_term)
    try:
        if args.mixed_mm:
            bench_mixed_mm(results, log, args.budget_s,
                           [int(r) for r in args.mixed_rows.split(",")] if args.mixed_rows else None)
            return
        if args.gemv:
            shapes = [tuple(int(v) for v in s.split("x")) for s in (args.gemv_shapes or "").split(",") if s]
            bench_gemv(results, log, args.budget_s, args.gemv_formats.split(","), shapes)
            return
        bench_linears(results, log)
        save()
        if not args.no_moe:
            bench_moe(results, log)
            save()
        if args.sweep:
            sweep(results, log)
    finally:
        save()


if __name__ == "__main__":
    sys.exit(main())
