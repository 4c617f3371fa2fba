"""Paged-attention kernels (trtlm.runtime.kernels) against gather + SDPA, Mistral-7B attention shapes.

One layer's attention: H=32 query heads, KV=8, head 128, cache blocks of 32 tokens whose ids are
shuffled (as a long-running pool hands them out).  For each case it times

* ``triton``: the Triton kernel reading K/V in place through the block table;
* ``gather_sdpa``: what the old path amounts to: gather the blocks into a contiguous copy
  (``k_cache[block_tables]``), dequantize an FP8 cache in torch, then
  ``F.scaled_dot_product_attention`` (flash / cuDNN / efficient backend, whichever torch picks);

as CUDA-graph replays (capture one call, replay it ``--iters`` times between two events: no launch
overhead, the way the engine runs decode) and reports the achieved K/V bandwidth: bytes of K/V the
step must read (context x KV heads x head x 2 tensors x bytes per element) / time, next to the
device-to-device copy bandwidth measured in the same run ((read + written bytes) / time).  It also
checks that both give the same answer and sweeps a few kernel configurations (the defaults in
``triton_ops.DECODE_CONFIG`` / ``PREFILL_CONFIG`` are the winners of this sweep).

Prefill (packed chunks with a cached prefix) compares the Triton kernel with a per-sequence gather +
SDPA (explicit mask when there is a prefix), in TFLOP/s of the attention matmuls actually needed.

Usage: ``python bench/paged_attention_bench.py OUT.json`` on a CUDA machine;
``--smoke`` runs tiny shapes (on CPU with ``TRITON_INTERPRET=1``) to check the script itself.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from trtlm.runtime.kernels import reference, triton_ops

H, KV, D, BS = 32, 8, 128, 32
DT = torch.bfloat16  # model dtype (float32 in --smoke: the interpreter has no bf16)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn, device, iters: int, graph: bool = True) -> float:
    """Seconds per call: CUDA-graph replay when possible (eager on CPU or if capture fails)."""
    fn()
    _sync(device)
    if device.type == "cuda" and graph:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            fn()
        torch.cuda.current_stream().wait_stream(stream)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        g.replay()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            g.replay()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / iters
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / iters
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t0) / iters


def copy_bandwidth(device, nbytes: int, iters: int) -> float:
    """Device-to-device copy bandwidth, (read + written) bytes / s."""
    a = torch.empty(nbytes, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    sec = time_fn(lambda: b.copy_(a), device, iters, graph=False)
    return 2 * nbytes / sec


def make_cache(batch: int, ctx: int, cache_dtype: torch.dtype, device, seed: int = 0):
    """A pool of exactly the blocks the batch needs, handed out in shuffled order."""
    gen = torch.Generator(device=device).manual_seed(seed)
    per_seq = -(-ctx // BS)
    num_blocks = batch * per_seq
    perm = torch.randperm(num_blocks, generator=gen, device=device).to(torch.int32)
    block_tables = perm.view(batch, per_seq).contiguous()
    context_lens = torch.full((batch,), ctx, dtype=torch.int32, device=device)
    shape = (num_blocks, BS, KV, D)
    scale = None
    caches = []
    for _ in range(2):
        x = torch.randn(shape, generator=gen, device=device, dtype=DT)
        if cache_dtype == torch.float8_e4m3fn:
            scale = torch.tensor([4.0 / 448.0], device=device)
            x = reference.quantize_kv(x, cache_dtype, scale)
        caches.append(x)
    return caches[0], caches[1], block_tables, context_lens, scale


def _gather(cache, index):
    """``cache[index]`` (float8 through its bytes: no float8 indexing kernel on every device)."""
    if cache.dtype == torch.float8_e4m3fn:
        return cache.view(torch.uint8)[index].view(cache.dtype)
    return cache[index]


def gather_sdpa_decode(q, k_cache, v_cache, block_tables, ctx: int, scale: float, k_scale, v_scale):
    """Gather every sequence's blocks into a contiguous copy, then SDPA (all sequences have ``ctx`` tokens)."""
    batch = q.shape[0]
    k = _gather(k_cache, block_tables).view(batch, -1, KV, D)[:, :ctx]
    v = _gather(v_cache, block_tables).view(batch, -1, KV, D)[:, :ctx]
    if k_scale is not None:
        k = (k.to(q.dtype) * k_scale.to(q.dtype))
        v = (v.to(q.dtype) * v_scale.to(q.dtype))
    out = F.scaled_dot_product_attention(q.unsqueeze(2), k.transpose(1, 2), v.transpose(1, 2), scale=scale,
                                         enable_gqa=True)
    return out.squeeze(2)


def bench_decode(device, batch, ctx, cache_dtype, iters, configs, bw_copy):
    k_cache, v_cache, bt, lens, s = make_cache(batch, ctx, cache_dtype, device)
    gen = torch.Generator(device=device).manual_seed(1)
    q = torch.randn(batch, H, D, generator=gen, device=device, dtype=DT)
    scale = 1 / math.sqrt(D)
    elem = k_cache.element_size()
    kv_bytes = 2 * batch * ctx * KV * D * elem
    row = {"batch": batch, "context": ctx, "kv_dtype": str(cache_dtype).replace("torch.", ""),
           "kv_bytes": kv_bytes}
    base = gather_sdpa_decode(q, k_cache, v_cache, bt, ctx, scale, s, s)
    try:
        t = time_fn(lambda: gather_sdpa_decode(q, k_cache, v_cache, bt, ctx, scale, s, s), device, iters)
        row["gather_sdpa_us"] = t * 1e6
        row["gather_sdpa_TBps"] = kv_bytes / t / 1e12
    except Exception as exc:  # noqa: BLE001 - a baseline failure must not hide the kernel numbers
        row["gather_sdpa_error"] = repr(exc)[:300]
    results = []
    for cfg in configs:
        entry = {"config": cfg}
        try:
            out = triton_ops.paged_decode_attention(q, k_cache, v_cache, bt, lens, scale, k_scale=s, v_scale=s,
                                                    max_context_len=ctx, config=cfg)
            entry["max_abs_diff_vs_gather_sdpa"] = float((out.float() - base.float()).abs().max())
            fn = (lambda cfg=cfg: triton_ops.paged_decode_attention(
                q, k_cache, v_cache, bt, lens, scale, k_scale=s, v_scale=s, max_context_len=ctx, config=cfg))
            t = time_fn(fn, device, iters)
            entry["us"] = t * 1e6
            entry["TBps"] = kv_bytes / t / 1e12
            entry["eager_us"] = time_fn(fn, device, iters, graph=False) * 1e6
        except Exception as exc:  # noqa: BLE001
            entry["error"] = repr(exc)[:500]
        results.append(entry)
    ok = [e for e in results if "us" in e]
    if ok:
        best = min(ok, key=lambda e: e["us"])
        default = results[0]
        row["triton_default_us"] = default.get("us")
        row["triton_default_TBps"] = default.get("TBps")
        row["triton_default_eager_us"] = default.get("eager_us")
        row["triton_default_pct_of_copy_bw"] = (100 * default["TBps"] * 1e12 / bw_copy) if "TBps" in default else None
        row["max_abs_diff_vs_gather_sdpa"] = default.get("max_abs_diff_vs_gather_sdpa")
        row["triton_best"] = best
        if "gather_sdpa_us" in row and default.get("us"):
            row["speedup_vs_gather_sdpa"] = row["gather_sdpa_us"] / default["us"]
    row["sweep"] = results
    del k_cache, v_cache
    return row


def bench_prefill(device, chunks, cache_dtype, iters, configs):
    """``chunks``: per sequence (context_len, q_len); the first ctx-q_len tokens are a cached prefix."""
    batch = len(chunks)
    ctx_max = max(c for c, _ in chunks)
    k_cache, v_cache, bt, _, s = make_cache(batch, ctx_max, cache_dtype, device, seed=2)
    lens = torch.tensor([c for c, _ in chunks], dtype=torch.int32, device=device)
    qsl = torch.tensor([0] + [sum(q for _, q in chunks[:i + 1]) for i in range(batch)], dtype=torch.int32,
                       device=device)
    n = sum(q for _, q in chunks)
    gen = torch.Generator(device=device).manual_seed(3)
    q = torch.randn(n, H, D, generator=gen, device=device, dtype=DT)
    scale = 1 / math.sqrt(D)
    flops = sum(4 * H * D * (q_len * (c - q_len) + q_len * (q_len + 1) / 2) for c, q_len in chunks)
    starts, ctxs, qlens = qsl.tolist(), [c for c, _ in chunks], [q for _, q in chunks]

    def gather_sdpa():
        out = torch.empty_like(q)
        for i in range(batch):  # the host knows the chunk bounds (engine-side lists)
            c, ql = ctxs[i], qlens[i]
            nb = -(-c // BS)
            k = _gather(k_cache, bt[i, :nb]).view(-1, KV, D)[:c]
            v = _gather(v_cache, bt[i, :nb]).view(-1, KV, D)[:c]
            if s is not None:
                k, v = k.to(q.dtype) * s.to(q.dtype), v.to(q.dtype) * s.to(q.dtype)
            qi = q[starts[i]:starts[i] + ql].transpose(0, 1).unsqueeze(0)
            ki, vi = k.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0)
            if c == ql:
                o = F.scaled_dot_product_attention(qi, ki, vi, is_causal=True, scale=scale, enable_gqa=True)
            else:  # causal aligned to the bottom right: the fused backends, not a materialized mask
                ki, vi = ki.repeat_interleave(H // KV, dim=1), vi.repeat_interleave(H // KV, dim=1)
                o = F.scaled_dot_product_attention(qi, ki, vi, attn_mask=causal_lower_right(ql, c), scale=scale)
            out[starts[i]:starts[i] + ql] = o.squeeze(0).transpose(0, 1)
        return out

    def gather_only():
        for i in range(batch):
            nb = -(-ctxs[i] // BS)
            _gather(k_cache, bt[i, :nb]), _gather(v_cache, bt[i, :nb])

    row = {"chunks": chunks, "kv_dtype": str(cache_dtype).replace("torch.", ""), "tokens": n, "flops": flops}
    base = gather_sdpa()
    t = time_fn(gather_sdpa, device, iters, graph=False)
    row["gather_sdpa_ms"] = t * 1e3
    row["gather_sdpa_TFLOPs"] = flops / t / 1e12
    row["gather_only_ms"] = time_fn(gather_only, device, iters, graph=False) * 1e3
    results = []
    for cfg in configs:
        entry = {"config": cfg}
        try:
            fn = (lambda cfg=cfg: triton_ops.paged_prefill_attention(
                q, k_cache, v_cache, bt, qsl, lens, scale, k_scale=s, v_scale=s,
                max_query_len=max(qlens), config=cfg))
            out = fn()
            entry["max_abs_diff_vs_gather_sdpa"] = float((out.float() - base.float()).abs().max())
            t = time_fn(fn, device, iters, graph=False)
            entry["ms"] = t * 1e3
            entry["TFLOPs"] = flops / t / 1e12
        except Exception as exc:  # noqa: BLE001
            entry["error"] = repr(exc)[:500]
        results.append(entry)
    default = results[0]
    row["triton_default_ms"] = default.get("ms")
    row["triton_default_TFLOPs"] = default.get("TFLOPs")
    row["max_abs_diff_vs_gather_sdpa"] = default.get("max_abs_diff_vs_gather_sdpa")
    if default.get("ms"):
        row["speedup_vs_gather_sdpa"] = row["gather_sdpa_ms"] / default["ms"]
    ok = [e for e in results if "ms" in e]
    if ok:
        row["triton_best"] = min(ok, key=lambda e: e["ms"])
    row["sweep"] = results
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", help="JSON file to write")
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--no-sweep", action="store_true", help="time the default kernel configurations only")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes: check the script (CPU + TRITON_INTERPRET=1)")
    args = ap.parse_args(argv)
    global H, KV, D, DT
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.smoke:
        H, KV, D = 4, 2, 16
        batches, contexts, iters = (1, 2), (40, 70), 1
        prefill_cases = [[(48, 48)], [(70, 20), (33, 33)]]
        dec_sweep = [{"TILE_N": 16}, {"TILE_N": 32, "num_stages": 2}]
        pre_sweep = [{"BLOCK_M": 16, "TILE_N": 16}]
        kv_dtypes = [torch.float32]
        DT = torch.float32
    else:
        batches, contexts, iters = (1, 64), (512, 2048, 8192), args.iters
        prefill_cases = [[(2048, 2048)], [(8192, 8192)], [(2048, 1024)] * 4, [(8192, 2048)],
                         [(1024, 1024)] * 8]
        dec_sweep = [{}, {"TILE_N": 32}, {"TILE_N": 128}, {"num_stages": 2}, {"num_warps": 8},
                     {"programs_per_sm": 4}, {"programs_per_sm": 1}]
        pre_sweep = [{}, {"BLOCK_M": 64, "TILE_N": 64, "num_warps": 4}, {"BLOCK_M": 128, "num_warps": 4},
                     {"BLOCK_M": 128, "TILE_N": 128, "num_warps": 8}, {"num_stages": 3}]
        kv_dtypes = [torch.bfloat16, torch.float8_e4m3fn]
    if args.no_sweep:
        dec_sweep, pre_sweep = dec_sweep[:1], pre_sweep[:1]
    result = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "shapes": {"H": H, "KV": KV, "D": D, "block_size": BS},
              "decode_default_config": triton_ops.DECODE_CONFIG, "prefill_default_config": triton_ops.PREFILL_CONFIG}
    try:
        import triton
        result["triton"] = triton.__version__
    except ImportError:
        pass
    bw = copy_bandwidth(device, (1 << 30) if not args.smoke else (1 << 20), max(iters, 1) if args.smoke else 20)
    result["copy_bandwidth_TBps"] = bw / 1e12
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s", flush=True)
    result["decode"] = []
    for kv_dtype in kv_dtypes:
        for batch in batches:
            for ctx in contexts:
                big = batch * ctx >= 64 * 2048  # the sweep only where the choice matters most
                sweep = dec_sweep if (big or batch == 1) else dec_sweep[:1]
                row = bench_decode(device, batch, ctx, kv_dtype, iters, sweep, bw)
                result["decode"].append(row)
                print(f"decode {row['kv_dtype']:>14} B={batch:<3} ctx={ctx:<5} triton {row.get('triton_default_us', float('nan')):8.1f} us "
                      f"{row.get('triton_default_TBps') or float('nan'):5.2f} TB/s | gather+sdpa "
                      f"{row.get('gather_sdpa_us', float('nan')):8.1f} us | best {row.get('triton_best', {}).get('config')} "
                      f"{row.get('triton_best', {}).get('us', float('nan')):.1f} us | maxdiff {row.get('max_abs_diff_vs_gather_sdpa')}",
                      flush=True)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    result["prefill"] = []
    for chunks in prefill_cases:
        for kv_dtype in kv_dtypes[:1]:
            row = bench_prefill(device, chunks, kv_dtype, max(1, iters // 5), pre_sweep)
            result["prefill"].append(row)
            print(f"prefill {chunks[0]}x{len(chunks)} triton {row.get('triton_default_ms') or float('nan'):.3f} ms "
                  f"{row.get('triton_default_TFLOPs') or float('nan'):.0f} TFLOP/s | gather+sdpa {row['gather_sdpa_ms']:.3f} ms "
                  f"{row['gather_sdpa_TFLOPs']:.0f} TFLOP/s (gather {row['gather_only_ms']:.3f} ms) | best {row.get('triton_best', {}).get('config')} "
                  f"{row.get('triton_best', {}).get('ms', float('nan')):.3f} ms | maxdiff {row.get('max_abs_diff_vs_gather_sdpa')}",
                  flush=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
