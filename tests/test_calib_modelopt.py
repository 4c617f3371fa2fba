"""``--calibrator modelopt``: NVIDIA Model Optimizer calibrates, trtlm writes (trtlm.quant.modelopt_calib).

The same tiny model and the same calibration ids go through both calibrators; the checkpoints are
compared tensor by tensor:

* weights and weight scales that depend only on the stored weights (fp8 weights and their scales,
  every weight-only tensor) must be bit-identical: trtlm computes them from the source file either way;
* tensors derived from calibrated *activations* (activation and KV scales, SmoothQuant's smoothed
  weights/scales/pre-quant scales, AWQ's pre-quant scales, smoothed int4 weights and their scales)
  within tests/calib_tolerance.py's bound: one float16 ulp relative for float values, integer
  codes at most one step apart in at most 1 % of the elements.  The two calibrators run different
  forward implementations of the same float32 model (transformers' eager/SDPA layers vs trtlm's
  packed paged-attention runtime), so activations agree to fp32 rounding (~1e-7 relative), not bit
  for bit; that is far inside one float16 ulp, which is what the stored float16 scales can resolve,
  while a mistranslated statistic (per-tensor vs per-channel amax, a pre-quant scale of the wrong
  part, K vs V) is off by percent.

modelopt (the ``modelopt`` extra, in the test extra) runs on the CPU; without it these tests skip
(except the ones checking the messages trtlm gives without it).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from calib_tolerance import ACTIVATION_SUFFIXES, assert_calibrated_close
from conftest import run_cli
from safetensors.torch import load_file

from trtlm.convert.options import ConvertOptions
from trtlm.convert.pipeline import convert
from trtlm.errors import UserError

HF = Path(__file__).parent / "fixtures" / "modelopt" / "hf"
RANDOM_CALIB = "random:seed=0,batches=4,batch_size=2,seq_len=32"


def _have_modelopt() -> bool:
    import importlib.util

    return importlib.util.find_spec("modelopt") is not None  # importing it takes seconds: only when used


needs_modelopt = pytest.mark.skipif(not _have_modelopt(),
                                    reason="nvidia-modelopt is not installed (pip install 'trtlm[modelopt]')")


def _convert(model: str, out: Path, calibrator: str, **kw) -> dict[str, torch.Tensor]:
    kw.setdefault("calib_data", RANDOM_CALIB)
    convert(HF / model, out, ConvertOptions(dtype="float16", calibrator=calibrator, **kw))
    return load_file(out / "rank0.safetensors")


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t


def _compare(ours: dict, theirs: dict, smoothed: bool, packed_int4: bool = False) -> int:
    """Every tensor alike (module doc); returns how many were compared within the tolerance."""
    assert sorted(ours) == sorted(theirs)
    approx = 0
    for name, t in ours.items():
        o = theirs[name]
        quantized_linear = name.endswith(("weights_scaling_factor", "prequant_scaling_factor")) or (
            name.endswith(".weight") and t.dtype == torch.int8)
        if name.endswith(ACTIVATION_SUFFIXES) or (smoothed and quantized_linear):
            assert_calibrated_close(o, t, name, packed_int4=packed_int4 and name.endswith(".weight"))
            approx += 1
        else:
            assert o.dtype == t.dtype and o.shape == t.shape, name
            assert torch.equal(_bits(o), _bits(t)), f"{name}: not bit-identical"
    return approx


@needs_modelopt
@pytest.mark.parametrize("quant, extra, smoothed", [
    ("fp8", {"kv_cache_dtype": "fp8"}, False),
    ("int8-sq", {"smoothquant_alpha": 1.0}, True),
    ("int8-sq", {"smoothquant_alpha": 0.5, "kv_cache_dtype": "int8"}, True),
    ("int4-awq", {"awq_group_size": 64}, True),
])
def test_modelopt_and_trtlm_calibrators_write_the_same_checkpoint(tmp_path, quant, extra, smoothed):
    ours = _convert("mistral128", tmp_path / "trtlm", "trtlm", quant=quant, **extra)
    theirs = _convert("mistral128", tmp_path / "modelopt", "modelopt", quant=quant, **extra)
    approx = _compare(ours, theirs, smoothed, packed_int4=quant == "int4-awq")
    assert approx > 0  # the calibrated tensors really were compared
    cfg = json.loads((tmp_path / "modelopt" / "config.json").read_text())
    assert cfg["trtlm"]["calibrator"] == "modelopt"
    assert cfg["quantization"] == json.loads((tmp_path / "trtlm" / "config.json").read_text())["quantization"]


@needs_modelopt
def test_modelopt_mixtral_fp8_experts(tmp_path):
    """transformers 5's fused experts: modelopt's expert input amaxes become the per-layer
    expert activation scales (over the routed tokens, as trtlm's own)."""
    ours = _convert("mixtral", tmp_path / "trtlm", "trtlm", quant="fp8")
    theirs = _convert("mixtral", tmp_path / "modelopt", "modelopt", quant="fp8")
    assert any(n.endswith("mlp.proj.activation_scaling_factor") for n in ours)
    _compare(ours, theirs, smoothed=False)


@needs_modelopt
def test_modelopt_weight_only_needs_no_calibration(tmp_path):
    """int8-wo/int4-wo calibrate nothing: the calibrator changes no byte."""
    ours = _convert("mistral128", tmp_path / "trtlm", "trtlm", quant="int4-wo", awq_group_size=64)
    theirs = _convert("mistral128", tmp_path / "modelopt", "modelopt", quant="int4-wo", awq_group_size=64)
    _compare(ours, theirs, smoothed=False)


@pytest.mark.parametrize("quant", ["w4a8-awq", "nvfp4"])
def test_modelopt_only_algorithms_are_rejected(tmp_path, quant):
    """modelopt's W4A8 AWQ / NVFP4 write quant_algos trtlm's runtime cannot execute: one line, no output."""
    with pytest.raises(UserError, match=r"trtlm's runtime cannot execute"):
        convert(HF / "mistral128", tmp_path / "o", ConvertOptions(quant=quant, calibrator="modelopt"))
    res = run_cli("convert", "--model-dir", HF / "mistral128", "--output-dir", tmp_path / "o", "--quant", quant,
                  "--calibrator", "modelopt")
    assert res.exit_code != 0 and "trtlm's runtime cannot execute" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "o").exists()


def test_modelopt_missing_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "modelopt.torch.quantization", None)  # import fails as if not installed
    res = run_cli("convert", "--model-dir", HF / "mistral128", "--output-dir", tmp_path / "o", "--quant", "fp8",
                  "--calibrator", "modelopt", "--calib-data", RANDOM_CALIB)
    assert res.exit_code == 1 and "Traceback" not in res.stderr, res.stderr
    assert "--calibrator modelopt" in res.stderr and "pip install 'trtlm[modelopt]'" in res.stderr
    assert not (tmp_path / "o").exists()


def test_modelopt_needs_a_model_dir(tmp_path):
    with pytest.raises(UserError, match="--calibrator modelopt calibrates a Hugging Face checkpoint"):
        convert(None, tmp_path / "o", ConvertOptions(quant="fp8", calibrator="modelopt", dummy_weights=True),
                family="mistral", preset="tiny")


@needs_modelopt
def test_modelopt_failure_is_one_line(tmp_path):
    """modelopt 0.47 cannot quantize transformers 5's MPT (its attention patching asserts): the
    failure is one line pointing to the built-in calibrator, never a traceback or a partial output."""
    res = run_cli("convert", "--model-dir", HF / "mpt", "--output-dir", tmp_path / "o", "--quant", "int8-sq",
                  "--calibrator", "modelopt", "--calib-data", "random:batches=1", "--quiet")
    if res.exit_code == 0:
        pytest.skip("this modelopt version calibrates MPT")
    assert res.exit_code == 1 and "Traceback" not in res.stderr, res.stderr
    assert "--calibrator modelopt: modelopt" in res.stderr and "use --calibrator trtlm" in res.stderr
    assert not (tmp_path / "o").exists()
