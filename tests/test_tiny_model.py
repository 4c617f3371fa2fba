"""Checks for the tiny trained Mistral model bundled in core/src/trtlm/data/tiny-mistral.

The model is produced by scripts/train_tiny_mistral.py; see the README.md in the
data directory for how it was made and the measured numbers.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
MODEL_DIR = REPO / "core" / "src" / "trtlm" / "data" / "tiny-mistral"

REQUIRED_FILES = [
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "eval.txt",
    "calib.txt",
    "README.md",
]
MAX_DIR_BYTES = 6_000_000
MAX_WEIGHTS_BYTES = 4_700_000

BOS_ID, EOS_ID, UNK_ID = 1, 2, 0

# Perplexity protocol, identical to eval_ppl() in scripts/train_tiny_mistral.py:
# first 2048 tokens of eval.txt (no special tokens), chunks of 256, each chunk
# fed as [BOS] + chunk, mean NLL over the chunk tokens.
EVAL_TOKENS = 2048
EVAL_CHUNK = 256
# Measured with transformers 5.23 / torch 2.13 CPU float32: 39.303 (see the data README).
# The bound allows 5 % slack for other library versions / CPUs.
PPL_MEASURED = 39.303
PPL_BOUND = 41.27  # = 39.303 * 1.05

SNIPPET = (
    "import os\n"
    "\n"
    "\n"
    "class Foo(object):\n"
    '    """Doc string with  two spaces,\ttab and unicode: caf\u00e9 \u2192 \u03bb."""\n'
    "\n"
    "    def bar(self, x: int = 0) -> dict[str, int]:\n"
    "        if x  >=  10:   # trailing spaces   \n"
    "            return {'a': x ** 2, \"b\": [1, 2, 3]}\n"
    "\t\treturn {}\r\n"
    "\n"
    "\n"
    "\n"
)


def test_files_exist_and_sizes():
    for name in REQUIRED_FILES:
        assert (MODEL_DIR / name).is_file(), f"missing {name}"
    total = sum(f.stat().st_size for f in MODEL_DIR.rglob("*") if f.is_file())
    assert total < MAX_DIR_BYTES, f"data dir is {total} bytes"
    assert (MODEL_DIR / "model.safetensors").stat().st_size < MAX_WEIGHTS_BYTES
    assert 30_000 <= (MODEL_DIR / "eval.txt").stat().st_size <= 60_000
    assert 20_000 <= (MODEL_DIR / "calib.txt").stat().st_size <= 40_000


def test_config():
    cfg = json.loads((MODEL_DIR / "config.json").read_text())
    assert cfg["architectures"] == ["MistralForCausalLM"]
    assert cfg["model_type"] == "mistral"
    assert cfg["tie_word_embeddings"] is False
    assert cfg["num_key_value_heads"] < cfg["num_attention_heads"]  # GQA
    assert cfg["sliding_window"] < EVAL_CHUNK + 1  # sliding window is exercised
    assert cfg["bos_token_id"] == BOS_ID and cfg["eos_token_id"] == EOS_ID


def test_tokenizer_roundtrip():
    tokenizers = pytest.importorskip("tokenizers")
    tok = tokenizers.Tokenizer.from_file(str(MODEL_DIR / "tokenizer.json"))
    assert tok.token_to_id("<unk>") == UNK_ID
    assert tok.token_to_id("<s>") == BOS_ID
    assert tok.token_to_id("</s>") == EOS_ID
    enc = tok.encode(SNIPPET)
    assert UNK_ID not in enc.ids
    assert BOS_ID not in enc.ids  # no automatic BOS
    assert tok.decode(enc.ids, skip_special_tokens=False) == SNIPPET
    text = (MODEL_DIR / "eval.txt").read_text(encoding="utf-8")
    assert tok.decode(tok.encode(text).ids) == text


def test_transformers_tokenizer():
    transformers = pytest.importorskip("transformers")
    tok = transformers.AutoTokenizer.from_pretrained(MODEL_DIR)
    assert (tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (BOS_ID, EOS_ID, UNK_ID)
    ids = tok(SNIPPET)["input_ids"]
    assert ids[0] != BOS_ID
    assert tok.decode(ids) == SNIPPET


@pytest.fixture(scope="module")
def hf_model():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32)
    model.eval()
    return model


def test_heldout_perplexity(hf_model):
    import torch
    import tokenizers

    tok = tokenizers.Tokenizer.from_file(str(MODEL_DIR / "tokenizer.json"))
    ids = tok.encode((MODEL_DIR / "eval.txt").read_text(encoding="utf-8")).ids[:EVAL_TOKENS]
    assert len(ids) == EVAL_TOKENS
    nll, n = 0.0, 0
    with torch.no_grad():
        for s in range(0, len(ids), EVAL_CHUNK):
            chunk = ids[s : s + EVAL_CHUNK]
            logits = hf_model(input_ids=torch.tensor([[BOS_ID] + chunk])).logits[0, :-1].float()
            nll += torch.nn.functional.cross_entropy(logits, torch.tensor(chunk), reduction="sum").item()
            n += len(chunk)
    ppl = math.exp(nll / n)
    assert ppl < PPL_BOUND, f"held-out perplexity {ppl:.3f} >= bound {PPL_BOUND:.3f} (measured {PPL_MEASURED})"


def test_greedy_generation_is_python_like(hf_model):
    import torch
    import tokenizers

    tok = tokenizers.Tokenizer.from_file(str(MODEL_DIR / "tokenizer.json"))
    ids = [BOS_ID] + tok.encode("import os\n").ids
    with torch.no_grad():
        out = hf_model.generate(
            input_ids=torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=48,
            do_sample=False,
            pad_token_id=EOS_ID,
        )
    text = tok.decode(out[0, len(ids):].tolist())
    assert "\n" in text
    assert any(kw in text for kw in ("import", "def ", "class ", "return", "self", "=")), text
