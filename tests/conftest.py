"""Shared fixtures: tiny random Hugging Face models, a tiny tokenizer and an in-process CLI runner.

Models are written once per test session (``scope="session"``) and cached by
their arguments, so every test module asking for the same tiny model gets the
same directory.  Treat those directories as read-only: a test that corrupts a
checkpoint copies it first (:func:`copy_model`).

Factories (session scoped):

* ``make_tiny_hf(model_type, *, dtype, seed, max_shard_size, tokenizer, **config)``
  -> ``Path`` of a ``save_pretrained`` directory for ``"mistral"``, ``"mixtral"``
  or ``"mpt"`` (small defaults below, overridden by ``config``).
* ``make_tiny_mistral(**kw)`` = ``make_tiny_hf("mistral", **kw)``.
* ``tiny_mistral_dir``: the default tiny Mistral (GQA 4/2, sliding window 8
  shorter than the test sequences, vocab 1001, 4 layers, float32).
* ``tiny_tokenizer_dir``: ``tokenizer.json`` + ``tokenizer_config.json`` of a
  small byte-level BPE (ids 0/1/2 = unk/bos/eos), for text prompts.

* ``make_engine(hf_dir, build_options=None, **convert_options)`` -> ``Path`` of an engine
  converted (float32 unless ``dtype`` says) and built from a HF checkpoint, cached per argument set.

Helpers: :func:`load_hf_model` (cached ``from_pretrained``), :func:`transformers_greedy`
(transformers' greedy continuation of each prompt alone, the reference for generation
tests), :func:`run_cli` (``trtlm.cli.main`` in this process with stdout/stderr captured).
"""
from __future__ import annotations

import contextlib
import io
import os
import shutil
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

# Tiny models run fastest on one thread, and intra-op threads spin badly when
# the CI machine's cores are shared (measured: 60x slower decode with 2 threads
# on a loaded 2-core machine).  Child processes (multi-rank runs) inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

#: Small defaults per model type; every test overrides what it is about.
TINY_DEFAULTS: dict[str, dict[str, Any]] = {
    "mistral": dict(vocab_size=1001, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                    sliding_window=8, rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False,
                    bos_token_id=1, eos_token_id=2),
    "mixtral": dict(vocab_size=1001, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                    num_local_experts=4, num_experts_per_tok=2, sliding_window=None, rope_theta=1e6,
                    tie_word_embeddings=False, bos_token_id=1, eos_token_id=2),
    "mpt": dict(vocab_size=1001, d_model=64, n_heads=4, n_layers=2, max_seq_len=512, no_bias=True,
                attn_config={"alibi": True, "clip_qkv": 6.0, "alibi_bias_max": 8}),
}

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Mistral is a decoder-only transformer with grouped-query attention.",
    "Tensor parallel ranks each hold a slice of every weight matrix.",
    "café → λ: unicode survives a round trip, and so do  two  spaces.",
    "def main():\n    return 42\n",
] * 20


@pytest.fixture(scope="session")
def make_tiny_hf(tmp_path_factory) -> Callable[..., Path]:
    """Factory of tiny random HF checkpoints, cached per argument set for the session."""
    cache: dict[str, Path] = {}

    def make(model_type: str = "mistral", *, dtype: torch.dtype = torch.float32, seed: int = 0,
             max_shard_size: str | int | None = None, tokenizer: bool = False, **config: Any) -> Path:
        key = repr((model_type, dtype, seed, max_shard_size, tokenizer, sorted(config.items())))
        if key not in cache:
            from transformers import AutoConfig, AutoModelForCausalLM

            cfg = AutoConfig.for_model(model_type, **{**TINY_DEFAULTS[model_type], **config})
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).to(dtype).eval()
            out = tmp_path_factory.mktemp(f"tiny-{model_type}")
            kwargs = {"max_shard_size": max_shard_size} if max_shard_size is not None else {}
            model.save_pretrained(out, **kwargs)
            if tokenizer:
                write_tiny_tokenizer(out)
            cache[key] = out
        return cache[key]

    return make


@pytest.fixture(scope="session")
def make_tiny_mistral(make_tiny_hf) -> Callable[..., Path]:
    """``make_tiny_hf("mistral", ...)``."""
    return lambda **kw: make_tiny_hf("mistral", **kw)


@pytest.fixture(scope="session")
def tiny_mistral_dir(make_tiny_mistral) -> Path:
    """The default tiny Mistral: 4 layers, 4 heads / 2 KV heads, window 8, vocab 1001, float32."""
    return make_tiny_mistral()


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny-tokenizer")
    write_tiny_tokenizer(out)
    return out


def write_tiny_tokenizer(directory: Path, vocab_size: int = 400) -> None:
    """A byte-level BPE ``tokenizer.json`` trained on a few sentences (ids 0/1/2 = <unk>/<s>/</s>),
    with a ``tokenizer_config.json`` asking for BOS, as Mistral's HF tokenizers do."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_CORPUS, trainer)
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True}))


@pytest.fixture(scope="session")
def make_engine(tmp_path_factory) -> Callable[..., Path]:
    """Factory: ``make_engine(hf_dir, build_options=None, **convert_options)`` -> engine directory
    (convert + build), cached for the session per argument set (``dtype`` defaults to float32)."""
    from trtlm.build import BuildOptions, build
    from trtlm.convert.options import ConvertOptions
    from trtlm.convert.pipeline import convert

    cache: dict[str, Path] = {}

    def make(hf_dir: Path, build_options: dict[str, Any] | None = None, **options: Any) -> Path:
        options.setdefault("dtype", "float32")
        key = repr((str(hf_dir), sorted((build_options or {}).items()), sorted(options.items())))
        if key not in cache:
            root = tmp_path_factory.mktemp("engine")
            convert(Path(hf_dir), root / "ckpt", ConvertOptions(**options))
            build(root / "ckpt", root / "engine", BuildOptions(**(build_options or {})))
            cache[key] = root / "engine"
        return cache[key]

    return make


_HF_MODELS: dict[Path, Any] = {}


def load_hf_model(model_dir: Path, dtype: torch.dtype = torch.float32):
    """``AutoModelForCausalLM.from_pretrained`` (eager attention), cached per directory and dtype."""
    key = (Path(model_dir), dtype)
    if key not in _HF_MODELS:
        from transformers import AutoModelForCausalLM

        _HF_MODELS[key] = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=dtype, attn_implementation="eager").eval()
    return _HF_MODELS[key]


def transformers_greedy(model_dir: Path, prompts: list[list[int]], new: int | list[int]) -> list[list[int]]:
    """transformers' greedy continuation of each prompt on its own (no padding), cut after EOS;
    ``new``: tokens per prompt (one number for all, or one per prompt)."""
    model = load_hf_model(model_dir)
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    news = list(new) if isinstance(new, (list, tuple)) else [new] * len(prompts)
    outs = []
    with torch.no_grad():
        for p, n in zip(prompts, news, strict=True):
            ids = torch.tensor([p])
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                 do_sample=False, pad_token_id=0)[0, len(p):].tolist()
            cut = next((i + 1 for i, t in enumerate(out) if t in eos), len(out))
            outs.append(out[:cut])
    return outs


def edit_safetensors(path: Path, edit: Callable[[dict], Any]) -> None:
    """Rewrite a safetensors file after ``edit`` changed its tensors in place (bad-input tests)."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def copy_model(src: Path, dst: Path) -> Path:
    """A writable copy of a (shared, read-only) model directory."""
    shutil.copytree(src, dst)
    return dst


@dataclass
class CliResult:
    exit_code: int
    stdout: str
    stderr: str

    @property
    def stderr_lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.strip()]


def run_cli(*argv: Any) -> CliResult:
    """Run ``trtlm.cli.main(argv)`` (the console script's entry point) in this process.

    Standard output and error are captured separately.  An exception that
    escapes ``main`` is what the console script would print as a traceback:
    it is formatted into ``stderr`` (exit code 1) so tests can assert there is none.
    """
    from trtlm.cli import main

    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main([str(a) for a in argv])
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except BaseException:  # noqa: BLE001 - reported as the interpreter would
            traceback.print_exc(file=sys.stderr)
            code = 1
    return CliResult(code, out.getvalue(), err.getvalue())
