"""trtlm.evaluate pieces that need no model: chunking, dataset reading, scoring arithmetic."""
from __future__ import annotations

import math

import pytest
import torch

from trtlm.errors import UserError
from trtlm.evaluate import chunk_ids, read_dataset, score


def test_chunks_cover_the_tokens_and_drop_unscorable_tail():
    assert chunk_ids(list(range(10)), 4) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert chunk_ids(list(range(9)), 4) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert chunk_ids(list(range(10)), 4, max_tokens=6) == [[0, 1, 2, 3], [4, 5]]
    with pytest.raises(UserError, match="--max-seq-len"):
        chunk_ids([1, 2], 1)


def test_read_dataset_jsonl(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "a"}\n\n{"text": "b"}\n')
    assert read_dataset(p) == "a\n\nb"
    p.write_text('{"no": 1}\n')
    with pytest.raises(UserError, match=r"d.jsonl:1"):
        read_dataset(p)
    with pytest.raises(UserError, match="no such file"):
        read_dataset(tmp_path / "missing.txt")


def test_uniform_logits_give_vocab_perplexity():
    V = 17
    ppl = score(lambda ids: torch.zeros(*ids.shape, V), [[1, 2, 3, 4], [5, 6, 7]])
    assert ppl.tokens == 5
    assert math.isclose(ppl.ppl, V, rel_tol=1e-6)
