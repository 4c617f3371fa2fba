"""The MPT family plugin end to end: mapping, ALiBi / clip_qkv / MQA-GQA runtime parity, FT in and out.

Oracles:

* NVIDIA modelopt's TensorRT-LLM export of a tiny transformers MPT
  (``tests/fixtures/modelopt``, copied from the shared reference exports):
  tensors must be equal name for name, shape, dtype and value;
* transformers' ``MptForCausalLM`` (float32) for logits and greedy tokens;
* a plain float64 re-implementation of llm-foundry's MPT (:func:`ref_logits`)
  for what transformers' MPT cannot express (kv_n_heads, biases,
  logit_scale); it is itself checked against transformers first.

Tensor-parallel runs execute each rank's network in its own thread, joined
by :class:`ThreadComm`, so every rank computes only its own heads (3 of 6
with tp=2: the non-power-of-two ALiBi slopes are sliced per rank).
"""
from __future__ import annotations

import configparser
import json
import math
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from trtlm.api import LLM
from trtlm.cli import main as cli_main
from trtlm.mapping import Mapping
from trtlm.convert.options import ConvertOptions
from trtlm.runtime.executor import TeacherForcing
from trtlm.convert.pipeline import convert
from trtlm.errors import UserError
from trtlm.plugins import get_registry
from trtlm.runtime.checkpoint import read_rank
from trtlm.runtime.distributed import rank_network
from trtlm.build import BuildOptions, build

transformers = pytest.importorskip("transformers")
from transformers import MptConfig, MptForCausalLM  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures" / "modelopt"
TOL = 1e-4
NEW_TOKENS = 32

# Config keys TensorRT-LLM's PretrainedConfig / MPTForCausalLM read from a checkpoint.
TRTLLM_KEYS = ("dtype", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "head_size", "intermediate_size", "hidden_act", "norm_epsilon",
               "position_embedding_type", "max_position_embeddings", "use_parallel_embedding",
               "embedding_sharding_dim", "share_embedding_table", "bias", "clip_qkv", "alibi_bias_max",
               "mapping", "quantization")


@pytest.fixture(autouse=True, scope="module")
def _one_intra_op_thread():
    """Tiny matrices gain nothing from intra-op threads, and the tensor-parallel tests run one
    thread per rank: with OpenMP threads on top, a busy 2-core machine slows down ~50x."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------------
# helpers


def to_ckpt(model_dir: Path, out: Path, tp: int = 1, dtype: str = "float32", **kw) -> Path:
    convert(model_dir, out, ConvertOptions(dtype=dtype, tp_size=tp, **kw))
    return out


def to_engine(ckpt: Path) -> Path:
    out = ckpt.with_name(ckpt.name + "-engine")
    build(ckpt, out, BuildOptions())
    return out


def assert_same_checkpoint(a: Path, b: Path, world: int) -> None:
    for r in range(world):
        ta, tb = load_file(a / f"rank{r}.safetensors"), load_file(b / f"rank{r}.safetensors")
        assert sorted(ta) == sorted(tb), f"rank {r}: {set(ta) ^ set(tb)}"
        for name in ta:
            assert ta[name].dtype == tb[name].dtype, (r, name)
            assert ta[name].shape == tb[name].shape, (r, name)
            assert torch.equal(ta[name], tb[name]), (r, name)


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Weights large enough that attention, ALiBi and clip_qkv all matter (init weights are ~0.02)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif "wte" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[1]))


def make_hf(tmp: Path, name: str, d_model: int, heads: int, clip=None, vocab: int = 256, seed: int = 0,
            **attn) -> tuple[Path, MptForCausalLM]:
    cfg = MptConfig(d_model=d_model, n_heads=heads, n_layers=2, vocab_size=vocab, max_seq_len=128,
                    attn_config=dict(alibi=True, alibi_bias_max=8, clip_qkv=clip, **attn))
    torch.manual_seed(seed)
    model = MptForCausalLM(cfg).eval()
    randomize(model, seed)
    out = tmp / name
    model.save_pretrained(out, safe_serialization=True)
    return out, model


def prompts(vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(7)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in (13, 6)]


@torch.no_grad()
def hf_greedy(model: MptForCausalLM, ids: list[int], n: int) -> tuple[torch.Tensor, list[int]]:
    """Prompt logits and ``n`` greedy tokens, each step a full forward (no cache) of transformers."""
    seq = torch.tensor([ids])
    first = model(seq).logits[0]
    out = []
    logits = first
    for _ in range(n):
        tok = int(logits[-1].argmax())
        out.append(tok)
        seq = torch.cat([seq, torch.tensor([[tok]])], dim=1)
        logits = model(seq).logits[0]
    return first, out


class _Group:
    def __init__(self, n: int):
        self.n = n
        self.barrier = threading.Barrier(n, timeout=120)
        self.slots: list = [None] * n


class ThreadComm:
    """Tensor-parallel collectives between ranks that run as threads of this process."""

    def __init__(self, group: _Group, tp_rank: int):
        self.group, self.tp_size, self.tp_rank = group, group.n, tp_rank

    def _exchange(self, x: torch.Tensor) -> list[torch.Tensor]:
        self.group.slots[self.tp_rank] = x
        self.group.barrier.wait()
        parts = list(self.group.slots)
        self.group.barrier.wait()
        return parts

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack(self._exchange(x)).sum(0)

    def all_gather_last(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat(self._exchange(x), dim=-1)


def rank_models(ckpt: Path) -> list[torch.nn.Module]:
    """Each rank's own network (its heads only) with its own rank file, strictly loaded."""
    config = json.loads((ckpt / "config.json").read_text())
    mapping = Mapping.from_config(config)
    assert mapping.pp_size == 1
    registry = get_registry()
    hooks = registry.hooks(registry.resolve_trtllm(config["architecture"]))
    group = _Group(mapping.tp_size)
    models = []
    for r in range(mapping.world_size):
        m = rank_network(hooks, config, mapping, r, BuildOptions(), device="cpu",
                         comm=ThreadComm(group, mapping.tp_rank(r)))
        m.load_state_dict(read_rank(ckpt, r), strict=True)
        models.append(m.eval())
    return models


def run_ranks(ckpt: Path, ids: list[int], n: int) -> list[tuple[torch.Tensor, list[int]]]:
    """(prompt logits, n greedy tokens) from every rank, with a KV cache (prefill, then decode)."""
    models = rank_models(ckpt)

    @torch.no_grad()
    def work(m):
        seq = TeacherForcing(m, 1, len(ids) + n)
        logits = seq(torch.tensor([ids]))
        first, out = logits[0], []
        for _ in range(n):
            tok = int(logits[0, -1].argmax())
            out.append(tok)
            logits = seq(torch.tensor([[tok]]))
        return first, out

    with ThreadPoolExecutor(len(models)) as pool:
        return list(pool.map(work, models))


def llm_run(engine: Path, batch: list[list[int]], n: int):
    llm = LLM(engine)
    outs = llm.generate(batch, max_new_tokens=n, keep_logits=True)
    gen = llm.last_generation
    return [o["output_ids"] for o in outs], gen.prompt_logits


def ref_slopes(heads: int, bias_max: float = 8.0) -> torch.Tensor:
    """ALiBi slopes from the paper's recipe, as llm-foundry's gen_slopes writes it."""
    n2 = 2 ** math.ceil(math.log2(heads))
    s = [2.0 ** (-(i + 1) * bias_max / n2) for i in range(n2)]
    if n2 != heads:
        s = s[1::2] + s[::2]
    return torch.tensor(s[:heads], dtype=torch.float64)


def ref_logits(t: dict[str, torch.Tensor], cfg: dict, ids: list[int]) -> torch.Tensor:
    """llm-foundry MPT forward in float64: MQA/GQA, biases (LayerNorm ones too), clip_qkv,
    softmax_scale, logit_scale, ALiBi.  Independent of trtlm's runtime."""
    t = {k: v.double() for k, v in t.items()}
    attn = cfg["attn_config"]
    H, nh = cfg["d_model"], cfg["n_heads"]
    D = H // nh
    kv = {"multiquery_attention": 1, "grouped_query_attention": attn.get("kv_n_heads")}.get(
        attn.get("attn_type"), nh)
    scale = attn.get("softmax_scale") or 1 / math.sqrt(D)
    clip = attn.get("clip_qkv")
    eps = cfg.get("layer_norm_epsilon", 1e-5)
    T = len(ids)
    pos = torch.arange(T, dtype=torch.float64)
    alibi = -ref_slopes(nh, attn.get("alibi_bias_max", 8))[:, None, None] * (pos[:, None] - pos[None, :]).abs()
    causal = torch.ones(T, T, dtype=torch.bool).tril()

    def ln(x, p):
        return torch.nn.functional.layer_norm(x, (H,), t[p + ".weight"], t.get(p + ".bias"), eps)

    def lin(x, p):
        y = x @ t[p + ".weight"].T
        return y + t[p + ".bias"] if p + ".bias" in t else y

    x = t["transformer.wte.weight"][ids]
    for i in range(cfg["n_layers"]):
        p = f"transformer.blocks.{i}."
        qkv = lin(ln(x, p + "norm_1"), p + "attn.Wqkv")
        if clip:
            qkv = qkv.clamp(-clip, clip)
        q, k, v = qkv.split([nh * D, kv * D, kv * D], dim=-1)
        q = q.view(T, nh, D).transpose(0, 1)
        k = k.view(T, kv, D).transpose(0, 1).repeat_interleave(nh // kv, dim=0)
        v = v.view(T, kv, D).transpose(0, 1).repeat_interleave(nh // kv, dim=0)
        s = (q @ k.transpose(1, 2)) * scale + alibi
        s = s.masked_fill(~causal, float("-inf")).softmax(-1)
        x = x + lin((s @ v).transpose(0, 1).reshape(T, nh * D), p + "attn.out_proj")
        x = x + lin(torch.nn.functional.gelu(lin(ln(x, p + "norm_2"), p + "ffn.up_proj")), p + "ffn.down_proj")
    x = ln(x, "transformer.norm_f")
    head = t.get("lm_head.weight", t["transformer.wte.weight"])
    ls = cfg.get("logit_scale") or 1.0
    return (x @ head.T) * ls


def hand_mpt(tmp: Path, name: str, kv: int | None, bias: bool = False, heads: int = 4, d_model: int = 32,
             vocab: int = 128, seed: int = 3, **cfg_extra) -> tuple[Path, dict, dict]:
    """An llm-foundry style MPT directory built by hand (transformers' MPT has neither
    kv_n_heads nor biases)."""
    g = torch.Generator().manual_seed(seed)
    D = d_model // heads
    kv_heads = heads if kv is None else kv
    inter = 4 * d_model

    def w(*shape, std=None):
        return torch.randn(*shape, generator=g) * (std if std is not None else 1 / math.sqrt(shape[-1]))

    t = {"transformer.wte.weight": w(vocab, d_model, std=0.5)}
    for i in range(2):
        p = f"transformer.blocks.{i}."
        t[p + "norm_1.weight"] = 1 + 0.2 * torch.randn(d_model, generator=g)
        t[p + "attn.Wqkv.weight"] = w((heads + 2 * kv_heads) * D, d_model)
        t[p + "attn.out_proj.weight"] = w(d_model, d_model)
        t[p + "norm_2.weight"] = 1 + 0.2 * torch.randn(d_model, generator=g)
        t[p + "ffn.up_proj.weight"] = w(inter, d_model)
        t[p + "ffn.down_proj.weight"] = w(d_model, inter)
        if bias:
            for n, size in (("norm_1.bias", d_model), ("attn.Wqkv.bias", (heads + 2 * kv_heads) * D),
                            ("attn.out_proj.bias", d_model), ("norm_2.bias", d_model),
                            ("ffn.up_proj.bias", inter), ("ffn.down_proj.bias", d_model)):
                t[p + n] = 0.3 * torch.randn(size, generator=g)
    t["transformer.norm_f.weight"] = 1 + 0.2 * torch.randn(d_model, generator=g)
    if bias:
        t["transformer.norm_f.bias"] = 0.3 * torch.randn(d_model, generator=g)
    attn = {"alibi": True, "alibi_bias_max": 8, "attn_impl": "torch", "clip_qkv": None, "qk_ln": False,
            "prefix_lm": False, "softmax_scale": None, "attn_type": "multihead_attention"}
    if kv == 1:
        attn.update(attn_type="multiquery_attention", kv_n_heads=1)
    elif kv is not None:
        attn.update(attn_type="grouped_query_attention", kv_n_heads=kv)
    attn.update(cfg_extra.pop("attn", {}))
    cfg = {"architectures": ["MPTForCausalLM"], "model_type": "mpt", "d_model": d_model, "n_heads": heads,
           "n_layers": 2, "expansion_ratio": 4, "max_seq_len": 128, "vocab_size": vocab, "no_bias": not bias,
           "attn_config": attn, "layer_norm_epsilon": 1e-5, "norm_type": "low_precision_layernorm",
           "learned_pos_emb": True, "logit_scale": None, "ffn_config": {"ffn_type": "mptmlp", "fc_type": "torch"},
           "torch_dtype": "float32", **cfg_extra}
    out = tmp / name
    out.mkdir()
    save_file({k: v.contiguous() for k, v in t.items()}, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(cfg))
    return out, t, cfg


# ---------------------------------------------------------------------------------------------
# family declaration


def test_family_routing_and_presets():
    registry = get_registry()
    entry = registry.family("mpt")
    assert registry.resolve_trtllm("MPTForCausalLM") == entry
    assert registry.resolve_trtllm("MptForCausalLM") == entry  # what modelopt writes
    assert registry.resolve_hf({"architectures": ["MptForCausalLM"]}) == entry
    assert registry.resolve_hf({"architectures": ["MPTForCausalLM"]}) == entry  # llm-foundry hub checkpoints
    caps = entry.family.capabilities
    assert caps.formats_in == ("hf", "ft") and caps.formats_out == ("trtllm", "ft")
    assert set(caps.quantization) == {"fp8", "int8-wo", "int4-wo", "int4-awq", "int8-sq"}
    assert set(entry.family.presets) >= {"tiny", "7b"}


def test_7b_preset_plan_shapes():
    from trtlm_mpt.plan import mpt_plan

    plan = mpt_plan(get_registry().family("mpt").family.presets["7b"], ConvertOptions(tp_size=4), "MPTForCausalLM")
    c = plan.config
    assert (c["hidden_size"], c["num_attention_heads"], c["num_hidden_layers"], c["vocab_size"]) == (4096, 32, 32, 50432)
    assert (c["intermediate_size"], c["max_position_embeddings"], c["bias"], c["clip_qkv"]) == (16384, 2048, False, None)
    shapes = plan.source_shapes()
    assert shapes["transformer.blocks.31.attn.Wqkv.weight"] == (12288, 4096)
    assert shapes["transformer.blocks.0.ffn.down_proj.weight"] == (4096, 16384)
    assert len(plan.tensors) == 2 + 6 * 32 + 1


def test_tiny_preset_dummy_converts_and_builds(tmp_path):
    cli_main(["convert", "--family", "mpt", "--preset", "tiny", "--dummy-weights", "--tp-size", "2",
              "--output-dir", str(tmp_path / "ckpt")])
    build(tmp_path / "ckpt", tmp_path / "engine", BuildOptions())
    cfg = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert cfg["architecture"] == "MPTForCausalLM" and cfg["clip_qkv"] == 6.0


# ---------------------------------------------------------------------------------------------
# modelopt fixtures


@pytest.mark.parametrize("tp", [1, 2])
def test_equal_to_modelopt_export(tmp_path, tp):
    ref = FIXTURES / "trtllm" / f"mpt_none_fp16_tp{tp}"
    out = to_ckpt(FIXTURES / "hf" / "mpt", tmp_path / "ckpt", tp=tp, dtype="float16")
    assert_same_checkpoint(out, ref, tp)
    assert sorted(p.name for p in out.glob("rank*.safetensors")) == [f"rank{r}.safetensors" for r in range(tp)]
    ours = json.loads((out / "config.json").read_text())
    theirs = json.loads((ref / "config.json").read_text())
    for key in TRTLLM_KEYS:
        assert ours[key] == theirs[key], key
    # The one TensorRT-LLM key that differs is the architecture's spelling: both strings select
    # TensorRT-LLM's MPTForCausalLM class, and trtlm reads either.
    assert (ours["architecture"], theirs["architecture"]) == ("MPTForCausalLM", "MptForCausalLM")
    fam = get_registry().family("mpt").family
    assert theirs["architecture"] in fam.trtllm_architectures


def test_modelopt_export_runs_in_trtlm(tmp_path):
    """A checkpoint written by modelopt (architecture "MptForCausalLM") builds and runs here."""
    ref = FIXTURES / "trtllm" / "mpt_none_fp16_tp2"
    engine = tmp_path / "engine"
    build(ref, engine, BuildOptions())
    hf = MptForCausalLM.from_pretrained(FIXTURES / "hf" / "mpt").eval()
    ids = prompts(1000)[0]
    _, logits = llm_run(engine, [ids], 1)
    with torch.no_grad():
        want = hf(torch.tensor([ids])).logits[0]
    # fp16 weights and activations against a float32 model
    assert (logits[0].float() - want).abs().max() < 0.05


# ---------------------------------------------------------------------------------------------
# runtime parity with transformers


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    """Module-wide cache: (heads, clip) -> (model dir, transformers model, references)."""
    tmp = tmp_path_factory.mktemp("mpt_hf")
    cache = {}

    def get(heads: int, clip):
        key = (heads, clip)
        if key not in cache:
            d_model = 8 * heads  # head_size 8
            path, model = make_hf(tmp, f"h{heads}_c{clip}", d_model, heads, clip=clip, seed=heads)
            refs = [hf_greedy(model, ids, NEW_TOKENS) for ids in prompts(256)]
            cache[key] = (path, model, refs)
        return cache[key]

    return get


def test_clip_qkv_is_active(hf_models):
    """The clip value of the parity tests really changes transformers' output (the test can fail)."""
    _, _, clipped = hf_models(6, 1.0)
    _, _, free = hf_models(6, None)
    # same seed and weights, only clip_qkv differs
    assert (clipped[0][0] - free[0][0]).abs().max() > 0.1


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("clip", [None, 1.0])
@pytest.mark.parametrize("heads", [4, 6])
def test_logits_and_greedy_match_transformers(tmp_path, hf_models, heads, clip, tp):
    path, _, refs = hf_models(heads, clip)
    ckpt = to_ckpt(path, tmp_path / "ckpt", tp=tp)
    cfg = json.loads((ckpt / "config.json").read_text())
    assert cfg["clip_qkv"] == clip and cfg["position_embedding_type"] == "alibi"
    batch = prompts(256)

    # 1. the engine through the public API: ranks merged, both prompts batched in one engine
    outs, logits = llm_run(to_engine(ckpt), batch, NEW_TOKENS)
    for b, (want_logits, want_tokens) in enumerate(refs):
        err = (logits[b] - want_logits).abs().max().item()
        assert err < TOL, (b, err)
        assert outs[b] == want_tokens

    # 2. each rank computing only its own heads (3 + 3 for 6 heads), with its KV cache
    if tp > 1:
        for b, (want_logits, want_tokens) in enumerate(refs):
            for first, tokens in run_ranks(ckpt, batch[b], NEW_TOKENS):
                err = (first - want_logits).abs().max().item()
                assert err < TOL, (b, err)
                assert tokens == want_tokens


def test_pipeline_and_tensor_parallel(tmp_path, hf_models):
    path, _, refs = hf_models(6, 1.0)
    ckpt = to_ckpt(path, tmp_path / "ckpt", tp=2, pp_size=2)
    assert len(list(ckpt.glob("rank*.safetensors"))) == 4
    ids = prompts(256)[0]
    outs, logits = llm_run(to_engine(ckpt), [ids], NEW_TOKENS)
    assert (logits[0] - refs[0][0]).abs().max() < TOL
    assert outs[0] == refs[0][1]


def test_rank_alibi_slopes_are_sliced(tmp_path, hf_models):
    path, _, _ = hf_models(6, None)
    ckpt = to_ckpt(path, tmp_path / "ckpt", tp=2)
    m0, m1 = rank_models(ckpt)
    want = ref_slopes(6).float()
    assert torch.equal(m0.alibi_slopes, want[:3]) and torch.equal(m1.alibi_slopes, want[3:])
    assert m0.transformer.layers[0].attention.qkv.weight.shape == (3 * 3 * 8, 48)


def test_softmax_scale_folded_into_queries(tmp_path):
    """transformers honours attn_config.softmax_scale; TensorRT-LLM's MPT has no key for it, so the
    converter folds it into the query rows of qkv."""
    path, model = make_hf(tmp_path, "scaled", 32, 4, softmax_scale=0.9)
    ckpt = to_ckpt(path, tmp_path / "ckpt", tp=2)
    ids = prompts(256)[0]
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0]
    for first, _ in run_ranks(ckpt, ids, 0):
        assert (first - want).abs().max() < TOL
    path2, _ = make_hf(tmp_path, "scaled_clip", 32, 4, clip=1.0, softmax_scale=0.9)
    with pytest.raises(UserError, match="softmax_scale"):
        to_ckpt(path2, tmp_path / "ckpt2")


# ---------------------------------------------------------------------------------------------
# the reference implementation, then what transformers cannot express


def test_reference_matches_transformers(hf_models):
    path, model, refs = hf_models(6, 1.0)
    t = load_file(path / "model.safetensors")
    cfg = json.loads((path / "config.json").read_text())
    got = ref_logits(t, cfg, prompts(256)[0])
    assert (got.float() - refs[0][0]).abs().max() < TOL

def assert_ranks_and_engine_match(ckpt: Path, ids: list[int], want: torch.Tensor) -> None:
    """Prefill logits of every rank run and of the built engine are within TOL of ``want``."""
    for first, _ in run_ranks(ckpt, ids, 0):
        assert (first - want).abs().max() < TOL
    _, logits = llm_run(to_engine(ckpt), [ids], 1)
    assert (logits[0] - want).abs().max() < TOL



@pytest.mark.parametrize("kv,tp", [(2, 1), (2, 2), (1, 1)])
def test_gqa_mqa_against_reference(tmp_path, kv, tp):
    path, t, cfg = hand_mpt(tmp_path, f"kv{kv}", kv=kv)
    ckpt = to_ckpt(path, tmp_path / "ckpt", tp=tp)
    config = json.loads((ckpt / "config.json").read_text())
    assert config["num_key_value_heads"] == kv and config["num_attention_heads"] == 4
    # rank r holds q heads [2r, 2r+1] and k/v heads [r*kv/tp, (r+1)*kv/tp): no duplication
    D, qh, kh = 8, 4 // tp, kv // tp
    w = t["transformer.blocks.1.attn.Wqkv.weight"]
    q, k, v = w[:32], w[32:32 + kv * D], w[32 + kv * D:]
    for r in range(tp):
        part = load_file(ckpt / f"rank{r}.safetensors")["transformer.layers.1.attention.qkv.weight"]
        want = torch.cat([q[r * qh * D:(r + 1) * qh * D], k[r * kh * D:(r + 1) * kh * D],
                          v[r * kh * D:(r + 1) * kh * D]])
        assert torch.equal(part, want)
    ids = prompts(128)[0]
    want = ref_logits(t, cfg, ids).float()
    assert_ranks_and_engine_match(ckpt, ids, want)


def test_alibi_bias_max_is_honoured(tmp_path):
    """transformers' MPT always uses 8; llm-foundry and TensorRT-LLM read attn_config.alibi_bias_max."""
    path, t, cfg = hand_mpt(tmp_path, "abm", kv=None, attn={"alibi_bias_max": 16})
    ckpt = to_ckpt(path, tmp_path / "ckpt", tp=2)
    assert json.loads((ckpt / "config.json").read_text())["alibi_bias_max"] == 16
    ids = prompts(128)[0]
    want = ref_logits(t, cfg, ids).float()
    assert (want - ref_logits(t, dict(cfg, attn_config=dict(cfg["attn_config"], alibi_bias_max=8)), ids)
            .float()).abs().max() > 0.01  # the setting matters for this model
    for first, _ in run_ranks(ckpt, ids, 0):
        assert (first - want).abs().max() < TOL


@pytest.mark.parametrize("tp", [1, 2])
def test_biases_folded_and_match_reference(tmp_path, tp):
    """no_bias=false (llm-foundry): TensorRT-LLM's MPT LayerNorms have no bias, so each one is
    folded into the next linear's bias (and ln_f's into lm_head.bias); logit_scale into lm_head."""
    path, t, cfg = hand_mpt(tmp_path, "biased", kv=2, bias=True, logit_scale=0.5)
    ckpt = to_ckpt(path, tmp_path / "ckpt", tp=tp)
    config = json.loads((ckpt / "config.json").read_text())
    assert config["bias"] is True and config["lm_head_bias"] is True
    ranks = [load_file(ckpt / f"rank{r}.safetensors") for r in range(tp)]
    assert not any("layernorm.bias" in k or "ln_f.bias" in k for k in ranks[0])
    assert ranks[0]["lm_head.bias"].shape == (128 // tp,)
    assert ranks[0]["transformer.layers.0.attention.dense.bias"].shape == (32,)  # replicated
    assert ranks[0]["transformer.layers.0.mlp.fc.bias"].shape == (128 // tp,)
    ids = prompts(128)[0]
    want = ref_logits(t, cfg, ids).float()
    assert_ranks_and_engine_match(ckpt, ids, want)


def test_transformers_save_with_no_bias_false(tmp_path):
    """transformers' MPT never has biases: a save with no_bias=false converts as bias-free."""
    cfg = MptConfig(d_model=32, n_heads=4, n_layers=1, vocab_size=64, max_seq_len=64, no_bias=False)
    MptForCausalLM(cfg).save_pretrained(tmp_path / "hf")
    ckpt = to_ckpt(tmp_path / "hf", tmp_path / "ckpt")
    assert json.loads((ckpt / "config.json").read_text())["bias"] is False


def test_replit_style_config_end_to_end(tmp_path):
    """replit-code-v1_5-3b's shape of config (llm-foundry names, MPTForCausalLM, vocab 32768,
    8 heads, no clip_qkv) on a tiny d_model: no special case anywhere."""
    cfg = MptConfig(d_model=64, n_heads=8, n_layers=2, vocab_size=32768, max_seq_len=128,
                    attn_config=dict(alibi=True, alibi_bias_max=8, clip_qkv=None))
    torch.manual_seed(1)
    model = MptForCausalLM(cfg).eval()
    randomize(model, 1)
    path = tmp_path / "replit"
    model.save_pretrained(path, safe_serialization=True)
    (path / "config.json").write_text(json.dumps({
        "architectures": ["MPTForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_mpt.MPTConfig", "AutoModelForCausalLM": "modeling_mpt.MPTForCausalLM"},
        "attn_config": {"alibi": True, "alibi_bias_max": 8, "attn_impl": "triton", "attn_pdrop": 0,
                        "attn_type": "multihead_attention", "attn_uses_sequence_id": False, "clip_qkv": None,
                        "prefix_lm": False, "qk_ln": False, "softmax_scale": None},
        "d_model": 64, "emb_pdrop": 0, "embedding_fraction": 1.0, "expansion_ratio": 4, "fc_type": "torch",
        "ffn_config": {"fc_type": "torch", "ffn_type": "mptmlp"}, "init_config": {"name": "kaiming_normal_"},
        "init_device": "cpu", "learned_pos_emb": True, "logit_scale": None, "max_seq_len": 128,
        "model_type": "mpt", "n_heads": 8, "n_layers": 2, "no_bias": True, "norm_type": "low_precision_layernorm",
        "resid_pdrop": 0, "tokenizer_name": "replit/replit-code-v1_5-3b", "torch_dtype": "bfloat16",
        "transformers_version": "4.33.0", "use_cache": False, "verbose": 0, "vocab_size": 32768,
    }))
    ckpt = to_ckpt(path, tmp_path / "ckpt", tp=2)
    ids = prompts(32768)[0]
    want_logits, want_tokens = hf_greedy(model, ids, NEW_TOKENS)
    outs, logits = llm_run(to_engine(ckpt), [ids], NEW_TOKENS)
    assert (logits[0] - want_logits).abs().max() < TOL
    assert outs[0] == want_tokens


# ---------------------------------------------------------------------------------------------
# FasterTransformer, both directions, through the CLI


def test_ft_out_and_back_is_lossless(tmp_path, hf_models):
    path, _, _ = hf_models(4, None)
    cli_main(["convert", "--model-dir", str(path), "--output-dir", str(tmp_path / "ft"), "--to", "ft",
              "--tp-size", "2", "--dtype", "float16"])
    ini = configparser.ConfigParser()
    ini.read(tmp_path / "ft" / "2-gpu" / "config.ini")
    assert ini["gpt"]["tensor_parallelism"] == "2" and ini["gpt"]["storage_dtype"] == "float16"
    for tp in (1, 2):
        direct = to_ckpt(path, tmp_path / f"direct{tp}", tp=tp, dtype="float16")
        cli_main(["convert", "--model-dir", str(tmp_path / "ft"), "--output-dir", str(tmp_path / f"via_ft{tp}"),
                  "--tp-size", str(tp)])  # dtype auto: the FT storage dtype
        assert_same_checkpoint(tmp_path / f"via_ft{tp}", direct, tp)
        a = json.loads((direct / "config.json").read_text())
        b = json.loads((tmp_path / f"via_ft{tp}" / "config.json").read_text())
        assert a == b


def test_ft_gqa_and_bias_round_trip(tmp_path):
    path, _, _ = hand_mpt(tmp_path, "gqa", kv=2, bias=True)
    cli_main(["convert", "--model-dir", str(path), "--output-dir", str(tmp_path / "ft"), "--to", "ft",
              "--tp-size", "2"])
    ini = configparser.ConfigParser()
    ini.read(tmp_path / "ft" / "2-gpu" / "config.ini")
    assert ini["gpt"]["n_kv_head"] == "2"
    for tp in (1, 2):
        direct = to_ckpt(path, tmp_path / f"direct{tp}", tp=tp)
        via = to_ckpt(tmp_path / "ft" / "2-gpu", tmp_path / f"via{tp}", tp=tp)
        assert_same_checkpoint(via, direct, tp)


def test_ft_refuses_lossy_unless_allowed(tmp_path, hf_models, capsys):
    path, _, _ = hf_models(4, 1.0)
    out = tmp_path / "ft"
    args = ["convert", "--model-dir", str(path), "--output-dir", str(out), "--to", "ft"]
    with pytest.raises(SystemExit) as exc:
        cli_main(args + ["--force"])  # --force only replaces an output directory
    assert exc.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "clip_qkv" in err and "--ft-allow-lossy" in err
    assert not out.exists()
    cli_main(args + ["--ft-allow-lossy"])
    assert (out / "1-gpu" / "config.ini").is_file()
    # back in, the clamp is gone: the FT model is a different model, as announced
    back = to_ckpt(out, tmp_path / "back")
    assert json.loads((back / "config.json").read_text())["clip_qkv"] is None


def test_ft_errors(tmp_path, capsys):
    path, _, _ = hand_mpt(tmp_path, "mqa", kv=1)
    with pytest.raises(SystemExit):
        cli_main(["convert", "--model-dir", str(path), "--output-dir", str(tmp_path / "a"), "--to", "ft",
                  "--tp-size", "2"])
    assert "kv_n_heads=1 is not divisible" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main(["convert", "--model-dir", str(path), "--output-dir", str(tmp_path / "b"), "--to", "ft",
                  "--pp-size", "2"])
    assert "pipeline" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# clear errors


@pytest.mark.parametrize("kv,tp", [(2, 4), (1, 2)])
def test_kv_heads_not_divisible_by_tp(tmp_path, kv, tp):
    path, _, _ = hand_mpt(tmp_path, "m", kv=kv)
    with pytest.raises(UserError, match=f"--tp-size {tp} does not divide the model's {kv} KV heads"):
        to_ckpt(path, tmp_path / "ckpt", tp=tp)


def test_heads_not_divisible_by_tp(tmp_path, hf_models):
    path, _, _ = hf_models(6, None)
    with pytest.raises(UserError, match="--tp-size 4 does not divide the model's 6 attention heads"):
        to_ckpt(path, tmp_path / "ckpt", tp=4)


@pytest.mark.parametrize("change,needle", [
    ({"attn": {"qk_ln": True}}, "qk_ln"),
    ({"attn": {"alibi": False}}, "alibi=false"),
    ({"attn": {"prefix_lm": True}}, "prefix_lm"),
    ({"norm_type": "rmsnorm"}, "norm_type"),
    ({"expansion_ratio": 2}, "expansion_ratio"),
    ({"ffn_config": {"ffn_type": "mptglu"}}, "ffn_type"),
])
def test_unsupported_settings_refused(tmp_path, change, needle):
    path, _, _ = hand_mpt(tmp_path, "m", kv=None, **change)
    with pytest.raises(UserError, match=needle):
        to_ckpt(path, tmp_path / "ckpt")
