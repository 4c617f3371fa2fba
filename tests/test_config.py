"""trtlm.config.CheckpointConfig: a checkpoint config parsed once, and trtlm.dtypes, the one dtype table."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import run_cli
from trtlm import dtypes
from trtlm.config import CheckpointConfig, MoeConfig, QuantConfig
from trtlm.errors import UserError
from trtlm.mapping import Mapping

FIXTURES = sorted((Path(__file__).parent / "fixtures" / "modelopt" / "trtllm").glob("*/config.json"))


@pytest.mark.parametrize("path", FIXTURES, ids=lambda p: p.parent.name)
def test_modelopt_configs_round_trip_and_parse(path):
    # Configs NVIDIA Model Optimizer wrote: every key survives, the typed fields match the dict.
    raw = json.loads(path.read_text())
    cfg = CheckpointConfig.from_dict(raw, where=str(path))
    assert cfg.to_dict() == raw
    assert cfg.architecture == raw["architecture"]
    assert cfg.num_key_value_heads == raw["num_key_value_heads"]
    assert cfg.mapping == Mapping(raw["mapping"]["tp_size"], raw["mapping"]["pp_size"])
    assert cfg.quantization.quant_algo == raw["quantization"]["quant_algo"]
    assert cfg.quantization.kv_cache_quant_algo == raw["quantization"]["kv_cache_quant_algo"]
    assert cfg.dtype == raw["dtype"]


def test_converted_checkpoint_round_trips_with_sliding_window(tiny_mistral_dir, tmp_path):
    res = run_cli("convert", "--model-dir", tiny_mistral_dir, "--output-dir", tmp_path / "c", "--tp-size", "2")
    assert res.exit_code == 0, res.stderr
    raw = json.loads((tmp_path / "c" / "config.json").read_text())
    cfg = CheckpointConfig.from_dict(raw)
    assert cfg.to_dict() == raw
    assert cfg.sliding_window == 8  # runtime_defaults.max_attention_window of the tiny Mistral
    assert (cfg.head_size, cfg.num_key_value_heads, cfg.mapping.tp_size, cfg.kv_heads_per_rank) == (16, 2, 2, 1)
    assert cfg.quantization == QuantConfig() and not cfg.quantization.quantized
    changed = cfg.replace(sliding_window=None, dtype="bfloat16").to_dict()
    assert "max_attention_window" not in changed["runtime_defaults"] and changed["dtype"] == "bfloat16"


def test_defaults_and_engine_unwrapping():
    minimal = {"architecture": "LlamaForCausalLM", "vocab_size": 10, "hidden_size": 64, "num_hidden_layers": 2,
               "num_attention_heads": 4}
    cfg = CheckpointConfig.from_dict({"pretrained_config": minimal, "build_config": {}})
    assert (cfg.num_key_value_heads, cfg.head_size, cfg.mapping.world_size, cfg.moe) == (4, 16, 1, None)
    moe = CheckpointConfig.from_dict(dict(minimal, moe={"num_experts": 8, "top_k": 2, "normalization_mode": 1},
                                          mapping={"tp_size": 2, "pp_size": 1, "moe_ep_size": 2, "moe_tp_size": 1}))
    assert moe.moe == MoeConfig(8, 2, 1) and moe.mapping.moe_ep_size == 2
    assert moe.to_dict()["mapping"] == {"world_size": 2, "tp_size": 2, "pp_size": 1, "moe_tp_size": 1, "moe_ep_size": 2}


@pytest.mark.parametrize("edit,needle", [
    (lambda d: d.pop("num_attention_heads"), "no 'num_attention_heads'"),
    (lambda d: d.update(vocab_size="lots"), "vocab_size is 'lots', not an integer"),
    (lambda d: d.update(dtype="float7"), "dtype 'float7' is not one of"),
])
def test_bad_config_is_one_line_naming_the_key(edit, needle):
    raw = json.loads(FIXTURES[0].read_text())
    edit(raw)
    with pytest.raises(UserError) as err:
        CheckpointConfig.from_dict(raw, where="ckpt/config.json")
    assert needle in str(err.value) and str(err.value).startswith("ckpt/config.json: ") and "\n" not in str(err.value)


def test_dtype_table_is_torch_free_and_matches_torch():
    code = ("import sys\nfrom trtlm import config, dtypes\n"
            "assert dtypes.get('bf16').st == 'BF16' and dtypes.get('F8_E4M3').name == 'float8_e4m3fn'\n"
            "assert 'torch' not in sys.modules\n")
    subprocess.run([sys.executable, "-c", code], check=True)
    import torch

    for entry in dtypes.DTYPES.values():
        t = dtypes.torch_dtype(entry)
        assert t.itemsize == entry.itemsize and dtypes.get(t) is entry
        assert entry.is_float == t.is_floating_point
    assert dtypes.lookup("torch.float16") is dtypes.get("half") is dtypes.get("F16")
    assert dtypes.lookup("complex32") is None
    # The exponent masks flag exactly NaN/Inf: checked on every bf16 bit pattern.
    bits = torch.arange(0, 1 << 16, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    exponent, magnitude = dtypes.get("bfloat16").float_bits
    flagged = (torch.arange(0, 1 << 16) & magnitude) >= exponent
    assert torch.equal(flagged, ~torch.isfinite(bits.float()))
