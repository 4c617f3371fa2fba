"""The engine's batching and KV-cache flags, shared by every command that runs the engine
(``run``, ``serve``): one definition, one spelling, one help text."""
from __future__ import annotations

from typing import Any, Callable

import click

#: TensorRT-LLM's names of the capacity scheduler policies.
CAPACITY_POLICIES = ("guaranteed_no_evict", "max_utilization")

ENGINE_FLAGS = ("max_batch_size", "max_num_tokens", "kv_cache_free_gpu_mem_fraction", "kv_cache_gb",
                "capacity_policy", "enable_prefix_caching", "async_scheduling")


def engine_options(fn: Callable) -> Callable:
    """Add the engine flags to a click command (their values reach it under the names in
    :data:`ENGINE_FLAGS`; :func:`engine_settings` collects them)."""
    options = [
        click.option("--max-batch-size", type=click.IntRange(min=1),
                     help="Sequences in flight at once (default: the engine's build --max-batch-size); more "
                          "requests wait in the queue."),
        click.option("--max-num-tokens", type=click.IntRange(min=1), default=8192, show_default=True,
                     help="Tokens computed per engine step; longer prompts are split across steps (chunked "
                          "prefill) so running sequences keep decoding."),
        click.option("--kv-cache-free-gpu-mem-fraction", type=click.FloatRange(0, 1, min_open=True), default=0.9,
                     show_default=True,
                     help="GPU: share of the memory free after loading the weights that the paged KV cache takes."),
        click.option("--kv-cache-gb", type=click.FloatRange(0, min_open=True),
                     help="KV cache size in GiB (CPU default: enough for max-batch-size full sequences, at most 1)."),
        click.option("--capacity-policy", type=click.Choice(CAPACITY_POLICIES), default="guaranteed_no_evict",
                     show_default=True,
                     help="guaranteed_no_evict: admit a request only when its whole generation fits in the KV "
                          "cache; max_utilization: admit greedily, preempt (and later recompute) the newest "
                          "sequence when blocks run out."),
        click.option("--enable-prefix-caching/--disable-prefix-caching", default=True, show_default=True,
                     help="Reuse the KV blocks of prompt prefixes seen before."),
        click.option("--async-scheduling/--no-async-scheduling", default=None,
                     help="Queue the next decode step before the host has read this step's tokens back, so "
                          "the host's per-step work overlaps the GPU (default: on where decode steps replay "
                          "CUDA graphs)."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def engine_settings(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Pop the engine flags out of a command's keyword arguments (JSON-able, for rank workers)."""
    return {name: kwargs.pop(name) for name in ENGINE_FLAGS}


def engine_config(settings: dict[str, Any] | None):
    """The :class:`~trtlm.runtime.engine.EngineConfig` of :func:`engine_settings`' result."""
    from trtlm.runtime.engine import EngineConfig

    return EngineConfig(**(settings or {}))
