"""Mistral end to end: convert -> build -> generate, against transformers' MistralForCausalLM.

The tiny model's sliding window (8) is shorter than every sequence here (20-token
prompts + 40 new tokens), so the window is exercised at prefill and decode.
Its ``eos_token_id`` is unset so greedy runs never stop early on a random model.

Tolerances (max abs logit difference to transformers over prefill and all decode
steps, measured with torch 2.13 CPU on these tiny models, |logits| <= 0.73; see
docs/benchmarks.md, "Mistral parity with transformers"):

* float32: measured 3.0e-7 for every layout; asserted 1e-4.
* bfloat16: measured 0.0057-0.0059 against transformers float32, where
  transformers' own bfloat16 run is 0.0054-0.0063 away; asserted 0.02 and no
  more than 2x transformers' own bfloat16 error.
* float16: measured 0.00083-0.00088 (transformers' own float16: 0.00064-0.00071);
  asserted 0.003 and no more than 2x transformers' own float16 error.

Greedy tokens are compared only in float32: in 16-bit precision near-tied
argmaxes of a random model legitimately flip.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import edit_safetensors, load_hf_model, run_cli
from safetensors.torch import load_file

from trtlm.api import LLM
from trtlm.convert.options import ConvertOptions
from trtlm.convert.pipeline import convert
from trtlm.build import BuildOptions, build

NEW_TOKENS = 40
LOW_PRECISION_TOL = {"bfloat16": 0.02, "float16": 0.003}
LAYOUTS = {"tp1": (1, 1), "tp2": (2, 1), "tp4": (4, 1), "pp2": (1, 2), "tp2xpp2": (2, 2)}


@pytest.fixture(scope="module")
def parity_model(make_tiny_mistral) -> Path:
    return make_tiny_mistral(eos_token_id=None)


@pytest.fixture(scope="module")
def engines(tmp_path_factory, parity_model):
    """``engine(tp, pp, dtype, model=parity_model)`` -> built engine directory, once per argument set."""
    built: dict[tuple, Path] = {}

    def engine(tp: int = 1, pp: int = 1, dtype: str = "float32", model: Path | None = None) -> Path:
        model = model or parity_model
        key = (tp, pp, dtype, model)
        if key not in built:
            root = tmp_path_factory.mktemp(f"engine-tp{tp}pp{pp}-{dtype}")
            convert(model, root / "ckpt", ConvertOptions(dtype=dtype, tp_size=tp, pp_size=pp))
            build(root / "ckpt", root / "engine", BuildOptions())
            built[key] = root / "engine"
        return built[key]

    return engine


def prompt(seed: int, length: int = 20) -> list[int]:
    return torch.randint(3, 1001, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def hf_greedy(model, ids: list[int], n: int = NEW_TOKENS) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=None,
                             pad_token_id=0)
    return out[0, len(ids):].tolist()


def engine_logits(llm: LLM) -> torch.Tensor:
    """Prefill logits of every prompt position, then each decode step's logits: [T + steps, V] (batch 0)."""
    gen = llm.last_generation
    return torch.cat([gen.prompt_logits[0].float(), torch.stack([s[0].float() for s in gen.step_logits])])


def reference_logits(model, ids: list[int], output: list[int]) -> torch.Tensor:
    """transformers' logits over prompt + generated tokens (teacher forcing), float32."""
    with torch.no_grad():
        return model(torch.tensor([ids + output])).logits[0].float()


# --------------------------------------------------------------------------------------------
# float32: logits and greedy tokens
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_float32_parity(layout, engines, parity_model):
    tp, pp = LAYOUTS[layout]
    llm = LLM(engines(tp, pp))
    hf = load_hf_model(parity_model)
    ids = prompt(1)
    out = llm.generate([ids], max_new_tokens=NEW_TOKENS, keep_logits=True)[0]["output_ids"]
    assert len(out) == NEW_TOKENS
    ours, ref = engine_logits(llm), reference_logits(hf, ids, out)
    n = ours.shape[0]
    assert n == len(ids) + NEW_TOKENS - 1  # prefill positions + every decode step but the last
    prefill_err = (ours[:len(ids)] - ref[:len(ids)]).abs().max().item()
    step_errs = (ours[len(ids):] - ref[len(ids):n]).abs().amax(dim=-1)
    assert prefill_err < 1e-4, f"prefill max abs error {prefill_err}"
    assert step_errs.max().item() < 1e-4, f"decode step {int(step_errs.argmax())}: {step_errs.max().item()}"
    assert out == hf_greedy(hf, ids)


def test_sliding_window_matters(engines, parity_model):
    """The parity above would catch an ignored window: without it transformers' logits move far
    more than the 1e-4 tolerance past position 8, and the engine follows the windowed model."""
    from transformers import AutoModelForCausalLM

    llm = LLM(engines())
    assert llm.config["runtime_defaults"]["max_attention_window"] == [8]
    ids = prompt(1)
    llm.generate([ids], max_new_tokens=2, keep_logits=True)
    ours = llm.last_generation.prompt_logits[0]
    full = AutoModelForCausalLM.from_pretrained(parity_model, sliding_window=None,
                                                attn_implementation="eager").eval()
    with torch.no_grad():
        unwindowed = full(torch.tensor([ids])).logits[0]
    windowed = reference_logits(load_hf_model(parity_model), ids, [])
    assert (windowed[:8] - unwindowed[:8]).abs().max().item() < 1e-5  # identical inside the window
    assert (windowed[8:] - unwindowed[8:]).abs().max().item() > 1e-2
    assert (ours - windowed).abs().max().item() < 1e-4


@pytest.mark.parametrize("layout", ["tp1", "tp2xpp2"])
def test_batched_prompts_match_unbatched_transformers(layout, engines, parity_model):
    """Left-padded batch of prompts of different lengths: each row equals transformers' unbatched greedy."""
    llm = LLM(engines(*LAYOUTS[layout]))
    hf = load_hf_model(parity_model)
    prompts = [prompt(10, 5), prompt(11, 20), prompt(12, 13), prompt(13, 1)]
    outs = llm.generate(prompts, max_new_tokens=NEW_TOKENS)
    for ids, out in zip(prompts, outs):
        assert out["output_ids"] == hf_greedy(hf, ids), f"prompt of length {len(ids)}"


@pytest.mark.parametrize("style", ["rope_theta", "rope_parameters"])
def test_rope_base_reaches_the_runtime(style, parity_model, engines, tmp_path):
    """A non-default rope base, in either config style, changes the logits exactly as in transformers."""
    model = tmp_path / "hf"
    model.mkdir()
    for f in parity_model.iterdir():
        os.symlink(f, model / f.name)
    (model / "config.json").unlink()
    cfg = json.loads((parity_model / "config.json").read_text())
    cfg.pop("rope_theta", None)
    cfg.pop("rope_parameters", None)
    if style == "rope_theta":
        cfg["rope_theta"] = 50.0
    else:
        cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": 50.0}
    (model / "config.json").write_text(json.dumps(cfg))
    llm = LLM(engines(model=model))
    assert llm.config["rotary_base"] == 50.0
    ids = prompt(2)
    out = llm.generate([ids], max_new_tokens=4, keep_logits=True)[0]["output_ids"]
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model, attn_implementation="eager").eval()
    assert hf.config.rope_parameters["rope_theta"] == 50.0
    ref = reference_logits(hf, ids, out)
    ours = engine_logits(llm)
    assert (ours - ref[:ours.shape[0]]).abs().max().item() < 1e-4
    default = reference_logits(load_hf_model(parity_model), ids, out)
    assert (ref - default).abs().max().item() > 1e-3  # the base matters for this sequence


# --------------------------------------------------------------------------------------------
# 16-bit precision
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("layout", ["tp1", "tp2xpp2"])
def test_low_precision_logits(dtype, layout, engines, parity_model):
    llm = LLM(engines(*LAYOUTS[layout], dtype=dtype))
    ids = prompt(3)
    out = llm.generate([ids], max_new_tokens=NEW_TOKENS, keep_logits=True)[0]["output_ids"]
    ours = engine_logits(llm)
    n = ours.shape[0]
    ref32 = reference_logits(load_hf_model(parity_model), ids, out)[:n]
    ref_low = reference_logits(load_hf_model(parity_model, getattr(torch, dtype)), ids, out)[:n]
    err = (ours - ref32).abs().max().item()
    hf_own_err = (ref_low - ref32).abs().max().item()
    assert err < LOW_PRECISION_TOL[dtype], f"{dtype}: max abs error {err}"
    assert err <= 2 * hf_own_err, f"{dtype}: error {err} vs transformers' own {dtype} error {hf_own_err}"


# --------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------
def test_sampling_is_reproducible_with_a_seed(engines):
    llm = LLM(engines())
    prompts = [prompt(4), prompt(5, 7)]
    kw = dict(max_new_tokens=32, temperature=1.0, top_k=50, top_p=0.95)
    a = llm.generate(prompts, seed=123, **kw)
    b = llm.generate(prompts, seed=123, **kw)
    c = llm.generate(prompts, seed=124, **kw)
    assert a == b
    assert a != c  # ~uniform next-token distribution of a random model: seeds disagree
    greedy = llm.generate(prompts, max_new_tokens=32)
    assert llm.generate(prompts, seed=7, max_new_tokens=32, temperature=1.0, top_k=1) == greedy


# --------------------------------------------------------------------------------------------
# Dummy weights
# --------------------------------------------------------------------------------------------
def test_dummy_weights_from_preset(tmp_path):
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        res = run_cli("convert", "--family", "mistral", "--preset", "tiny", "--dummy-weights", "--seed", seed,
                      "--output-dir", tmp_path / name, "--tp-size", "2")
        assert res.exit_code == 0, res.stderr
    a0, b0, c0 = (load_file(str(tmp_path / n / "rank0.safetensors")) for n in "abc")
    assert all(torch.equal(a0[k], b0[k]) for k in a0)  # same seed, same weights
    assert not torch.equal(a0["transformer.layers.0.attention.qkv.weight"],
                           c0["transformer.layers.0.attention.qkv.weight"])
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert config["architecture"] == "MistralForCausalLM" and config["mapping"]["tp_size"] == 2
    res = run_cli("build", "--checkpoint-dir", tmp_path / "a", "--output-dir", tmp_path / "engine")
    assert res.exit_code == 0, res.stderr
    res = run_cli("run", "--engine-dir", tmp_path / "engine", "--input-ids", "1,5,9", "--max-output-len", "6",
                  "--launch", "single", "--json")
    assert res.exit_code == 0, res.stderr
    assert 1 <= len(json.loads(res.stdout)["outputs"][0]["output_ids"]) <= 6


def test_dummy_weights_from_lone_config(tiny_mistral_dir, tmp_path):
    """A directory with only config.json converts with --dummy-weights into the shapes it implies."""
    lone = tmp_path / "lone"
    lone.mkdir()
    (lone / "config.json").write_text((tiny_mistral_dir / "config.json").read_text())
    res = run_cli("convert", "--model-dir", lone, "--dummy-weights", "--output-dir", tmp_path / "ckpt")
    assert res.exit_code == 0, res.stderr
    ours = load_file(str(tmp_path / "ckpt" / "rank0.safetensors"))
    real = tmp_path / "real"
    convert(tiny_mistral_dir, real, ConvertOptions())
    want = load_file(str(real / "rank0.safetensors"))
    assert {k: (v.shape, v.dtype) for k, v in ours.items()} == {k: (v.shape, v.dtype) for k, v in want.items()}
    assert not torch.equal(ours["lm_head.weight"], want["lm_head.weight"])
    build(tmp_path / "ckpt", tmp_path / "engine", BuildOptions())
    out = LLM(tmp_path / "engine").generate([[1, 2, 3]], max_new_tokens=3)
    assert len(out[0]["output_ids"]) >= 1


# --------------------------------------------------------------------------------------------
# trtlm run: --model-dir cache and --json
# --------------------------------------------------------------------------------------------
def cache_engines(cache: Path) -> list[Path]:
    root = cache / "engines"
    return sorted(p for p in root.iterdir()) if root.exists() else []


def test_run_model_dir_uses_cache(make_tiny_mistral, engines, tmp_path, monkeypatch):
    model = tmp_path / "hf"
    model.mkdir()
    src = make_tiny_mistral(eos_token_id=None)
    for f in src.iterdir():
        (model / f.name).write_bytes(f.read_bytes())
    cache = tmp_path / "cache"
    monkeypatch.setenv("TRTLM_CACHE", str(cache))
    args = ["run", "--model-dir", model, "--input-ids", "5,6,7,8", "--max-output-len", "8", "--json"]

    first = run_cli(*args)
    assert first.exit_code == 0, first.stderr
    [key] = cache_engines(cache)
    marker = (key / "engine" / "config.json").stat()
    second = run_cli(*args)
    assert second.exit_code == 0, second.stderr
    assert second.stdout == first.stdout
    assert cache_engines(cache) == [key]  # same key ...
    again = (key / "engine" / "config.json").stat()
    assert (again.st_ino, again.st_mtime_ns) == (marker.st_ino, marker.st_mtime_ns)  # ... and not rebuilt

    expected = LLM(engines()).generate([[5, 6, 7, 8]], max_new_tokens=8)[0]["output_ids"]
    assert json.loads(first.stdout)["outputs"][0]["output_ids"] == expected

    assert run_cli(*args, "--dtype", "bfloat16").exit_code == 0  # other options: another entry
    assert len(cache_engines(cache)) == 2
    cfg = model / "config.json"
    os.utime(cfg, ns=(cfg.stat().st_atime_ns, cfg.stat().st_mtime_ns + 10**9))  # checkpoint changed
    assert run_cli(*args).exit_code == 0
    assert len(cache_engines(cache)) == 3


def test_run_json_document(make_tiny_mistral, tmp_path, monkeypatch):
    """--json prints exactly one document {"outputs": [{"output_ids": [...], "text": ...}]}."""
    monkeypatch.setenv("TRTLM_CACHE", str(tmp_path / "cache"))
    model = make_tiny_mistral(tokenizer=True)
    res = run_cli("run", "--model-dir", model, "--input-text", "The quick brown fox",
                  "--input-text", "Tensor parallel", "--max-output-len", "5", "--json")
    assert res.exit_code == 0, res.stderr
    doc = json.loads(res.stdout)  # the whole stdout is one JSON document
    assert list(doc) == ["outputs"] and len(doc["outputs"]) == 2
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model / "tokenizer.json"))
    for out in doc["outputs"]:
        assert sorted(out) == ["finish_reason", "output_ids", "text"]
        assert 1 <= len(out["output_ids"]) <= 5 and all(isinstance(i, int) for i in out["output_ids"])
        assert out["text"] == tok.decode(out["output_ids"], skip_special_tokens=True)

    res = run_cli("run", "--model-dir", model, "--input-ids", "1,2,3", "--max-output-len", "3", "--json")
    assert res.exit_code == 0, res.stderr
    [out] = json.loads(res.stdout)["outputs"]
    assert sorted(out) == ["finish_reason", "output_ids", "text"] and out["text"] is None


# --------------------------------------------------------------------------------------------
# trtlm build: checkpoint vs network
# --------------------------------------------------------------------------------------------
@pytest.fixture
def checkpoint(tiny_mistral_dir, tmp_path) -> Path:
    convert(tiny_mistral_dir, tmp_path / "ckpt", ConvertOptions(dtype="float32"))
    return tmp_path / "ckpt"


def edit_rank0(ckpt: Path, edit) -> None:
    edit_safetensors(ckpt / "rank0.safetensors", edit)


def test_build_rejects_missing_tensor(checkpoint, tmp_path):
    edit_rank0(checkpoint, lambda t: t.pop("transformer.layers.1.mlp.gate.weight"))
    res = run_cli("build", "--checkpoint-dir", checkpoint, "--output-dir", tmp_path / "engine")
    assert res.exit_code == 1
    assert res.stderr_lines == [res.stderr_lines[0]] and res.stderr_lines[0].startswith("error:")
    assert "transformer.layers.1.mlp.gate.weight" in res.stderr and "missing" in res.stderr
    assert not (tmp_path / "engine").exists()


def test_build_rejects_wrong_shape(checkpoint, tmp_path):
    def shrink(t):
        name = "transformer.layers.0.attention.dense.weight"
        t[name] = t[name][:, :32].contiguous()

    edit_rank0(checkpoint, shrink)
    res = run_cli("build", "--checkpoint-dir", checkpoint, "--output-dir", tmp_path / "engine")
    assert res.exit_code == 1
    assert len(res.stderr_lines) == 1 and res.stderr_lines[0].startswith("error:")
    assert "transformer.layers.0.attention.dense.weight" in res.stderr and "[64, 32]" in res.stderr
    assert not (tmp_path / "engine").exists()


def test_build_warns_on_extra_tensor(checkpoint, tmp_path):
    edit_rank0(checkpoint, lambda t: t.update({"transformer.layers.0.attention.extra.weight": torch.ones(2)}))
    res = run_cli("build", "--checkpoint-dir", checkpoint, "--output-dir", tmp_path / "engine")
    assert res.exit_code == 0, res.stderr
    assert len(res.stderr_lines) == 1 and res.stderr_lines[0].startswith("warning:")
    assert "transformer.layers.0.attention.extra.weight" in res.stderr
    assert (tmp_path / "engine" / "config.json").exists()
