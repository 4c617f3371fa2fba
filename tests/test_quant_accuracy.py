"""Measured accuracy of every quantization mode on the bundled tiny *trained* model.

Perplexity on the model's held-out ``eval.txt`` (``trtlm.evaluate``, the same code as ``trtlm
eval``) of each quantized engine against the float32 engine built from the same weights.  The
bounds are the measured deltas (docs/quantization.md) with a margin; a regression in the
quantization math, the calibration or the runtime emulation shows up here as a perplexity jump.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from trtlm.cli import cli
from trtlm.convert.options import ConvertOptions
from trtlm.convert.pipeline import convert
from trtlm.evaluate import evaluate
from trtlm.build import BuildOptions, build

MODEL = Path(__file__).resolve().parents[1] / "core" / "src" / "trtlm" / "data" / "tiny-mistral"
EVAL = MODEL / "eval.txt"
MAX_TOKENS = 4096

#: mode -> (convert options, largest allowed relative perplexity increase over float32)
BOUNDS = {
    "fp8": (dict(quant="fp8"), 0.01),
    "fp8+fp8kv": (dict(quant="fp8", kv_cache_dtype="fp8"), 0.015),
    "int8-wo": (dict(quant="int8-wo"), 0.005),
    "int4-wo": (dict(quant="int4-wo"), 0.04),
    "int4-awq": (dict(quant="int4-awq"), 0.03),
    "int8-sq": (dict(quant="int8-sq"), 0.02),
    "int8kv": (dict(kv_cache_dtype="int8"), 0.005),
}

pytestmark = pytest.mark.skipif(not (MODEL / "model.safetensors").is_file() or not EVAL.is_file(),
                                reason="the bundled tiny-mistral model is not in this checkout")


def _engine(tmp: Path, name: str, **opts) -> Path:
    ck, eng = tmp / f"ck-{name}", tmp / f"eng-{name}"
    # a smaller calibration set than the CLI default keeps the test fast (the table in
    # docs/quantization.md uses the defaults); the model writes Python, so it calibrates on its own
    # held-out code (calib.txt), not on the default English text meant for natural-language models
    convert(MODEL, ck, ConvertOptions(dtype="float32", calib_size=16, calib_max_seq_len=128,
                                      calib_data=MODEL / "calib.txt", **opts))
    build(ck, eng, BuildOptions())
    return eng


@pytest.fixture(scope="module")
def perplexities(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("acc")
    out = {"float32": evaluate(_engine(tmp, "f32"), EVAL, max_tokens=MAX_TOKENS)}
    for mode, (opts, _bound) in BOUNDS.items():
        out[mode] = evaluate(_engine(tmp, mode, **opts), EVAL, max_tokens=MAX_TOKENS)
    return out


@pytest.mark.parametrize("mode", list(BOUNDS))
def test_perplexity_within_bound(perplexities, mode):
    base = perplexities["float32"]["trtlm"]["ppl"]
    ppl = perplexities[mode]["trtlm"]["ppl"]
    assert perplexities[mode]["trtlm"]["tokens"] == perplexities["float32"]["trtlm"]["tokens"]
    assert ppl / base - 1 <= BOUNDS[mode][1], f"{mode}: perplexity {ppl:.4f} vs float32 {base:.4f}"


def test_quantization_is_not_a_no_op(perplexities):
    """The emulation really quantizes: int4 changes the perplexity measurably."""
    base = perplexities["float32"]["trtlm"]["ppl"]
    assert abs(perplexities["int4-wo"]["trtlm"]["ppl"] / base - 1) > 1e-4


def test_eval_cli_matches_transformers(tmp_path):
    """`trtlm eval --hf-model-dir`: float32 trtlm and transformers score the same tokens alike."""
    eng = _engine(tmp_path, "f32")
    res = CliRunner().invoke(cli, ["eval", "--engine-dir", str(eng), "--dataset", str(EVAL), "--hf-model-dir",
                                   str(MODEL), "--max-tokens", "1024", "--json"])
    assert res.exit_code == 0, res.output
    r = json.loads(res.stdout[res.stdout.index("{"):])
    assert r["trtlm"]["tokens"] == r["hf"]["tokens"] > 0
    assert abs(r["relative_delta"]) < 1e-4
