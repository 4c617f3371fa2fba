"""The core's default hook implementations, registered as plugin ``builtin``.

Every implementation is ``trylast``: a family plugin's own implementation of
the same hook runs first and wins by returning a value.  Nothing heavy is
imported at module level (this module loads with ``trtlm --help``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from trtlm import PLUGIN_API_VERSION, hookimpl

TRTLM_PLUGIN_API = PLUGIN_API_VERSION


@hookimpl(trylast=True)
def trtlm_load_weights(family, model_dir: Path, options):
    """Hugging Face directory: config.json + safetensors (pickle only when allowed)."""
    from trtlm.errors import UserError
    from trtlm.modeldir import read_json
    from trtlm.sources import DummySource, SafetensorsSource, load_pickle_dir
    from trtlm.weights import LoadedModel

    hf_config = read_json(model_dir / "config.json")
    if options.dummy_weights:
        return LoadedModel(hf_config, DummySource({}), origin=f"{model_dir} (dummy weights)")
    if list(model_dir.glob("*.safetensors")) or (model_dir / "model.safetensors.index.json").exists():
        return LoadedModel(hf_config, SafetensorsSource.from_dir(model_dir), origin=str(model_dir))
    pickles = sorted(model_dir.glob("pytorch_model*.bin"))
    if pickles:
        if not options.allow_pickle:
            raise UserError(f"{pickles[0]}: pickle checkpoint refused (it can run code when loaded); "
                            f"convert it to safetensors, or pass --allow-pickle to load it with weights_only=True")
        return LoadedModel(hf_config, load_pickle_dir(model_dir), origin=str(model_dir))
    raise UserError(f"{model_dir}: no *.safetensors files (for a config-only directory pass --dummy-weights)")


@hookimpl(trylast=True)
def trtlm_map_layers(family, hf_config: dict[str, Any], options):
    """Llama-style decoders (the layout most HF causal LMs share)."""
    from trtlm.llama import llama_plan

    return llama_plan(hf_config, options, architecture=family.trtllm_architecture)


@hookimpl(trylast=True)
def trtlm_quantize(family, plan, loaded, options, hooks):
    """Per-tensor generic quantization (:func:`trtlm.quant.plan.quantize_plan`); the plan unchanged
    when neither ``--quant`` nor ``--kv-cache-dtype`` is given."""
    if not options.quant and not options.kv_cache_dtype:
        return plan
    from trtlm.quant.plan import quantize_plan

    return quantize_plan(plan, loaded, options, hooks)


@hookimpl(trylast=True)
def trtlm_shard(family, plan, mapping):
    """Rule-driven placement (:func:`trtlm.convert.plan.default_shard`): layers on pipeline stages,
    tensor-parallel splits from :mod:`trtlm.layout`."""
    from trtlm.convert.plan import default_shard

    return default_shard(plan, mapping)


@hookimpl(trylast=True)
def trtlm_export(family, fmt: str, loaded, options, output_dir: Path, hooks):
    """``--to mcore``: a Megatron-Core checkpoint (:func:`trtlm.mcore.writer.export_mcore`), laid out by
    the family's ``trtlm_mcore_layout``; ``--to hf``: a Hugging Face directory of the loaded tensors
    (:func:`trtlm.mcore.hf.export_hf`, the way back from Megatron-Core); ``None`` for other formats."""
    if fmt == "mcore":
        from trtlm.mcore.writer import export_mcore

        return export_mcore(family, hooks, loaded, options, output_dir)
    if fmt == "hf":
        from trtlm.mcore.hf import export_hf

        return export_hf(loaded, options, output_dir)
    return None


@hookimpl(trylast=True)
def trtlm_mcore_layout(family, hf_config: dict[str, Any], tp_size: int, pp_size: int, ep_size: int):
    """Llama-style decoders (:func:`trtlm.mcore.layout.llama_layout`): dense SwiGLU MLP, TE names."""
    from trtlm.mcore.layout import llama_layout

    return llama_layout(hf_config, tp_size, pp_size, ep_size)


@hookimpl(trylast=True)
def trtlm_mcore_config(family, args: dict[str, Any]):
    """The recorded or derived Llama-style config (:func:`trtlm.mcore.config.llama_hf_config`);
    refuses Mixture-of-Experts args, which need a family with experts."""
    from trtlm.errors import UserError
    from trtlm.mcore.config import llama_hf_config, recorded_hf_config

    if args.get("num_experts") and recorded_hf_config(args) is None:
        raise UserError(f"a Mixture-of-Experts Megatron checkpoint (num_experts={args['num_experts']}): "
                        f"family {family.name} has no experts; pass --family of one that has")
    model_type = family.hf_model_types[0] if family.hf_model_types else family.name
    return llama_hf_config(args, family.hf_architectures[0], model_type, where="args")


@hookimpl(trylast=True)
def trtlm_build_network(family, config: dict[str, Any], backend: str, options):
    """torch: ``functools.partial(Transformer, config)``, the config-driven decoder of
    :mod:`trtlm.runtime.model`; tensorrt-llm: TensorRT-LLM's own builder, imported on use."""
    if backend == "torch":
        from functools import partial

        from trtlm.runtime.model import Transformer

        return partial(Transformer, config)
    if backend == "tensorrt-llm":
        from trtlm.runtime.trtllm_backend import TensorRTLLMNetwork

        return TensorRTLLMNetwork(config, options)
    return None
