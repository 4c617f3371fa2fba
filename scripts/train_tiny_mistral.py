#!/usr/bin/env python
"""Train the tiny Mistral-architecture model bundled with trtlm.

The model is trained from scratch on CPU, on Python standard-library source
code, so that the README quick start produces recognisable (Python-ish) output
without downloading anything, and so that accuracy tests (e.g. perplexity of
quantized variants vs float32) have a small, real, trained fixture.

Usage (from the repository root):

    /work/venv/bin/python scripts/train_tiny_mistral.py --out core/src/trtlm/data/tiny-mistral

Everything is deterministic for a given Python installation (the training text
is the interpreter's own stdlib) and given torch build: fixed seeds, sorted file
lists, hash-based (crc32) file splits, torch.set_num_threads(2). Bit-exact
reproduction across different CPUs / torch versions is not guaranteed (float
reduction order), but the result should be statistically the same.

Outputs in --out:
    config.json, generation_config.json, model.safetensors   (float32)
    tokenizer.json, tokenizer_config.json                    (byte-level BPE)
    eval.txt    held-out stdlib source, for perplexity evaluation
    calib.txt   other held-out stdlib source, default calibration set
    README.md   what this is, how it was made, and the measured numbers
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import sys
import sysconfig
import time
import zlib
from pathlib import Path

import torch

# ---------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------

SEED = 1234
NUM_THREADS = 2

VOCAB_SIZE = 2048
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]  # ids 0, 1, 2 as in Mistral
UNK_ID, BOS_ID, EOS_ID = 0, 1, 2

MODEL_KW = dict(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,  # GQA, 2 query heads per KV head
    head_dim=32,
    hidden_act="silu",
    max_position_embeddings=1024,
    sliding_window=128,  # shorter than the training/eval sequences (257)
    rope_theta=10000.0,
    rms_norm_eps=1e-6,
    initializer_range=0.02,
    tie_word_embeddings=False,
    attention_dropout=0.0,
    bos_token_id=BOS_ID,
    eos_token_id=EOS_ID,
)

SEQ_LEN = 256  # text tokens per training sample; BOS is prepended -> 257 inputs
BATCH_SIZE = 16
STEPS = 1100
LR = 3e-3
MIN_LR_FRAC = 0.1
WARMUP = 100
WEIGHT_DECAY = 0.1
BETAS = (0.9, 0.95)
GRAD_CLIP = 1.0

TRAIN_BYTES = 6_000_000  # cap on training text
EVAL_BYTES = 48_000
CALIB_BYTES = 32_000
PER_FILE_BYTES = 16_000  # max bytes taken from one file for eval/calib
MAX_FILE_BYTES = 200_000  # skip huge (table-like) files

# Perplexity protocol (mirrored in tests/test_tiny_model.py):
# first EVAL_TOKENS tokens of eval.txt (tokenized without special tokens),
# split into chunks of EVAL_CHUNK, each chunk fed as [BOS] + chunk; the loss is
# the mean NLL of predicting the chunk tokens.
EVAL_TOKENS = 2048
EVAL_CHUNK = 256

# Top-level stdlib directories and path components that are excluded.
EXCLUDE_TOP = {
    "test", "idlelib", "lib2to3", "site-packages", "dist-packages", "encodings",
    "pydoc_data", "ensurepip", "turtledemo", "__phello__", "__pycache__",
}
EXCLUDE_PARTS = {"test", "tests", "__pycache__"}

SAMPLE_PROMPTS = ["def ", "import os\n", "class "]


# ---------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------


def stdlib_files() -> list[tuple[str, str]]:
    """Return sorted (relative_path, text) of usable stdlib *.py files."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for p in sorted(root.rglob("*.py"), key=lambda q: q.relative_to(root).as_posix()):
        rel = p.relative_to(root)
        parts = rel.parts
        if parts[0] in EXCLUDE_TOP or parts[0].startswith("config-"):
            continue
        if any(x in EXCLUDE_PARTS for x in parts[:-1]):
            continue
        if rel.name.startswith("_sysconfigdata"):
            continue
        try:
            if not p.is_file() or p.stat().st_size > MAX_FILE_BYTES:
                continue
            text = p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        text = text.replace("\r\n", "\n")
        if len(text.strip()) < 200:
            continue
        out.append((rel.as_posix(), text))
    return out


def bucket(rel: str) -> int:
    return zlib.crc32(rel.encode("utf-8")) % 20


def take_lines(text: str, limit: int) -> str:
    """Longest prefix of text made of whole lines with len <= limit."""
    if len(text) <= limit:
        return text if text.endswith("\n") else text + "\n"
    cut = text.rfind("\n", 0, limit)
    return text[: cut + 1] if cut > 0 else ""


def build_heldout(files: list[tuple[str, str]], total: int) -> tuple[str, list[str]]:
    """Concatenate up to PER_FILE_BYTES from each file until `total` chars."""
    parts, names, size = [], [], 0
    for rel, text in sorted(files, key=lambda f: (zlib.crc32(f[0].encode()), f[0])):
        if size >= total:
            break
        piece = take_lines(text, min(PER_FILE_BYTES, total - size))
        if not piece:
            continue
        parts.append(piece)
        names.append(rel)
        size += len(piece)
    return "".join(parts), names


def split_corpus():
    files = stdlib_files()
    train_pool = [f for f in files if bucket(f[0]) >= 2]
    eval_pool = [f for f in files if bucket(f[0]) == 0]
    calib_pool = [f for f in files if bucket(f[0]) == 1]

    # Training subset: files in crc32 order (spreads across packages) up to the
    # byte cap, then kept in sorted path order.
    chosen, size = [], 0
    for rel, text in sorted(train_pool, key=lambda f: (zlib.crc32(f[0].encode()), f[0])):
        if size + len(text) > TRAIN_BYTES:
            continue
        chosen.append((rel, text))
        size += len(text)
    chosen.sort()

    eval_text, eval_names = build_heldout(eval_pool, EVAL_BYTES)
    calib_text, calib_names = build_heldout(calib_pool, CALIB_BYTES)
    return chosen, eval_text, eval_names, calib_text, calib_names, len(files)


# ---------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------


def train_tokenizer(texts: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = None  # no lowercasing / unicode normalisation
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = None  # no automatic BOS/EOS
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    for i, s in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(s) == i, (s, tok.token_to_id(s))
    return tok


def save_tokenizer(tok, out: Path):
    tok.save(str(out / "tokenizer.json"))
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": MODEL_KW["max_position_embeddings"],
        "padding_side": "left",
    }
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")


# ---------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------


@torch.no_grad()
def eval_ppl(model, ids: list[int], n_tokens: int = EVAL_TOKENS, chunk: int = EVAL_CHUNK) -> float:
    model.eval()
    ids = ids[:n_tokens]
    nll, count = 0.0, 0
    for s in range(0, len(ids) - 1, chunk):
        c = ids[s : s + chunk]
        if len(c) < 2:
            break
        x = torch.tensor([[BOS_ID] + c])
        logits = model(input_ids=x).logits[0, :-1].float()
        nll += torch.nn.functional.cross_entropy(logits, torch.tensor(c), reduction="sum").item()
        count += len(c)
    model.train()
    return math.exp(nll / count)


def lr_at(step: int) -> float:
    if step < WARMUP:
        return LR * (step + 1) / WARMUP
    p = (step - WARMUP) / max(1, STEPS - WARMUP)
    return LR * (MIN_LR_FRAC + (1 - MIN_LR_FRAC) * 0.5 * (1 + math.cos(math.pi * p)))


def train_model(stream: torch.Tensor, eval_ids: list[int], vocab_size: int, log):
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(SEED)
    cfg = MistralConfig(vocab_size=vocab_size, **MODEL_KW)
    model = MistralForCausalLM(cfg).float()
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model: {n_params:,} parameters ({n_params * 4 / 1e6:.2f} MB fp32)")

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}],
        lr=LR, betas=BETAS, eps=1e-8,
    )
    gen = torch.Generator().manual_seed(SEED)
    bos = torch.full((BATCH_SIZE, 1), BOS_ID, dtype=torch.long)
    ar = torch.arange(SEQ_LEN)
    hi = len(stream) - SEQ_LEN

    t0 = time.time()
    losses = []
    for step in range(STEPS):
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        starts = torch.randint(0, hi, (BATCH_SIZE,), generator=gen)
        x = torch.cat([bos, stream[starts[:, None] + ar]], dim=1)
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        opt.step()
        losses.append(loss.item())
        if step % 50 == 0 or step == STEPS - 1:
            el = time.time() - t0
            msg = f"step {step:5d}  loss {loss.item():.4f}  lr {lr_at(step):.2e}  {el:6.0f}s"
            if step % 250 == 0 or step == STEPS - 1:
                msg += f"  eval_ppl {eval_ppl(model, eval_ids):.3f}"
            log(msg)
    train_time = time.time() - t0
    log(f"load average {os.getloadavg()}")
    model.eval()
    return model, losses, train_time


@torch.no_grad()
def greedy_samples(model, tok, max_new_tokens=64):
    samples = {}
    for prompt in SAMPLE_PROMPTS:
        ids = [BOS_ID] + tok.encode(prompt).ids
        out = model.generate(
            input_ids=torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=EOS_ID,
        )
        samples[prompt] = tok.decode(out[0, 1:].tolist(), skip_special_tokens=False)
    return samples


# ---------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------


README_TMPL = """# tiny-mistral

A tiny `MistralForCausalLM` ({n_params:,} parameters, float32) trained from scratch
on CPU on Python standard-library source code. It is bundled with trtlm so that
the quick start works without any download, and it is the fixture for accuracy
tests (e.g. perplexity of quantized variants vs float32). It writes
Python-looking code; it is not useful for anything else.

## Files

| file | what |
|---|---|
| `config.json`, `generation_config.json` | HF config (`MistralForCausalLM`, `model_type: mistral`) |
| `model.safetensors` | float32 weights, untied `lm_head` |
| `tokenizer.json` | byte-level BPE (`tokenizers`), vocab {vocab} |
| `tokenizer_config.json` | minimal config for `transformers.AutoTokenizer` (`PreTrainedTokenizerFast`) |
| `eval.txt` | {eval_kb:.1f} KB held-out stdlib source, for perplexity evaluation |
| `calib.txt` | {calib_kb:.1f} KB other held-out stdlib source, default quantization calibration set |

## Model

hidden {hidden_size}, {num_hidden_layers} layers, {num_attention_heads} attention heads,
{num_key_value_heads} KV heads (GQA), head_dim {head_dim}, intermediate {intermediate_size} (SiLU-gated MLP),
vocab {vocab}, max_position_embeddings {max_position_embeddings},
**sliding_window {sliding_window}** (shorter than the 257-token training/eval
sequences, so sliding-window attention is exercised; as in transformers, query
position `i` attends to key positions `i-{sw_m1}..i`, i.e. {sliding_window} keys including itself),
rope_theta {rope_theta:g}, rms_norm_eps {rms_norm_eps:g}, `tie_word_embeddings: false`.
`config.json` (written by transformers {tf_version}) stores RoPE as
`rope_parameters`; a top-level `rope_theta` is also written for older readers.

## Tokenizer and BOS

Byte-level BPE: ByteLevel pre-tokenizer (no prefix space) and ByteLevel decoder,
no normalizer, so `decode(encode(text)) == text` exactly for any text
(whitespace, indentation and newlines included). Special tokens: `<unk>`=0,
`<s>`=1 (BOS), `</s>`=2 (EOS).

The tokenizer does **not** add BOS/EOS itself (no post-processor,
`add_bos_token: false`). The model was trained with BOS (id 1) prepended to
every sequence, so callers should prepend BOS themselves (`config.json` has
`bos_token_id: 1`). In training, source files were separated by EOS (id 2).

## How it was made

```
{command}
```

Python {py_version} stdlib (`{stdlib}`), torch {torch_version}, transformers
{tf_version}, tokenizers {tok_version}, {threads} CPU threads, seed {seed}.

- Text: stdlib `*.py` files, excluding {excluded} and
  any `test`/`tests` directory, files over {max_file_kb} KB and non-UTF-8 files
  ({n_files} files usable). Files are assigned to splits by `crc32(relative path) % 20`:
  0 -> eval pool, 1 -> calibration pool, 2-19 -> training pool. Training used
  {n_train_files} files, {train_mb:.2f} MB, {train_tokens:,} tokens; the tokenizer was
  trained on the same text. `eval.txt` takes up to {per_file_kb} KB from each of {n_eval_files}
  eval-pool files; `calib.txt` likewise from {n_calib_files} calibration-pool files. Neither
  was seen in training (nor by the tokenizer trainer).
  - `eval.txt` sources, in order: {eval_names}
  - `calib.txt` sources, in order: {calib_names}
- Training: AdamW (betas {betas}, weight decay {wd}, grad clip {clip}), lr {lr:g} with
  {warmup} warmup steps then cosine decay to {min_lr:g}, {steps} steps x batch {bs} x
  ({seq}+1 BOS) tokens = {tok_seen:,} tokens (~{epochs:.1f} epochs), random windows
  of the token stream.

## Results

- Training wall time: {train_time:.0f} s ({train_min:.1f} min) on this machine ({cpu};
  1-min load average when training ended: {load:.1f}; other processes competing for
  the cores inflate this number).
- Final train loss (mean of last 50 steps): {final_loss:.4f} (last step {last_loss:.4f}).
- Held-out perplexity, first {eval_tokens} tokens of `eval.txt` in chunks of {eval_chunk}
  (each chunk fed as `[BOS] + chunk`): **{ppl_2048:.3f}**; over all of `eval.txt`
  ({eval_len:,} tokens): {ppl_all:.3f}. On `calib.txt` (all {calib_len:,} tokens): {ppl_calib:.3f}.
- Tokenizer: {bytes_per_tok:.2f} bytes/token on `eval.txt`.

Greedy sample (transformers `generate`, BOS + prompt `{sample_prompt!r}`, {sample_new} new tokens):

```python
{sample}
```
"""


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, type=Path, help="output directory")
    args = ap.parse_args()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)

    random.seed(SEED)
    torch.manual_seed(SEED)
    torch.set_num_threads(NUM_THREADS)
    torch.use_deterministic_algorithms(True)

    def log(msg):
        print(msg, flush=True)

    import tokenizers
    import transformers

    t_start = time.time()
    train_files, eval_text, eval_names, calib_text, calib_names, n_files = split_corpus()
    train_texts = [t for _, t in train_files]
    train_bytes = sum(len(t.encode()) for t in train_texts)
    log(f"{n_files} usable stdlib files; train {len(train_files)} files {train_bytes / 1e6:.2f} MB; "
        f"eval {len(eval_text)} chars from {len(eval_names)} files; "
        f"calib {len(calib_text)} chars from {len(calib_names)} files")

    tok = train_tokenizer(train_texts)
    vocab = tok.get_vocab_size()
    log(f"tokenizer: vocab {vocab}")
    for t in (eval_text, calib_text):
        assert tok.decode(tok.encode(t).ids, skip_special_tokens=False) == t, "tokenizer round-trip failed"

    stream_ids = []
    for t in train_texts:
        stream_ids.extend(tok.encode(t).ids)
        stream_ids.append(EOS_ID)
    stream = torch.tensor(stream_ids, dtype=torch.long)
    eval_ids = tok.encode(eval_text).ids
    calib_ids = tok.encode(calib_text).ids
    log(f"train stream: {len(stream):,} tokens ({train_bytes / len(stream):.2f} bytes/token); "
        f"data prep {time.time() - t_start:.0f}s")

    model, losses, train_time = train_model(stream, eval_ids, vocab, log)
    load = os.getloadavg()[0]

    ppl_2048 = eval_ppl(model, eval_ids)
    ppl_all = eval_ppl(model, eval_ids, n_tokens=len(eval_ids))
    ppl_calib = eval_ppl(model, calib_ids, n_tokens=len(calib_ids))
    final_loss = sum(losses[-50:]) / len(losses[-50:])
    log(f"train time {train_time:.1f}s; final loss {final_loss:.4f}; eval ppl {ppl_2048:.3f} "
        f"(all {ppl_all:.3f}); calib ppl {ppl_calib:.3f}")

    # --- save -------------------------------------------------------------
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (out / name).exists():
            (out / name).unlink()
    model.generation_config.bos_token_id = BOS_ID
    model.generation_config.eos_token_id = EOS_ID
    model.save_pretrained(out, safe_serialization=True)
    cfg_path = out / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["architectures"] = ["MistralForCausalLM"]
    cfg["model_type"] = "mistral"
    cfg.setdefault("rope_theta", MODEL_KW["rope_theta"])  # for readers predating rope_parameters
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    save_tokenizer(tok, out)
    (out / "eval.txt").write_text(eval_text, encoding="utf-8")
    (out / "calib.txt").write_text(calib_text, encoding="utf-8")

    # --- verify the saved artefacts with transformers ----------------------
    from transformers import AutoModelForCausalLM, AutoTokenizer

    m2 = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert type(m2).__name__ == "MistralForCausalLM"
    ppl_reload = eval_ppl(m2, eval_ids)
    assert abs(ppl_reload - ppl_2048) < 1e-3 * ppl_2048, (ppl_reload, ppl_2048)
    hf_tok = AutoTokenizer.from_pretrained(out)
    snippet = "def f(x):\n    return {'a': x}  # ok\n\n\tpass\n"
    assert hf_tok.decode(hf_tok(snippet)["input_ids"]) == snippet
    assert hf_tok(snippet)["input_ids"] == tok.encode(snippet).ids
    assert hf_tok.bos_token_id == BOS_ID and hf_tok.eos_token_id == EOS_ID and hf_tok.unk_token_id == UNK_ID

    samples = greedy_samples(m2, tok)
    for p, s in samples.items():
        log(f"--- greedy sample, prompt {p!r} ---\n{s}\n")

    # --- README ------------------------------------------------------------
    sample_prompt = "def "
    sample_text = samples[sample_prompt].rstrip("\n").replace("```", "` ` `")
    readme = README_TMPL.format(
        n_params=sum(p.numel() for p in m2.parameters()),
        vocab=vocab,
        eval_kb=len(eval_text.encode()) / 1024,
        calib_kb=len(calib_text.encode()) / 1024,
        sw_m1=MODEL_KW["sliding_window"] - 1,
        tf_version=transformers.__version__,
        tok_version=tokenizers.__version__,
        torch_version=torch.__version__,
        py_version=platform.python_version(),
        stdlib=sysconfig.get_paths()["stdlib"],
        command=f"/work/venv/bin/python scripts/train_tiny_mistral.py --out {out.as_posix()}",
        threads=NUM_THREADS,
        seed=SEED,
        excluded=", ".join(f"`{x}/`" for x in sorted(EXCLUDE_TOP)) + ", `config-*/`, `_sysconfigdata*`",
        max_file_kb=MAX_FILE_BYTES // 1000,
        per_file_kb=PER_FILE_BYTES // 1000,
        n_files=n_files,
        n_train_files=len(train_files),
        train_mb=train_bytes / 1e6,
        train_tokens=len(stream),
        n_eval_files=len(eval_names),
        n_calib_files=len(calib_names),
        eval_names=", ".join(f"`{n}`" for n in eval_names),
        calib_names=", ".join(f"`{n}`" for n in calib_names),
        betas=BETAS,
        wd=WEIGHT_DECAY,
        clip=GRAD_CLIP,
        lr=LR,
        min_lr=LR * MIN_LR_FRAC,
        warmup=WARMUP,
        steps=STEPS,
        bs=BATCH_SIZE,
        seq=SEQ_LEN,
        tok_seen=STEPS * BATCH_SIZE * (SEQ_LEN + 1),
        epochs=STEPS * BATCH_SIZE * SEQ_LEN / len(stream),
        train_time=train_time,
        train_min=train_time / 60,
        cpu=f"{platform.machine()}, {os.cpu_count()} cores",
        load=load,
        final_loss=final_loss,
        last_loss=losses[-1],
        eval_tokens=EVAL_TOKENS,
        eval_chunk=EVAL_CHUNK,
        ppl_2048=ppl_2048,
        ppl_all=ppl_all,
        eval_len=len(eval_ids),
        ppl_calib=ppl_calib,
        calib_len=len(calib_ids),
        bytes_per_tok=len(eval_text.encode()) / len(eval_ids),
        sample_prompt=sample_prompt,
        sample_new=64,
        sample=sample_text,
        **MODEL_KW,
    )
    (out / "README.md").write_text(readme, encoding="utf-8")

    total = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    for f in sorted(out.iterdir()):
        log(f"  {f.name:28s} {f.stat().st_size:>10,d}")
    log(f"total {total / 1e6:.2f} MB in {out}; wall time {time.time() - t_start:.0f}s")
    if total > 6_000_000:
        sys.exit(f"data dir too large: {total} bytes")


if __name__ == "__main__":
    main()
