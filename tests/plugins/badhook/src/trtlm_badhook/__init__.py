"""A plugin with a hook implementation that matches no trtlm hookspec (test-only).

A typo in a hook name would otherwise be ignored silently (pluggy only
reports unknown hooks when asked); the loader rejects the whole plugin, so
its family must not be registered either.
"""
from __future__ import annotations

from trtlm import PLUGIN_API_VERSION, Family, hookimpl

TRTLM_PLUGIN_API = PLUGIN_API_VERSION


@hookimpl
def trtlm_families() -> list[Family]:
    return [Family(name="badhook", hf_architectures=("BadhookForCausalLM",),
                   trtllm_architecture="BadhookForCausalLM")]


@hookimpl
def trtlm_not_a_hook(family, hf_config):
    raise AssertionError("never called: the plugin is rejected at load")
