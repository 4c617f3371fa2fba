"""Mistral HF -> TensorRT-LLM checkpoint conversion, checked tensor for tensor.

Two independent oracles:

* :func:`expected_ranks` re-derives every rank file from the HF tensors with
  plain torch slicing, written from the checkpoint facts in
  ``shared/reference/trtllm-checkpoint.md`` (fused qkv split by heads with
  contiguous KV-head repetition when kv < tp, TensorRT-LLM's inverted
  fc/gate naming, zero-padded vocabulary rows, ``tensor_split`` pipeline
  stages renumbered from 0).  It deliberately does not use ``trtlm.layout``,
  so a wrong split rule there cannot agree with itself.
* the checkpoints NVIDIA Model Optimizer wrote for the same tiny model
  (``tests/fixtures/modelopt``), compared by name, shape, dtype, value and
  the config keys TensorRT-LLM reads.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import run_cli
from safetensors.torch import load_file

from trtlm.convert.options import ConvertOptions
from trtlm.convert.pipeline import convert

FIXTURES = Path(__file__).parent / "fixtures" / "modelopt"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

#: Config keys TensorRT-LLM's PretrainedConfig / LLaMAConfig read for a Mistral checkpoint.
TRTLLM_KEYS = ("architecture", "dtype", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "head_size", "intermediate_size", "hidden_act", "norm_epsilon",
               "position_embedding_type", "max_position_embeddings", "rotary_base", "use_parallel_embedding",
               "embedding_sharding_dim", "mapping", "quantization")


# --------------------------------------------------------------------------------------------
# The independent expectation
# --------------------------------------------------------------------------------------------
def read_hf(model_dir: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """config.json and every tensor of a (possibly sharded) HF safetensors directory."""
    cfg = json.loads((model_dir / "config.json").read_text())
    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        tensors.update(load_file(str(path)))
    return cfg, tensors


def stage_layers(num_layers: int, pp: int) -> list[list[int]]:
    """torch.tensor_split semantics: the first ``num_layers % pp`` stages get one extra layer."""
    return [chunk.tolist() for chunk in torch.tensor_split(torch.arange(num_layers), pp)]


def rows(w: torch.Tensor, tp: int, r: int) -> torch.Tensor:
    """Rank ``r``'s block of rows (dim 0), by explicit index arithmetic."""
    n = w.shape[0] // tp
    return w[r * n:(r + 1) * n]


def cols(w: torch.Tensor, tp: int, r: int) -> torch.Tensor:
    n = w.shape[1] // tp
    return w[:, r * n:(r + 1) * n]


def vocab_rows(w: torch.Tensor, tp: int, r: int) -> torch.Tensor:
    """Vocabulary rows zero-padded up to a multiple of tp, then rank r's block."""
    return rows(F.pad(w, (0, 0, 0, (-w.shape[0]) % tp)), tp, r)


def qkv_part(q, k, v, heads: int, kv: int, head: int, tp: int, r: int) -> torch.Tensor:
    """q split by heads; k and v split by heads after repeating each KV head tp/kv times (h0,h0,h1,h1...)."""
    hidden = q.shape[1]
    qh = q.reshape(heads, head, hidden)
    kh, vh = k.reshape(kv, head, hidden), v.reshape(kv, head, hidden)
    if kv < tp:
        kh, vh = kh.repeat_interleave(tp // kv, dim=0), vh.repeat_interleave(tp // kv, dim=0)
    q_per, kv_per = heads // tp, kh.shape[0] // tp
    parts = [qh[r * q_per:(r + 1) * q_per], kh[r * kv_per:(r + 1) * kv_per], vh[r * kv_per:(r + 1) * kv_per]]
    return torch.cat([p.reshape(-1, hidden) for p in parts], dim=0)


def expected_ranks(cfg: dict, hf: dict[str, torch.Tensor], tp: int, pp: int, dtype: torch.dtype,
                   parallel_embedding: bool = True) -> list[dict[str, torch.Tensor]]:
    """Every rank{r}.safetensors of a tp x pp Mistral checkpoint, from the HF tensors."""
    heads, hidden = cfg["num_attention_heads"], cfg["hidden_size"]
    kv = cfg.get("num_key_value_heads") or heads
    head = cfg.get("head_dim") or hidden // heads
    hf = {k: v.to(dtype) for k, v in hf.items()}
    embed = hf["model.embed_tokens.weight"]
    lm_head = embed if cfg.get("tie_word_embeddings") else hf["lm_head.weight"]
    stages = stage_layers(cfg["num_hidden_layers"], pp)
    out = []
    for rank in range(tp * pp):
        r, stage = rank % tp, rank // tp
        t: dict[str, torch.Tensor] = {}
        if stage == 0:
            t["transformer.vocab_embedding.weight"] = vocab_rows(embed, tp, r) if parallel_embedding else embed
        for local, i in enumerate(stages[stage]):
            p, n = f"model.layers.{i}.", f"transformer.layers.{local}."
            t[n + "input_layernorm.weight"] = hf[p + "input_layernorm.weight"]
            t[n + "post_layernorm.weight"] = hf[p + "post_attention_layernorm.weight"]
            t[n + "attention.qkv.weight"] = qkv_part(
                hf[p + "self_attn.q_proj.weight"], hf[p + "self_attn.k_proj.weight"],
                hf[p + "self_attn.v_proj.weight"], heads, kv, head, tp, r)
            t[n + "attention.dense.weight"] = cols(hf[p + "self_attn.o_proj.weight"], tp, r)
            t[n + "mlp.fc.weight"] = rows(hf[p + "mlp.gate_proj.weight"], tp, r)  # SiLU branch
            t[n + "mlp.gate.weight"] = rows(hf[p + "mlp.up_proj.weight"], tp, r)  # linear branch
            t[n + "mlp.proj.weight"] = cols(hf[p + "mlp.down_proj.weight"], tp, r)
        if stage == pp - 1:
            t["transformer.ln_f.weight"] = hf["model.norm.weight"]
            t["lm_head.weight"] = vocab_rows(lm_head, tp, r)
        out.append(t)
    return out


def read_ranks(ckpt: Path) -> list[dict[str, torch.Tensor]]:
    world = json.loads((ckpt / "config.json").read_text())["mapping"]["world_size"]
    assert sorted(p.name for p in ckpt.glob("rank*.safetensors")) == sorted(f"rank{r}.safetensors"
                                                                            for r in range(world))
    return [load_file(str(ckpt / f"rank{r}.safetensors")) for r in range(world)]


def assert_same_tensors(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], where: str) -> None:
    assert sorted(got) == sorted(want), f"{where}: tensor names differ"
    for name in want:
        g, w = got[name], want[name]
        assert tuple(g.shape) == tuple(w.shape), f"{where}: {name} shape {tuple(g.shape)} != {tuple(w.shape)}"
        assert g.dtype == w.dtype, f"{where}: {name} dtype {g.dtype} != {w.dtype}"
        assert torch.equal(g, w), f"{where}: {name} values differ (max {(g.float() - w.float()).abs().max()})"


def convert_dir(model_dir: Path, out: Path, **options) -> dict:
    convert(model_dir, out, ConvertOptions(**options))
    return json.loads((out / "config.json").read_text())


# --------------------------------------------------------------------------------------------
# Layouts against the plain-torch expectation
# --------------------------------------------------------------------------------------------
LAYOUTS = {"tp1": (1, 1), "tp2": (2, 1), "tp4": (4, 1), "pp2": (1, 2), "tp2xpp2": (2, 2), "pp3": (1, 3)}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layouts_match_torch_slicing(layout, tiny_mistral_dir, tmp_path):
    """4 layers, 4 heads / 2 KV heads (tp4 repeats KV heads), vocab 1001 (padded at tp 2 and 4)."""
    tp, pp = LAYOUTS[layout]
    config = convert_dir(tiny_mistral_dir, tmp_path / "ckpt", dtype="float32", tp_size=tp, pp_size=pp)
    hf_cfg, hf = read_hf(tiny_mistral_dir)
    got = read_ranks(tmp_path / "ckpt")
    for rank, (g, w) in enumerate(zip(got, expected_ranks(hf_cfg, hf, tp, pp, torch.float32))):
        assert_same_tensors(g, w, f"{layout} rank{rank}")
    assert config["mapping"] == {"world_size": tp * pp, "tp_size": tp, "pp_size": pp}
    assert config["num_hidden_layers"] == 4  # global count, as TensorRT-LLM keeps it
    assert config["vocab_size"] == 1001  # unpadded: padding is a property of the lm_head split only
    assert config["runtime_defaults"]["max_attention_window"] == [8]  # Mistral's sliding window travels


def test_pp3_stages_follow_tensor_split(tiny_mistral_dir, tmp_path):
    """4 layers over 3 stages: 2/1/1 (torch.tensor_split), each stage renumbered from 0."""
    convert_dir(tiny_mistral_dir, tmp_path / "ckpt", dtype="float32", pp_size=3)
    ranks = read_ranks(tmp_path / "ckpt")
    layer_counts = [len({n.split(".")[2] for n in r if n.startswith("transformer.layers.")}) for r in ranks]
    assert layer_counts == [2, 1, 1]
    assert "transformer.vocab_embedding.weight" in ranks[0] and "lm_head.weight" not in ranks[0]
    assert "lm_head.weight" in ranks[2] and "transformer.ln_f.weight" in ranks[2]
    _, hf = read_hf(tiny_mistral_dir)
    assert torch.equal(ranks[1]["transformer.layers.0.mlp.proj.weight"], hf["model.layers.2.mlp.down_proj.weight"])


@pytest.mark.parametrize("tp", [2, 4])
def test_single_kv_head_is_duplicated(tp, make_tiny_mistral, tmp_path):
    """kv=1 < tp: every rank gets a copy of the only KV head."""
    model = make_tiny_mistral(num_key_value_heads=1)
    convert_dir(model, tmp_path / "ckpt", dtype="float32", tp_size=tp)
    hf_cfg, hf = read_hf(model)
    got = read_ranks(tmp_path / "ckpt")
    for rank, (g, w) in enumerate(zip(got, expected_ranks(hf_cfg, hf, tp, 1, torch.float32))):
        assert_same_tensors(g, w, f"kv1 tp{tp} rank{rank}")
    k = hf["model.layers.0.self_attn.k_proj.weight"]
    for r in range(tp):  # 1 q head... per rank: q rows (heads/tp * 16), then the one K head
        qkv = got[r]["transformer.layers.0.attention.qkv.weight"]
        assert qkv.shape == ((4 // tp + 2) * 16, 64)
        assert torch.equal(qkv[(4 // tp) * 16:(4 // tp + 1) * 16], k)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])  # bytes copied as they are / cast
def test_sharded_tied_input(dtype, make_tiny_mistral, tmp_path):
    """A sharded safetensors checkpoint (model.safetensors.index.json) with tied embeddings:
    lm_head.weight is written as a copy of the embedding."""
    model = make_tiny_mistral(max_shard_size="60KB", tie_word_embeddings=True)
    assert (model / "model.safetensors.index.json").exists()
    assert len(list(model.glob("*.safetensors"))) > 2
    hf_cfg, hf = read_hf(model)
    assert "lm_head.weight" not in hf  # tied: HF does not store it
    convert_dir(model, tmp_path / "ckpt", dtype=dtype, tp_size=2, pp_size=2)
    got = read_ranks(tmp_path / "ckpt")
    for rank, (g, w) in enumerate(zip(got, expected_ranks(hf_cfg, hf, 2, 2, DTYPES[dtype]))):
        assert_same_tensors(g, w, f"sharded tied rank{rank}")


def test_replicated_embedding(tiny_mistral_dir, tmp_path):
    config = convert_dir(tiny_mistral_dir, tmp_path / "ckpt", dtype="float32", tp_size=2,
                         use_parallel_embedding=False)
    assert config["use_parallel_embedding"] is False
    hf_cfg, hf = read_hf(tiny_mistral_dir)
    got = read_ranks(tmp_path / "ckpt")
    for rank, (g, w) in enumerate(zip(got, expected_ranks(hf_cfg, hf, 2, 1, torch.float32, False))):
        assert_same_tensors(g, w, f"replicated rank{rank}")


def test_auto_dtype_follows_checkpoint(make_tiny_mistral, tmp_path):
    model = make_tiny_mistral(dtype=torch.bfloat16)
    config = convert_dir(model, tmp_path / "ckpt")
    assert config["dtype"] == "bfloat16"
    assert read_ranks(tmp_path / "ckpt")[0]["lm_head.weight"].dtype == torch.bfloat16


def test_cli_convert(tiny_mistral_dir, tmp_path):
    res = run_cli("convert", "--model-dir", tiny_mistral_dir, "--output-dir", tmp_path / "ckpt",
                  "--tp-size", "2", "--pp-size", "2", "--dtype", "float16", "--workers", "3")
    assert res.exit_code == 0, res.stderr
    assert "tp=2 pp=2" in res.stdout and res.stderr == ""
    hf_cfg, hf = read_hf(tiny_mistral_dir)
    for rank, (g, w) in enumerate(zip(read_ranks(tmp_path / "ckpt"), expected_ranks(hf_cfg, hf, 2, 2, torch.float16))):
        assert_same_tensors(g, w, f"cli rank{rank}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temporary sibling left


# --------------------------------------------------------------------------------------------
# rope_theta styles
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("style", ["rope_theta", "rope_parameters", "both"])
def test_rope_theta_styles(style, tiny_mistral_dir, tmp_path):
    """transformers 4 writes ``rope_theta``; transformers 5 ``rope_parameters.rope_theta``."""
    model = tmp_path / "hf"
    shutil.copytree(tiny_mistral_dir, model)
    cfg = json.loads((model / "config.json").read_text())
    cfg.pop("rope_theta", None)
    cfg.pop("rope_parameters", None)
    if style in ("rope_theta", "both"):
        cfg["rope_theta"] = 12345.0
    if style in ("rope_parameters", "both"):
        cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": 12345.0}
    (model / "config.json").write_text(json.dumps(cfg))
    config = convert_dir(model, tmp_path / "ckpt", dtype="float32")
    assert config["rotary_base"] == 12345.0
    assert config["rotary_scaling"] is None


# --------------------------------------------------------------------------------------------
# Against NVIDIA Model Optimizer's exports of the same model
# --------------------------------------------------------------------------------------------
MODELOPT = {"mistral_none_fp16_tp1": ("float16", 1), "mistral_none_fp16_tp2": ("float16", 2),
            "mistral_none_bf16_tp1": ("bfloat16", 1)}


def normalized_mapping(mapping: dict) -> dict:
    """TensorRT-LLM's Mapping defaults: moe_tp = tp, moe_ep = 1, world = tp * pp."""
    tp, pp = mapping.get("tp_size", 1), mapping.get("pp_size", 1)
    return {"world_size": mapping.get("world_size", tp * pp), "tp_size": tp, "pp_size": pp,
            "moe_tp_size": mapping.get("moe_tp_size", tp), "moe_ep_size": mapping.get("moe_ep_size", 1)}


@pytest.mark.parametrize("name", list(MODELOPT))
def test_matches_modelopt_export(name, tmp_path):
    dtype, tp = MODELOPT[name]
    ref_dir = FIXTURES / "trtllm" / name
    ours = convert_dir(FIXTURES / "hf" / "mistral", tmp_path / "ckpt", dtype=dtype, tp_size=tp)
    ref = json.loads((ref_dir / "config.json").read_text())
    for key in TRTLLM_KEYS:
        if key == "mapping":
            assert normalized_mapping(ours[key]) == normalized_mapping(ref[key])
        elif key == "quantization":
            for k in ("quant_algo", "kv_cache_quant_algo"):
                assert ours[key].get(k) == ref[key].get(k), f"quantization.{k}"
        else:
            assert ours[key] == ref[key], f"config {key}: ours {ours[key]!r}, modelopt {ref[key]!r}"
    got = read_ranks(tmp_path / "ckpt")
    want = read_ranks(ref_dir)
    for rank, (g, w) in enumerate(zip(got, want)):
        assert_same_tensors(g, w, f"{name} rank{rank}")


# --------------------------------------------------------------------------------------------
# The copy path: bytes that do not change are copied between files, not rebuilt as tensors
# --------------------------------------------------------------------------------------------
def test_unchanged_bytes_are_copied_as_file_ranges(tiny_mistral_dir):
    """A same-dtype conversion copies every tensor as byte ranges of the source file: row blocks
    (qkv heads, vocabulary rows with zero padding) and, row by row, splits of another dimension
    (row-parallel weights); a cast builds the tensor.  The layout tests above check the bytes; this
    checks that the copy is planned where it should be."""
    from trtlm import dtypes
    from trtlm.convert.bytecopy import tensor_copy
    from trtlm.convert.plan import by_spec, default_shard
    from trtlm.llama import llama_plan
    from trtlm.mapping import Mapping
    from trtlm.sources import SafetensorsSource

    hf_cfg = json.loads((tiny_mistral_dir / "config.json").read_text())
    plan = llama_plan(hf_cfg, ConvertOptions(tp_size=2), "MistralForCausalLM")
    mapping = Mapping(2, 1)
    targets = by_spec(default_shard(plan, mapping))
    source = SafetensorsSource.from_dir(tiny_mistral_dir)

    def pieces(name, dtype="float32"):
        copy = tensor_copy(plan.spec(name), targets[name], source, mapping, dtypes.get(dtype))
        return None if copy is None else [part.pieces for part in copy.parts]

    row = 64 * 4  # hidden 64, float32
    lm_head = pieces("lm_head.weight")  # 1001 rows: 501 per rank, rank 1's last one zero padding
    assert lm_head == [[(0, 0, 501 * row)], [(0, 501 * row, 500 * row)]]
    assert [len(p) for p in pieces("transformer.layers.0.attention.qkv.weight")] == [3, 3]  # q, k, v blocks
    assert pieces("transformer.layers.0.mlp.fc.weight") is not None
    dense = pieces("transformer.layers.0.attention.dense.weight")  # split on dim 1: half of each row
    assert [len(p) for p in dense] == [64, 64] and dense[1][0] == (0, row // 2, row // 2)
    assert pieces("lm_head.weight", "bfloat16") is None  # a cast changes bytes


def test_source_tensors_are_copy_on_write(tiny_mistral_dir, tmp_path):
    """SafetensorsSource maps files privately: a caller may modify what it gets, the file never changes."""
    from trtlm.sources import SafetensorsSource

    model = tmp_path / "hf"
    shutil.copytree(tiny_mistral_dir, model)
    before = (model / "model.safetensors").read_bytes()
    t = SafetensorsSource.from_dir(model).get("model.norm.weight")
    t.mul_(0).add_(7)
    assert (model / "model.safetensors").read_bytes() == before
    assert torch.equal(SafetensorsSource.from_dir(model).get("model.norm.weight"),
                       load_file(str(model / "model.safetensors"))["model.norm.weight"])
