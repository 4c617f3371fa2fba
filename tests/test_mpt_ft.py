"""MPT FasterTransformer writer/reader (trtlm_mpt.ft) and ALiBi slopes (trtlm.runtime.alibi)."""
from __future__ import annotations

import configparser
import json
import logging
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from trtlm.runtime.alibi import alibi_bias, alibi_slopes, alibi_slopes_for_rank
from trtlm_mpt.ft import (
    FTSource,
    FTUnsupported,
    ft_hf_config,
    ft_unsupported_settings,
    is_ft_dir,
    write_ft,
)

transformers = pytest.importorskip("transformers")
from transformers import MptConfig, MptForCausalLM  # noqa: E402
from transformers.models.mpt.modeling_mpt import build_mpt_alibi_tensor  # noqa: E402

D, H, L, V = 32, 4, 2, 50
HD = D // H
I = 4 * D

_ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


class SafetensorsSource:
    """Minimal lazy TensorSource over one .safetensors file."""

    def __init__(self, path: Path):
        self._f = safe_open(str(path), framework="pt")

    def keys(self):
        return list(self._f.keys())

    def shape(self, name):
        return tuple(self._f.get_slice(name).get_shape())

    def dtype(self, name):
        return _ST_DTYPES[self._f.get_slice(name).get_dtype()]

    def get(self, name):
        return self._f.get_tensor(name)


class DictSource:
    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.t = tensors

    def keys(self):
        return list(self.t)

    def shape(self, name):
        return tuple(self.t[name].shape)

    def dtype(self, name):
        return self.t[name].dtype

    def get(self, name):
        return self.t[name].clone()


def make_hf(tmp_path: Path, dtype=torch.float32, **cfg_kw):
    torch.manual_seed(0)
    cfg = MptConfig(d_model=D, n_heads=H, n_layers=L, max_seq_len=64, vocab_size=V,
                    bos_token_id=1, eos_token_id=2, **cfg_kw)
    model = MptForCausalLM(cfg).to(dtype).eval()
    with torch.no_grad():  # LayerNorm weights are ones at init: make them distinctive
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.randn_like(p))
    out = tmp_path / "hf"
    model.save_pretrained(out, safe_serialization=True)
    config = json.loads((out / "config.json").read_text())
    return model, SafetensorsSource(out / "model.safetensors"), config


def hand_model(kv_heads: int, bias: bool = False, dtype=torch.float32):
    """MPT tensors built by hand (transformers' MPT has neither MQA/GQA nor biases)."""
    g = torch.Generator().manual_seed(1)

    def r(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    t = {"transformer.wte.weight": r(V, D)}
    for i in range(L):
        p = f"transformer.blocks.{i}."
        t[p + "norm_1.weight"] = r(D)
        t[p + "attn.Wqkv.weight"] = r(D + 2 * kv_heads * HD, D)
        t[p + "attn.out_proj.weight"] = r(D, D)
        t[p + "norm_2.weight"] = r(D)
        t[p + "ffn.up_proj.weight"] = r(I, D)
        t[p + "ffn.down_proj.weight"] = r(D, I)
        if bias:
            t[p + "norm_1.bias"] = r(D)
            t[p + "attn.Wqkv.bias"] = r(D + 2 * kv_heads * HD)
            t[p + "attn.out_proj.bias"] = r(D)
            t[p + "norm_2.bias"] = r(D)
            t[p + "ffn.up_proj.bias"] = r(I)
            t[p + "ffn.down_proj.bias"] = r(D)
    t["transformer.norm_f.weight"] = r(D)
    if bias:
        t["transformer.norm_f.bias"] = r(D)
    attn = {"alibi": True, "alibi_bias_max": 8, "clip_qkv": None, "qk_ln": False}
    if kv_heads == 1:
        attn.update(attn_type="multiquery_attention", kv_n_heads=1)
    elif kv_heads != H:
        attn.update(attn_type="grouped_query_attention", kv_n_heads=kv_heads)
    config = {"architectures": ["MptForCausalLM"], "model_type": "mpt", "d_model": D, "n_heads": H,
              "n_layers": L, "expansion_ratio": 4, "max_seq_len": 64, "vocab_size": V,
              "no_bias": not bias, "attn_config": attn, "layer_norm_epsilon": 1e-5,
              "bos_token_id": 0, "eos_token_id": 0}
    return DictSource(t), config


def assert_same(src, ft: FTSource):
    assert set(ft.keys()) == set(src.keys())
    for name in src.keys():
        a, b = src.get(name), ft.get(name)
        assert ft.shape(name) == tuple(a.shape), name
        assert ft.dtype(name) == a.dtype and b.dtype == a.dtype, name
        assert b.shape == a.shape and b.is_contiguous(), name
        assert torch.equal(a, b), name


def read_bin(path: Path, dtype=np.float32, shape=None):
    arr = np.fromfile(path, dtype=dtype)
    return torch.from_numpy(arr.reshape(shape) if shape else arr)


# ---------------------------------------------------------------------------
# round trips


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_roundtrip_exact(tmp_path, tp, dtype):
    _, src, cfg = make_hf(tmp_path, dtype)
    out = write_ft(src, cfg, tmp_path / "ft", tp, dtype)
    assert out == tmp_path / "ft" / f"{tp}-gpu"
    assert is_ft_dir(out) and is_ft_dir(tmp_path / "ft")
    assert_same(src, FTSource(out))
    assert_same(src, FTSource(tmp_path / "ft"))  # parent with exactly one *-gpu child


def test_roundtrip_bfloat16_and_cast(tmp_path):
    _, src, cfg = make_hf(tmp_path, torch.float32)
    out = write_ft(src, cfg, tmp_path / "bf", 2, torch.bfloat16)
    ft = FTSource(out)
    for name in src.keys():
        assert torch.equal(ft.get(name), src.get(name).to(torch.bfloat16)), name
    out16 = write_ft(src, cfg, tmp_path / "h", 2, "float16")
    ft16 = FTSource(out16)
    assert ft16.dtype("transformer.wte.weight") == torch.float16
    for name in src.keys():
        assert torch.equal(ft16.get(name), src.get(name).half()), name


def test_ft_model_matches_hf_logits(tmp_path):
    model, src, cfg = make_hf(tmp_path)
    out = write_ft(src, cfg, tmp_path / "ft", 2, torch.float32)
    ft = FTSource(out)
    hf_cfg = ft_hf_config(out)
    re_model = MptForCausalLM(MptConfig.from_dict(hf_cfg)).eval()
    state = {k: ft.get(k) for k in ft.keys()}
    missing, unexpected = re_model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    re_model.tie_weights()
    ids = torch.tensor([[3, 7, 11, 5, 9]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, re_model(ids).logits)


# ---------------------------------------------------------------------------
# config.ini and file layout


def test_config_ini(tmp_path):
    _, src, cfg = make_hf(tmp_path)
    out = write_ft(src, cfg, tmp_path / "ft", 2, torch.float16)
    ini = configparser.ConfigParser()
    ini.read(out / "config.ini")
    assert ini.sections() == ["gpt"]
    assert list(ini["gpt"].items()) == [
        ("model_name", "mpt"),
        ("n_head", "4"),
        ("n_embd", "32"),
        ("n_inner", "128"),
        ("n_positions", "64"),
        ("n_layer", "2"),
        ("vocab_size", "50"),
        ("bos_token_id", "1"),
        ("eos_token_id", "2"),
        ("storage_dtype", "float16"),
        ("tensor_parallelism", "2"),
        ("activation_function", "gelu"),
        ("calibrate_kv_cache", "False"),
        ("smoothquant", "None"),
        ("layer_norm_epsilon", "1e-05"),
        ("position_embedding_type", "alibi"),
        ("bias", "False"),
    ]
    hf = ft_hf_config(tmp_path / "ft")
    assert hf["architectures"] == ["MptForCausalLM"] and hf["model_type"] == "mpt"
    assert (hf["d_model"], hf["n_heads"], hf["n_layers"], hf["expansion_ratio"]) == (32, 4, 2, 4)
    assert (hf["max_seq_len"], hf["vocab_size"], hf["no_bias"]) == (64, 50, True)
    assert hf["attn_config"]["alibi"] is True and hf["attn_config"]["alibi_bias_max"] == 8
    assert hf["attn_config"]["clip_qkv"] is None and "kv_n_heads" not in hf["attn_config"]
    assert hf["attn_config"]["attn_type"] == "multihead_attention"
    assert (hf["bos_token_id"], hf["eos_token_id"], hf["torch_dtype"]) == (1, 2, "float16")
    assert hf["layer_norm_epsilon"] == 1e-5 and hf["tie_word_embeddings"] is True


def test_missing_ids_use_overrides(tmp_path):
    src, cfg = hand_model(H)
    del cfg["bos_token_id"], cfg["eos_token_id"]
    out = write_ft(src, cfg, tmp_path / "a", 1, torch.float32, bos_token_id=0, eos_token_id=0)
    ini = configparser.ConfigParser()
    ini.read(out / "config.ini")
    assert ini["gpt"]["bos_token_id"] == "0" and ini["gpt"]["eos_token_id"] == "0"


def test_file_names_and_layout_by_hand(tmp_path):
    _, src, cfg = make_hf(tmp_path)
    tp = 2
    out = write_ft(src, cfg, tmp_path / "ft", tp, torch.float32)
    names = {p.name for p in out.iterdir()}
    expected = {"config.ini", "model.wte.bin", "model.final_layernorm.weight.bin",
                "model.final_layernorm.bias.bin"}
    for i in range(L):
        for n in ("input_layernorm", "post_attention_layernorm"):
            expected |= {f"model.layers.{i}.{n}.weight.bin", f"model.layers.{i}.{n}.bias.bin"}
        for n in ("attention.query_key_value.weight", "attention.dense.weight",
                  "mlp.dense_h_to_4h.weight", "mlp.dense_4h_to_h.weight"):
            expected |= {f"model.layers.{i}.{n}.{r}.bin" for r in range(tp)}
    assert names == expected

    # qkv rank 1, computed independently: Wqkv rows are [q(H*HD); k(H*HD); v(H*HD)];
    # rank 1 holds heads 2,3 of each, transposed to [in, out] and laid out [D, 3, D/2].
    w = src.get("transformer.blocks.1.attn.Wqkv.weight")  # [3D, D]
    per = w.reshape(3, H, HD, D)[:, 2:4]  # [3, 2 heads, HD, D]
    want = per.reshape(3, D // 2, D).permute(2, 0, 1).contiguous()  # [D(in), 3, D/2]
    got = read_bin(out / "model.layers.1.attention.query_key_value.weight.1.bin", shape=(D, 3, D // 2))
    assert torch.equal(got, want)
    # element spot check: file[in=5, qkv=2 (v), col=3] == Wqkv[2*D + D/2 + 3, 5]
    assert got[5, 2, 3] == w[2 * D + D // 2 + 3, 5]

    wo = src.get("transformer.blocks.0.attn.out_proj.weight")  # [out, in]
    got = read_bin(out / "model.layers.0.attention.dense.weight.1.bin", shape=(D // 2, D))
    assert torch.equal(got, wo[:, D // 2:].T)  # rows = input features 16..31
    wu = src.get("transformer.blocks.0.ffn.up_proj.weight")  # [I, D]
    got = read_bin(out / "model.layers.0.mlp.dense_h_to_4h.weight.1.bin", shape=(D, I // 2))
    assert torch.equal(got, wu[I // 2:, :].T)
    wd = src.get("transformer.blocks.0.ffn.down_proj.weight")  # [D, I]
    got = read_bin(out / "model.layers.0.mlp.dense_4h_to_h.weight.0.bin", shape=(I // 2, D))
    assert torch.equal(got, wd[:, :I // 2].T)
    assert torch.equal(read_bin(out / "model.wte.bin", shape=(V, D)), src.get("transformer.wte.weight"))
    assert torch.equal(read_bin(out / "model.layers.1.input_layernorm.weight.bin"),
                       src.get("transformer.blocks.1.norm_1.weight"))
    for f in ("model.layers.0.input_layernorm.bias.bin", "model.final_layernorm.bias.bin"):
        assert torch.equal(read_bin(out / f), torch.zeros(D))


def test_rewrite_removes_stale_files(tmp_path):
    src, cfg = hand_model(H, bias=True)
    write_ft(src, cfg, tmp_path / "ft", 2, torch.float32)
    assert (tmp_path / "ft/2-gpu/model.layers.0.attention.dense.bias.bin").exists()
    src2, cfg2 = hand_model(H, bias=False)
    out = write_ft(src2, cfg2, tmp_path / "ft", 2, torch.float32)
    assert not (out / "model.layers.0.attention.dense.bias.bin").exists()
    assert_same(src2, FTSource(out))


# ---------------------------------------------------------------------------
# MQA / GQA and biases


def test_transformers_mpt_has_no_kv_heads():
    """transformers 5.x MPT ignores kv_n_heads: its Wqkv is always [3D, D] (hence hand-built tensors)."""
    cfg = MptConfig(d_model=D, n_heads=H, n_layers=1, attn_config={"kv_n_heads": 1})
    assert MptForCausalLM(cfg).transformer.blocks[0].attn.Wqkv.weight.shape == (3 * D, D)


@pytest.mark.parametrize("kv,tp", [(1, 1), (2, 1), (2, 2)])
def test_mqa_gqa_roundtrip_and_layout(tmp_path, kv, tp):
    src, cfg = hand_model(kv)
    out = write_ft(src, cfg, tmp_path / "ft", tp, torch.float32)
    ini = configparser.ConfigParser()
    ini.read(out / "config.ini")
    assert ini["gpt"]["n_kv_head"] == str(kv)
    assert_same(src, FTSource(out))
    hf = ft_hf_config(out)
    assert hf["attn_config"]["kv_n_heads"] == kv
    assert hf["attn_config"]["attn_type"] == ("multiquery_attention" if kv == 1 else "grouped_query_attention")

    # rank files: cat(q_r, k_r, v_r) of the transposed Wqkv, each split by heads
    w = src.get("transformer.blocks.0.attn.Wqkv.weight")
    q, k, v = w[:D], w[D:D + kv * HD], w[D + kv * HD:]
    for r in range(tp):
        qh, kh = D // tp, kv * HD // tp
        want = torch.cat([q[r * qh:(r + 1) * qh], k[r * kh:(r + 1) * kh], v[r * kh:(r + 1) * kh]]).T
        got = read_bin(out / f"model.layers.0.attention.query_key_value.weight.{r}.bin",
                       shape=(D, qh + 2 * kh))
        assert torch.equal(got, want)


@pytest.mark.parametrize("kv,tp", [(1, 2), (2, 4)])
def test_kv_heads_not_divisible_by_tp(tmp_path, kv, tp):
    src, cfg = hand_model(kv)
    with pytest.raises(ValueError, match="kv_n_heads"):
        write_ft(src, cfg, tmp_path / "ft", tp, torch.float32)
    assert not (tmp_path / "ft").exists()


def test_kv_config_must_match_shapes(tmp_path):
    src, cfg = hand_model(2)
    cfg["attn_config"]["kv_n_heads"] = 1
    with pytest.raises(ValueError, match="KV heads"):
        write_ft(src, cfg, tmp_path / "ft", 1, torch.float32)


def test_heads_not_divisible_by_tp(tmp_path):
    src, cfg = hand_model(H)
    with pytest.raises(ValueError, match="n_heads=4 is not divisible"):
        write_ft(src, cfg, tmp_path / "ft", 3, torch.float32)


def test_mqa_replicated_kv_layout_is_read(tmp_path):
    """GPT-style MQA files (K/V replicated on every rank) read back to the same Wqkv."""
    src, cfg = hand_model(1)
    out = write_ft(src, cfg, tmp_path / "one", 1, torch.float32)
    two = tmp_path / "two" / "2-gpu"
    two.mkdir(parents=True)
    for f in out.iterdir():
        if ".0.bin" not in f.name and f.name != "config.ini":
            shutil.copy(f, two / f.name)
    text = (out / "config.ini").read_text().replace("tensor_parallelism = 1", "tensor_parallelism = 2")
    (two / "config.ini").write_text(text)
    for i in range(L):
        w = src.get(f"transformer.blocks.{i}.attn.Wqkv.weight").T  # [D, D + 2*HD]
        q, kv = w[:, :D], w[:, D:]
        for r in range(2):
            part = torch.cat([q[:, r * D // 2:(r + 1) * D // 2], kv], dim=1).contiguous()
            part.numpy().tofile(two / f"model.layers.{i}.attention.query_key_value.weight.{r}.bin")
        for n, axis in (("attention.dense.weight", 0), ("mlp.dense_h_to_4h.weight", 1),
                        ("mlp.dense_4h_to_h.weight", 0)):
            full = np.fromfile(out / f"model.layers.{i}.{n}.0.bin", dtype=np.float32)
            full = full.reshape((D, D) if "dense.weight" in n and "4h" not in n else
                                (D, I) if "h_to_4h" in n else (I, D))
            for r, piece in enumerate(np.split(full, 2, axis=axis)):
                np.ascontiguousarray(piece).tofile(two / f"model.layers.{i}.{n}.{r}.bin")
    assert_same(src, FTSource(two))


@pytest.mark.parametrize("kv", [H, 2])
def test_bias_roundtrip(tmp_path, kv):
    src, cfg = hand_model(kv, bias=True)
    out = write_ft(src, cfg, tmp_path / "ft", 2, torch.float32)
    ini = configparser.ConfigParser()
    ini.read(out / "config.ini")
    assert "bias" not in ini["gpt"]  # readers default bias to True
    assert (out / "model.layers.0.attention.query_key_value.bias.1.bin").exists()
    assert (out / "model.layers.0.attention.dense.bias.bin").exists()
    assert (out / "model.layers.0.mlp.dense_h_to_4h.bias.1.bin").exists()
    assert (out / "model.layers.0.mlp.dense_4h_to_h.bias.bin").exists()
    assert_same(src, FTSource(out))
    assert ft_hf_config(out)["no_bias"] is False
    if kv == H:  # MHA qkv bias per rank is [3, D/tp]
        b = src.get("transformer.blocks.0.attn.Wqkv.bias").reshape(3, D)
        assert torch.equal(read_bin(out / "model.layers.0.attention.query_key_value.bias.1.bin"),
                           b[:, D // 2:].reshape(-1))


def test_no_bias_false_without_bias_tensors(tmp_path):
    """transformers' MPT never has biases, whatever no_bias says: written as bias = False."""
    _, src, cfg = make_hf(tmp_path, no_bias=False)
    out = write_ft(src, cfg, tmp_path / "ft", 1, torch.float32)
    ini = configparser.ConfigParser()
    ini.read(out / "config.ini")
    assert ini["gpt"]["bias"] == "False"
    assert_same(src, FTSource(out))


# ---------------------------------------------------------------------------
# unsupported settings


@pytest.mark.parametrize("attn_kw,needle", [
    ({"clip_qkv": 6.0}, "clip_qkv"),
    ({"qk_ln": True}, "qk_ln"),
    ({"alibi_bias_max": 16}, "alibi_bias_max"),
    ({"softmax_scale": 0.1}, "softmax_scale"),
])
def test_unsupported_refused_unless_forced(tmp_path, caplog, attn_kw, needle):
    src, cfg = hand_model(H)
    cfg["attn_config"].update(attn_kw)
    assert any(needle in p for p in ft_unsupported_settings(cfg))
    with pytest.raises(FTUnsupported, match=needle):
        write_ft(src, cfg, tmp_path / "ft", 2, torch.float32)
    assert not (tmp_path / "ft").exists()
    with caplog.at_level(logging.WARNING, logger="trtlm_mpt.ft"):
        out = write_ft(src, cfg, tmp_path / "ft", 2, torch.float32, force=True)
    assert any(needle in rec.getMessage() for rec in caplog.records)
    assert_same(src, FTSource(out))


def test_clip_qkv_from_transformers_config(tmp_path):
    _, src, cfg = make_hf(tmp_path, attn_config={"clip_qkv": 8.0})
    with pytest.raises(FTUnsupported, match="clip_qkv"):
        write_ft(src, cfg, tmp_path / "ft", 1, torch.float32)
    write_ft(src, cfg, tmp_path / "ft", 1, torch.float32, force=True)
    assert ft_hf_config(tmp_path / "ft")["attn_config"]["clip_qkv"] is None


def test_default_transformers_config_is_supported(tmp_path):
    _, src, cfg = make_hf(tmp_path)
    assert ft_unsupported_settings(cfg, src) == []


# ---------------------------------------------------------------------------
# broken directories


def test_missing_and_truncated_bin(tmp_path):
    src, cfg = hand_model(H)
    out = write_ft(src, cfg, tmp_path / "ft", 2, torch.float16)
    victim = out / "model.layers.1.mlp.dense_4h_to_h.weight.1.bin"
    data = victim.read_bytes()

    victim.unlink()
    with pytest.raises(ValueError, match=r"missing model\.layers\.1\.mlp\.dense_4h_to_h\.weight\.1\.bin"):
        FTSource(out)
    lazy = FTSource(out, validate=False)
    assert torch.equal(lazy.get("transformer.wte.weight"), src.get("transformer.wte.weight").half())
    with pytest.raises(ValueError, match=r"dense_4h_to_h\.weight\.1\.bin"):
        lazy.get("transformer.blocks.1.ffn.down_proj.weight")

    victim.write_bytes(data[:-2])
    expected_bytes = (I // 2) * D * 2
    with pytest.raises(ValueError, match=rf"dense_4h_to_h\.weight\.1\.bin is {expected_bytes - 2} bytes, expected {expected_bytes}"):
        FTSource(out)

    qkv = out / "model.layers.0.attention.query_key_value.weight.0.bin"
    qkv.write_bytes(qkv.read_bytes()[:100])
    victim.write_bytes(data)
    with pytest.raises(ValueError, match=r"query_key_value\.weight\.0\.bin is 100 bytes"):
        FTSource(out)


def test_dir_resolution(tmp_path):
    src, cfg = hand_model(H)
    write_ft(src, cfg, tmp_path / "ft", 1, torch.float32)
    write_ft(src, cfg, tmp_path / "ft", 2, torch.float32)
    with pytest.raises(ValueError, match="several FT directories"):
        FTSource(tmp_path / "ft")
    assert not is_ft_dir(tmp_path / "ft")
    assert is_ft_dir(tmp_path / "ft" / "1-gpu")
    assert not is_ft_dir(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="not an FT directory"):
        FTSource(tmp_path)
    assert FTSource(tmp_path / "ft" / "2-gpu").tp == 2


# ---------------------------------------------------------------------------
# ALiBi


def hf_slopes(n: int) -> torch.Tensor:
    # build_mpt_alibi_tensor returns slopes * arange(1 - S, 1); with S = 2 column 0 is -slope.
    return -build_mpt_alibi_tensor(n, 2)[:, 0, 0]


@pytest.mark.parametrize("n", range(1, 65))
def test_alibi_slopes_equal_transformers(n):
    s = alibi_slopes(n)
    assert s.dtype == torch.float32 and s.shape == (n,)
    assert torch.equal(s, hf_slopes(n))
    assert torch.equal(alibi_slopes(n, 8), s)


SLOPES_6 = [0.25, 0.0625, 0.015625, 0.00390625, 0.5, 0.125]
SLOPES_12 = [0.5, 0.25, 0.125, 0.0625, 0.03125, 0.015625, 0.0078125, 0.00390625,
             0.7071067811865476, 0.3535533905932738, 0.1767766952966369, 0.08838834764831845]
SLOPES_32 = [
    0.8408964152537145, 0.7071067811865476, 0.5946035575013605, 0.5,
    0.42044820762685725, 0.3535533905932738, 0.29730177875068026, 0.25,
    0.21022410381342863, 0.1767766952966369, 0.14865088937534013, 0.125,
    0.10511205190671431, 0.08838834764831845, 0.07432544468767006, 0.0625,
    0.052556025953357156, 0.04419417382415922, 0.03716272234383503, 0.03125,
    0.026278012976678578, 0.02209708691207961, 0.018581361171917516, 0.015625,
    0.013139006488339289, 0.011048543456039806, 0.009290680585958758, 0.0078125,
    0.0065695032441696445, 0.005524271728019903, 0.004645340292979379, 0.00390625,
]


@pytest.mark.parametrize("n,table", [(6, SLOPES_6), (12, SLOPES_12), (32, SLOPES_32)])
def test_alibi_slopes_hand_table(n, table):
    s = alibi_slopes(n).double()
    torch.testing.assert_close(s, torch.tensor(table, dtype=torch.float64), rtol=1e-7, atol=0)
    # exact powers of two must be exact
    for got, want in zip(s.tolist(), table):
        if math.log2(want).is_integer():
            assert got == want


def test_alibi_bias_max_honoured_and_rank_slices():
    # max 16 with 8 heads: base = (h+1)*2 -> 2^-2 .. 2^-16
    assert alibi_slopes(8, 16).tolist() == [2.0 ** -(2 * (h + 1)) for h in range(8)]
    s = alibi_slopes(12)
    assert torch.equal(torch.cat([alibi_slopes_for_rank(12, 4, r) for r in range(4)]), s)
    with pytest.raises(ValueError):
        alibi_slopes_for_rank(12, 5, 0)
    with pytest.raises(ValueError):
        alibi_slopes(0)


def test_alibi_bias_softmax_matches_transformers():
    n, S = 6, 7
    s = alibi_slopes(n)
    bias = alibi_bias(s, torch.arange(S), torch.arange(S))
    assert bias.shape == (n, S, S)
    assert bias[2, 5, 3] == -2 * s[2] and bias[0, 4, 4] == 0
    hf = build_mpt_alibi_tensor(n, S)  # [n, 1, S]
    causal = torch.ones(S, S, dtype=torch.bool).tril()
    scores = torch.randn(n, S, S)
    p_ours = torch.softmax((scores + bias).masked_fill(~causal, float("-inf")), -1)
    p_hf = torch.softmax((scores + hf).masked_fill(~causal, float("-inf")), -1)
    torch.testing.assert_close(p_ours, p_hf, rtol=1e-5, atol=1e-6)
    # decode step: one query at position S-1 against keys 0..S-1 equals the last row
    step = alibi_bias(s, torch.tensor([S - 1]), torch.arange(S))
    assert torch.equal(step[:, 0], bias[:, S - 1])
