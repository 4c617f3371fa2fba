"""A third-party family as an outside author would write it (test-only).

``AcmeForCausalLM`` is Llama-compatible: RMSNorm, RoPE, grouped-query
attention and a SwiGLU MLP under the usual Hugging Face tensor names.  The
plugin therefore declares its family and nothing else; every per-family hook
(loading, the Llama mapping, quantization, sharding, the torch network) is
the core's default.  tests/test_plugins.py installs it as a real distribution
and converts, builds, runs and inspects a ``--preset tiny --dummy-weights``
model through it, which is what proves that discovery works for a
distribution trtlm has never heard of.
"""
from __future__ import annotations

from trtlm import PLUGIN_API_VERSION, Capabilities, Family, hookimpl

TRTLM_PLUGIN_API = PLUGIN_API_VERSION

_TINY = {
    "architectures": ["AcmeForCausalLM"], "model_type": "acme", "vocab_size": 512, "hidden_size": 32,
    "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "head_dim": 8, "max_position_embeddings": 128, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
    "hidden_act": "silu", "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "dtype": "float32",
}

FAMILY = Family(
    name="acme",
    hf_architectures=("AcmeForCausalLM",),
    hf_model_types=("acme",),
    trtllm_architecture="AcmeForCausalLM",
    capabilities=Capabilities(parallel=("tp", "pp")),
    presets={"tiny": _TINY},
    description="Acme: a Llama-compatible decoder (test-only third-party plugin)",
)


@hookimpl
def trtlm_families() -> list[Family]:
    return [FAMILY]
