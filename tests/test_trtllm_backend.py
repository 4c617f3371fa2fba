"""The tensorrt-llm backend up to TensorRT-LLM's API boundary.

TensorRT-LLM itself is never faked: these tests check what trtlm decides before calling it
(is this a TensorRT-LLM engine, what does its config say, is the architecture buildable, one
line when tensorrt_llm is missing) and that every tensorrt_llm name the module uses is listed in
docs/tensorrt-llm.md.  Building and running real engines needs a GPU with TensorRT-LLM.
"""
from __future__ import annotations

import ast
import importlib.util
import json
import re
from pathlib import Path

import pytest

from conftest import run_cli
from trtlm.errors import UserError
from trtlm.runtime import trtllm_backend as tb

REPO = Path(__file__).resolve().parent.parent
HAVE_TRTLLM = importlib.util.find_spec("tensorrt_llm") is not None


def trtllm_engine_dir(path: Path, world: int = 1, **build) -> Path:
    """An engine directory laid out as TensorRT-LLM's Engine.save writes it (config.json + rank{r}.engine);
    the .engine bytes are placeholders: nothing here deserializes them."""
    path.mkdir(parents=True)
    config = {"version": "0.17.0", "pretrained_config": {
        "architecture": "MistralForCausalLM", "dtype": "float16", "vocab_size": 1001, "hidden_size": 64,
        "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
        "mapping": {"world_size": world, "tp_size": world, "pp_size": 1}},
        "build_config": {"max_batch_size": 4, "max_input_len": 16, "max_seq_len": 32, **build}}
    (path / "config.json").write_text(json.dumps(config))
    for r in range(world):
        (path / f"rank{r}.engine").write_bytes(b"\0" * 16)
    return path


def test_is_trtllm_engine_tells_the_layouts_apart(tiny_mistral_dir, tmp_path):
    assert tb.is_trtllm_engine(trtllm_engine_dir(tmp_path / "trt"))
    assert not tb.is_trtllm_engine(tiny_mistral_dir)  # an HF directory
    res = run_cli("convert", "--model-dir", tiny_mistral_dir, "--output-dir", tmp_path / "ckpt")
    assert res.exit_code == 0, res.stderr
    assert not tb.is_trtllm_engine(tmp_path / "ckpt")  # a checkpoint (rank0.safetensors)
    res = run_cli("build", "--checkpoint-dir", tmp_path / "ckpt", "--output-dir", tmp_path / "engine")
    assert res.exit_code == 0, res.stderr
    assert not tb.is_trtllm_engine(tmp_path / "engine")  # a trtlm torch engine
    broken = trtllm_engine_dir(tmp_path / "broken")
    (broken / "config.json").write_text("{not json")
    assert not tb.is_trtllm_engine(broken)


def test_engine_info_reads_config_json(tmp_path):
    info = tb.engine_info(trtllm_engine_dir(tmp_path / "e", world=2, gather_context_logits=True))
    assert (info.architecture, info.world_size, info.max_input_len, info.max_seq_len, info.vocab_size) == (
        "MistralForCausalLM", 2, 16, 32, 1001)
    assert info.gather_context_logits
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{}")
    with pytest.raises(UserError, match="not a TensorRT-LLM engine config"):
        tb.engine_info(tmp_path / "bad")


def test_run_checks_before_needing_tensorrt_llm(tmp_path):
    engine = trtllm_engine_dir(tmp_path / "e")
    with pytest.raises(UserError, match=r"prompt 0 has 17 tokens; .* max_input_len=16"):
        tb.run_trtllm_engine(engine, [list(range(17))], max_new_tokens=2)
    with pytest.raises(UserError, match="built without gather_context_logits"):
        tb.run_trtllm_engine(engine, [[1, 2]], max_new_tokens=2, context_logits=True)


@pytest.mark.skipif(HAVE_TRTLLM, reason="checks the message shown where tensorrt_llm is not installed")
def test_without_tensorrt_llm_run_and_build_are_one_line(tmp_path, tiny_mistral_dir):
    engine = trtllm_engine_dir(tmp_path / "e")
    with pytest.raises(UserError) as err:
        tb.run_trtllm_engine(engine, [[1, 2, 3]], max_new_tokens=2)
    assert "needs tensorrt_llm" in str(err.value) and str(engine) in str(err.value) and "\n" not in str(err.value)
    res = run_cli("convert", "--model-dir", tiny_mistral_dir, "--output-dir", tmp_path / "ckpt")
    assert res.exit_code == 0, res.stderr
    res = run_cli("build", "--checkpoint-dir", tmp_path / "ckpt", "--output-dir", tmp_path / "out",
                  "--backend", "tensorrt-llm")
    assert res.exit_code == 1 and len(res.stderr_lines) == 1
    assert res.stderr_lines[0].startswith("error: TensorRT-LLM is not installed")
    assert not (tmp_path / "out").exists()


def test_unknown_architecture_is_one_line_naming_it():
    tb.check_architecture("MistralForCausalLM", {"MistralForCausalLM", "LlamaForCausalLM"}, "ckpt/config.json")
    with pytest.raises(UserError) as err:
        tb.check_architecture("MistralXForCausalLM", {"MistralForCausalLM", "LlamaForCausalLM"}, "ckpt/config.json",
                              "0.17.0")
    msg = str(err.value)
    assert msg.startswith("ckpt/config.json: TensorRT-LLM 0.17.0 has no model class for architecture "
                          "'MistralXForCausalLM'") and "MistralForCausalLM" in msg and "--backend torch" in msg


def test_every_tensorrt_llm_name_is_listed_in_the_docs():
    source = (REPO / "core/src/trtlm/runtime/trtllm_backend.py").read_text()
    tree = ast.parse(source)
    used = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tensorrt_llm"):
            used |= {f"{node.module}.{a.name}" for a in node.names}
    used |= {f"tensorrt_llm.{m}" for m in re.findall(r"\btrtllm\.(\w+)", source)}
    assert {"tensorrt_llm.builder.BuildConfig", "tensorrt_llm.builder.build",
            "tensorrt_llm.runtime.ModelRunnerCpp"} <= used
    doc = (REPO / "docs" / "tensorrt-llm.md").read_text()
    missing = sorted(name for name in used if f"`{name}`" not in doc)
    assert not missing, f"docs/tensorrt-llm.md does not list {missing}"
    assert "from tensorrt_llm import BuildConfig" not in source  # the package root stopped re-exporting it


def test_generate_text_tokenizes_with_the_engines_tokenizer(tmp_path, tiny_tokenizer_dir):
    # trtlm build copies the tokenizer into the engine directory; text prompts are encoded with it
    # before TensorRT-LLM is needed, so a prompt longer than max_input_len=16 is refused in one line.
    import shutil

    from trtlm.runtime.tokenizer import load_tokenizer, tokenizer_files

    engine = trtllm_engine_dir(tmp_path / "e")
    for path in tokenizer_files(tiny_tokenizer_dir):
        shutil.copy2(path, engine / path.name)
    prompt = "The quick brown fox jumps over the lazy dog. " * 3
    n = len(load_tokenizer(tiny_tokenizer_dir).encode(prompt))
    assert n > 16
    with pytest.raises(UserError, match=rf"prompt 0 has {n} tokens"):
        tb.generate_text(engine, [prompt], max_new_tokens=4)


def test_inspect_names_the_backend_of_a_tensorrt_llm_engine(tmp_path):
    engine = trtllm_engine_dir(tmp_path / "e", world=2)
    res = run_cli("inspect", engine, "--json")
    assert res.exit_code == 0, res.stderr
    info = json.loads(res.stdout)
    assert info["format"] == "engine" and info["backend"] == "tensorrt-llm"
    assert info["rank_files"] == ["rank0.engine", "rank1.engine"] and info["family"] == "mistral"
