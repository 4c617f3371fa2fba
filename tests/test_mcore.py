"""Megatron-Core checkpoints in and out (trtlm.mcore, the mcore hooks, `--to mcore`, `--model-dir MCORE`).

* Round trips: HF -> MCore (tp/pp/ep splits) -> TensorRT-LLM checkpoint equals HF -> TensorRT-LLM
  directly, tensor for tensor, and HF -> MCore -> HF (`--to hf`) equals the source.
  Conversions only move, concatenate, pad and slice data (no arithmetic), so equality is exact.
* The layout facts, checked against formulas transcribed from Megatron-LM's own converter
  (tools/checkpoint/loader_mixtral_hf.py, saver_base.py) rather than against trtlm's code.
* megatron-core's own GPTModel, built from the written args and loaded with the written weights,
  gives transformers' logits (float32; tolerance 1e-5 absolute: the two differ only in summation
  order, measured max abs error ~2e-7 on logits of magnitude ~0.7).  Skipped without megatron-core.
* The served result: a tiny Mixtral HF -> MCore (tp2 x ep2) -> `trtlm run --model-dir MCORE`
  decodes transformers' greedy tokens.
* Bad inputs: one `error:` line each, nothing left behind.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import load_hf_model, run_cli
from safetensors.torch import load_file

TESTS = Path(__file__).resolve().parent


def convert(*argv) -> None:
    res = run_cli("convert", *argv)
    assert res.exit_code == 0, res.stderr


def to_mcore(hf: Path, out: Path, *extra) -> Path:
    convert("--model-dir", hf, "--output-dir", out, "--to", "mcore", *extra)
    return out


def assert_same_checkpoint(a: Path, b: Path) -> None:
    """Two TensorRT-LLM checkpoints: same config.json, same rank files, every tensor equal (dtype too)."""
    assert json.loads((a / "config.json").read_text()) == json.loads((b / "config.json").read_text())
    files = sorted(p.name for p in a.glob("rank*.safetensors"))
    assert files == sorted(p.name for p in b.glob("rank*.safetensors")) and files
    for name in files:
        x, y = load_file(str(a / name)), load_file(str(b / name))
        assert x.keys() == y.keys(), name
        for key in x:
            assert x[key].dtype == y[key].dtype, (name, key)
            assert torch.equal(x[key], y[key]), (name, key)


def rank_state(path: Path) -> dict:
    """A rank file trtlm wrote (trusted: the test made it), with everything in it."""
    return torch.load(path, map_location="cpu", weights_only=False)


@pytest.fixture(scope="module")
def tiny_mixtral(make_tiny_hf) -> Path:
    return make_tiny_hf("mixtral", tokenizer=True)


@pytest.fixture(scope="module")
def tiny_mistral(tiny_mistral_dir) -> Path:
    return tiny_mistral_dir


# --------------------------------------------------------------------------------------------
# Round trips
# --------------------------------------------------------------------------------------------
ROUND_TRIPS = [
    ("mistral", ["--tp-size", "2"]),
    ("mistral", ["--pp-size", "2"]),
    ("mistral", ["--tp-size", "2", "--pp-size", "2"]),
    ("mixtral", ["--tp-size", "2"]),
    ("mixtral", ["--pp-size", "2"]),
    ("mixtral", ["--moe-ep-size", "2"]),
    ("mixtral", ["--tp-size", "2", "--moe-ep-size", "2"]),
]


@pytest.mark.parametrize("family,split", ROUND_TRIPS, ids=[f"{f}-{'-'.join(s)}" for f, s in ROUND_TRIPS])
def test_mcore_to_trtllm_equals_direct(family, split, tiny_mistral, tiny_mixtral, tmp_path):
    hf = tiny_mistral if family == "mistral" else tiny_mixtral
    mc = to_mcore(hf, tmp_path / "mc", *split)
    convert("--model-dir", mc, "--output-dir", tmp_path / "via-mcore")
    convert("--model-dir", hf, "--output-dir", tmp_path / "direct")
    assert_same_checkpoint(tmp_path / "via-mcore", tmp_path / "direct")


def test_mcore_to_trtllm_tp2_equals_direct_tp2(tiny_mixtral, tmp_path):
    mc = to_mcore(tiny_mixtral, tmp_path / "mc", "--pp-size", "2", "--moe-ep-size", "2")
    convert("--model-dir", mc, "--output-dir", tmp_path / "via-mcore", "--tp-size", "2", "--moe-ep-size", "2")
    convert("--model-dir", tiny_mixtral, "--output-dir", tmp_path / "direct", "--tp-size", "2", "--moe-ep-size", "2")
    assert_same_checkpoint(tmp_path / "via-mcore", tmp_path / "direct")


@pytest.mark.parametrize("family,split", [("mistral", ["--tp-size", "2", "--pp-size", "2"]),
                                          ("mixtral", ["--tp-size", "2", "--moe-ep-size", "2"])])
def test_mcore_reads_back_the_hf_tensors(family, split, tiny_mistral, tiny_mixtral, tmp_path):
    """HF -> MCore -> HF: every source tensor, and the config, come back unchanged."""
    from trtlm.mcore.reader import load_mcore, resolve_family
    from trtlm.plugins import get_registry

    hf = tiny_mistral if family == "mistral" else tiny_mixtral
    mc = to_mcore(hf, tmp_path / "mc", *split)
    entry, ckpt = resolve_family(mc, None)
    assert entry.family.name == family
    loaded = load_mcore(mc, get_registry().hooks(entry), ckpt)
    source = load_file(str(hf / "model.safetensors"))
    assert sorted(loaded.source.keys()) == sorted(source)
    for name, tensor in source.items():
        got = loaded.source.get(name)
        assert got.dtype == (torch.float32 if name.endswith("gate.weight") else tensor.dtype), name
        assert torch.equal(got.to(tensor.dtype), tensor), name
    original = json.loads((hf / "config.json").read_text())
    for key in ("architectures", "vocab_size", "hidden_size", "num_hidden_layers", "num_key_value_heads",
                "sliding_window", "rope_theta", "num_local_experts", "num_experts_per_tok"):
        assert loaded.hf_config.get(key) == original.get(key), key


@pytest.mark.parametrize("family,split", [("mistral", ["--tp-size", "2", "--pp-size", "2"]),
                                          ("mixtral", ["--tp-size", "2", "--pp-size", "2", "--moe-ep-size", "2"])])
def test_hf_to_mcore_to_hf_equals_source(family, split, tiny_mistral, tiny_mixtral, tmp_path):
    hf = tiny_mistral if family == "mistral" else tiny_mixtral
    mc = to_mcore(hf, tmp_path / "mc", *split)
    convert("--model-dir", mc, "--output-dir", tmp_path / "back", "--to", "hf")
    a, b = load_file(str(tmp_path / "back" / "model.safetensors")), load_file(str(hf / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
    assert json.loads((tmp_path / "back" / "config.json").read_text()) == json.loads((hf / "config.json").read_text())


@pytest.mark.parametrize("family,split", [("mistral", ["--tp-size", "2", "--pp-size", "2"]),
                                          ("mixtral", ["--tp-size", "2", "--moe-ep-size", "2"])])
def test_megatron_written_args_are_enough(family, split, tiny_mistral, tiny_mixtral, tmp_path):
    """A checkpoint Megatron-LM wrote has no trtlm_hf_config: the family and the config come from the
    model args alone (num_experts picks Mixtral), and the weights convert to the same tensors."""
    hf = tiny_mistral if family == "mistral" else tiny_mixtral
    mc = to_mcore(hf, tmp_path / "mc", *split)
    for f in (mc / "iter_0000001").glob("*/model_optim_rng.pt"):
        rewrite(f, lambda s: (delattr(s["args"], "trtlm_hf_config"), delattr(s["args"], "trtlm_version")))
    convert("--model-dir", mc, "--output-dir", tmp_path / "via-mcore")
    convert("--model-dir", hf, "--output-dir", tmp_path / "direct")
    a = json.loads((tmp_path / "via-mcore" / "config.json").read_text())
    b = json.loads((tmp_path / "direct" / "config.json").read_text())
    for key in ("architecture", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_size", "intermediate_size", "norm_epsilon", "rotary_base",
                "max_position_embeddings", "moe", "dtype"):
        assert a.get(key) == b.get(key), key
    for name in ("rank0.safetensors",):
        x, y = load_file(str(tmp_path / "via-mcore" / name)), load_file(str(tmp_path / "direct" / name))
        assert x.keys() == y.keys()
        assert all(torch.equal(x[k], y[k]) for k in x)


def test_local_spec_names_are_read(tiny_mistral, tmp_path):
    """Megatron's converter with --saver-transformer-impl local keeps the norms as input_layernorm /
    pre_mlp_layernorm (schema_core.py CoreLocalSchema): read under either name."""
    mc = to_mcore(tiny_mistral, tmp_path / "mc", "--tp-size", "2")
    local = {"self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
             "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight"}

    def to_local(state):
        renamed = {}
        for name, tensor in state["model"].items():
            for te, loc in local.items():
                name = name.replace(te, loc)
            renamed[name] = tensor
        state["model"] = renamed
        state["args"].transformer_impl = "local"

    for f in (mc / "iter_0000001").glob("*/model_optim_rng.pt"):
        rewrite(f, to_local)
    assert "decoder.layers.0.input_layernorm.weight" in rank_state(mc / "iter_0000001" / "mp_rank_00" /
                                                                   "model_optim_rng.pt")["model"]
    convert("--model-dir", mc, "--output-dir", tmp_path / "via-mcore")
    convert("--model-dir", tiny_mistral, "--output-dir", tmp_path / "direct")
    assert_same_checkpoint(tmp_path / "via-mcore", tmp_path / "direct")


def test_bfloat16_source(make_tiny_hf, tmp_path):
    hf = make_tiny_hf("mixtral", dtype=torch.bfloat16)
    mc = to_mcore(hf, tmp_path / "mc", "--tp-size", "2")
    state = rank_state(mc / "iter_0000001" / "mp_rank_01" / "model_optim_rng.pt")
    assert state["model"]["decoder.layers.0.self_attention.linear_qkv.weight"].dtype == torch.bfloat16
    assert state["model"]["decoder.layers.0.mlp.router.weight"].dtype == torch.float32  # TopKRouter is fp32
    assert state["args"].bf16 and state["args"].params_dtype == torch.bfloat16
    convert("--model-dir", mc, "--output-dir", tmp_path / "via-mcore")
    convert("--model-dir", hf, "--output-dir", tmp_path / "direct")
    assert_same_checkpoint(tmp_path / "via-mcore", tmp_path / "direct")


# --------------------------------------------------------------------------------------------
# The layout, checked against Megatron-LM's converter formulas
# --------------------------------------------------------------------------------------------
def test_directory_layout_and_file_contents(tiny_mixtral, tmp_path):
    mc = to_mcore(tiny_mixtral, tmp_path / "mc", "--tp-size", "2", "--pp-size", "2", "--moe-ep-size", "2")
    assert (mc / "latest_checkpointed_iteration.txt").read_text().strip() == "1"
    # megatron/training/checkpointing.py get_checkpoint_name: mp_rank_{tp:02d}_{pp:03d}_{ep:03d}
    assert sorted(p.name for p in (mc / "iter_0000001").iterdir()) == [
        f"mp_rank_{t:02d}_{p:03d}_{e:03d}" for t in range(2) for p in range(2) for e in range(2)]
    assert (mc / "tokenizer.json").exists()  # carried along for `trtlm run --model-dir`
    first = rank_state(mc / "iter_0000001" / "mp_rank_01_000_001" / "model_optim_rng.pt")
    last = rank_state(mc / "iter_0000001" / "mp_rank_00_001_000" / "model_optim_rng.pt")
    assert first["checkpoint_version"] == 3.0 and first["iteration"] == 1
    assert isinstance(first["args"], argparse.Namespace)
    a = first["args"]
    assert (a.tensor_model_parallel_size, a.pipeline_model_parallel_size, a.expert_model_parallel_size) == (2, 2, 2)
    assert a.padded_vocab_size == 1024 and a.num_experts == 4  # 1001 up to a multiple of 128 x tp
    # Layer indices count within the stage, expert indices within the EP rank.
    names = set(first["model"])
    assert "embedding.word_embeddings.weight" in names and "output_layer.weight" not in names
    assert "decoder.layers.0.mlp.experts.local_experts.1.linear_fc1.weight" in names
    assert not any(".local_experts.2." in n or "decoder.layers.1." in n for n in names)
    assert {"decoder.final_layernorm.weight", "output_layer.weight"} <= set(last["model"])
    assert "decoder.layers.0.pre_mlp_layernorm.weight" in names
    assert "decoder.layers.0.self_attention.linear_qkv.layer_norm_weight" in names


def test_tensors_follow_megatron_formulas(tiny_mixtral, tmp_path):
    """linear_qkv, expert linear_fc1 and the padded vocabulary as Megatron-LM's converter builds them
    (loader_mixtral_hf.py set_attn_state / set_mlp_state, saver_base.py chunk_weight and pad_weight)."""
    mc = to_mcore(tiny_mixtral, tmp_path / "mc", "--tp-size", "2", "--moe-ep-size", "2")
    hf = load_file(str(tiny_mixtral / "model.safetensors"))
    cfg = json.loads((tiny_mixtral / "config.json").read_text())
    heads, kv, dim, hidden = 4, 2, 16, 64
    tp = 2
    for t in range(tp):
        for e in range(2):
            m = rank_state(mc / "iter_0000001" / f"mp_rank_{t:02d}_{e:03d}" / "model_optim_rng.pt")["model"]
            q = hf["model.layers.1.self_attn.q_proj.weight"]
            k = hf["model.layers.1.self_attn.k_proj.weight"]
            v = hf["model.layers.1.self_attn.v_proj.weight"]
            groups, per = kv, heads // kv
            full = torch.cat([q.reshape(groups, per * dim, -1), k.reshape(groups, dim, -1),
                              v.reshape(groups, dim, -1)], dim=1).reshape(-1, hidden)
            assert torch.equal(m["decoder.layers.1.self_attention.linear_qkv.weight"], full.chunk(tp, 0)[t])
            for local in range(2):
                expert = e * 2 + local
                p = f"model.layers.1.block_sparse_moe.experts.{expert}."
                w = torch.cat([hf[p + "w1.weight"].chunk(tp, 0)[t], hf[p + "w3.weight"].chunk(tp, 0)[t]])
                x = f"decoder.layers.1.mlp.experts.local_experts.{local}."
                assert torch.equal(m[x + "linear_fc1.weight"], w)
                assert torch.equal(m[x + "linear_fc2.weight"], hf[p + "w2.weight"].chunk(tp, 1)[t])
            assert torch.equal(m["decoder.layers.1.mlp.router.weight"], hf["model.layers.1.block_sparse_moe.gate.weight"])
            emb = hf["model.embed_tokens.weight"]
            padded = torch.cat([emb, emb[-1:].expand(1024 - cfg["vocab_size"], -1)])
            assert torch.equal(m["embedding.word_embeddings.weight"], padded.chunk(tp, 0)[t])


# --------------------------------------------------------------------------------------------
# Served: HF -> MCore (tp2 x ep2) -> `trtlm run --model-dir MCORE`
# --------------------------------------------------------------------------------------------
def test_run_mcore_dir_decodes_like_transformers(tiny_mixtral, tmp_path):
    mc = to_mcore(tiny_mixtral, tmp_path / "mc", "--tp-size", "2", "--moe-ep-size", "2")
    prompt = [1, 5, 9, 200, 31, 77]
    res = run_cli("run", "--model-dir", mc, "--no-cache", "--input-ids", ",".join(map(str, prompt)),
                  "--max-output-len", "10", "--json")
    assert res.exit_code == 0, res.stderr
    got = json.loads(res.stdout)["outputs"][0]["output_ids"]
    model = load_hf_model(tiny_mixtral)
    with torch.no_grad():
        ref = model.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False, eos_token_id=None,
                             pad_token_id=0)[0, len(prompt):].tolist()
    assert got == ref


# --------------------------------------------------------------------------------------------
# Checked by Megatron itself
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["mistral", "mixtral"])
def test_megatron_core_gives_transformers_logits(family, tiny_mistral, tiny_mixtral, tmp_path):
    pytest.importorskip("megatron.core", reason="megatron-core is not installed (pip install megatron-core)")
    hf = tiny_mistral if family == "mistral" else tiny_mixtral
    mc = to_mcore(hf, tmp_path / "mc")
    # The tiny Mistral's sliding window is 8: 8 tokens keep every position inside it, so full causal
    # attention (what the GPTModel built here does) is the same computation.
    seq = 8
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, str(TESTS / "mcore_megatron.py"),
                           str(mc / "iter_0000001" / "mp_rank_00" / "model_optim_rng.pt"), str(hf), str(seq)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["missing"] == [] and result["unexpected"] == [], result
    assert result["padded_vocab"] == 1024
    assert result["max_abs_err"] < 1e-5, result


# --------------------------------------------------------------------------------------------
# Bad inputs
# --------------------------------------------------------------------------------------------
@pytest.fixture
def outs(tmp_path) -> Path:
    (tmp_path / "outs").mkdir()
    return tmp_path / "outs"


def assert_one_line_failure(res, outs: Path, *needles: str) -> str:
    assert res.exit_code != 0, res.stdout
    assert "Traceback" not in res.stderr, res.stderr
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    assert list(outs.iterdir()) == [], "output left behind"
    return lines[0]


@pytest.fixture
def mc_tp2_ep2(tiny_mixtral, tmp_path) -> Path:
    return to_mcore(tiny_mixtral, tmp_path / "mc", "--tp-size", "2", "--moe-ep-size", "2")


def rewrite(path: Path, edit) -> None:
    state = rank_state(path)
    edit(state)
    torch.save(state, path)


def test_missing_rank(mc_tp2_ep2, outs):
    gone = mc_tp2_ep2 / "iter_0000001" / "mp_rank_01_001"
    shutil.rmtree(gone)
    res = run_cli("convert", "--model-dir", mc_tp2_ep2, "--output-dir", outs / "ckpt")
    assert_one_line_failure(res, outs, str(gone / "model_optim_rng.pt"), "missing", "expert_model_parallel_size=2")


def test_tp_in_args_disagrees_with_files(mc_tp2_ep2, outs):
    for f in (mc_tp2_ep2 / "iter_0000001").glob("*/model_optim_rng.pt"):
        rewrite(f, lambda s: setattr(s["args"], "tensor_model_parallel_size", 1))
    res = run_cli("convert", "--model-dir", mc_tp2_ep2, "--output-dir", outs / "ckpt")
    assert_one_line_failure(res, outs, "mp_rank_01_000", "tensor_model_parallel_size=1", "disagree")


def test_tp_in_args_larger_than_files(mc_tp2_ep2, outs):
    for f in (mc_tp2_ep2 / "iter_0000001").glob("*/model_optim_rng.pt"):
        rewrite(f, lambda s: setattr(s["args"], "tensor_model_parallel_size", 4))
    res = run_cli("convert", "--model-dir", mc_tp2_ep2, "--output-dir", outs / "ckpt")
    assert_one_line_failure(res, outs, "mp_rank_02_000", "missing", "tensor_model_parallel_size=4")


def test_shard_shape_disagrees_with_args(mc_tp2_ep2, outs):
    f = mc_tp2_ep2 / "iter_0000001" / "mp_rank_00_001" / "model_optim_rng.pt"
    name = "decoder.layers.0.self_attention.linear_proj.weight"
    rewrite(f, lambda s: s["model"].__setitem__(name, torch.zeros(64, 64)))
    res = run_cli("convert", "--model-dir", mc_tp2_ep2, "--output-dir", outs / "ckpt")
    assert_one_line_failure(res, outs, str(f), name, "[64, 32]")


class _Payload:
    """Unpickling this runs ``os.mkdir(marker)``; trtlm's reader must refuse it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def test_pickled_object_beyond_tensors_is_refused(mc_tp2_ep2, outs, tmp_path):
    marker = tmp_path / "payload-ran"
    f = mc_tp2_ep2 / "iter_0000001" / "mp_rank_00_000" / "model_optim_rng.pt"
    rewrite(f, lambda s: s.__setitem__("rng_state", _Payload(marker)))
    res = run_cli("convert", "--model-dir", mc_tp2_ep2, "--output-dir", outs / "ckpt")
    assert_one_line_failure(res, outs, str(f), "refused", "posix.mkdir", "weights_only=True")
    assert not marker.exists()


def test_megatron_enum_in_args_is_read_without_megatron(mc_tp2_ep2, tmp_path):
    """Megatron's saver stores enums in args (args.model_type = ModelType.encoder_or_decoder): read as
    inert stand-ins, never by importing Megatron."""
    import enum
    import types

    mod = types.ModuleType("megatron_fake_enums")

    class ModelType(enum.Enum):
        encoder_or_decoder = 1

    ModelType.__module__ = "megatron.core.enums"
    ModelType.__qualname__ = "ModelType"
    mod.ModelType = ModelType
    saved = {k: sys.modules.get(k) for k in ("megatron", "megatron.core", "megatron.core.enums")}
    sys.modules["megatron.core.enums"] = mod
    try:
        for f in (mc_tp2_ep2 / "iter_0000001").glob("*/model_optim_rng.pt"):
            rewrite(f, lambda s: setattr(s["args"], "model_type", ModelType.encoder_or_decoder))
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
    # In a fresh process: this one may have imported megatron.core (the Megatron check above).
    code = ("import sys; from pathlib import Path; from trtlm.mcore.torchfile import MegatronGlobal, load_rank_file; "
            f"s = load_rank_file(Path({str(mc_tp2_ep2 / 'iter_0000001' / 'mp_rank_00_000' / 'model_optim_rng.pt')!r})); "
            "assert isinstance(s['args'].model_type, MegatronGlobal), type(s['args'].model_type); "
            "assert not [m for m in sys.modules if m.startswith('megatron')]; print(s['args'].model_type)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "megatron.core.enums.ModelType(1)"
    convert("--model-dir", mc_tp2_ep2, "--output-dir", tmp_path / "ckpt")


def test_distributed_checkpoint_is_named(tmp_path, outs):
    it = tmp_path / "dist" / "iter_0000100"
    it.mkdir(parents=True)
    (it / ".metadata").write_bytes(b"\0")
    (it / "__0_0.distcp").write_bytes(b"\0")
    (tmp_path / "dist" / "latest_checkpointed_iteration.txt").write_text("100")
    res = run_cli("convert", "--model-dir", tmp_path / "dist", "--output-dir", outs / "ckpt")
    assert_one_line_failure(res, outs, "torch_dist", "--ckpt-format torch")


def test_ep_without_experts_is_refused(tiny_mistral, outs):
    res = run_cli("convert", "--model-dir", tiny_mistral, "--output-dir", outs / "mc", "--to", "mcore",
                  "--moe-ep-size", "2")
    assert_one_line_failure(res, outs, "--moe-ep-size")


def test_tp_not_dividing_query_groups_is_refused(tiny_mistral, outs):
    res = run_cli("convert", "--model-dir", tiny_mistral, "--output-dir", outs / "mc", "--to", "mcore",
                  "--tp-size", "4")
    assert_one_line_failure(res, outs, "--tp-size 4", "KV heads")


def test_inspect_describes_an_mcore_dir(mc_tp2_ep2):
    res = run_cli("inspect", mc_tp2_ep2, "--json")
    assert res.exit_code == 0, res.stderr
    info = json.loads(res.stdout)
    assert (info["format"], info["family"], info["layers"]) == ("mcore", "mixtral", 2)
    assert info["parallel"] == {"tp_size": 2, "pp_size": 1, "ep_size": 2}
