"""Triton's generate extension with tensorrtllm_backend's ``ensemble`` inputs.

A client written for ``POST /v2/models/ensemble/generate`` sends
``{"text_input", "max_tokens", "bad_words", "stop_words", "end_id", "pad_id",
"temperature", "top_k", "top_p", "seed", "stream", "exclude_input_in_output",
"return_log_probs", ...}`` -- at the top level or under ``"parameters"`` -- and
reads ``{"model_name", "model_version", "text_output", ...}``.  Like the
ensemble, the prompt is echoed unless ``exclude_input_in_output``; streamed
responses carry only the new text (what tensorrtllm_backend's streaming and
the benchmark clients expect).  Inputs the ensemble accepts but trtlm cannot
honour with their non-default values (penalties, beams, logits) are rejected
with a 400 that names them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from trtlm.serve.errors import bad_request

#: Model names a tensorrtllm_backend client may address besides the served name.
TRITON_ALIASES = ("ensemble", "tensorrt_llm_bls")

#: input -> value that means "off" (anything else is rejected as unsupported).
UNSUPPORTED = {"beam_width": 1, "num_return_sequences": 1, "length_penalty": 1.0, "repetition_penalty": 1.0,
               "presence_penalty": 0.0, "frequency_penalty": 0.0, "return_context_logits": False,
               "return_generation_logits": False}


@dataclass
class TritonRequest:
    text_input: str
    max_tokens: int
    stream: bool
    exclude_input_in_output: bool
    return_log_probs: bool
    stop_words: list[str]
    bad_words: list[str]
    end_id: int | None
    temperature: float
    top_k: int
    top_p: float
    seed: int | None
    min_tokens: int
    request_id: str | None


def _scalar(value: Any) -> Any:
    """Triton clients sometimes send a tensor of one element (``[5]`` or ``[[5]]``)."""
    while isinstance(value, list) and len(value) == 1:
        value = value[0]
    return value


def _int(fields: dict[str, Any], name: str, default: int | None, lo: int | None = None) -> int | None:
    value = _scalar(fields.get(name, default))
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
        raise bad_request(name, f"expected an integer, got {value!r}")
    if lo is not None and value < lo:
        raise bad_request(name, f"must be >= {lo}, got {value}")
    return int(value)


def _float(fields: dict[str, Any], name: str, default: float, lo: float, hi: float | None = None,
           open_lo: bool = False) -> float:
    value = _scalar(fields.get(name, default))
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise bad_request(name, f"expected a number, got {value!r}")
    if value < lo or (open_lo and value == lo) or (hi is not None and value > hi):
        bound = f"> {lo}" if open_lo else f">= {lo}"
        raise bad_request(name, f"must be {bound}" + (f" and <= {hi}" if hi is not None else "") + f", got {value}")
    return float(value)


def _bool(fields: dict[str, Any], name: str, default: bool) -> bool:
    value = _scalar(fields.get(name, default))
    if not isinstance(value, bool):
        raise bad_request(name, f"expected true or false, got {value!r}")
    return value


def _words(fields: dict[str, Any], name: str) -> list[str]:
    """A word list: ``"a,b"``-free: a string is one word, a list is several; ``""`` means none."""
    value = fields.get(name)
    if value is None or value == "":
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        flat: list[Any] = []
        for v in value:
            flat.extend(v if isinstance(v, list) else [v])
        if all(isinstance(v, str) for v in flat):
            return [v for v in flat if v]
    raise bad_request(name, "expected a string or a list of strings")


def parse(body: Any) -> TritonRequest:
    """Validate a generate request body; 400 naming the field on any mistake."""
    if not isinstance(body, dict):
        raise bad_request("body", "expected a JSON object")
    params = body.get("parameters", {})
    if not isinstance(params, dict):
        raise bad_request("parameters", "expected a JSON object")
    fields = {**params, **{k: v for k, v in body.items() if k != "parameters"}}
    text = _scalar(fields.get("text_input"))
    if text is None:
        raise bad_request("text_input", "required field is missing")
    if not isinstance(text, str):
        raise bad_request("text_input", f"expected a string, got {type(text).__name__}")
    if "max_tokens" not in fields:
        raise bad_request("max_tokens", "required field is missing")
    for name, neutral in UNSUPPORTED.items():
        if name in fields and _scalar(fields[name]) != neutral:
            raise bad_request(name, f"not supported by trtlm (use {neutral!r} or leave it out)")
    request_id = fields.get("id")
    return TritonRequest(
        text_input=text, max_tokens=_int(fields, "max_tokens", None, lo=1),
        stream=_bool(fields, "stream", False),
        exclude_input_in_output=_bool(fields, "exclude_input_in_output", False),
        return_log_probs=_bool(fields, "return_log_probs", False),
        stop_words=_words(fields, "stop_words"), bad_words=_words(fields, "bad_words"),
        end_id=_int(fields, "end_id", None, lo=0), temperature=_float(fields, "temperature", 0.0, 0.0, 100.0),
        top_k=_int(fields, "top_k", 0, lo=0), top_p=_float(fields, "top_p", 1.0, 0.0, 1.0, open_lo=True),
        seed=_int(fields, "seed", None, lo=0), min_tokens=_int(fields, "min_tokens", 0, lo=0),
        request_id=str(request_id) if request_id is not None else None)


def sampling_params(req: TritonRequest, tokenizer, vocab_size: int):
    """SamplingParams of a Triton request: ``end_id`` replaces the model's EOS, as in TensorRT-LLM;
    ``bad_words`` are tokenized (no BOS) into the sequences never generated."""
    from trtlm.runtime.sampling import SamplingParams

    if req.end_id is not None and req.end_id >= vocab_size:
        raise bad_request("end_id", f"{req.end_id} is outside the vocabulary (0..{vocab_size - 1})")
    bad_ids = []
    for word in req.bad_words:
        ids = tokenizer.encode(word)
        if getattr(tokenizer, "add_bos", False) and ids and ids[0] == tokenizer.bos_id:
            ids = ids[1:]
        if ids:
            bad_ids.append(ids)
    return SamplingParams(max_tokens=req.max_tokens, min_tokens=req.min_tokens, temperature=req.temperature,
                          top_k=req.top_k, top_p=req.top_p, seed=req.seed,
                          stop_token_ids=[req.end_id] if req.end_id is not None else [],
                          ignore_eos=req.end_id is not None, stop=list(req.stop_words),
                          logprobs=0 if req.return_log_probs else None, bad_words_ids=bad_ids)


def response(model_name: str, text: str, req: TritonRequest, completion=None, final: bool = True) -> dict[str, Any]:
    """One generate (or generate_stream) response object."""
    out: dict[str, Any] = {"model_name": model_name, "model_version": "1", "batch_index": 0, "sequence_index": 0,
                           "sequence_id": 0, "sequence_start": False, "sequence_end": False, "text_output": text}
    if req.request_id is not None:
        out["id"] = req.request_id
    if req.return_log_probs and completion is not None and completion.logprobs is not None:
        lps = [entry.get(tid) for tid, entry in zip(completion.token_ids, completion.logprobs, strict=False)]
        out["output_log_probs"] = lps
        out["cum_log_probs"] = completion.cumulative_logprob if completion.cumulative_logprob is not None \
            else float(sum(lp for lp in lps if lp is not None))
    if final and completion is not None:
        out["finish_reason"] = completion.finish_reason
    return out
