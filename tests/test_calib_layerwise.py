"""Layer-by-layer calibration (trtlm.quant.layerwise) against the whole-model pass it replaces.

The statistics (per-channel input amax, AWQ act-scale sums, MoE expert amaxes, K/V amax) and the
AWQ pre-quant scales must equal the whole-model calibration's in the same dtype: same runtime
modules, same inputs, only the model is built one layer at a time.  Values are compared within a
relative tolerance, never bit for bit (the residual add happens in a different place, and BLAS may
sum in another order for other shapes): float32 ``1e-5`` relative (a few hundred fp32 ulps, far
below the one-float16-ulp tolerance of the checkpoint tests), bfloat16 ``2**-6`` (two bf16 ulps:
one rounding of the residual stream may differ).  A wrong layer, a missed MoE route or a wrong
position table moves statistics by far more.

Also: only one decoder layer is alive at a time, the default calibration text is natural language,
and the calibration flags fail with one line.
"""
from __future__ import annotations

import gc
import re
import weakref
from pathlib import Path

import pytest
import torch
from conftest import run_cli

from trtlm.convert.options import ConvertOptions
from trtlm.convert.pipeline import convert, load, resolve_model
from trtlm.errors import UserError
from trtlm.plugins import get_registry
from trtlm.quant import calibrate as cal
from trtlm.quant import layerwise
from trtlm.quant.plan import _meta_full

ROOT = Path(__file__).resolve().parents[1]
FIX = Path(__file__).parent / "fixtures" / "modelopt" / "hf"
TINY = ROOT / "core" / "src" / "trtlm" / "data" / "tiny-mistral"
RTOL = {torch.float32: 1e-5, torch.bfloat16: 2.0 ** -6}
GROUP = 32


def _setup(model_dir: Path):
    reg = get_registry()
    entry, _fmt = resolve_model(model_dir, None, reg)
    hooks = reg.hooks(entry)
    opts = ConvertOptions(dtype="float32", quant="int4-awq", awq_group_size=GROUP)
    loaded = load(hooks, model_dir, None, opts)
    plan = hooks.trtlm_map_layers(hf_config=loaded.hf_config, options=opts)
    dense = [s for s in plan.tensors if s.quantizable and _meta_full(s).dim() == 2]
    names = [s.name[: -len(".weight")] for s in dense]
    rows = {s.name[: -len(".weight")]: [sh[0] for sh in s.shapes] if len(s.shapes) > 1 else [_meta_full(s).shape[0]]
            for s in dense}
    return hooks, opts, loaded, plan, names, rows


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float, what: str) -> None:
    a, b = a.double(), b.double()
    scale = a.abs().max().clamp_min(1e-30)  # relative to the tensor's range: tiny channels are noise
    worst = ((a - b).abs() / scale).max().item()
    assert worst <= rtol, f"{what}: differs by {worst:.3g} relative (allowed {rtol:.3g})"


@pytest.mark.parametrize("model_dir", [TINY, FIX / "mixtral", FIX / "mpt"], ids=["tiny-mistral", "mixtral", "mpt"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_layerwise_equals_whole_model(model_dir, dtype):
    """Same statistics, K/V amax and AWQ scales as the whole model in the same dtype (RoPE +
    sliding window, MoE routing per layer, ALiBi)."""
    hooks, opts, loaded, plan, names, rows = _setup(model_dir)
    batches = cal.random_batches(int(loaded.hf_config["vocab_size"]), 0, 3, 2, 24)
    model = cal.dense_model(plan, loaded, hooks, opts, dtype=dtype)
    ref = cal.collect(model, batches, names, True, progress="off")
    parts = {n: list(dict(model.named_modules())[n].weight.detach().float().split(r, 0)) for n, r in rows.items()}
    ref_awq = cal.awq_search(model, batches, parts, ref, GROUP, progress="off")
    del model
    got, awq = layerwise.calibrate_layerwise(plan, loaded, hooks, opts, batches, names, kv=True, awq_rows=rows,
                                             group_size=GROUP, dtype=dtype, device="cpu")
    rtol = RTOL[dtype]
    assert sorted(got.linears) == sorted(ref.linears)
    if model_dir.name == "mixtral":
        assert any(k.endswith("mlp.proj") for k in got.linears)  # the MoE hook ran per layer
    for name, st in ref.linears.items():
        assert got.linears[name].calls == st.calls, name
        for attr in ("amax", "awq_sum"):
            if getattr(st, attr) is not None:
                _close(getattr(got.linears[name], attr), getattr(st, attr), rtol, f"{name}.{attr}")
    assert sorted(got.k_amax) == sorted(ref.k_amax) == list(range(len(ref.k_amax)))
    for layer in ref.k_amax:
        _close(got.k_amax[layer], ref.k_amax[layer], rtol, f"k_amax[{layer}]")
        _close(got.v_amax[layer], ref.v_amax[layer], rtol, f"v_amax[{layer}]")
    assert sorted(awq) == sorted(ref_awq)
    if dtype == torch.float32:  # bf16 noise may legitimately pick a neighbouring alpha
        for name in ref_awq:
            for a, b in zip(awq[name], ref_awq[name], strict=True):
                _close(a, b, rtol, f"awq {name}")


def test_one_decoder_layer_alive_at_a_time():
    """The streaming pass frees each layer before building the next: peak = one layer + activations."""
    hooks, opts, loaded, plan, names, rows = _setup(TINY)
    alive: list[weakref.ref] = []
    seen = []

    def on_layer(layer, stage):
        gc.collect()
        assert all(r() is None for r in alive), f"layer {layer} built while an earlier layer is still alive"
        n_layers = len(stage.transformer.layers)
        assert n_layers == 1 and not hasattr(stage, "lm_head") and not hasattr(stage.transformer, "vocab_embedding")
        alive.append(weakref.ref(stage))
        seen.append(layer)
    batches = cal.random_batches(2048, 0, 2, 1, 16)
    layerwise.calibrate_layerwise(plan, loaded, hooks, opts, batches, names, kv=True, awq_rows=rows,
                                  group_size=GROUP, on_layer=on_layer)
    assert seen == list(range(int(loaded.hf_config["num_hidden_layers"])))


def test_auto_device_and_dtype():
    assert layerwise.resolve_calib_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert layerwise.resolve_calib_device("cpu") == torch.device("cpu")
    assert layerwise.resolve_calib_dtype("auto", {"dtype": "bfloat16"}) == torch.bfloat16
    assert layerwise.resolve_calib_dtype("auto", {"torch_dtype": "float16"}) == torch.float16
    assert layerwise.resolve_calib_dtype("auto", {}) == torch.float32
    assert layerwise.resolve_calib_dtype("float32", {"dtype": "bfloat16"}) == torch.float32
    with pytest.raises(UserError, match="--calib-device"):
        layerwise.resolve_calib_device("gpu")


def test_default_calibration_text_is_natural_language():
    """The bundled default is English prose (sentences), not source code."""
    path = cal.BUNDLED_CALIB
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    assert len(lines) >= 100
    code = re.compile(r"^\s*(def|class|import|from|return|if|for)\b|[{}();=]\s*$|^\s{2,}|\bself\.|==|->")
    assert not [line for line in lines if code.search(line)]
    assert all(line.rstrip().endswith((".", "!", "?")) for line in lines)
    words = re.findall(r"[A-Za-z']+", " ".join(lines).lower())
    assert len(words) > 4000 and sum(w in ("the", "and", "of", "a", "to") for w in words) / len(words) > 0.1
    batches, where = cal.calibration_batches(None, 2048, [TINY], 8, 64, progress="off")
    assert "english.txt" in where and len(batches) == 8 and all(b.shape[1] > 20 for b in batches)


def test_calib_data_jsonl_and_errors(tmp_path):
    j = tmp_path / "c.jsonl"
    j.write_text('{"text": "The cat sat on the mat."}\n\n{"text": "A second sample of plain English."}\n')
    batches, where = cal.calibration_batches(j, 2048, [TINY], 64, 256, progress="off")
    assert len(batches) == 2 and "c.jsonl" in where
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"txt": 1}\n')
    with pytest.raises(UserError, match=r"bad.jsonl:1: expected a JSON object"):
        cal.calibration_batches(bad, 2048, [TINY], 64, 256, progress="off")


def test_converts_in_bfloat16_on_cpu(tmp_path):
    """--calib-dtype bfloat16 runs end to end (what a bf16 model gets by default) and stays close
    to the float32 calibration's activation scales (bf16 activations: within 2 %)."""
    from safetensors.torch import load_file

    outs = {}
    for dt in ("float32", "bfloat16"):
        out = tmp_path / dt
        convert(FIX / "mistral128", out, ConvertOptions(dtype="float16", quant="fp8", calib_dtype=dt,
                                                        calib_data="random:seed=0,batches=2,batch_size=2,seq_len=16"))
        outs[dt] = load_file(out / "rank0.safetensors")
    for name, t in outs["float32"].items():
        if name.endswith("activation_scaling_factor"):
            _close(outs["bfloat16"][name], t, 0.02, name)


@pytest.mark.parametrize("args, message", [
    (["--calib-device", "gpu"], "--calib-device 'gpu': not a device"),
    (["--calib-dtype", "float64"], "Invalid value for '--calib-dtype'"),
    (["--calibrator", "awesome"], "Invalid value for '--calibrator'"),
])
def test_bad_calibration_flags_are_one_line(tmp_path, args, message):
    res = run_cli("convert", "--model-dir", FIX / "mistral128", "--output-dir", tmp_path / "o", "--quant", "fp8",
                  "--calib-data", "random:batches=1", *args)
    assert res.exit_code != 0
    assert message in res.stderr, res.stderr
    assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) <= 3
    assert not (tmp_path / "o").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("model_dir", [TINY, FIX / "mixtral", FIX / "mpt"], ids=["tiny-mistral", "mixtral", "mpt"])
def test_layerwise_on_gpu_matches_cpu(model_dir):
    """--calib-device cuda: the GPU's kernels (paged attention, fused norms) give the CPU's
    statistics within float32 rounding of different kernels (1e-4 relative)."""
    hooks, opts, loaded, plan, names, rows = _setup(model_dir)
    batches = cal.random_batches(int(loaded.hf_config["vocab_size"]), 0, 3, 2, 24)
    cpu, cpu_awq = layerwise.calibrate_layerwise(plan, loaded, hooks, opts, batches, names, kv=True, awq_rows=rows,
                                                 group_size=GROUP, device="cpu")
    gpu, gpu_awq = layerwise.calibrate_layerwise(plan, loaded, hooks, opts, batches, names, kv=True, awq_rows=rows,
                                                 group_size=GROUP, device="cuda")
    for name, st in cpu.linears.items():
        assert gpu.linears[name].amax.device.type == "cpu"
        _close(gpu.linears[name].amax, st.amax, 1e-4, name)
    for layer in cpu.k_amax:
        _close(gpu.k_amax[layer], cpu.k_amax[layer], 1e-4, f"k_amax[{layer}]")
        _close(gpu.v_amax[layer], cpu.v_amax[layer], 1e-4, f"v_amax[{layer}]")
    assert sorted(gpu_awq) == sorted(cpu_awq)
