"""The conversion driver: load -> map -> quantize -> shard -> write, through the hooks.

Writing takes one of two paths: byte copies (:mod:`trtlm.convert.bytecopy`, torch never
imported) when no tensor changes a byte, the torch writer (:mod:`trtlm.convert.execute`)
otherwise (casts, quantization, dummy weights, non-safetensors sources)."""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trtlm import dtypes
from trtlm.config import CheckpointConfig
from trtlm.convert.options import DTYPES, ConvertOptions
from trtlm.convert.plan import ConversionPlan, RankPlan
from trtlm.errors import UserError
from trtlm.fsutil import atomic_dir
from trtlm.hf_config import torch_dtype_name
from trtlm.mapping import Mapping
from trtlm.modeldir import detect_format, read_json  # noqa: F401  (re-exported)
from trtlm.plugins import get_registry
from trtlm.registry import FamilyEntry, FamilyHooks, Registry
from trtlm.sources import DummySource
from trtlm.weights import LoadedModel


@dataclass
class ConvertResult:
    output_dir: Path
    family: str
    config: dict[str, Any]
    num_tensors: int
    bytes_written: int


def resolve_model(model_dir: Path | None, family: str | None,
                  registry: Registry | None = None) -> tuple[FamilyEntry, str]:
    """The family handling ``model_dir`` (or named ``family``) and the directory format
    (``registry``: the process-wide one unless given)."""
    registry = registry or get_registry()
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
    elif fmt == "mcore":
        from trtlm.mcore.reader import resolve_family

        entry, _ckpt = resolve_family(model_dir, family)
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
        if name not in dtypes.CHECKPOINT_DTYPES:
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


def final_config(plan: ConversionPlan, mapping: Mapping, dtype: str) -> dict[str, Any]:
    parsed = CheckpointConfig.from_dict(plan.config, where="the plan's config")
    return parsed.replace(dtype=dtype, mapping=mapping).to_dict()


def write_rank_files(plan: ConversionPlan, rank_plans: list[RankPlan], mapping: Mapping, loaded: LoadedModel,
                     dtype: str, out: Path, options: ConvertOptions, shown_as: Path | None = None) -> tuple[int, int]:
    """Byte copies when nothing changes a byte (no torch), else the torch writer, which copies the
    tensors it need not build. Returns (tensors, bytes)."""
    from trtlm.convert import bytecopy

    copies = None
    if not (options.quant or options.kv_cache_dtype or options.dummy_weights):
        copies = bytecopy.plan_copies(plan, rank_plans, mapping, loaded.source, dtype)
    if copies is not None:
        return bytecopy.write_checkpoint(copies, mapping.world_size, out, loaded.origin, options.workers,
                                         options.check_finite, options.progress, shown_as=shown_as)
    from trtlm.convert.execute import write_checkpoint

    return write_checkpoint(plan, rank_plans, mapping, loaded, dtype, out, options.workers, options.progress,
                            options.check_finite, shown_as)


def copy_tokenizer(model_dir: Path | None, out: Path) -> None:
    """Carry the tokenizer files along (TensorRT-LLM ignores extra files), so an
    engine built from this checkpoint can decode text without --tokenizer-dir."""
    from trtlm.runtime.tokenizer import tokenizer_files

    if model_dir is None:
        return
    for path in tokenizer_files(model_dir):
        shutil.copy2(path, out / path.name)


def calib_path(options: ConvertOptions) -> str | None:
    """The calibration file of ``--calib-data`` (``random:...`` and the default are not files)."""
    spec = getattr(options, "calib_data", None)
    return str(spec) if spec and not str(spec).startswith("random:") else None


def convert(model_dir: Path | None, output_dir: Path, options: ConvertOptions,
            family: str | None = None, preset: str | None = None,
            registry: Registry | None = None) -> ConvertResult:
    """Convert a model into a TensorRT-LLM checkpoint (or another ``options.to`` format).

    The registry (the process-wide one unless given) is asked once, here; every later step
    gets the family's hooks."""
    registry = registry or get_registry()
    from trtlm.quant.modelopt_calib import check_options as check_calibrator

    check_calibrator(options)  # before the family's checks: a modelopt-only --quant gets its own message
    entry, fmt = resolve_model(model_dir, family, registry)
    check_capabilities(entry, options)
    hooks = registry.hooks(entry)
    if fmt == "mcore":  # Megatron-Core: read through the family's MCore layout (trtlm.mcore.reader)
        from trtlm.mcore.reader import load_mcore

        loaded = load_mcore(model_dir, hooks)
    else:
        loaded = load(hooks, model_dir, preset, options)
    inputs = {"--model-dir": model_dir, "--calib-data": calib_path(options)}
    if options.to != "trtllm":
        with atomic_dir(output_dir, options.force, inputs=inputs, command="convert") as tmp:
            written = hooks.trtlm_export(fmt=options.to, loaded=loaded, options=options, output_dir=tmp,
                                         hooks=hooks)
            if written is None:
                raise UserError(f"no plugin writes --to {options.to} for family {entry.family.name}")
            if options.to in ("mcore", "hf"):
                copy_tokenizer(model_dir, tmp)  # Megatron ignores them; `trtlm run --model-dir` decodes with them
        return ConvertResult(output_dir, entry.family.name, {}, 0, 0)
    dtype = resolve_dtype(options, loaded.hf_config, entry)
    plan = hooks.trtlm_map_layers(hf_config=loaded.hf_config, options=options)
    if options.dummy_weights:
        loaded.source = DummySource(plan.source_shapes(), seed=options.seed)
    loaded.require((name, shape, "config.json's model") for name, shape in plan.source_shapes().items())
    plan = hooks.trtlm_quantize(plan=plan, loaded=loaded, options=options, hooks=hooks) or plan
    mapping = Mapping(options.tp_size, options.pp_size, options.moe_tp_size or 0, options.moe_ep_size or 0)
    rank_plans = hooks.trtlm_shard(plan=plan, mapping=mapping)
    config = final_config(plan, mapping, dtype)
    with atomic_dir(output_dir, options.force, inputs=inputs, command="convert") as tmp:
        n, nbytes = write_rank_files(plan, rank_plans, mapping, loaded, dtype, tmp, options, shown_as=output_dir)
        (tmp / "config.json").write_text(json.dumps(config, indent=4) + "\n")
        copy_tokenizer(model_dir, tmp)
    return ConvertResult(output_dir, entry.family.name, config, n, nbytes)
