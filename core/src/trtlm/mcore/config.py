"""Megatron ``args`` <-> a Hugging Face style ``config.json`` (the Llama-style part).

trtlm's conversion starts from a Hugging Face config, so a Megatron
checkpoint is first described as one.  Checkpoints trtlm writes carry the
source config in ``args.trtlm_hf_config`` (Megatron ignores arguments it
does not know), which gives back exactly what was converted (sliding window,
token ids, ...); for any other Megatron checkpoint the config is derived
from the model arguments, and settings a Llama-style decoder cannot express
are refused naming the argument.
"""
from __future__ import annotations

from typing import Any

from trtlm.errors import UserError

#: The key under which trtlm records the source Hugging Face config in Megatron's args.
HF_CONFIG_ARG = "trtlm_hf_config"

#: args that must have this value for a Llama-style (RMSNorm, RoPE, SwiGLU, no bias) decoder.
_REQUIRED = {
    "normalization": "RMSNorm", "swiglu": True, "add_bias_linear": False, "add_qkv_bias": False,
    "position_embedding_type": "rope", "apply_layernorm_1p": False, "qk_layernorm": False,
    "rotary_interleaved": False, "squared_relu": False, "multi_latent_attention": False,
}


def recorded_hf_config(args: dict[str, Any]) -> dict[str, Any] | None:
    cfg = args.get(HF_CONFIG_ARG)
    return dict(cfg) if isinstance(cfg, dict) else None


def _need(args: dict[str, Any], key: str, where: str) -> Any:
    value = args.get(key)
    if value is None:
        raise UserError(f"{where}: args.{key} is missing; cannot describe the model")
    return value


def llama_hf_config(args: dict[str, Any], architecture: str, model_type: str, where: str) -> dict[str, Any]:
    """The Hugging Face config of a Llama-style Megatron GPT model."""
    recorded = recorded_hf_config(args)
    if recorded is not None:
        return recorded
    for key, want in _REQUIRED.items():
        have = args.get(key, want)
        if key == "add_bias_linear" and args.get("disable_bias_linear"):
            have = False
        if have != want and not (want is False and not have):
            raise UserError(f"{where}: args.{key} = {have!r}; trtlm maps Llama-style Megatron models "
                            f"({key} = {want!r}) only")
    rotary_percent = float(args.get("rotary_percent") or 1.0)
    if rotary_percent != 1.0:
        raise UserError(f"{where}: args.rotary_percent = {rotary_percent}; only full rotary embeddings are mapped")
    heads = int(_need(args, "num_attention_heads", where))
    hidden = int(_need(args, "hidden_size", where))
    kv = int(args.get("num_query_groups") or heads) if args.get("group_query_attention") else heads
    vocab = args.get("vocab_size") or _need(args, "padded_vocab_size", where)
    max_pos = int(args.get("max_position_embeddings") or args.get("seq_length") or 4096)
    return {
        "architectures": [architecture], "model_type": model_type,
        "vocab_size": int(vocab), "hidden_size": hidden,
        "intermediate_size": int(args.get("ffn_hidden_size") or 4 * hidden),
        "num_hidden_layers": int(_need(args, "num_layers", where)),
        "num_attention_heads": heads, "num_key_value_heads": kv,
        "head_dim": int(args.get("kv_channels") or hidden // heads),
        "max_position_embeddings": max_pos,
        "rms_norm_eps": float(args.get("norm_epsilon") or 1e-5),
        "rope_theta": float(args.get("rotary_base") or 10000.0),
        "tie_word_embeddings": not bool(args.get("untie_embeddings_and_output_weights", False)),
        "hidden_act": "silu", "sliding_window": None,
        "dtype": _dtype_name(args),
    }


def _dtype_name(args: dict[str, Any]) -> str:
    if args.get("bf16"):
        return "bfloat16"
    if args.get("fp16"):
        return "float16"
    name = str(args.get("params_dtype") or "torch.float32").replace("torch.", "")
    return name if name in ("float32", "float16", "bfloat16") else "float32"


def hf_config_for_args(hf: dict[str, Any]) -> dict[str, Any]:
    """The config recorded in args: without trtlm's private loader keys."""
    return {k: v for k, v in hf.items() if not k.startswith("trtlm_")}
