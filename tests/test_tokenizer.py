"""Tokenizer loading with Mistral's real tokenizers.

mistral-common ships Mistral's tokenizer files in its ``data`` directory under
release names (``tokenizer.model.v1``, ``mistral_instruct_tokenizer_240323.model.v3``,
``tekken_240718.json``...); hub checkpoints use others (``tokenizer.model``,
``tokenizer.model.v3``, ``tekken.json``).  ``load_tokenizer`` must find them in a
directory under any of these names, keep the name (mistral-common reads the
tokenizer version from it) and carry them from a model to its checkpoint and
engine.  SentencePiece ids are checked against the sentencepiece library itself.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import run_cli

from trtlm.errors import UserError
from trtlm.runtime.tokenizer import HFTokenizer, MistralCommonTokenizer, load_tokenizer, mistral_tokenizer_files

mistral_common = pytest.importorskip("mistral_common")
DATA = Path(mistral_common.__file__).parent / "data"

TEXTS = ["Hello, world!", "café → λ: unicode, and  two  spaces\nand a newline", "def f(x):\n\treturn x ** 2"]
SPM_FILES = ["tokenizer.model.v1", "mistral_instruct_tokenizer_240323.model.v3",
             "mistral_instruct_tokenizer_241114.model.v7"]
TEKKEN_FILE = "tekken_240718.json"


def shipped(name: str) -> Path:
    path = DATA / name
    if not path.exists():
        pytest.skip(f"this mistral-common version does not ship {name}")
    return path


def dir_with(tmp_path: Path, files: dict[str, str]) -> Path:
    """A directory holding shipped files under the given names ({new name: shipped name})."""
    d = tmp_path / "tok"
    d.mkdir(exist_ok=True)
    for new, old in files.items():
        shutil.copy(shipped(old), d / new)
    return d


@pytest.mark.parametrize("name", SPM_FILES)
@pytest.mark.parametrize("as_hub_name", [False, True], ids=["shipped-name", "hub-name"])
def test_sentencepiece_round_trip(name, as_hub_name, tmp_path):
    sentencepiece = pytest.importorskip("sentencepiece", reason="mistral-common[sentencepiece] not installed")
    version = name.rpartition(".model")[2]  # "" | ".v3" | ...
    target = ("tokenizer.model" + (version if version != ".v1" else "")) if as_hub_name else name
    d = dir_with(tmp_path, {target: name})
    tok = load_tokenizer(d)
    assert isinstance(tok, MistralCommonTokenizer) and tok.path.name == target
    sp = sentencepiece.SentencePieceProcessor(model_file=str(d / target))
    assert tok.bos_id == sp.bos_id() == 1 and tok.eos_ids == (sp.eos_id(),) == (2,)
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == [sp.bos_id()] + sp.encode(text)  # BOS first, as Mistral's models expect
        assert tok.decode(ids) == text
        assert tok.decode(ids + [2]) == text  # a generated EOS decodes to nothing


def test_tekken_round_trip(tmp_path):
    d = dir_with(tmp_path, {TEKKEN_FILE: TEKKEN_FILE})
    tok = load_tokenizer(d)
    assert isinstance(tok, MistralCommonTokenizer)
    assert tok.bos_id == 1 and tok.eos_ids == (2,)
    vocab = json.loads((d / TEKKEN_FILE).read_text())["config"]["default_vocab_size"]
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids[0] == 1 and all(0 <= i < vocab for i in ids)
        assert len(ids) - 1 <= len(text.encode())  # byte-level BPE never exceeds one token per byte
        assert tok.decode(ids) == text
    assert tok.decode(tok.encode("Hello") + [2]) == "Hello"
    # also when given the file itself
    assert load_tokenizer(d / TEKKEN_FILE).encode(TEXTS[1]) == tok.encode(TEXTS[1])


def test_file_preference(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    for name in ("tokenizer.model", "tokenizer.model.v3", "tokenizer.model.v7m1", "tokenizer.model.v7",
                 "tekken.json", "config.json", "model.safetensors", "notes.model.txt"):
        (d / name).write_text("x")
    assert [p.name for p in mistral_tokenizer_files(d)] == [
        "tekken.json", "tokenizer.model.v7m1", "tokenizer.model.v7", "tokenizer.model.v3", "tokenizer.model"]


def test_versioned_model_preferred_over_bare(tmp_path):
    pytest.importorskip("sentencepiece", reason="mistral-common[sentencepiece] not installed")
    d = dir_with(tmp_path, {"tokenizer.model": "tokenizer.model.v1",
                            "tokenizer.model.v3": "mistral_instruct_tokenizer_240323.model.v3"})
    tok = load_tokenizer(d)
    assert tok.path.name == "tokenizer.model.v3"
    assert tok.encode("Hello") != MistralCommonTokenizer(d / "tokenizer.model").encode("Hello")  # other vocab


def test_tokenizer_json_wins(tiny_tokenizer_dir, tmp_path):
    d = tmp_path / "both"
    shutil.copytree(tiny_tokenizer_dir, d)
    shutil.copy(shipped(TEKKEN_FILE), d / "tekken.json")
    assert isinstance(load_tokenizer(d), HFTokenizer)


def test_no_tokenizer(tmp_path):
    with pytest.raises(UserError, match="--tokenizer-dir"):
        load_tokenizer(tmp_path)


def test_unreadable_tokenizer_file(tmp_path):
    (tmp_path / "tokenizer.model.v3").write_bytes(b"\x00 not a sentencepiece model")
    with pytest.raises(UserError, match="tokenizer.model.v3"):
        load_tokenizer(tmp_path)


def test_tokenizer_travels_to_engine_and_run(make_tiny_mistral, tmp_path):
    """A model directory with a versioned Mistral tokenizer: convert and build carry the file
    under its own name, and `trtlm run --input-text` encodes and decodes with it."""
    pytest.importorskip("sentencepiece", reason="mistral-common[sentencepiece] not installed")
    name = "mistral_instruct_tokenizer_240323.model.v3"
    src = make_tiny_mistral(vocab_size=32768, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                            head_dim=8, eos_token_id=None)
    model = tmp_path / "hf"
    shutil.copytree(src, model)
    shutil.copy(shipped(name), model / name)
    assert run_cli("convert", "--model-dir", model, "--output-dir", tmp_path / "ckpt").exit_code == 0
    assert (tmp_path / "ckpt" / name).exists()
    assert run_cli("build", "--checkpoint-dir", tmp_path / "ckpt", "--output-dir", tmp_path / "engine").exit_code == 0
    assert (tmp_path / "engine" / name).exists()
    res = run_cli("run", "--engine-dir", tmp_path / "engine", "--input-text", "Hello, world!",
                  "--max-output-len", "4", "--json")
    assert res.exit_code == 0, res.stderr
    [out] = json.loads(res.stdout)["outputs"]
    tok = load_tokenizer(tmp_path / "engine")
    assert out["text"] == tok.decode(out["output_ids"]) and len(out["output_ids"]) == 4
