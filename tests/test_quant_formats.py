"""trtlm.quant.formats against checkpoints written by NVIDIA Model Optimizer 0.47.

Fixtures (tests/fixtures/modelopt, copied from the project's reference exports):

* ``hf/{mistral,mistral128,mixtral}``: the tiny random Hugging Face models (fp32), unchanged.
* ``trtllm/<model>_<modelopt config>_fp16_tp<N>``: what ``export_tensorrt_llm_checkpoint`` wrote
  for them.  config.json is unchanged; the rank safetensors keep every tensor *except*
  ``transformer.vocab_embedding.weight`` and ``lm_head.weight`` (never quantized, plain fp16
  copies of the HF tensors) to keep the fixtures small.

modelopt calibrated on 4 batches of ``torch.randint(0, 1000, (2, 32))`` drawn right after
``torch.manual_seed(0)``, on the fp32 model.  Re-running that calibration with transformers
reproduces its activation statistics up to fp32 summation order, which differs between CPUs
(~1e-7 relative); the SmoothQuant, AWQ-lite, W4A8 and activation-scale tests therefore compare
the calibration-derived tensors within one float16 ulp (codes: one step, rarely), see
tests/calib_tolerance.py for why that bound; weights and weight-only scales stay bit-identical.
They are skipped when transformers is missing.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from calib_tolerance import assert_calibrated_close
from trtlm.quant import formats as qf

FIX = Path(__file__).resolve().parent / "fixtures" / "modelopt"
HF = FIX / "hf"
TRT = FIX / "trtllm"

# TensorRT-LLM linear -> HF parts (note the inversion: fc = gate_proj, gate = up_proj).
LINEARS = {
    "attention.qkv": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
    "attention.dense": ["self_attn.o_proj"],
    "mlp.fc": ["mlp.gate_proj"],
    "mlp.gate": ["mlp.up_proj"],
    "mlp.proj": ["mlp.down_proj"],
}
N_LAYERS = 2


def _hf(name: str) -> dict[str, torch.Tensor]:
    return load_file(HF / name / "model.safetensors")


def _trt(dirname: str, rank: int = 0) -> dict[str, torch.Tensor]:
    return load_file(TRT / dirname / f"rank{rank}.safetensors")


def _config(dirname: str) -> dict:
    return json.loads((TRT / dirname / "config.json").read_text())


def _parts(hf: dict, layer: int, linear: str) -> list[torch.Tensor]:
    return [hf[f"model.layers.{layer}.{p}.weight"] for p in LINEARS[linear]]


def _bytes_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Byte-level equality (fp8 tensors compared through their uint8 view)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype == torch.float8_e4m3fn:
        return torch.equal(a.view(torch.uint8), b.view(torch.uint8))
    return torch.equal(a, b)


def _assert_same(ours: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    assert ours.dtype == ref.dtype, f"{what}: dtype {ours.dtype} != {ref.dtype}"
    assert ours.shape == ref.shape, f"{what}: shape {tuple(ours.shape)} != {tuple(ref.shape)}"
    if not _bytes_equal(ours, ref):
        if ours.is_floating_point() and ours.dtype != torch.float8_e4m3fn:
            diff = (ours.float() - ref.float()).abs().max().item()
        else:
            diff = (ours.view(torch.uint8) != ref.view(torch.uint8)).sum().item()
        raise AssertionError(f"{what}: not bit-identical (max diff / #bytes differing: {diff})")


def _fp8_dense_mlp_expected(hf: dict, layer: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """linear -> (unsplit weight, expected per-tensor scale) for FP8 Mistral."""
    fc_gate_scale = qf.fp8_weight_scale(*_parts(hf, layer, "mlp.fc"), *_parts(hf, layer, "mlp.gate"))
    out = {}
    for linear in LINEARS:
        parts = _parts(hf, layer, linear)
        scale = fc_gate_scale if linear in ("mlp.fc", "mlp.gate") else qf.fp8_weight_scale(*parts)
        out[linear] = (parts, scale)
    return out


# ----------------------------------------------------------------------------- FP8

@pytest.mark.parametrize("model,dirname", [
    ("mistral128", "mistral128_FP8_DEFAULT_CFG+FP8KV_fp16_tp1"),
    ("mistral", "mistral_FP8_DEFAULT_CFG_fp16_tp1"),
])
def test_fp8_matches_modelopt(model, dirname):
    hf, ref = _hf(model), _trt(dirname)
    for i in range(N_LAYERS):
        for linear, (parts, scale) in _fp8_dense_mlp_expected(hf, i).items():
            key = f"transformer.layers.{i}.{linear}"
            _assert_same(scale, ref[key + ".weights_scaling_factor"], key + ".weights_scaling_factor")
            _assert_same(qf.quantize_fp8(torch.cat(parts), scale), ref[key + ".weight"], key + ".weight")
        # fc (gate_proj) and gate (up_proj) share both the weight and the activation scale.
        t = f"transformer.layers.{i}.mlp."
        assert torch.equal(ref[t + "fc.weights_scaling_factor"], ref[t + "gate.weights_scaling_factor"])
        assert torch.equal(ref[t + "fc.activation_scaling_factor"], ref[t + "gate.activation_scaling_factor"])


def test_fp8_source_precision_is_fp32():
    """Rounding the HF weight to the export dtype first would not reproduce modelopt."""
    hf, ref = _hf("mistral128"), _trt("mistral128_FP8_DEFAULT_CFG+FP8KV_fp16_tp1")
    w = hf["model.layers.0.self_attn.o_proj.weight"]
    key = "transformer.layers.0.attention.dense"
    assert not torch.equal(qf.fp8_weight_scale(w.half()), ref[key + ".weights_scaling_factor"])
    q16 = qf.quantize_fp8(w.half(), ref[key + ".weights_scaling_factor"])
    assert not _bytes_equal(q16, ref[key + ".weight"])


def test_fp8_tp2_scales_from_full_tensor():
    """Under TP, per-tensor scales come from the unsplit tensor and are replicated on every rank."""
    hf = _hf("mistral")
    refs = [_trt("mistral_FP8_DEFAULT_CFG_fp16_tp2", r) for r in range(2)]
    for i in range(N_LAYERS):
        for linear, (parts, scale) in _fp8_dense_mlp_expected(hf, i).items():
            dim = 1 if linear in ("attention.dense", "mlp.proj") else 0
            for r, ref in enumerate(refs):
                # 2 KV heads, tp 2: no KV duplication; q, k, v each split then concatenated.
                w = torch.cat([torch.chunk(p, 2, dim)[r] for p in parts])
                key = f"transformer.layers.{i}.{linear}"
                _assert_same(scale, ref[key + ".weights_scaling_factor"], f"rank{r} {key}.weights_scaling_factor")
                _assert_same(qf.quantize_fp8(w, scale), ref[key + ".weight"], f"rank{r} {key}.weight")


def test_fp8_mixtral_experts():
    hf, ref = _hf("mixtral"), _trt("mixtral_FP8_DEFAULT_CFG_fp16_tp1")
    n_experts = _config("mixtral_FP8_DEFAULT_CFG_fp16_tp1")["moe"]["num_experts"]
    for i in range(N_LAYERS):
        t = f"transformer.layers.{i}."
        for linear in ("attention.qkv", "attention.dense"):
            parts = _parts(hf, i, linear)
            scale = qf.fp8_weight_scale(*parts)
            _assert_same(scale, ref[t + linear + ".weights_scaling_factor"], t + linear + ".weights_scaling_factor")
            _assert_same(qf.quantize_fp8(torch.cat(parts), scale), ref[t + linear + ".weight"], t + linear + ".weight")
        p = f"model.layers.{i}.block_sparse_moe."
        w1, w2, w3 = (torch.stack([hf[f"{p}experts.{e}.{n}.weight"] for e in range(n_experts)]) for n in ("w1", "w2", "w3"))
        fc_scale = qf.fp8_expert_weight_scale(w1, w3)
        proj_scale = qf.fp8_expert_weight_scale(w2)
        assert fc_scale.shape == (n_experts, 1)
        _assert_same(fc_scale, ref[t + "mlp.fc.weights_scaling_factor"], t + "mlp.fc.weights_scaling_factor")
        _assert_same(proj_scale, ref[t + "mlp.proj.weights_scaling_factor"], t + "mlp.proj.weights_scaling_factor")
        fc = torch.cat([w3, w1], dim=1)  # per expert: up (w3) first, gate (w1) second
        _assert_same(qf.quantize_fp8(fc, fc_scale), ref[t + "mlp.fc.weight"], t + "mlp.fc.weight")
        _assert_same(qf.quantize_fp8(w2, proj_scale), ref[t + "mlp.proj.weight"], t + "mlp.proj.weight")
        # The router is never quantized: float32, bit-identical to HF.
        _assert_same(hf[p + "gate.weight"], ref[t + "mlp.router.weight"], t + "mlp.router.weight")


def test_fp8_per_channel_per_token():
    dirname = "mistral128_FP8_PER_CHANNEL_PER_TOKEN_CFG_fp16_tp1"
    hf, ref = _hf("mistral128"), _trt(dirname)
    assert _config(dirname)["quantization"]["quant_algo"] == "FP8_PER_CHANNEL_PER_TOKEN"
    for i in range(N_LAYERS):
        for linear in LINEARS:
            key = f"transformer.layers.{i}.{linear}"
            w = torch.cat(_parts(hf, i, linear))
            scale = qf.fp8_per_channel_scale(w)
            _assert_same(scale, ref[key + ".per_channel_scale"], key + ".per_channel_scale")
            _assert_same(qf.quantize_fp8(w, scale), ref[key + ".weight"], key + ".weight")
            assert key + ".activation_scaling_factor" not in ref  # per-token: dynamic


def test_kv_cache_scales():
    ref = _trt("mistral128_FP8_DEFAULT_CFG+FP8KV_fp16_tp1")
    assert _config("mistral128_FP8_DEFAULT_CFG+FP8KV_fp16_tp1")["quantization"]["kv_cache_quant_algo"] == "FP8"
    # Any realistic amax (well below 448) gives exactly 1.0: modelopt floors FP8 KV scales at 1.
    ours = qf.kv_cache_scale(torch.tensor(7.5), torch.tensor(3.0))
    for i in range(N_LAYERS):
        for name, value in ours.items():
            _assert_same(value, ref[f"transformer.layers.{i}.attention.{name}"], name)
    big = qf.kv_cache_scale(896.0, 1344.0)
    assert big["k_cache_scaling_factor"].item() == 2.0 and big["v_cache_scaling_factor"].item() == 3.0
    assert big["kv_cache_scaling_factor"].item() == 3.0
    int8 = qf.kv_cache_scale(12.7, 25.4, kind="INT8")
    assert torch.allclose(int8["kv_cache_scaling_factor"], torch.tensor([0.2]))


# ----------------------------------------------------------------------------- INT8 / INT4

def test_int8_weight_only_matches_modelopt():
    dirname = "mistral128_INT8_WEIGHT_ONLY_CFG_fp16_tp1"
    hf, ref = _hf("mistral128"), _trt(dirname)
    assert _config(dirname)["quantization"]["quant_algo"] == "W8A16"
    for i in range(N_LAYERS):
        for linear in LINEARS:
            key = f"transformer.layers.{i}.{linear}"
            w = torch.cat(_parts(hf, i, linear))
            scale = qf.int8_weight_scale(w)
            _assert_same(scale, ref[key + ".weights_scaling_factor"], key + ".weights_scaling_factor")
            _assert_same(qf.quantize_int8(w, scale), ref[key + ".weight"], key + ".weight")


def test_int4_blockwise_matches_modelopt():
    dirname = "mistral128_INT4_BLOCKWISE_WEIGHT_ONLY_CFG_fp16_tp1"
    hf, ref, cfg = _hf("mistral128"), _trt(dirname), _config(dirname)
    q = cfg["quantization"]
    # modelopt labels plain blockwise int4 as W4A16_AWQ (pre_quant_scale true, but writes none).
    assert (q["quant_algo"], q["group_size"], q["has_zero_point"]) == ("W4A16_AWQ", 128, False)
    group = q["group_size"]
    for i in range(N_LAYERS):
        for linear in LINEARS:
            key = f"transformer.layers.{i}.{linear}"
            w = torch.cat(_parts(hf, i, linear))
            scales = qf.int4_group_scales(w, group)
            _assert_same(scales, ref[key + ".weights_scaling_factor"], key + ".weights_scaling_factor")
            packed = qf.pack_int4(qf.quantize_int4(w, scales, group))
            assert packed.shape == (w.shape[0] // 2, w.shape[1])
            _assert_same(packed, ref[key + ".weight"], key + ".weight")
            assert key + ".prequant_scaling_factor" not in ref


def test_int4_pack_layout():
    q = torch.tensor([[1, 2], [3, -1], [-8, 7], [0, -2]], dtype=torch.int8)  # [out=4, in=2]
    packed = qf.pack_int4(q)
    assert packed.dtype == torch.int8 and packed.shape == (2, 2)
    # byte (j, i) = q[2j, i] low nibble | q[2j+1, i] high nibble
    assert packed.view(torch.uint8).tolist() == [[0x31, 0xF2], [0x08, 0xE7]]
    assert torch.equal(qf.unpack_int4(packed), q)
    experts = torch.randint(-8, 8, (3, 6, 4), dtype=torch.int8)
    assert torch.equal(qf.unpack_int4(qf.pack_int4(experts)), experts)
    assert torch.equal(qf.pack_int4(experts)[1], qf.pack_int4(experts[1]))
    # every (low, high) pair of values, against the byte written out by hand
    lo, hi = (g.flatten() for g in torch.meshgrid(torch.arange(-8, 8), torch.arange(-8, 8), indexing="ij"))
    pairs = qf.pack_int4(torch.stack([lo, hi]).to(torch.int8))[0].view(torch.uint8).tolist()
    assert pairs == [(a & 0xF) | ((b & 0xF) << 4) for a, b in zip(lo.tolist(), hi.tolist())]


def test_awq_vocab_padding():
    for dirname in ("mistral128_INT4_AWQ_CFG_fp16_tp1", "mistral128_INT4_BLOCKWISE_WEIGHT_ONLY_CFG_fp16_tp1",
                    "mistral128_W4A8_AWQ_BETA_CFG_fp16_tp1"):
        assert _config(dirname)["vocab_size"] == qf.awq_padded_vocab_size(1000) == 1024
    assert _config("mistral128_INT8_WEIGHT_ONLY_CFG_fp16_tp1")["vocab_size"] == 1000
    assert qf.awq_padded_vocab_size(1024) == 1024 and qf.awq_padded_vocab_size(32001) == 32064
    w = torch.randn(1000, 8)
    padded = qf.pad_vocab_rows(w, 1024)
    assert padded.shape == (1024, 8) and torch.equal(padded[:1000], w) and not padded[1000:].any()


def test_awq_fixture_self_consistent():
    """dequant(packed, scales) * prequant reproduces the HF weight within int4 error."""
    dirname = "mistral128_INT4_AWQ_CFG_fp16_tp1"
    hf, ref = _hf("mistral128"), _trt(dirname)
    assert _config(dirname)["quantization"]["pre_quant_scale"] is True
    for i in range(N_LAYERS):
        for linear in LINEARS:
            key = f"transformer.layers.{i}.{linear}"
            w = torch.cat(_parts(hf, i, linear))
            t = {s: ref[f"{key}.{s}"] for s in ("weight", "weights_scaling_factor", "prequant_scaling_factor")}
            assert t["prequant_scaling_factor"].dtype == torch.float16
            assert not torch.all(t["prequant_scaling_factor"] == 1)  # AWQ really scaled something
            dense = qf.dequantize("W4A16_AWQ", t, torch.float32)
            step = t["weights_scaling_factor"].repeat_interleave(128, -1) * t["prequant_scaling_factor"].float()
            bound = step / 2 + w.abs() * 2.0**-10 + 1e-7  # half an int4 step + fp16 rounding of prequant
            assert torch.all((dense - w).abs() <= bound), key
            # Dividing by the prequant scale instead would be far off.
            wrong = qf.dequantize("W4A16_AWQ", t, torch.float32, fold_prequant=False) / t["prequant_scaling_factor"].float()
            assert not torch.all((wrong - w).abs() <= bound)


# ----------------------------------------------------------------------------- calibration-dependent formats

@pytest.fixture(scope="module")
def calib_inputs():
    """Every decoder linear's inputs over modelopt's calibration batches, from the fp32 HF model."""
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(HF / "mistral128").eval()
    assert next(model.parameters()).dtype == torch.float32
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 1000, (2, 32), generator=gen) for _ in range(4)]
    inputs: dict[str, list[torch.Tensor]] = {}
    hooks = []
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and ".layers." in name:
            hooks.append(mod.register_forward_pre_hook(
                lambda m, args, name=name: inputs.setdefault(name.removeprefix("model."), []).append(args[0].detach().clone())))
    with torch.no_grad():
        for ids in batches:
            model(ids)
    for h in hooks:
        h.remove()
    return inputs


def _linear_inputs(calib, layer: int, linear: str) -> list[torch.Tensor]:
    return calib[f"layers.{layer}.{LINEARS[linear][0]}"]


def _channel_amax(batches: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack([x.abs().reshape(-1, x.shape[-1]).amax(0) for x in batches]).amax(0)


def test_fp8_activation_scales_from_calibration(calib_inputs):
    ref = _trt("mistral128_FP8_DEFAULT_CFG+FP8KV_fp16_tp1")
    for i in range(N_LAYERS):
        for linear in LINEARS:
            key = f"transformer.layers.{i}.{linear}.activation_scaling_factor"
            scale = qf.fp8_activation_scale(_channel_amax(_linear_inputs(calib_inputs, i, linear)))
            assert_calibrated_close(scale, ref[key], key)


def test_smoothquant_matches_modelopt(calib_inputs):
    hf, ref = _hf("mistral128"), _trt("mistral128_INT8_SMOOTHQUANT_CFG_fp16_tp1")
    for i in range(N_LAYERS):
        for linear in LINEARS:
            key = f"transformer.layers.{i}.{linear}"
            out = qf.quantize_smoothquant(_parts(hf, i, linear), _channel_amax(_linear_inputs(calib_inputs, i, linear)),
                                          alpha=1.0)
            out["prequant_scaling_factor"] = out["prequant_scaling_factor"].half()  # export dtype
            for name, value in out.items():  # all of them depend on the calibrated smoother
                assert_calibrated_close(value, ref[f"{key}.{name}"], f"{key}.{name}")
    # alpha = 1: every activation scale is exactly 1/127
    assert ref["transformer.layers.0.attention.qkv.activation_scaling_factor"].item() == pytest.approx(1 / 127)


@pytest.fixture(scope="module")
def awq_search(calib_inputs):
    """(layer, linear) -> the awq_lite results of its HF parts (INT4_AWQ and W4A8_AWQ share them)."""
    hf = _hf("mistral128")
    return {
        (i, linear): [qf.awq_lite_search(w, calib_inputs[f"layers.{i}.{p}"], group_size=128)
                      for w, p in zip(_parts(hf, i, linear), LINEARS[linear])]
        for i in range(N_LAYERS) for linear in LINEARS
    }


def test_awq_lite_matches_modelopt(awq_search):
    hf, ref = _hf("mistral128"), _trt("mistral128_INT4_AWQ_CFG_fp16_tp1")
    alphas = []
    for i in range(N_LAYERS):
        for linear in LINEARS:
            key = f"transformer.layers.{i}.{linear}"
            prequants = [r.prequant for r in awq_search[i, linear]]
            alphas += [r.alpha for r in awq_search[i, linear]]
            out = qf.quantize_awq(_parts(hf, i, linear), prequants, group_size=128)
            out["prequant_scaling_factor"] = out["prequant_scaling_factor"].half()
            for name, value in out.items():  # all of them depend on the calibrated AWQ scales
                assert_calibrated_close(value, ref[f"{key}.{name}"], f"{key}.{name}", packed_int4=name == "weight")
    assert len(set(alphas)) > 1  # the search really chose between alphas


def test_w4a8_awq_matches_modelopt(calib_inputs, awq_search):
    hf, ref = _hf("mistral128"), _trt("mistral128_W4A8_AWQ_BETA_CFG_fp16_tp1")
    for i in range(N_LAYERS):
        for linear in LINEARS:
            key = f"transformer.layers.{i}.{linear}"
            prequants = [r.prequant for r in awq_search[i, linear]]
            act_amax = _channel_amax(_linear_inputs(calib_inputs, i, linear))
            out = qf.quantize_w4a8_awq(_parts(hf, i, linear), prequants, act_amax, group_size=128)
            out["prequant_scaling_factor"] = out["prequant_scaling_factor"].half()
            for name, value in out.items():  # all of them depend on the calibrated AWQ scales
                assert_calibrated_close(value, ref[f"{key}.{name}"], f"{key}.{name}", packed_int4=name == "weight")


# ----------------------------------------------------------------------------- round trips and runtime helpers

def test_round_trip_error_bounds():
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(64, 256, generator=gen) * 0.05
    w[3] = 0  # an all-zero row gets scale 1.0 and quantizes to zeros
    experts = torch.randn(3, 32, 128, generator=gen)

    s = qf.fp8_weight_scale(w)
    err = (qf.dequantize_fp8(qf.quantize_fp8(w, s), s, torch.float32) - w).abs()
    assert torch.all(err <= torch.maximum(w.abs() * 2.0**-4, s * 2.0**-10) * (1 + 1e-6))
    se = qf.fp8_expert_weight_scale(experts)
    assert se.shape == (3, 1)
    err = (qf.dequantize_fp8(qf.quantize_fp8(experts, se), se, torch.float32) - experts).abs()
    assert torch.all(err <= torch.maximum(experts.abs() * 2.0**-4, se.view(3, 1, 1) * 2.0**-10) * (1 + 1e-6))
    sc = qf.fp8_per_channel_scale(w)
    assert sc[3] == 1.0
    err = (qf.dequantize_fp8(qf.quantize_fp8(w, sc), sc, torch.float32) - w).abs()
    assert torch.all(err <= torch.maximum(w.abs() * 2.0**-4, sc[:, None] * 2.0**-10) * (1 + 1e-6))

    s8 = qf.int8_weight_scale(w)
    assert s8[3] == 1.0
    q8 = qf.quantize_int8(w, s8)
    assert q8.abs().amax() == 127 and not q8[3].any()
    err = (qf.dequantize_int8(q8, s8, torch.float32) - w).abs()
    assert torch.all(err <= s8[:, None] / 2 * (1 + 1e-6))

    s4 = qf.int4_group_scales(w, 128)
    assert s4.shape == (64, 2) and torch.all(s4[3] == 1.0)
    q4 = qf.quantize_int4(w, s4, 128)
    assert q4.min() >= -8 and q4.max() <= 7
    err = (qf.dequantize_int4(qf.pack_int4(q4), s4, torch.float32) - w).abs()
    assert torch.all(err <= s4.repeat_interleave(128, -1) / 2 * (1 + 1e-6))
    # fake quant used by the AWQ search agrees with quantize -> dequantize within one ulp
    assert torch.allclose(qf.fake_quant_int4(w, 128), qf.dequantize_int4(qf.pack_int4(q4), s4, torch.float32),
                          rtol=0, atol=float(s4.max()) * 1e-5 + 1e-12)

    p = torch.rand(256, generator=gen) + 0.5
    out = qf.quantize_awq([w], [p], 128)
    dense = qf.dequantize("W4A16_AWQ", out, torch.float32)
    assert torch.all((dense - w).abs() <= out["weights_scaling_factor"].repeat_interleave(128, -1) * p / 2 * (1 + 1e-5) + 1e-9)


def test_fp8_saturates_instead_of_nan():
    q = qf.quantize_fp8(torch.tensor([1.0, -3.0]), torch.tensor([1.0 / 448]))
    assert q.float().tolist() == [448.0, -448.0]


def test_dequantize_dispatch_on_fixtures():
    hf = _hf("mistral128")
    cases = {
        "mistral128_FP8_DEFAULT_CFG+FP8KV_fp16_tp1": 2.0**-4,
        "mistral128_FP8_PER_CHANNEL_PER_TOKEN_CFG_fp16_tp1": 2.0**-4,
        "mistral128_INT8_WEIGHT_ONLY_CFG_fp16_tp1": 1 / 127,
        "mistral128_INT8_SMOOTHQUANT_CFG_fp16_tp1": 2 / 127,  # smoothing moves error between channels
        "mistral128_INT4_BLOCKWISE_WEIGHT_ONLY_CFG_fp16_tp1": 1 / 7,
        "mistral128_INT4_AWQ_CFG_fp16_tp1": 1 / 7,
        "mistral128_W4A8_AWQ_BETA_CFG_fp16_tp1": 1 / 7,
    }
    suffixes = ("weight", "weights_scaling_factor", "per_channel_scale", "prequant_scaling_factor")
    for dirname, rel in cases.items():
        kind = _config(dirname)["quantization"]["quant_algo"]
        ref = _trt(dirname)
        for i in range(N_LAYERS):
            for linear in LINEARS:
                key = f"transformer.layers.{i}.{linear}"
                t = {s: ref[f"{key}.{s}"] for s in suffixes if f"{key}.{s}" in ref}
                w = torch.cat(_parts(hf, i, linear))
                dense = qf.dequantize(kind, t, torch.float16)
                assert dense.dtype == torch.float16 and dense.shape == w.shape
                # max error relative to the largest weight of the tensor (loose: the format's step)
                err = (dense.float() - w).abs().max() / w.abs().max()
                assert err <= rel, f"{dirname} {key}: {err}"
    plain = torch.randn(4, 4)
    assert torch.equal(qf.dequantize(None, {"weight": plain}, torch.float32), plain)
    assert qf.dequantize("FP8", {"weight": plain.half()}, torch.float32).dtype == torch.float32  # excluded module


def test_fuse_prequant_resmooths():
    gen = torch.Generator().manual_seed(2)
    ws = [torch.randn(8, 16, generator=gen) for _ in range(3)]
    ps = [torch.rand(16, generator=gen) + 0.5 for _ in range(3)]
    smoothed = [qf.smooth_weight(w, p) for w, p in zip(ws, ps)]
    fused, common = qf.fuse_prequant(smoothed, ps)
    assert torch.allclose(common, torch.stack(ps).mean(0))
    for w, f in zip(ws, fused):  # y = (x * common) @ f^T == x @ w^T
        assert torch.allclose(f * common, w, rtol=1e-5, atol=1e-6)
    same, c = qf.fuse_prequant([smoothed[0]], [ps[0]])
    assert same[0] is smoothed[0] and torch.equal(c, ps[0])
