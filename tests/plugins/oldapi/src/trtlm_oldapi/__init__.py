"""A plugin written for plugin API 0 (test-only): the loader must refuse it."""
from __future__ import annotations

from trtlm import Family, hookimpl

TRTLM_PLUGIN_API = 0


@hookimpl
def trtlm_families() -> list[Family]:
    return [Family(name="oldapi", hf_architectures=("OldapiForCausalLM",),
                   trtllm_architecture="OldapiForCausalLM")]
