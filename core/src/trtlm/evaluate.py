"""Perplexity of an engine on a local text file, optionally side by side with transformers.

This is the role TensorRT-LLM's ``summarize.py`` / ``mmlu.py`` play for accuracy checks, kept to
what needs no hub: the text is tokenised once with the engine's tokenizer, cut into chunks of
``max_seq_len`` tokens, and every chunk is scored by next-token negative log-likelihood (the first
token of a chunk has no context and is not scored).  With a Hugging Face model directory the very
same token chunks go through ``AutoModelForCausalLM`` too, so the two numbers are directly
comparable (and quantized engines can be compared with the float model they came from).
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from trtlm.config import quant_config
from trtlm.errors import UserError


@dataclass
class Perplexity:
    """Summed NLL (nats) over ``tokens`` scored tokens and its perplexity."""

    nll: float
    tokens: int

    @property
    def ppl(self) -> float:
        return math.exp(self.nll / self.tokens) if self.tokens else float("nan")

    def to_dict(self) -> dict[str, float]:
        return dict(asdict(self), ppl=self.ppl)


def read_dataset(path: Path) -> str:
    """The text of a ``.txt`` file, or the ``"text"`` fields of a ``.jsonl`` file joined by blank lines."""
    if not path.is_file():
        raise UserError(f"--dataset {path}: no such file")
    raw = path.read_text(encoding="utf-8")
    if path.suffix != ".jsonl":
        return raw
    texts = []
    for n, line in enumerate(raw.splitlines(), 1):
        if line.strip():
            try:
                texts.append(str(json.loads(line)["text"]))
            except (json.JSONDecodeError, KeyError, TypeError):
                raise UserError(f"{path}:{n}: expected a JSON object with a \"text\" field") from None
    return "\n\n".join(texts)


def chunk_ids(ids: Sequence[int], max_seq_len: int, max_tokens: int | None = None) -> list[list[int]]:
    """Consecutive chunks of at most ``max_seq_len`` tokens (a last chunk of one token is dropped: nothing to score)."""
    if max_seq_len < 2:
        raise UserError(f"--max-seq-len {max_seq_len}: need at least 2 tokens per chunk")
    ids = list(ids)[:max_tokens] if max_tokens else list(ids)
    chunks = [ids[i:i + max_seq_len] for i in range(0, len(ids), max_seq_len)]
    return [c for c in chunks if len(c) >= 2]


def score(logits_fn: Callable[[torch.Tensor], torch.Tensor], chunks: list[list[int]], batch: int = 8) -> Perplexity:
    """Sum of next-token NLL over all chunks; ``logits_fn`` maps ids ``[B, T]`` to logits ``[B, T, V]``."""
    nll, count = 0.0, 0
    by_len: dict[int, list[list[int]]] = {}
    for c in chunks:
        by_len.setdefault(len(c), []).append(c)
    with torch.inference_mode():
        for _length, group in sorted(by_len.items()):
            for i in range(0, len(group), batch):
                ids = torch.tensor(group[i:i + batch])
                logits = logits_fn(ids).float()
                lp = F.log_softmax(logits[:, :-1], dim=-1)
                nll -= float(lp.gather(-1, ids[:, 1:, None].to(lp.device)).sum())
                count += ids.shape[0] * (ids.shape[1] - 1)
    return Perplexity(nll, count)


def engine_logits_fn(engine) -> Callable[[torch.Tensor], torch.Tensor]:
    """Prompt logits from the engine itself (the path generation takes: paged KV cache, chunked
    prefill), one request per row, each asking for one token and keeping its prompt's logits."""
    from trtlm.runtime.sampling import SamplingParams

    params = SamplingParams(max_tokens=1, ignore_eos=True, detokenize=False)

    def fn(ids: torch.Tensor) -> torch.Tensor:
        outs = engine.generate(ids.tolist(), params, keep_logits=True)
        return torch.stack([o.prompt_logits for o in outs])
    return fn


def hf_logits_fn(model_dir: Path) -> Callable[[torch.Tensor], torch.Tensor]:
    """Logits of transformers' ``AutoModelForCausalLM`` (float32, CPU)."""
    try:
        from transformers import AutoModelForCausalLM
    except ImportError:
        raise UserError("--hf-model-dir needs transformers (pip install transformers)") from None
    if not (model_dir / "config.json").is_file():
        raise UserError(f"--hf-model-dir {model_dir}: no config.json")
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    return lambda ids: model(input_ids=ids).logits


def trtllm_logits_fn(engine_dir: Path) -> Callable[[torch.Tensor], torch.Tensor]:
    """Prompt logits of an engine TensorRT-LLM built, from its own runtime (``gather_context_logits``)."""
    from trtlm.runtime.trtllm_backend import run_trtllm_engine

    def fn(ids: torch.Tensor) -> torch.Tensor:
        outs = run_trtllm_engine(engine_dir, ids.tolist(), max_new_tokens=1, context_logits=True)
        return torch.stack([torch.as_tensor(o.context_logits) for o in outs])
    return fn


def evaluate(engine_dir: Path, dataset: Path, hf_model_dir: Path | None = None, max_seq_len: int = 256,
             max_tokens: int | None = None, device: str = "cpu") -> dict:
    """Perplexity of ``engine_dir`` (and of ``hf_model_dir``) on ``dataset``; a JSON-able dict."""
    from trtlm.runtime.trtllm_backend import engine_info, is_trtllm_engine

    if is_trtllm_engine(engine_dir):  # built by TensorRT-LLM: scored by its own runtime
        from trtlm.modeldir import read_json
        from trtlm.runtime.tokenizer import load_tokenizer

        info = engine_info(engine_dir)
        tokenizer, logits_fn = load_tokenizer(engine_dir), trtllm_logits_fn(engine_dir)
        config = read_json(Path(engine_dir) / "config.json").get("pretrained_config") or {}
        seq = min(max_seq_len, info.max_input_len or max_seq_len)
    else:
        from trtlm.api import LLM

        llm = LLM(engine_dir, device=device)
        engine = llm.engine
        if llm.tokenizer is None:
            raise UserError(f"--engine-dir {engine_dir}: no tokenizer files to tokenize --dataset with")
        tokenizer, logits_fn, config = llm.tokenizer, engine_logits_fn(engine), llm.config
        seq = min(max_seq_len, engine.max_input_len, engine.max_seq_len - 1)  # each chunk asks for one more token
    chunks = chunk_ids(tokenizer.encode(read_dataset(dataset)), seq, max_tokens)
    if not chunks:
        raise UserError(f"--dataset {dataset}: fewer than 2 tokens after tokenisation")
    q = quant_config(config)
    result = {"dataset": str(dataset), "engine_dir": str(engine_dir), "max_seq_len": seq, "chunks": len(chunks),
              "quant_algo": q.quant_algo, "kv_cache_quant_algo": q.kv_cache_quant_algo,
              "trtlm": score(logits_fn, chunks).to_dict()}
    if hf_model_dir is not None:
        hf = score(hf_logits_fn(hf_model_dir), chunks)
        result["hf"] = hf.to_dict()
        result["relative_delta"] = result["trtlm"]["ppl"] / hf.ppl - 1.0
    return result
