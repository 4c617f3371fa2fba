"""The GPU path of the engine (Triton paged attention, CUDA-graph decode, grouped MoE) and `trtlm bench`.

CPU tests check the pieces that also run there (fused SwiGLU, weight-byte accounting, the bench
command in both modes); GPU tests (skipped without CUDA) check bf16 logits against transformers
and that CUDA-graph replay equals the same engine steps run eagerly.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from trtlm.bench import dummy_model, weight_bytes_per_step

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
PROMPTS = [[5, 6, 7, 8, 9] * 5, [11, 12, 13]]  # 25 + 20 tokens cross the tiny Mistral's 32-token window


def _model(family: str, dtype: str = "float32", device: str = "cpu"):
    model = dummy_model(family, "tiny", dtype, device, seed=1).model
    with torch.no_grad():  # larger weights than fill_random's: logits that separate tokens
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.2, generator=torch.Generator(p.device).manual_seed(p.numel()))
    return model


@pytest.mark.skipif(not hasattr(torch.nn.functional, "grouped_mm"), reason="this torch has no grouped_mm")
def test_grouped_experts_match_moe_forward():
    from trtlm.runtime.moe import grouped_experts, moe_forward, route

    g = torch.Generator().manual_seed(0)
    E, H, I, T, k = 6, 32, 48, 7, 2
    x = torch.randn(T, H, generator=g)
    router = torch.randn(E, H, generator=g)
    fc, proj = torch.randn(E, 2 * I, H, generator=g) / 6, torch.randn(E, H, I, generator=g) / 7
    scales, ids = route(x @ router.t(), k, 1)
    ours = grouped_experts(x, fc, proj, scales, ids)
    ref = moe_forward(x, router, fc, proj, k, 1, strategy="dense")
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_gated_mlp_fuse_keeps_state_dict():
    model = _model("mistral")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 3, model.d.hidden)
    mlp = model.transformer.layers[0].mlp
    y = mlp(x)
    mlp.fuse()
    assert mlp.fused is not None
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    torch.testing.assert_close(mlp(x), y)
    # loading a checkpoint after fusing updates the fused weight too
    new = {k: torch.randn_like(v) for k, v in before.items()}
    model.load_state_dict(new)
    fc_rows = new["transformer.layers.0.mlp.fc.weight"]
    assert torch.equal(mlp.fused[0][:fc_rows.shape[0]], fc_rows)


def test_weight_bytes_count_routed_experts_only():
    model = dummy_model("mixtral", "tiny", "float32", "cpu").model
    moe = model.transformer.layers[0].mlp
    E, k = moe.fc.weight.shape[0], moe.top_k
    expert = sum(p.numel() * 4 for n, p in model.named_parameters() if p.dim() == 3)
    emb = model.transformer.vocab_embedding.weight
    rest = sum(p.numel() * 4 for n, p in model.named_parameters() if p.dim() != 3) - emb.numel() * 4
    assert weight_bytes_per_step(model, 1) == int(rest + emb.shape[1] * 4 + expert * k / E)


def test_bench_cli_cpu(tmp_path):
    """Both modes on CPU, through the engine: latency rows with a roofline fraction, offline rows for
    continuous and static batching of the same requests, and transformers alongside."""
    from trtlm.cli import main

    out = tmp_path / "bench.json"
    main(["bench", "--family", "mixtral", "--preset", "tiny", "--dummy-weights", "--device", "cpu",
          "--dtype", "float32", "--batch-size", "1,2", "--input-len", "4", "--output-len", "3", "--reps", "1",
          "--mode", "latency,offline", "--num-requests", "6", "--input-range", "3-9", "--output-range", "2-5",
          "--max-batch-size", "4", "--compare-hf", "--hf-batch-size", "1", "--json", "--output", str(out)])
    doc = json.loads(out.read_text())
    assert doc["device"] == "cpu" and doc["layers"] == 2 and doc["copy_bandwidth_GBps"] > 0
    assert [(r["mode"], r["batch_size"]) for r in doc["results"]] == [("latency", 1), ("latency", 2)]
    for r in doc["results"]:
        for key in ("ttft_ms", "prefill_tokens_per_s", "decode_tokens_per_s_per_seq", "decode_tokens_per_s_total",
                    "decode_step_ms", "roofline_fraction", "weight_bytes_per_step"):
            assert math.isfinite(r[key]) and r[key] > 0, key
        assert r["peak_gpu_memory_gb"] is None
        assert r["decode_tokens_per_s_total"] == pytest.approx(r["batch_size"] * r["decode_tokens_per_s_per_seq"])
    batching = [r["batching"] for r in doc["offline"]]
    assert batching == ["continuous", "static", "transformers-generate"]
    continuous, static = doc["offline"][:2]
    assert continuous["output_tokens"] == static["output_tokens"]  # the same requests, every token generated
    for r in (continuous, static):
        assert r["requests"] == 6 and 6 * 2 <= r["output_tokens"] <= 6 * 5
        assert r["ttft_ms"]["p50"] > 0 and 0 < r["kv_blocks_peak"] <= r["kv_blocks_total"]
    assert doc["continuous_over_static"] > 0
    assert doc["hf"][0]["batch_size"] == 1 and doc["hf"][0]["ttft_ms"] > 0
    assert "speedup_vs_hf" in doc["results"][0]


@pytest.mark.parametrize("quant, code_bytes", [("fp8", 1.0), ("int8-wo", 1.0), ("int4-awq", 0.5), ("int4-wo", 0.5)])
def test_bench_quantized_preset_reads_the_packed_bytes(quant, code_bytes, tmp_path):
    """``--quant`` builds the preset's quantized layers with random codes: the roofline counts their
    stored bytes (codes + scales), each layer type says its kernel, and the engine generates."""
    from trtlm.cli import main

    out = tmp_path / "bench.json"
    main(["bench", "--family", "mistral", "--preset", "tiny", "--dummy-weights", "--device", "cpu", "--quant", quant,
          "--batch-size", "1", "--input-len", "4", "--output-len", "3", "--reps", "1", "--json", "--output", str(out)])
    doc = json.loads(out.read_text())
    dense = dummy_model("mistral", "tiny", "bfloat16", "cpu").model
    quantized = dummy_model("mistral", "tiny", "bfloat16", "cpu", quant=quant).model
    linear = sum(p.numel() for n, p in dense.named_parameters() if ".layers." in n and p.dim() == 2)
    assert doc["model"].endswith(f":dummy:{quant}")
    # the same model minus the layers' bf16 matrices plus their codes; scales are the small remainder
    codes = weight_bytes_per_step(dense, 1) - 2 * linear + code_bytes * linear
    assert codes <= doc["weight_bytes_per_token"] <= codes * 1.05 + 64 * 1024
    assert doc["weight_bytes_per_token"] == weight_bytes_per_step(quantized, 1)
    assert {"attention.qkv", "attention.dense", "mlp.fc", "mlp.proj"} <= set(doc["quant_kernels"])
    assert doc["results"][0]["decode_tokens_per_s_total"] > 0


def test_bench_cli_errors(capsys):
    from trtlm.cli import main

    with pytest.raises(SystemExit):
        main(["bench", "--family", "mistral", "--preset", "tiny", "--device", "cpu"])
    assert "--dummy-weights" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["bench", "--family", "mistral", "--preset", "tiny", "--dummy-weights", "--device", "cpu",
              "--batch-size", "1,x"])
    assert "--batch-size" in capsys.readouterr().err


# -- GPU ------------------------------------------------------------------------------------------
def _engine_on(model, device, graphs: bool, async_scheduling: bool | None = None):
    from trtlm.runtime.engine import Engine, EngineConfig
    from trtlm.runtime.executor import LocalExecutor

    return Engine(LocalExecutor(model, torch.device(device), use_cuda_graphs=graphs), max_seq_len=128,
                  vocab_size=model.d.vocab, max_batch_size=4,
                  config=EngineConfig(use_cuda_graphs=graphs, async_scheduling=async_scheduling))


@CUDA
def test_decode_steps_queued_ahead_on_cuda_graphs_give_the_same_tokens():
    """With CUDA graphs a decode step is queued before the previous step's tokens are read back (on
    by default): its input tokens are copied on the device from the previous samples into the
    graph's buffer, its host staging alternates between two pinned sets.  Same tokens as
    reading every step back first, with requests ending by stop id, by length at different steps,
    one aborted while a step is queued, and one sampled (seeded, top-k, log-probabilities: its
    host values reach the GPU through pinned memory); float32 (no TF32): the same kernels on the
    same inputs."""
    from trtlm.runtime.sampling import SamplingParams

    model = _model("mistral", "float32", "cuda")
    prompts = [[(5 * i + j) % 250 + 3 for j in range(4 + 7 * i)] for i in range(4)]
    results = []
    for ahead in (False, None):
        engine = _engine_on(model, "cuda", True, ahead)
        assert engine.async_scheduling is (ahead is None)
        free = engine.generate([prompts[0]], SamplingParams(max_tokens=30, ignore_eos=True))[0].outputs[0]
        params = [SamplingParams(max_tokens=30, ignore_eos=True, stop_token_ids=[free.token_ids[12]]),
                  SamplingParams(max_tokens=9, ignore_eos=True), SamplingParams(max_tokens=40, ignore_eos=True),
                  SamplingParams(max_tokens=25, ignore_eos=True, temperature=0.9, top_k=50, seed=11, logprobs=2)]
        ids = [engine.add_request(p, sp) for p, sp in zip(prompts, params)]
        outs, steps = {}, 0
        while engine.has_unfinished():
            for out in engine.step():
                outs[out.request_id] = out.outputs[0].token_ids
            steps += 1
            if steps == 15:
                engine.abort(ids[2])
        results.append([outs[i] for i in ids])
        assert engine.allocator.all_free()
        assert (engine.lookahead_steps > 0) == (ahead is None)
    assert results[0] == results[1]
    stop_at = free.token_ids.index(free.token_ids[12])  # its first occurrence ends the request
    assert results[0][0] == free.token_ids[:stop_at + 1]


@CUDA
@pytest.mark.parametrize("family", ["mistral", "mixtral"])
def test_cuda_graph_decode_identical_to_eager(family):
    """Replaying captured decode steps gives the same tokens and bit-identical logits to running the
    same steps eagerly (same kernels, same inputs)."""
    from trtlm.runtime.sampling import SamplingParams

    model = _model(family, "bfloat16", "cuda")
    results = []
    for graphs in (False, True):
        engine = _engine_on(model, "cuda", graphs)
        assert (engine.executor.graphs is not None) == graphs
        outs = engine.generate(PROMPTS, SamplingParams(max_tokens=20, ignore_eos=True), keep_logits=True)
        results.append(outs)
    eager, graph = results
    for a, b in zip(eager, graph):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        assert len(a.step_logits) == len(b.step_logits) == 19
        for x, y in zip(a.step_logits, b.step_logits):
            assert torch.equal(x, y)


@CUDA
def test_warm_up_captures_every_graph_and_changes_no_output():
    """``Engine.warm_up`` (what ``trtlm serve`` runs before it is ready) captures every (batch, context)
    bucket -- the scratch block absorbs the K/V that capturing writes -- leaves the counters at zero and
    the pool free, and the engine then decodes exactly what a cold engine decodes (bit-identical logits:
    same kernels, same inputs)."""
    from trtlm.runtime.sampling import SamplingParams

    model = _model("mistral", "bfloat16", "cuda")
    cold, warm = _engine_on(model, "cuda", True), _engine_on(model, "cuda", True)
    warm.warm_up()
    graphs = warm.executor.graphs
    assert set(graphs.graphs) == {(b, c) for b in graphs.batch_buckets for c in graphs.context_buckets()}
    stats = warm.stats()
    assert (stats.steps, stats.prompt_tokens_total, stats.kv_blocks_used) == (0, 0, 0)
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    a = cold.generate(PROMPTS, params, keep_logits=True)
    b = warm.generate(PROMPTS, params, keep_logits=True)
    for x, y in zip(a, b):
        assert x.outputs[0].token_ids == y.outputs[0].token_ids
        assert all(torch.equal(p, q) for p, q in zip(x.step_logits, y.step_logits))


def _triton_variants() -> int:
    """Compiled variants of every Triton kernel of the engine's forward, on every device."""
    import triton

    from trtlm.runtime.kernels import fused_triton, triton_ops

    count = 0
    for module in (triton_ops, fused_triton):
        for fn in vars(module).values():
            if isinstance(fn, triton.runtime.JITFunction):
                caches = getattr(fn, "device_caches", None)  # triton >= 3.0: device -> (kernels, ...)
                count += sum(len(c[0]) for c in caches.values()) if caches is not None else \
                    sum(len(c) for c in fn.cache.values())
    return count


@CUDA
def test_after_warm_up_no_step_compiles_a_kernel():
    """A served engine must not stall mid-load to compile: Triton compiles a kernel variant per
    pointer alignment and per integer that is 1 or a multiple of 16, and steps of every size come.
    After ``warm_up``, a workload of prompts of 1 to 70 tokens arriving while others decode (mixed
    steps of every width and alignment) adds no compiled variant."""
    from trtlm.runtime.sampling import SamplingParams

    engine = _engine_on(_model("mistral", "bfloat16", "cuda"), "cuda", True)
    engine.warm_up()
    before = _triton_variants()
    assert before > 0
    lengths = [1, 2, 3, 5, 16, 17, 31, 33, 48, 64, 65, 70, 7, 9]
    prompts = [[(11 * i + j) % 250 + 3 for j in range(n)] for i, n in enumerate(lengths)]
    params = [SamplingParams(max_tokens=3 + i % 5, ignore_eos=True) for i in range(len(prompts))]
    engine.scheduler.max_batch_size = 3  # admissions wait for a slot: they land in decode steps
    engine.generate(prompts, params)
    assert engine.executor.split_steps > 0
    assert _triton_variants() == before


@CUDA
@pytest.mark.parametrize("family", ["mistral", "mixtral"])
def test_mixed_steps_split_into_graph_and_eager_give_eager_tokens(family):
    """Staggered admissions make steps that mix decodes with prompt chunks; with CUDA graphs their
    decode rows replay a graph and the prompt tokens run eagerly after it.  Float32 (no TF32), so
    the two kernel paths differ by float32 rounding only: the same greedy tokens, logits within 1e-4."""
    from trtlm.runtime.sampling import SamplingParams

    model = _model(family, "float32", "cuda")
    prompts = [[(7 * i + j) % 250 + 3 for j in range(5 + 9 * i)] for i in range(6)]
    params = [SamplingParams(max_tokens=6 + 5 * i, ignore_eos=True) for i in range(6)]
    results = []
    for graphs in (False, True):
        engine = _engine_on(model, "cuda", graphs)
        engine.scheduler.max_batch_size = 3  # admissions wait for a slot: they land in decode steps
        results.append(engine.generate(prompts, params, keep_logits=True))
        if graphs:
            assert engine.executor.split_steps > 0
    for a, b in zip(*results):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for x, y in zip(a.step_logits, b.step_logits):
            torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-4)


@CUDA
@pytest.mark.parametrize("family", ["mistral", "mixtral"])
def test_bf16_logits_match_transformers_on_gpu(family, tmp_path):
    """LLM on CUDA (fast forward + CUDA graphs) against transformers' model, both bf16 on the GPU:
    prompt logits and the decode logits of the generated continuation (teacher-forced through
    transformers) within a relative error of 3e-2 (bf16 rounding of two different kernel orders)."""
    from trtlm.api import LLM
    from trtlm.convert.options import ConvertOptions
    from trtlm.convert.pipeline import convert
    from trtlm.build import BuildOptions, build
    from trtlm.testing.models import make_tiny_model, transformers_class

    model_dir = make_tiny_model(family, tmp_path / "hf")
    convert(model_dir, tmp_path / "ckpt", ConvertOptions(dtype="bfloat16"))
    build(tmp_path / "ckpt", tmp_path / "engine", BuildOptions())
    llm = LLM(tmp_path / "engine", device="cuda")
    prompt = PROMPTS[0]
    out = llm.generate([prompt], max_new_tokens=12, keep_logits=True)[0]["output_ids"]
    gen = llm.last_generation
    config = json.loads((model_dir / "config.json").read_text())
    hf = transformers_class(config).from_pretrained(model_dir, dtype=torch.bfloat16).cuda().eval()
    with torch.inference_mode():
        ids = torch.tensor([prompt + out[:-1]], device="cuda")
        ref = hf(ids).logits.float()[0].cpu()  # the engine hands kept logits back on the host
    ours = torch.cat([gen.prompt_logits[0].float()] + [s.float() for s in gen.step_logits], 0)
    assert ours.shape == ref.shape
    err = (ours - ref).norm() / ref.norm()
    assert err < 3e-2, f"relative error {err:.3g}"


# -- quantized engines on the GPU path --------------------------------------------------------------
TINY = Path(__file__).resolve().parents[1] / "core" / "src" / "trtlm" / "data" / "tiny-mistral"
#: mode -> convert options; the GPU runs each with its fast kernel where the device has one
GPU_QUANT = {"int8kv": dict(kv_cache_dtype="int8"), "fp8kv": dict(kv_cache_dtype="fp8"),
             "fp8": dict(quant="fp8"), "int8-wo": dict(quant="int8-wo"), "int4-awq": dict(quant="int4-awq"),
             "int4-wo": dict(quant="int4-wo"), "int8-sq": dict(quant="int8-sq")}


@CUDA
@pytest.mark.parametrize("mode", list(GPU_QUANT))
def test_quantized_engine_gpu_path_matches_cpu_path(mode, tmp_path):
    """The same quantized (or KV-quantized) engine on the GPU path (kernels, quantized KV blocks,
    CUDA graphs) and on the CPU path (reference ops): the prompt logits agree to fp16 rounding of
    two different kernel orders (relative error < 2e-2), the greedy tokens of a short continuation
    agree, and the perplexity on held-out text differs by < 1%."""
    from trtlm.api import LLM
    from trtlm.build import BuildOptions, build
    from trtlm.convert.options import ConvertOptions
    from trtlm.convert.pipeline import convert
    from trtlm.evaluate import engine_logits_fn, read_dataset, score, chunk_ids

    convert(TINY, tmp_path / "ck", ConvertOptions(dtype="float16", calib_size=16, calib_max_seq_len=128,
                                                  **GPU_QUANT[mode]))
    build(tmp_path / "ck", tmp_path / "eng", BuildOptions())
    cpu, gpu = LLM(tmp_path / "eng", device="cpu"), LLM(tmp_path / "eng", device="cuda")
    if mode == "fp8":  # the FP8 activation quantization runs fused into the norms and the SwiGLU
        from trtlm.runtime.model import Block, GatedMLP

        modules = list(gpu.engine.executor.model.modules())
        assert all(m.fused_fp8 is not None for m in modules if isinstance(m, GatedMLP))
        assert all(b.qkv_fp8_scale is not None and b.mlp_fp8_scale is not None
                   for b in modules if isinstance(b, Block))
    if mode in ("int4-awq", "int4-wo"):  # the int4 GEMV of proj applies the SwiGLU after a stacked fc/gate
        from trtlm.runtime.model import GatedMLP

        mlps = [m for m in gpu.engine.executor.model.modules() if isinstance(m, GatedMLP)]
        assert all(m.proj_takes_swiglu == (m.fused_quant is not None and m.proj.kernel_path == "w4") for m in mlps)
    prompt = "def fibonacci(n):\n    "
    a = cpu.generate([prompt], max_new_tokens=8, keep_logits=True)
    b = gpu.generate([prompt], max_new_tokens=8, keep_logits=True)
    la, lb = cpu.last_generation.prompt_logits[0].float(), gpu.last_generation.prompt_logits[0].float()
    assert (la - lb).norm() / la.norm() < 2e-2
    assert a[0]["output_ids"][:4] == b[0]["output_ids"][:4]
    chunks = chunk_ids(cpu.tokenizer.encode(read_dataset(TINY / "eval.txt")), 128, 1024)
    ppl_cpu = score(engine_logits_fn(cpu.engine), chunks).ppl
    ppl_gpu = score(engine_logits_fn(gpu.engine), chunks).ppl
    assert abs(ppl_gpu / ppl_cpu - 1) < 1e-2, (ppl_cpu, ppl_gpu)


@CUDA
@pytest.mark.parametrize("mode", ["bf16", "fp8", "int8-wo", "int4-awq"])
def test_programmatic_dependent_launch_changes_no_output(mode, tmp_path, monkeypatch):
    """Kernels launched with programmatic dependent launch (on by default from sm_90: each may start
    while the kernel before ends, the GEMV prefetching its weights meanwhile) decode exactly what the
    same kernels launched one after the other decode: the same tokens and bit-identical logits, in
    CUDA graphs and eagerly (prefill).  The arithmetic is the same program; only when each kernel
    starts differs, so any difference would be a read of an input before the kernel before wrote it."""
    from trtlm.api import LLM
    from trtlm.build import BuildOptions, build
    from trtlm.convert.options import ConvertOptions
    from trtlm.convert.pipeline import convert
    from trtlm.runtime.kernels.pdl import pdl_available

    opts = {} if mode == "bf16" else {"quant": mode, "calib_size": 16, "calib_max_seq_len": 128}
    convert(TINY, tmp_path / "ck", ConvertOptions(dtype="bfloat16", **opts))
    build(tmp_path / "ck", tmp_path / "eng", BuildOptions())
    prompts = ["def fibonacci(n):\n    ", "The quick brown fox"]
    runs = []
    for flag in ("0", "1"):
        monkeypatch.setenv("TRTLM_PDL", flag)
        assert pdl_available(torch.device("cuda")) == (flag == "1" and torch.cuda.get_device_capability() >= (9, 0))
        llm = LLM(tmp_path / "eng", device="cuda")
        assert llm.engine.executor.graphs is not None
        first = llm.generate(prompts[:1], max_new_tokens=16, keep_logits=True)[0]["output_ids"]
        gen = llm.last_generation
        logits = [gen.prompt_logits[0]] + list(gen.step_logits)
        both = [o["output_ids"] for o in llm.generate(prompts, max_new_tokens=16)]
        runs.append(([first] + both, logits))
    (tokens_off, logits_off), (tokens_on, logits_on) = runs
    assert tokens_on == tokens_off
    assert all(torch.equal(a, b) for a, b in zip(logits_off, logits_on))


@pytest.mark.parametrize("quant", ["int8-wo", "int4-wo", "int4-awq"])
def test_weight_only_swiglu_stacks_fc_and_gate(quant):
    """``GatedMLP.fuse`` stacks weight-only quantized ``fc`` and ``gate`` into one quantized linear
    (one kernel on the GPU): same output, same state_dict, the parts' codes views of the stacked
    ones (nothing stored twice), and a checkpoint loaded afterwards reaches the stacked codes.  On
    the CPU both sides run the emulation; they differ only in how the float32 BLAS blocks the
    product (``1e-5``).  AWQ stacks only when fc and gate share their pre-quant scale."""
    from trtlm.runtime.model import GatedMLP

    model = dummy_model("mistral", "tiny", "float32", "cpu", seed=4, quant=quant).model
    mlp = next(m for m in model.modules() if isinstance(m, GatedMLP))
    if quant == "int4-awq":
        mlp.gate.prequant_scaling_factor.copy_(mlp.fc.prequant_scaling_factor * 1.5)
        mlp.fuse()
        assert mlp.fused_quant is None  # different pre-quant scales: not one product
        mlp.gate.prequant_scaling_factor.copy_(mlp.fc.prequant_scaling_factor)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(5, mlp.fc.in_features, generator=torch.Generator().manual_seed(0))
    want = mlp(x)
    mlp.fuse()
    assert mlp.fused_quant is not None
    stacked = mlp.fused_quant[0]
    assert stacked.out_features == mlp.fc.out_features + mlp.gate.out_features
    assert mlp.fc.weight.data_ptr() == stacked.weight.data_ptr()
    assert mlp.gate.weight.untyped_storage().data_ptr() == stacked.weight.untyped_storage().data_ptr()
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    torch.testing.assert_close(mlp(x), want, rtol=1e-5, atol=1e-5)
    name = next(k for k in before if k.endswith("mlp.gate.weights_scaling_factor"))
    model.load_state_dict({**before, name: before[name] * 2})
    rows = mlp.fc.out_features
    assert torch.equal(stacked.weights_scaling_factor[rows:], before[name] * 2)


def test_fp8_swiglu_fused_computes_what_the_fp8_linears_compute():
    """The fused FP8 SwiGLU (one ``[2I, H]`` FP8 GEMM, per-column weight scales, SiLU, product and the
    down projection's input quantization in one op) against the three FP8 linears one by one, on
    the CPU (``torch._scaled_mm`` runs there too; the GPU picks this path on sm_89+, where
    ``test_quantized_engine_gpu_path_matches_cpu_path[fp8]`` covers it).  The linears are put on the
    ``_scaled_mm`` path as on such a GPU.  Reference: each linear's emulation (dequantized weights
    rounded to bf16), so the two differ by that rounding (~2^-9 per weight) and by FP8 codes of the
    SwiGLU output that it moves across a rounding boundary (one e4m3 step is 6-12%): relative errors
    of 1-2% on these weights, bound 4e-2.  Swapping the fc and gate column scales gives ~9%."""
    from trtlm.quant import kernels as qk
    from trtlm.quant.runtime import QuantLinear
    from trtlm.runtime.kernels import fused
    from trtlm.runtime.model import GatedMLP

    model = dummy_model("mistral", "tiny", "bfloat16", "cpu", seed=3, quant="fp8").model
    mlp = next(m for m in model.modules() if isinstance(m, GatedMLP))
    mlp.gate.weights_scaling_factor.mul_(1.7)  # fc and gate scaled differently: each column its own
    for linear in (mlp.fc, mlp.gate, mlp.proj):
        assert isinstance(linear, QuantLinear)
        linear.prepare()
        linear.kernel_path = qk.SCALED_MM
    x = torch.randn(5, mlp.fc.in_features, generator=torch.Generator().manual_seed(0)).bfloat16()
    want = mlp(x)  # CPU bf16 input: every linear emulates
    mlp.fuse()
    assert mlp.fused_fp8 is not None and mlp.fp8_input_scale() is mlp.fc.activation_scaling_factor
    assert mlp.fc.weight.data_ptr() == mlp.fused_fp8[0].data_ptr()  # views of the fused codes
    got = mlp(fused.quantize_fp8_ref(x, mlp.fp8_input_scale()))  # as the RMSNorm's kernel hands it over
    assert got.dtype == torch.bfloat16 and got.shape == want.shape
    err = ((got.float() - want.float()).norm() / want.float().norm()).item()
    assert err < 4e-2, err
