"""The Triton repository of a tensorrt-llm engine: tensorrtllm_backend's ``inflight_batcher_llm`` layout.

The five models (``preprocessing``, ``tensorrt_llm``, ``postprocessing``,
``ensemble``, ``tensorrt_llm_bls``) are tensorrtllm_backend's own files, kept
verbatim under ``templates/inflight_batcher_llm/`` (``UPSTREAM`` names the
commit and each file's git blob id).  Instead of ``fill_template.py`` and a
dozen ``${...}`` per file by hand, every placeholder gets a value here:

* :func:`fill_values` — from the engine's ``config.json`` (batch size, beam
  width, attention window, dtypes, whether paged context FMHA allows KV reuse
  and chunked context) and the command's options, or tensorrtllm_backend's
  documented default (``docs/model_config.md``) written out explicitly;
* :data:`UNSET` — parameters that only mean something for features a
  decoder-only engine does not use (encoder-decoder, LoRA prefetch,
  speculative decoding, multimodal, explicit GPU lists).  Their
  ``parameters { ... }`` block is removed: tensorrtllm_backend reads a
  missing parameter exactly as an unfilled ``${...}`` (its C++ ``GetParameter``
  throws and the caller falls back to the default), so nothing changes except
  that no ``${`` is left.

The engine goes to ``tensorrt_llm/1/engine`` and the tokenizer to
``preprocessing/1/tokenizer``.  tensorrtllm_backend reads paths as given, so
``config.pbtxt`` holds them as absolute paths of the repository's final
location.
"""
from __future__ import annotations

import re
import shutil
from pathlib import Path
from string import Template
from typing import Any

from trtlm.errors import UserError
from trtlm.triton.files import RepoOptions, place, place_tokenizer

TEMPLATES = Path(__file__).with_name("templates") / "inflight_batcher_llm"
#: tensorrtllm_backend commit the templates are copied from: the last before ``all_models`` moved into
#: NVIDIA/TensorRT-LLM (``triton_backend/``); the layout and parameters are the same there.
UPSTREAM_COMMIT = "c2e65b88d85255be30cf50440a91662abeb497dd"
MODELS = ("preprocessing", "tensorrt_llm", "postprocessing", "ensemble", "tensorrt_llm_bls")
#: Files copied as they are (model code of the Python-backend models).
CODE_FILES = ("preprocessing/1/model.py", "postprocessing/1/model.py", "tensorrt_llm_bls/1/model.py",
              "tensorrt_llm_bls/1/lib/decode.py", "tensorrt_llm_bls/1/lib/triton_decoder.py")

#: Parameters removed (placeholder -> what the backend does without it).
UNSET: dict[str, str] = {
    "max_tokens_in_paged_kv_cache": "KV cache sized by kv_cache_free_gpu_mem_fraction alone",
    "cross_kv_cache_fraction": "encoder-decoder models only",
    "encoder_engine_dir": "encoder-decoder models only",
    "gpu_device_ids": "all visible GPUs",
    "participant_ids": "orchestrator mode without spawned processes only",
    "iter_stats_max_iterations": "the executor's default",
    "request_stats_max_iterations": "the executor's default",
    "lora_prefetch_dir": "no LoRA adapters preloaded",
    "decoding_mode": "chosen from the requests (top-k / top-p)",
    "medusa_choices": "Medusa engines only",
    "eagle_choices": "EAGLE engines only",
    "lookahead_window_size": "lookahead decoding only",
    "lookahead_ngram_size": "lookahead decoding only",
    "lookahead_verification_set_size": "lookahead decoding only",
    "max_num_images": "multimodal models only",
    "sink_token_length": "no attention sink tokens (the engine sets none)",
}

_TRITON_DTYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "bfloat16": "TYPE_BF16"}


def _bool(value: bool) -> str:
    return "true" if value else "false"


def fill_values(cfg: dict[str, Any], options: RepoOptions, engine_path: Path, tokenizer_path: Path) -> dict[str, str]:
    """The value of every filled placeholder, from the engine config and the options."""
    pretrained, build = cfg["pretrained_config"], cfg["build_config"]
    plugins = build.get("plugin_config") or {}
    paged_context = bool(plugins.get("use_paged_context_fmha"))  # KV reuse and chunked context need it
    max_batch_size = options.max_batch_size or int(build.get("max_batch_size") or 8)
    window = (pretrained.get("runtime_defaults") or {}).get("max_attention_window")
    values = {
        # tensorrt_llm
        "triton_backend": "tensorrtllm",
        "triton_max_batch_size": str(max_batch_size),
        "decoupled_mode": _bool(options.decoupled),
        "max_queue_delay_microseconds": str(options.max_queue_delay_us),
        "max_queue_size": "0",
        "engine_dir": str(engine_path),
        "tokenizer_dir": str(tokenizer_path),
        "batching_strategy": "inflight_fused_batching",
        "max_beam_width": str(int(build.get("max_beam_width") or 1)),
        "kv_cache_free_gpu_mem_fraction": repr(float(options.kv_cache_free_gpu_mem_fraction)),
        "kv_cache_host_memory_bytes": "0",
        "kv_cache_onboard_blocks": "true",
        "batch_scheduler_policy": "guaranteed_no_evict",
        "enable_kv_cache_reuse": _bool(paged_context),
        "enable_chunked_context": _bool(paged_context),
        "exclude_input_in_output": "false",
        "cancellation_check_period_ms": "100",
        "stats_check_period_ms": "100",
        "normalize_log_probs": "true",
        "num_nodes": "1",
        "gpu_weights_percent": "1.0",
        "enable_context_fmha_fp32_acc": "false",
        "multi_block_mode": "true",
        "cuda_graph_mode": "false",
        "cuda_graph_cache_size": "0",
        "speculative_decoding_fast_logits": "false",
        "lora_cache_optimal_adapter_size": "8",
        "lora_cache_max_adapter_size": "64",
        "lora_cache_gpu_memory_fraction": "0.05",
        "lora_cache_host_memory_bytes": str(2 ** 30),
        "guided_decoding_backend": "",  # empty = off (the backend checks for empty)
        "xgrammar_tokenizer_info_path": "",
        "logits_datatype": _TRITON_DTYPES.get(str(pretrained.get("logits_dtype") or "float32"), "TYPE_FP32"),
        "encoder_input_features_data_type": _TRITON_DTYPES.get(str(pretrained.get("dtype")), "TYPE_FP16"),
        # pre/postprocessing and BLS
        "add_special_tokens": "true",
        "skip_special_tokens": "true",
        "multimodal_model_path": "",  # empty = text only (preprocessing checks for empty)
        "preprocessing_instance_count": str(options.instance_count),
        "postprocessing_instance_count": str(options.instance_count),
        "bls_instance_count": str(options.instance_count),
        "accumulate_tokens": "false",
        "tensorrt_llm_model_name": "tensorrt_llm",
        "tensorrt_llm_draft_model_name": "",
        "multimodal_encoders_name": "",
    }
    sink = (pretrained.get("runtime_defaults") or {}).get("sink_token_length")
    if sink:
        values["sink_token_length"] = str(int(sink))
    if window:
        values["max_attention_window_size"] = ",".join(str(int(w)) for w in window)
    else:
        values["max_attention_window_size"] = str(int(build.get("max_seq_len") or 0) or "")
    return values


#: A commented-out parameter block (``enable_trt_overlap``, deprecated upstream): dropped with its placeholder.
_COMMENTED_BLOCK = re.compile(r"(?m)^#\s*parameters:?\s*\{\n(?:#.*\n)*?#\s*\}\n")
_PARAM_BLOCK = re.compile(r'parameters:?\s*\{\s*key:\s*"[^"]+"\s*value:\s*\{\s*string_value:\s*"\$\{(\w+)\}"\s*\}\s*\}\n?')


def fill(template: str, values: dict[str, str], where: str) -> str:
    """Substitute every placeholder of ``template``: parameters in :data:`UNSET` are removed, the rest filled."""
    template = _COMMENTED_BLOCK.sub(lambda m: "" if "${" in m.group(0) else m.group(0), template)
    text = _PARAM_BLOCK.sub(lambda m: "" if m.group(1) in UNSET and m.group(1) not in values else m.group(0),
                           template)
    try:
        text = Template(text).substitute(values)
    except KeyError as exc:
        raise RuntimeError(f"{where}: no value for placeholder {exc}") from None
    if "${" in text:
        raise RuntimeError(f"{where}: a placeholder is left")
    return text


def write_trtllm_repo(repo: Path, final: Path, engine_dir: Path, cfg: dict[str, Any], options: RepoOptions,
                      tokenizer_dir: Path | None) -> dict[str, Any]:
    """Write the five models into ``repo`` (paths in configs point at ``final``, where it will be)."""
    if tokenizer_dir is None:
        from trtlm.runtime.tokenizer import tokenizer_files

        if not tokenizer_files(engine_dir):
            raise UserError(f"--engine-dir {engine_dir}: a tensorrt-llm engine carries no tokenizer; pass "
                            f"--tokenizer-dir (the Hugging Face checkpoint's directory)")
        tokenizer_dir = engine_dir
    world = int((cfg["pretrained_config"].get("mapping") or {}).get("world_size") or 1)
    engine_rel, tokenizer_rel = Path("tensorrt_llm/1/engine"), Path("preprocessing/1/tokenizer")
    values = fill_values(cfg, options, final / engine_rel, final / tokenizer_rel)
    names = {m: (options.model_name if m == "ensemble" else m) for m in MODELS}
    for model in MODELS:
        text = fill((TEMPLATES / model / "config.pbtxt").read_text(), values, f"{model}/config.pbtxt")
        if names[model] != model:
            text = re.sub(rf'^name: "{model}"$', f'name: "{names[model]}"', text, count=1, flags=re.M)
        (repo / names[model] / "1").mkdir(parents=True, exist_ok=True)
        (repo / names[model] / "config.pbtxt").write_text(text)
    for rel in CODE_FILES:
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(TEMPLATES / rel, repo / rel)
    shutil.copyfile(TEMPLATES / "LICENSE", repo / "tensorrt_llm" / "LICENSE.tensorrtllm_backend")
    place(engine_dir, repo / engine_rel, options.link)
    place_tokenizer(Path(tokenizer_dir), repo / tokenizer_rel, options.link)
    return {"models": [names[m] for m in MODELS], "max_batch_size": int(values["triton_max_batch_size"]),
            "decoupled": options.decoupled, "world_size": world, "parameters": values, "unset": sorted(UNSET),
            "upstream": f"triton-inference-server/tensorrtllm_backend@{UPSTREAM_COMMIT[:7]}"}
