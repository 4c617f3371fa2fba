"""The conversion driver: load -> map -> quantize -> shard -> write, through the hooks."""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trtlm.convert.execute import TORCH_DTYPES, write_checkpoint
from trtlm.convert.mapping import Mapping
from trtlm.convert.options import DTYPES, ConvertOptions
from trtlm.convert.plan import ConversionPlan
from trtlm.errors import UserError
from trtlm.fsutil import atomic_dir
from trtlm.hf_config import torch_dtype_name
from trtlm.modeldir import detect_format, read_json  # noqa: F401  (re-exported)
from trtlm.plugins import FamilyEntry, FamilyHooks, get_registry
from trtlm.sources import DummySource
from trtlm.weights import LoadedModel


@dataclass
class ConvertResult:
    output_dir: Path
    family: str
    config: dict[str, Any]
    num_tensors: int
    bytes_written: int


def resolve_model(model_dir: Path | None, family: str | None) -> tuple[FamilyEntry, str]:
    """The family handling ``model_dir`` (or named ``family``) and the directory format."""
    registry = get_registry()
    if model_dir is None:
        if family is None:
            raise UserError("give --model-dir, or --family with --preset and --dummy-weights")
        return registry.family(family), "preset"
    fmt = detect_format(model_dir)
    if fmt == "hf":
        entry = registry.resolve_hf(read_json(model_dir / "config.json"), where=str(model_dir / "config.json"))
    elif fmt == "ft":
        readers = registry.families_reading("ft")
        if family:
            readers = [e for e in readers if e.family.name == family]
        if len(readers) != 1:
            names = ", ".join(e.family.name for e in readers) or "none installed"
            raise UserError(f"{model_dir}: FasterTransformer directory; families reading FT: {names} "
                            f"(pass --family, or pip install trtlm-plugin-mpt)")
        entry = readers[0]
    else:
        raise UserError(f"{model_dir}: is a {fmt} directory, not a model checkpoint to convert")
    if family and entry.family.name != family:
        raise UserError(f"{model_dir}: is a {entry.family.name} model, not --family {family}")
    return entry, fmt


def resolve_dtype(options: ConvertOptions, hf_config: dict[str, Any], entry: FamilyEntry) -> str:
    if options.dtype not in DTYPES:
        raise UserError(f"--dtype {options.dtype!r} is not one of {', '.join(DTYPES)}")
    name = options.dtype
    if name == "auto":
        name = torch_dtype_name(hf_config) or "float32"
        if name not in TORCH_DTYPES:
            name = "float32"
    if name not in entry.family.capabilities.dtypes:
        raise UserError(f"--dtype {name} is not supported by family {entry.family.name} "
                        f"(supported: {', '.join(entry.family.capabilities.dtypes)})")
    return name


def check_capabilities(entry: FamilyEntry, options: ConvertOptions) -> None:
    caps = entry.family.capabilities
    if options.pp_size > 1 and "pp" not in caps.parallel:
        raise UserError(f"family {entry.family.name} does not support --pp-size")
    if options.tp_size > 1 and "tp" not in caps.parallel:
        raise UserError(f"family {entry.family.name} does not support --tp-size")
    if (options.moe_ep_size or 1) > 1 and "ep" not in caps.parallel:
        raise UserError(f"family {entry.family.name} has no experts: --moe-ep-size does not apply")
    if options.quant and options.quant not in caps.quantization:
        raise UserError(f"--quant {options.quant} is not supported by family {entry.family.name} "
                        f"(supported: {', '.join(caps.quantization) or 'none'})")
    if options.kv_cache_dtype and options.kv_cache_dtype not in caps.kv_cache_quantization:
        raise UserError(f"--kv-cache-dtype {options.kv_cache_dtype} is not supported by family {entry.family.name}")
    if options.to not in caps.formats_out:
        raise UserError(f"--to {options.to} is not supported by family {entry.family.name} "
                        f"(supported: {', '.join(caps.formats_out)})")


def load(hooks: FamilyHooks, model_dir: Path | None, preset: str | None, options: ConvertOptions) -> LoadedModel:
    if model_dir is None:
        presets = hooks.family.presets
        if preset not in presets:
            raise UserError(f"--preset {preset!r} is not a preset of family {hooks.family.name} "
                            f"(presets: {', '.join(sorted(presets)) or 'none'})")
        if not options.dummy_weights:
            raise UserError("--preset builds a model from a config only: add --dummy-weights")
        return LoadedModel(dict(presets[preset]), DummySource({}), origin=f"{hooks.family.name}:{preset}:dummy")
    loaded = hooks.trtlm_load_weights(model_dir=model_dir, options=options)
    if loaded is None:
        raise UserError(f"{model_dir}: no plugin could load it")
    return loaded


def validate_sources(plan: ConversionPlan, loaded: LoadedModel) -> None:
    """Every tensor the plan needs is present with the shape config.json implies."""
    have = set(loaded.source.keys())
    for name, shape in plan.source_shapes().items():
        if name not in have:
            raise UserError(f"{loaded.origin}: tensor {name} is missing (needed for config.json's model)")
        actual = tuple(loaded.source.shape(name))
        if actual != tuple(shape):
            raise UserError(f"{loaded.origin}: tensor {name} has shape {list(actual)} but config.json "
                            f"implies {list(shape)}; the config and the weights do not match")


def final_config(plan: ConversionPlan, mapping: Mapping, dtype: str) -> dict[str, Any]:
    config = dict(plan.config)
    config["dtype"] = dtype
    config["mapping"] = mapping.to_config(moe=bool(config.get("moe")))
    return config


def copy_tokenizer(model_dir: Path | None, out: Path) -> None:
    """Carry the tokenizer files along (TensorRT-LLM ignores extra files), so an
    engine built from this checkpoint can decode text without --tokenizer-dir."""
    from trtlm.runtime.tokenizer import tokenizer_files

    if model_dir is None:
        return
    for path in tokenizer_files(model_dir):
        shutil.copy2(path, out / path.name)


def convert(model_dir: Path | None, output_dir: Path, options: ConvertOptions,
            family: str | None = None, preset: str | None = None) -> ConvertResult:
    """Convert a model into a TensorRT-LLM checkpoint (or another ``options.to`` format)."""
    entry, _fmt = resolve_model(model_dir, family)
    check_capabilities(entry, options)
    registry = get_registry()
    hooks = registry.hooks(entry)
    loaded = load(hooks, model_dir, preset, options)
    if options.to != "trtllm":
        with atomic_dir(output_dir, options.force) as tmp:
            written = hooks.trtlm_export(fmt=options.to, loaded=loaded, options=options, output_dir=tmp)
            if written is None:
                raise UserError(f"no plugin writes --to {options.to} for family {entry.family.name}")
        return ConvertResult(output_dir, entry.family.name, {}, 0, 0)
    dtype = resolve_dtype(options, loaded.hf_config, entry)
    plan = hooks.trtlm_map_layers(hf_config=loaded.hf_config, options=options)
    if options.dummy_weights:
        loaded.source = DummySource(plan.source_shapes(), seed=options.seed)
    validate_sources(plan, loaded)
    plan = hooks.trtlm_quantize(plan=plan, loaded=loaded, options=options) or plan
    mapping = Mapping(options.tp_size, options.pp_size, options.moe_tp_size or 0, options.moe_ep_size or 0)
    rank_plans = hooks.trtlm_shard(plan=plan, mapping=mapping)
    config = final_config(plan, mapping, dtype)
    with atomic_dir(output_dir, options.force) as tmp:
        n, nbytes = write_checkpoint(plan, rank_plans, mapping, loaded, dtype, tmp, options.workers, options.progress)
        (tmp / "config.json").write_text(json.dumps(config, indent=4) + "\n")
        copy_tokenizer(model_dir, tmp)
    return ConvertResult(output_dir, entry.family.name, config, n, nbytes)
