"""Tiny model factories: a family's ``tiny`` preset, saved as a real HF directory."""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from trtlm.registry import FamilyHooks, Registry


def make_tiny_model(family: str, directory: Path, overrides: dict[str, Any] | None = None,
                    seed: int = 0, preset: str = "tiny", registry: Registry | None = None) -> Path:
    """Write a tiny model of ``family`` to ``directory`` and return it.

    When transformers has a class for the preset's architecture, the model is
    that class with random weights (``save_pretrained``, safetensors), so its
    logits can be compared with trtlm's.  Otherwise the weights are the random
    tensors the family's own plan asks for, written as ``model.safetensors``:
    every family can be tested, with or without a transformers counterpart.
    ``registry`` defaults to the process-wide one; the family's hooks are resolved once, here.
    """
    if registry is None:
        from trtlm.plugins import get_registry

        registry = get_registry()
    entry = registry.family(family)
    if preset not in entry.family.presets:
        raise ValueError(f"family {family!r} has no {preset!r} preset; add one to its Family(presets=...)")
    config = {**entry.family.presets[preset], **(overrides or {})}
    config.setdefault("dtype", "float32")
    directory.mkdir(parents=True, exist_ok=True)
    model_cls = transformers_class(config)
    if model_cls is not None:
        import torch

        torch.manual_seed(seed)
        hf_config = model_cls.config_class.from_dict(config)
        model = model_cls(hf_config).eval()
        model.save_pretrained(directory, safe_serialization=True)
        return directory
    _write_dummy(registry.hooks(entry), config, directory, seed)
    return directory


def transformers_class(config: dict[str, Any]):
    """transformers' class for ``config["architectures"][0]``, or ``None``."""
    try:
        import transformers
    except ImportError:
        return None
    for arch in config.get("architectures") or []:
        cls = getattr(transformers, arch, None)
        if cls is not None:
            return cls
    return None


def _write_dummy(hooks: FamilyHooks, config: dict[str, Any], directory: Path, seed: int) -> None:
    from safetensors.torch import save_file

    from trtlm.convert.options import ConvertOptions
    from trtlm.sources import DummySource

    plan = hooks.trtlm_map_layers(hf_config=config, options=ConvertOptions())
    source = DummySource(plan.source_shapes(), seed=seed)
    save_file({name: source.get(name).contiguous() for name in source.keys()}, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps(config, indent=2))
