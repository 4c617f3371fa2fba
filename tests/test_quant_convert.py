"""Quantized conversion end to end: modelopt parity, tensor parallelism, every family and mode runs.

The Hugging Face fixtures are the tiny random models NVIDIA modelopt exported
(tests/fixtures/modelopt); modelopt calibrated them on 4 batches of
``randint(0, 1000, (2, 32))`` after ``manual_seed(0)``, which ``--calib-data random:...`` reproduces.
Weights and weight-only scales must equal modelopt's bit for bit; tensors derived from the calibrated
activations are compared within one float16 ulp (codes: one step, rarely), because the fp32 calibration
pass sums in a CPU-dependent order (tests/calib_tolerance.py says why that bound).
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from calib_tolerance import ACTIVATION_SUFFIXES, assert_calibrated_close
from trtlm.cli import cli as cli_main
from trtlm.convert.options import ConvertOptions
from trtlm.convert.pipeline import convert
from trtlm.errors import UserError
from trtlm.build import BuildOptions, build

FIX = Path(__file__).parent / "fixtures" / "modelopt"
HF = FIX / "hf"
TRT = FIX / "trtllm"
RANDOM_CALIB = "random:seed=0,batches=4,batch_size=2,seq_len=32"
MODES = ("fp8", "int8-wo", "int4-wo", "int4-awq", "int8-sq")


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t


def _assert_matches_fixture(ours: dict, ref: dict, smoothed: bool, packed_int4: bool = False) -> None:
    """Every fixture tensor is in ``ours``; exact unless derived from calibrated activations.

    :param smoothed: the format folds a calibrated smoother (SmoothQuant / AWQ pre-quant scale) into
        the weights, so every tensor of a quantized linear depends on the activations.
    """
    for name, t in ref.items():
        assert name in ours, name
        quantized_linear = name.endswith(("weights_scaling_factor", "prequant_scaling_factor")) or (
            name.endswith(".weight") and t.dtype == torch.int8)
        if name.endswith(ACTIVATION_SUFFIXES) or (smoothed and quantized_linear):
            assert_calibrated_close(ours[name], t, name, packed_int4=packed_int4 and name.endswith(".weight"))
        else:
            assert ours[name].dtype == t.dtype and ours[name].shape == t.shape, name
            assert torch.equal(_bits(ours[name]), _bits(t)), name


def _convert(model: str, out: Path, quant: str | None, dtype: str = "float16", **kw) -> Path:
    opts = ConvertOptions(dtype=dtype, quant=quant, calib_data=kw.pop("calib_data", RANDOM_CALIB), **kw)
    convert(HF / model, out, opts)
    return out


def _logits(ckpt: Path, tmp: Path) -> torch.Tensor:
    from trtlm.api import LLM

    eng = tmp / (ckpt.name + "-engine")
    build(ckpt, eng, BuildOptions(force=True))
    llm = LLM(eng)
    llm.generate([list(range(1, 40))], max_new_tokens=1, keep_logits=True)
    return torch.as_tensor(llm.last_generation.prompt_logits[0]).float()


@pytest.mark.parametrize("args, fixture", [
    (["--quant", "fp8", "--kv-cache-dtype", "fp8"], "mistral128_FP8_DEFAULT_CFG+FP8KV_fp16_tp1"),
    (["--quant", "int8-wo"], "mistral128_INT8_WEIGHT_ONLY_CFG_fp16_tp1"),
    (["--quant", "int8-sq", "--smoothquant-alpha", "1.0"], "mistral128_INT8_SMOOTHQUANT_CFG_fp16_tp1"),
    (["--quant", "int4-awq"], "mistral128_INT4_AWQ_CFG_fp16_tp1"),
    (["--quant", "int4-wo"], "mistral128_INT4_BLOCKWISE_WEIGHT_ONLY_CFG_fp16_tp1"),
])
def test_cli_conversion_equals_modelopt(tmp_path, args, fixture):
    """`trtlm convert --quant ...` writes modelopt's tensors bit for bit (weights, all scales)."""
    out = tmp_path / "ck"
    res = CliRunner().invoke(cli_main, ["convert", "--model-dir", str(HF / "mistral128"), "--output-dir", str(out),
                                        "--dtype", "float16", "--calib-data", RANDOM_CALIB, *args])
    assert res.exit_code == 0, res.output
    ours, ref = load_file(out / "rank0.safetensors"), load_file(TRT / fixture / "rank0.safetensors")
    _assert_matches_fixture(ours, ref, smoothed=args[1] in ("int8-sq", "int4-awq"), packed_int4="int4" in args[1])


def test_mixtral_fp8_equals_modelopt(tmp_path):
    """Experts: one scale per expert [E, 1] (w1/w3 shared), activation scales over routed tokens."""
    out = _convert("mixtral", tmp_path / "ck", "fp8")
    ours = load_file(out / "rank0.safetensors")
    ref = load_file(TRT / "mixtral_FP8_DEFAULT_CFG_fp16_tp1" / "rank0.safetensors")
    _assert_matches_fixture(ours, ref, smoothed=False)
    import json

    q = json.loads((out / "config.json").read_text())["quantization"]
    assert q["quant_algo"] == "FP8"
    assert sorted(q["exclude_modules"]) == sorted(
        ["lm_head", "transformer.layers.0.mlp.router", "transformer.layers.1.mlp.router"])


@pytest.mark.parametrize("mode", MODES)
def test_tp2_scales_agree_and_merged_output_equals_tp1(tmp_path, mode):
    tp1 = _convert("mistral128", tmp_path / "tp1", mode, awq_group_size=64, kv_cache_dtype="fp8")
    tp2 = _convert("mistral128", tmp_path / "tp2", mode, awq_group_size=64, kv_cache_dtype="fp8", tp_size=2)
    r0, r1 = load_file(tp2 / "rank0.safetensors"), load_file(tp2 / "rank1.safetensors")
    full = load_file(tp1 / "rank0.safetensors")
    for name, t in r0.items():
        if name.endswith(("activation_scaling_factor", "cache_scaling_factor")) or (
                name.endswith("weights_scaling_factor") and t.numel() == 1):
            assert torch.equal(t, r1[name]) and torch.equal(t, full[name]), name
    torch.testing.assert_close(_logits(tp2, tmp_path), _logits(tp1, tmp_path), rtol=0, atol=0)


@pytest.mark.parametrize("family", ["mixtral", "mpt"])
@pytest.mark.parametrize("mode", MODES)
def test_every_mode_builds_and_runs(tmp_path, family, mode):
    """Each mode converts, passes build's checks and runs; its logits stay near the float model's."""
    ref = _logits(_convert(family, tmp_path / "f32", None, dtype="float32"), tmp_path)
    got = _logits(_convert(family, tmp_path / "q", mode, dtype="float32", awq_group_size=32), tmp_path)
    assert torch.isfinite(got).all()
    assert (got - ref).abs().max() < 0.25 * ref.abs().max()


def test_mixtral_expert_parallel_quantized_equals_tp1(tmp_path):
    tp1 = _convert("mixtral", tmp_path / "tp1", "int4-awq", dtype="float32", awq_group_size=32)
    ep2 = _convert("mixtral", tmp_path / "ep2", "int4-awq", dtype="float32", awq_group_size=32, tp_size=2,
                   moe_ep_size=2)
    tp2 = _convert("mixtral", tmp_path / "tp2", "fp8", dtype="float32", tp_size=2)
    fp8 = _convert("mixtral", tmp_path / "fp8", "fp8", dtype="float32")
    torch.testing.assert_close(_logits(ep2, tmp_path), _logits(tp1, tmp_path), rtol=0, atol=0)
    torch.testing.assert_close(_logits(tp2, tmp_path), _logits(fp8, tmp_path), rtol=0, atol=0)


def test_bad_group_size_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="--awq-group-size"):
        _convert("mistral128", tmp_path / "ck", "int4-wo", awq_group_size=96)


def test_calib_text_needs_a_tokenizer(tmp_path):
    txt = tmp_path / "calib.txt"
    txt.write_text("hello world\n")
    with pytest.raises(UserError, match="tokenizer"):
        _convert("mistral128", tmp_path / "ck", "fp8", calib_data=txt)
