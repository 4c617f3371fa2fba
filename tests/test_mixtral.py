"""Mixtral family plugin: conversion, expert parallelism and runtime parity.

Three independent oracles:

* the checkpoints NVIDIA modelopt wrote for the same tiny HF model
  (tests/fixtures/modelopt, copied from the reference exports): tensor for
  tensor equality and the config keys TensorRT-LLM reads;
* expectations computed here from the HF tensors with plain slicing, for the
  expert-parallel layouts modelopt has no fixtures for;
* transformers' ``MixtralForCausalLM`` (float32 logits at prefill and every
  decode step, greedy tokens), and a plain per-token MoE written below for the
  routing mode transformers does not implement.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from trtlm.mapping import Mapping
from trtlm.convert.options import ConvertOptions
from trtlm.convert.pipeline import convert
from trtlm.errors import UserError

transformers = pytest.importorskip("transformers")
from transformers import MixtralConfig, MixtralForCausalLM  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures" / "modelopt"
HF_FIXTURE = FIXTURES / "hf" / "mixtral"

#: config.json keys TensorRT-LLM's PretrainedConfig / LLaMA model read for Mixtral.
TRTLLM_KEYS = ("architecture", "dtype", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "head_size", "intermediate_size", "hidden_act", "norm_epsilon",
               "position_embedding_type", "max_position_embeddings", "rotary_base", "mapping", "moe",
               "quantization")

VOCAB, HIDDEN, INTER, LAYERS, EXPERTS = 1001, 64, 96, 3, 4


def tiny_config(**overrides) -> MixtralConfig:
    kw = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS,
              num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
              sliding_window=16, tie_word_embeddings=False, num_local_experts=EXPERTS, num_experts_per_tok=2,
              rope_theta=1e6)
    kw.update(overrides)
    return MixtralConfig(**kw)


def make_model(tmp: Path, seed: int = 0, **overrides) -> tuple[MixtralForCausalLM, Path]:
    torch.manual_seed(seed)
    model = MixtralForCausalLM(tiny_config(**overrides)).eval()
    model.save_pretrained(tmp / "hf")
    return model, tmp / "hf"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random 3-layer, 4-expert Mixtral saved by transformers (per-expert w1/w2/w3 on disk)."""
    return make_model(tmp_path_factory.mktemp("mixtral"))


def convert_build(hf_dir: Path, out: Path, **options) -> Path:
    from trtlm.build import BuildOptions, build

    options.setdefault("dtype", "float32")
    convert(hf_dir, out / "ckpt", ConvertOptions(**options))
    build(out / "ckpt", out / "engine", BuildOptions())
    return out / "engine"


# --------------------------------------------------------------------------- family


def test_family_and_presets():
    from trtlm.plugins import get_registry

    registry = get_registry()
    entry = registry.resolve_hf({"architectures": ["MixtralForCausalLM"]}, where="test")
    fam = entry.family
    assert (fam.name, fam.trtllm_architecture, entry.plugin) == ("mixtral", "MixtralForCausalLM", "mixtral")
    assert registry.resolve_hf({"model_type": "mixtral"}, where="test").family.name == "mixtral"
    assert set(fam.capabilities.parallel) == {"tp", "pp", "ep"}
    assert set(fam.capabilities.quantization) == {"fp8", "int8-wo", "int4-wo", "int4-awq", "int8-sq"}
    big = fam.presets["8x7b"]
    assert (big["vocab_size"], big["hidden_size"], big["intermediate_size"], big["num_hidden_layers"],
            big["num_attention_heads"], big["num_key_value_heads"], big["num_local_experts"],
            big["num_experts_per_tok"], big["rope_theta"], big["sliding_window"], big["rms_norm_eps"],
            big["dtype"]) == (32000, 4096, 14336, 32, 32, 8, 8, 2, 1e6, None, 1e-5, "bfloat16")


def test_8x7b_plan_from_config_only():
    """The real model's plan (no weights read): shapes, router dtype, config values."""
    from trtlm.convert.plan import spec_shapes
    from trtlm.plugins import get_registry

    registry = get_registry()
    hooks = registry.hooks(registry.family("mixtral"))
    plan = hooks.trtlm_map_layers(hf_config=hooks.family.presets["8x7b"], options=ConvertOptions(tp_size=8))
    cfg = plan.config
    assert cfg["moe"] == {"num_experts": 8, "top_k": 2, "normalization_mode": 1}
    assert (cfg["rotary_base"], cfg["hidden_act"], cfg["intermediate_size"]) == (1e6, "swiglu", 14336)
    assert "runtime_defaults" not in cfg  # sliding_window null: full attention
    shapes = spec_shapes(plan, torch.bfloat16)
    assert shapes["transformer.layers.31.mlp.router.weight"] == ((8, 4096), torch.float32)
    assert shapes["transformer.layers.31.mlp.fc.weight"] == ((8, 2 * 14336, 4096), torch.bfloat16)
    assert shapes["transformer.layers.31.mlp.proj.weight"] == ((8, 4096, 14336), torch.bfloat16)
    assert not plan.spec("transformer.layers.0.mlp.router.weight").quantizable
    assert plan.spec("transformer.layers.0.mlp.fc.weight").quantizable


# --------------------------------------------------------------------------- modelopt fixtures


@pytest.mark.parametrize("name, dtype, tp", [
    ("mixtral_none_fp16_tp1", "float16", 1),
    ("mixtral_none_fp16_tp2", "float16", 2),
    ("mixtral_none_bf16_tp1", "bfloat16", 1),
])
def test_matches_modelopt(tmp_path, name, dtype, tp):
    ref_dir = FIXTURES / "trtllm" / name
    convert(HF_FIXTURE, tmp_path / "ck", ConvertOptions(dtype=dtype, tp_size=tp))
    ref_cfg = json.loads((ref_dir / "config.json").read_text())
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
    for key in TRTLLM_KEYS:
        assert cfg[key] == ref_cfg[key], key
    for rank in range(tp):
        ref = load_file(ref_dir / f"rank{rank}.safetensors")
        got = load_file(tmp_path / "ck" / f"rank{rank}.safetensors")
        assert sorted(got) == sorted(ref)
        for key, want in ref.items():
            assert got[key].shape == want.shape and got[key].dtype == want.dtype, key
            assert torch.equal(got[key], want), key


def test_fused_on_disk_layout_gives_same_checkpoint(tmp_path, tiny):
    """transformers 5 can also write its in-memory layout (mlp.experts.gate_up_proj, gate rows first):
    both on-disk layouts convert to the same bytes."""
    model, hf_dir = tiny
    model.save_pretrained(tmp_path / "fused", save_original_format=False)
    fused_names = load_file(tmp_path / "fused" / "model.safetensors").keys()
    assert "model.layers.0.mlp.experts.gate_up_proj" in fused_names
    for kw in ({}, {"tp_size": 2}, {"tp_size": 2, "moe_ep_size": 2}):
        convert(hf_dir, tmp_path / "a", ConvertOptions(dtype="float32", force=True, **kw))
        convert(tmp_path / "fused", tmp_path / "b", ConvertOptions(dtype="float32", force=True, **kw))
        for rank in range(kw.get("tp_size", 1)):
            a = load_file(tmp_path / "a" / f"rank{rank}.safetensors")
            b = load_file(tmp_path / "b" / f"rank{rank}.safetensors")
            assert sorted(a) == sorted(b)
            assert all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------- expert-parallel layouts


def expected_moe_part(hf: dict[str, torch.Tensor], layer: int, tp_rank: int, tp: int,
                      ep: int) -> dict[str, torch.Tensor]:
    """One rank's MoE tensors, straight from the HF per-expert tensors: moe_ep_rank = tp_rank % ep holds
    experts [ep_rank * E/ep, (ep_rank+1) * E/ep); moe_tp_rank = tp_rank // ep holds rows
    [r * I/mtp, (r+1) * I/mtp) of w1 and w3 (and those columns of w2); fc = cat(w3 part, w1 part)."""
    mtp = tp // ep
    ep_rank, mtp_rank = tp_rank % ep, tp_rank // ep
    per_ep, per_tp = EXPERTS // ep, INTER // mtp
    rows = slice(mtp_rank * per_tp, (mtp_rank + 1) * per_tp)
    p = f"model.layers.{layer}.block_sparse_moe."
    fc, proj = [], []
    for e in range(ep_rank * per_ep, (ep_rank + 1) * per_ep):
        w1, w2, w3 = (hf[p + f"experts.{e}.{w}.weight"] for w in ("w1", "w2", "w3"))
        fc.append(torch.cat([w3[rows], w1[rows]]))
        proj.append(w2[:, rows])
    return {"router.weight": hf[p + "gate.weight"].float(), "fc.weight": torch.stack(fc),
            "proj.weight": torch.stack(proj)}


@pytest.mark.parametrize("tp, ep, pp", [(2, 2, 1), (2, 1, 1), (4, 2, 1), (2, 2, 2), (4, 4, 2)],
                         ids=["ep2", "moe_tp2", "ep2xmoe_tp2", "ep2+pp2", "ep4+pp2"])
def test_expert_parallel_layouts(tmp_path, tiny, tp, ep, pp):
    _, hf_dir = tiny
    hf = load_file(hf_dir / "model.safetensors")
    convert(hf_dir, tmp_path / "ck", ConvertOptions(dtype="float32", tp_size=tp, pp_size=pp, moe_ep_size=ep))
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert cfg["mapping"] == {"world_size": tp * pp, "tp_size": tp, "pp_size": pp,
                              "moe_tp_size": tp // ep, "moe_ep_size": ep}
    stages = torch.tensor_split(torch.arange(LAYERS), pp)
    for rank in range(tp * pp):
        tp_rank, pp_rank = rank % tp, rank // tp
        got = load_file(tmp_path / "ck" / f"rank{rank}.safetensors")
        layers = stages[pp_rank].tolist()
        moe_names = {n for n in got if ".mlp." in n}
        assert moe_names == {f"transformer.layers.{j}.mlp.{t}" for j in range(len(layers))
                             for t in ("router.weight", "fc.weight", "proj.weight")}
        assert ("transformer.vocab_embedding.weight" in got) == (pp_rank == 0)
        assert ("lm_head.weight" in got) == (pp_rank == pp - 1)
        for local, layer in enumerate(layers):
            for t, want in expected_moe_part(hf, layer, tp_rank, tp, ep).items():
                have = got[f"transformer.layers.{local}.mlp.{t}"]
                assert have.dtype == want.dtype and have.shape == want.shape, (rank, layer, t)
                assert torch.equal(have, want), (rank, layer, t)


@pytest.mark.parametrize("tp, ep", [(2, 2), (2, 1), (4, 2), (4, 4)])
def test_runtime_rank_layers_sum_to_full_layer(tmp_path, tiny, tp, ep):
    """Each rank's runtime MoE layer (its experts, its expert-offset, its intermediate slice),
    summed as the all-reduce would, equals the single-process layer."""
    from trtlm.config import CheckpointConfig
    from trtlm.runtime.distributed import ShapeComm
    from trtlm.runtime.model import Dims, MoE

    _, hf_dir = tiny
    convert(hf_dir, tmp_path / "full", ConvertOptions(dtype="float32"))
    convert(hf_dir, tmp_path / "split", ConvertOptions(dtype="float32", tp_size=tp, moe_ep_size=ep))
    cfg = CheckpointConfig.from_dict(json.loads((tmp_path / "split" / "config.json").read_text()))
    mapping = cfg.mapping
    prefix = "transformer.layers.1.mlp."

    def layer(directory: Path, rank: int, m: Mapping) -> MoE:
        comm = ShapeComm(m.tp_size, rank)
        module = MoE(cfg, Dims.from_config(cfg, m.tp_size), comm, m, torch.float32)
        tensors = load_file(directory / f"rank{rank}.safetensors")
        module.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
        return module

    x = torch.randn(1, 37, HIDDEN, generator=torch.Generator().manual_seed(3))
    full = layer(tmp_path / "full", 0, Mapping())(x)
    parts = sum(layer(tmp_path / "split", r, mapping)(x) for r in range(tp))
    assert (parts - full).abs().max().item() < 1e-5


# --------------------------------------------------------------------------- parity with transformers


def parity(model: MixtralForCausalLM, engine: Path, new_tokens: int, seed: int = 1):
    """(prefill max abs error, max abs error over decode steps, trtlm tokens, transformers tokens)."""
    from trtlm.api import LLM

    llm = LLM(engine)
    ids = torch.randint(3, VOCAB, (1, 20), generator=torch.Generator().manual_seed(seed))
    out = llm.generate([ids[0].tolist()], max_new_tokens=new_tokens, keep_logits=True)[0]["output_ids"]
    gen = llm.last_generation
    T = ids.shape[1]
    with torch.no_grad():
        ref = model(torch.tensor([ids[0].tolist() + out])).logits[0]
        hf_tokens = model.generate(ids, max_new_tokens=new_tokens, do_sample=False)[0, T:].tolist()
    prefill = (gen.prompt_logits[0] - ref[:T]).abs().max().item()
    decode = max((gen.step_logits[i][0] - ref[T + i]).abs().max().item() for i in range(len(gen.step_logits)))
    return prefill, decode, out, hf_tokens


@pytest.mark.parametrize("layout", [{}, {"tp_size": 2, "moe_ep_size": 2}, {"tp_size": 2}],
                         ids=["tp1", "ep2", "moe_tp2"])
def test_logits_and_greedy_tokens_match_transformers(tmp_path, tiny, layout):
    model, hf_dir = tiny
    engine = convert_build(hf_dir, tmp_path, **layout)
    prefill, decode, ours, theirs = parity(model, engine, new_tokens=40)
    assert prefill < 1e-4 and decode < 1e-4, (prefill, decode)
    assert len(ours) >= 32 and ours == theirs


@pytest.mark.parametrize("top_k", [1, EXPERTS])
def test_top_k_extremes_match_transformers(tmp_path, top_k):
    model, hf_dir = make_model(tmp_path, seed=5, num_experts_per_tok=top_k)
    engine = convert_build(hf_dir, tmp_path)
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text())["moe"]["top_k"] == top_k
    prefill, decode, ours, theirs = parity(model, engine, new_tokens=16)
    assert prefill < 1e-4 and decode < 1e-4, (prefill, decode)
    assert ours == theirs


def plain_moe(hf: dict[str, torch.Tensor], layer: int, top_k: int, renormalize: bool):
    """A per-token Mixtral MoE from the HF per-expert tensors, with either routing mode:
    scales = top-k of softmax(router logits), divided by their sum when ``renormalize``."""
    p = f"model.layers.{layer}.block_sparse_moe."
    gate = hf[p + "gate.weight"].double()
    experts = [tuple(hf[p + f"experts.{e}.{w}.weight"].double() for w in ("w1", "w2", "w3"))
               for e in range(gate.shape[0])]

    def forward(h: torch.Tensor) -> torch.Tensor:
        flat = h.reshape(-1, h.shape[-1]).double()
        out = torch.zeros_like(flat)
        for t, x in enumerate(flat):
            probs = torch.softmax(gate @ x, dim=-1)
            scales, chosen = torch.topk(probs, top_k)
            if renormalize:
                scales = scales / scales.sum()
            for s, e in zip(scales, chosen.tolist()):
                w1, w2, w3 = experts[e]
                out[t] += s * (w2 @ (torch.nn.functional.silu(w1 @ x) * (w3 @ x)))
        return out.reshape(h.shape).to(h.dtype)

    return forward


def test_normalization_modes_against_plain_reference(tmp_path, tiny):
    """--moe-normalization-mode renormalize (Mixtral's, the default) and none, each against transformers'
    model whose MoE blocks are replaced by the plain per-token reference with that routing."""
    from trtlm.api import LLM

    model, hf_dir = tiny
    hf = load_file(hf_dir / "model.safetensors")
    ids = torch.randint(3, VOCAB, (1, 24), generator=torch.Generator().manual_seed(7))
    logits = {}
    for mode, code in (("renormalize", 1), ("none", 0)):
        engine = convert_build(hf_dir, tmp_path / mode, moe_normalization_mode=mode)
        cfg = json.loads((tmp_path / mode / "ckpt" / "config.json").read_text())
        assert cfg["moe"]["normalization_mode"] == code
        llm = LLM(engine)
        llm.generate([ids[0].tolist()], max_new_tokens=4, keep_logits=True)
        logits[mode] = llm.last_generation.prompt_logits[0]
        reference = MixtralForCausalLM(model.config).eval()
        reference.load_state_dict(model.state_dict())
        for i, block in enumerate(reference.model.layers):
            block.mlp.forward = plain_moe(hf, i, model.config.num_experts_per_tok, renormalize=mode == "renormalize")
        with torch.no_grad():
            want = reference(ids).logits[0]
        assert (logits[mode] - want).abs().max().item() < 1e-4, mode
    # The two modes really differ (so the comparison above can tell them apart).
    assert (logits["renormalize"] - logits["none"]).abs().max().item() > 1e-3


def test_default_normalization_is_renormalize(tmp_path, tiny):
    convert(tiny[1], tmp_path / "ck", ConvertOptions(dtype="float32"))
    assert json.loads((tmp_path / "ck" / "config.json").read_text())["moe"]["normalization_mode"] == 1


def test_tiny_preset_with_dummy_weights_runs(tmp_path):
    from trtlm.api import LLM
    from trtlm.build import BuildOptions, build

    convert(None, tmp_path / "ck", ConvertOptions(dtype="float32", dummy_weights=True, tp_size=2, moe_ep_size=2),
            family="mixtral", preset="tiny")
    build(tmp_path / "ck", tmp_path / "en", BuildOptions())
    out = LLM(tmp_path / "en").generate([[1, 5, 9]], max_new_tokens=4)
    assert len(out[0]["output_ids"]) >= 1


# --------------------------------------------------------------------------- clear errors


def config_only(tmp: Path, **overrides) -> Path:
    """A config.json-only model directory (converted with --dummy-weights: no weights needed)."""
    d = tmp / "cfg"
    d.mkdir(exist_ok=True)
    tiny_config(**overrides).save_pretrained(d)
    return d


@pytest.mark.parametrize("overrides, options, message", [
    ({"num_local_experts": 6}, {"tp_size": 4, "moe_ep_size": 4},
     "--moe-ep-size 4 does not divide the model's 6 experts"),
    ({"intermediate_size": 30}, {"tp_size": 4},
     "moe_tp_size 4 (= --tp-size / --moe-ep-size by default) does not divide"),
    ({"intermediate_size": 30}, {"tp_size": 4, "moe_tp_size": 4},
     "moe_tp_size 4 does not divide the experts' intermediate_size 30"),
    ({}, {"tp_size": 4, "moe_tp_size": 3, "moe_ep_size": 2}, "must equal --tp-size 4"),
    ({}, {"moe_normalization_mode": "softmax"}, "--moe-normalization-mode 'softmax'"),
    ({"num_experts_per_tok": 5}, {}, "num_experts_per_tok 5 must be between 1 and num_local_experts 4"),
])
def test_clear_errors_before_anything_is_written(tmp_path, overrides, options, message):
    model_dir = config_only(tmp_path, **overrides)
    out = tmp_path / "out"
    with pytest.raises(UserError) as err:
        convert(model_dir, out, ConvertOptions(dummy_weights=True, **options))
    assert message in str(err.value)
    assert not out.exists()


def test_expert_parallel_that_divides_works_where_tp_cannot(tmp_path):
    """intermediate_size 30 cannot be split 4 ways, but 4 experts over 4 expert-parallel ranks need no split."""
    model_dir = config_only(tmp_path, intermediate_size=30)
    result = convert(model_dir, tmp_path / "out", ConvertOptions(dummy_weights=True, tp_size=4, moe_ep_size=4))
    assert result.config["mapping"]["moe_ep_size"] == 4
    rank3 = load_file(tmp_path / "out" / "rank3.safetensors")
    assert rank3["transformer.layers.0.mlp.fc.weight"].shape == (1, 60, HIDDEN)


def test_cli_reports_expert_error_in_one_line(tmp_path, capsys):
    from trtlm.cli import main

    model_dir = config_only(tmp_path, num_local_experts=6)
    with pytest.raises(SystemExit) as exc:
        main(["convert", "--model-dir", str(model_dir), "--output-dir", str(tmp_path / "o"), "--dummy-weights",
              "--tp-size", "4", "--moe-ep-size", "4"])
    assert exc.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("error: --moe-ep-size 4 does not divide the model's 6 experts") and err.count("\n") == 1
