"""Inputs of the serving benchmark: a tokenizer of the model's vocabulary size and one request set.

    python bench/serve_inputs.py OUT_DIR [--vocab 32000] [--num-requests 1000]
        [--input-range 128-1024] [--output-range 128-512] [--seed 0]

writes ``OUT_DIR/tokenizer/`` (``tokenizer.json`` + ``tokenizer_config.json``) and
``OUT_DIR/requests.jsonl``.

Why a tokenizer: a benchmark engine made from a preset with ``--dummy-weights`` has none, but the
server's cost includes detokenizing every streamed token, so the run needs a real one of the
model's vocabulary size.  Hub downloads are not possible on the benchmark machine, so a byte-level
BPE of exactly ``--vocab`` tokens is trained here with the ``tokenizers`` library on a seeded
synthetic corpus (a few seconds): its decoding does what a production tokenizer's does.

Why one file of requests: ``trtlm bench --mode offline --dataset`` (the engine alone) and
``trtlm bench serve --dataset`` (over HTTP) read the same lines (``prompt_ids`` / ``prompt`` are
the same token ids, ``output_len`` the tokens to generate), so the two throughputs compare the
same work.
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path


def train_tokenizer(out: Path, vocab: int, seed: int) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    rng = random.Random(seed)
    letters = "etaoinshrdlcumwfgypbvkjxqz"
    weights = [12.7, 9.1, 8.2, 7.5, 7.0, 6.7, 6.3, 6.1, 6.0, 4.3, 4.0, 2.8, 2.8, 2.4, 2.4, 2.2, 2.0, 2.0, 1.9,
               1.5, 1.0, 0.8, 0.2, 0.2, 0.1, 0.1]
    words = ["".join(rng.choices(letters, weights, k=rng.randint(2, 11))) for _ in range(60000)]
    corpus = [" ".join(rng.choices(words, k=64)) + rng.choice([".", ",", "!", "?"]) for _ in range(6000)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    size = tok.get_vocab_size()
    if size < vocab:  # pad with unused tokens so every id of the model decodes
        tok.add_tokens([f"<extra_{i}>" for i in range(vocab - size)])
    assert tok.get_vocab_size() == vocab, (tok.get_vocab_size(), vocab)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
         "unk_token": "<unk>", "model_max_length": 32768}, indent=1))


def write_requests(path: Path, vocab: int, n: int, input_range: tuple[int, int], output_range: tuple[int, int],
                   seed: int) -> None:
    rng = random.Random(seed)
    with path.open("w") as f:
        for _ in range(n):
            ids = [rng.randrange(10, vocab) for _ in range(rng.randint(*input_range))]
            f.write(json.dumps({"prompt_ids": ids, "prompt": ids, "output_len": rng.randint(*output_range)}) + "\n")


def _range(text: str) -> tuple[int, int]:
    lo, hi = (int(x) for x in text.split("-"))
    return lo, hi


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--num-requests", type=int, default=1000)
    ap.add_argument("--input-range", type=_range, default=(128, 1024))
    ap.add_argument("--output-range", type=_range, default=(128, 512))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    train_tokenizer(args.out / "tokenizer", args.vocab, args.seed)
    write_requests(args.out / "requests.jsonl", args.vocab, args.num_requests, args.input_range,
                   args.output_range, args.seed)
    print(f"wrote {args.out}/tokenizer (vocab {args.vocab}) and {args.out}/requests.jsonl ({args.num_requests})")


if __name__ == "__main__":
    main()
