"""A plugin claiming ``MistralForCausalLM``, which trtlm-plugin-mistral owns (test-only).

Two owners for one architecture is an error naming both distributions; the
plugin loaded later (entry points load sorted by name) is rejected.
"""
from __future__ import annotations

from trtlm import PLUGIN_API_VERSION, Family, hookimpl

TRTLM_PLUGIN_API = PLUGIN_API_VERSION


@hookimpl
def trtlm_families() -> list[Family]:
    return [Family(name="conflict", hf_architectures=("MistralForCausalLM",),
                   trtllm_architecture="ConflictForCausalLM")]
