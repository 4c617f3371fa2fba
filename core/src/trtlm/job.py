"""What ``trtlm run`` asks of every process that runs the model: a typed request, run and printed.

``trtlm run`` (the CLI) builds a :class:`RunRequest`; in one process it calls
:func:`execute` itself, on a multi-rank engine the launcher hands the request
(as JSON) to one worker per rank (:mod:`trtlm.runtime.worker`), each of which
calls :func:`run_rank`.  Nothing here imports the CLI, so the runtime never does.
"""
from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from trtlm.errors import UserError


@dataclass
class RunRequest:
    """Prompts (text, or lists of token ids) and how to generate and print them."""

    engine_dir: str | None
    prompts: list[Any]
    tokenizer_dir: str | None = None
    device: str = "cpu"
    max_output_len: int = 32
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    streaming: bool = False
    as_json: bool = False
    dist_timeout: float = 300.0
    engine: dict[str, Any] = field(default_factory=dict)  #: EngineConfig fields (trtlm run's engine flags)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RunRequest":
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)


def check_engine_request(engine_dir: Path, prompts: list[Any], max_output_len: int) -> None:
    """Token-id prompts against the engine's limits, from its config.json (no torch, before any rank
    starts): an id outside the vocabulary or a prompt longer than the engine's --max-input-len is one
    line here instead of a failure inside every rank.  Text prompts are checked after tokenizing, by
    the engine."""
    from trtlm.modeldir import read_json

    cfg = read_json(engine_dir / "config.json")
    pretrained, build = cfg.get("pretrained_config") or {}, cfg.get("build_config") or {}
    vocab = pretrained.get("vocab_size")
    max_input = build.get("max_input_len")
    for ids in prompts:
        if not isinstance(ids, list):
            continue
        if vocab is not None:
            bad = [t for t in ids if t >= int(vocab)]
            if bad:
                raise UserError(f"--input-ids: token id {bad[0]} is outside the vocabulary of {engine_dir} "
                                f"(ids must be in [0, {int(vocab)}))")
        if max_input is not None and len(ids) > int(max_input):
            raise UserError(f"--input-ids: a prompt of {len(ids)} tokens is longer than the engine allows "
                            f"(max_input_len {int(max_input)}; rebuild with a larger --max-input-len)")


def run_rank(request: RunRequest, env) -> None:
    """Be rank ``env.rank`` of the job: load this rank's file, generate, and print on rank 0."""
    from trtlm.api import DistributedLLM
    from trtlm.runtime.engine import EngineConfig

    with DistributedLLM(request.engine_dir, tokenizer_dir=request.tokenizer_dir, device=request.device,
                        timeout_s=request.dist_timeout, env=env,
                        engine_config=EngineConfig(**request.engine)) as llm:
        execute(llm, request, emit=env.rank == 0)


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def execute(llm, request: RunRequest, emit: bool) -> list[dict[str, Any]]:
    """Generate for ``request`` with ``llm`` (one process or one rank); print when ``emit``.

    One format whether streamed or not: a text prompt is printed followed by its completion, a
    token-id prompt as its ids followed by the generated ids (comma-separated); one sequence after
    another for a batch.  --streaming (one prompt) prints the same bytes as they are generated:
    the prompt first, then each new piece of complete text (the engine never hands out half a
    UTF-8 character), then a newline.
    """
    prompts = request.prompts
    if emit:
        for layer, path in (getattr(llm.model, "kernel_paths", None) or {}).items():
            sys.stderr.write(f"quantized {layer}: {path}\n")
    on_output = None
    streaming = emit and request.streaming and len(prompts) == 1 and not request.as_json
    if streaming:
        texts = isinstance(prompts[0], str)
        _write(prompts[0] if texts else ",".join(map(str, prompts[0])))

        def on_output(_index, out):
            completion = out.outputs[0]
            _write(completion.new_text if texts else "".join(f",{t}" for t in completion.new_token_ids))

    outputs = llm.generate(prompts, max_new_tokens=request.max_output_len, temperature=request.temperature,
                           top_k=request.top_k, top_p=request.top_p, seed=request.seed, on_output=on_output)
    if not emit:
        return outputs
    if request.as_json:
        _write(json.dumps({"outputs": outputs}) + "\n")
    elif streaming:
        _write("\n")
    else:
        for prompt, out in zip(prompts, outputs):
            _write(format_output(prompt, out) + "\n")
    return outputs


def execute_trtllm(request: RunRequest) -> list[dict[str, Any]]:
    """``trtlm run`` on an engine TensorRT-LLM built: its own runtime generates
    (:mod:`trtlm.runtime.trtllm_backend`, one line when tensorrt_llm is not installed); printed in
    the same format as trtlm's engine prints."""
    from trtlm.runtime.trtllm_backend import generate_text

    if request.streaming:
        raise UserError("--streaming: not available for engines TensorRT-LLM built (run without it)")
    results = generate_text(request.engine_dir, request.prompts, max_new_tokens=request.max_output_len,
                            tokenizer_dir=request.tokenizer_dir, temperature=request.temperature,
                            top_k=request.top_k, top_p=request.top_p, seed=request.seed)
    outputs = [{"output_ids": r["token_ids"], "text": r["text"] if isinstance(p, str) else None}
               for p, r in zip(request.prompts, results)]
    if request.as_json:
        _write(json.dumps({"outputs": outputs}) + "\n")
    else:
        for prompt, out in zip(request.prompts, outputs):
            _write(format_output(prompt, out) + "\n")
    return outputs


def format_output(prompt: Any, out: dict[str, Any]) -> str:
    """The printed form of one sequence: prompt + completion, or prompt ids + generated ids."""
    if isinstance(prompt, str) and out.get("text") is not None:
        return f"{prompt}{out['text']}"
    ids = list(prompt) if not isinstance(prompt, str) else []
    return ",".join(map(str, [*ids, *out["output_ids"]]))
