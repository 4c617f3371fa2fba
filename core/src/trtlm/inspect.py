"""``trtlm inspect``: what a directory is and which plugin handles it."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from trtlm.errors import UserError


def _dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _safetensors_stats(files: list[Path]) -> tuple[int, dict[str, int]]:
    """(parameter count, {dtype: count}) from headers only."""
    import struct

    params, dtypes = 0, {}
    for f in files:
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        header.pop("__metadata__", None)
        for info in header.values():
            count = math.prod(info["shape"])
            params += count
            dtypes[info["dtype"]] = dtypes.get(info["dtype"], 0) + count
    return params, dtypes


def inspect_path(path: Path) -> dict[str, Any]:
    """Summary of a HF, TensorRT-LLM checkpoint, engine or FT directory.

    Raises :class:`UserError` for an unsupported architecture (naming it, the
    installed families and the plugin to install).
    """
    from trtlm.plugins import get_registry

    registry = get_registry()
    fmt = _detect(path)
    info: dict[str, Any] = {"path": str(path), "format": fmt, "size_bytes": _dir_size(path)}
    if fmt == "hf":
        cfg = json.loads((path / "config.json").read_text())
        entry = registry.resolve_hf(cfg, where=str(path / "config.json"))
        files = sorted(path.glob("*.safetensors"))
        params, dtypes = _safetensors_stats(files)
        info.update(architecture=(cfg.get("architectures") or [cfg.get("model_type")])[0],
                    layers=cfg.get("num_hidden_layers", cfg.get("n_layers")),
                    hidden_size=cfg.get("hidden_size", cfg.get("d_model")),
                    parameters=params, dtypes=dtypes, config_dtype=cfg.get("dtype") or cfg.get("torch_dtype"),
                    parallel={"tp_size": 1, "pp_size": 1}, weight_files=[f.name for f in files])
    elif fmt in ("trtllm", "engine"):
        cfg = json.loads((path / "config.json").read_text())
        build_cfg = None
        if fmt == "engine":
            build_cfg, cfg = cfg.get("build_config"), cfg["pretrained_config"]
        entry = registry.resolve_trtllm(cfg.get("architecture", "?"), where=str(path / "config.json"))
        files = sorted(path.glob("rank*.safetensors"))
        params, dtypes = _safetensors_stats(files)
        info.update(architecture=cfg.get("architecture"), layers=cfg.get("num_hidden_layers"),
                    hidden_size=cfg.get("hidden_size"), parameters_all_ranks=params, dtypes=dtypes,
                    dtype=cfg.get("dtype"), parallel=cfg.get("mapping"),
                    quantization=cfg.get("quantization"), rank_files=[f.name for f in files])
        if build_cfg is not None:
            info["build_config"] = build_cfg
    else:  # ft
        readers = registry.families_reading("ft")
        if not readers:
            raise UserError(f"{path}: FasterTransformer directory, but no installed family reads FT "
                            f"(install one with: pip install trtlm-plugin-mpt)")
        entry = readers[0]
        import configparser

        ini = next(iter([path / "config.ini"] if (path / "config.ini").exists() else path.glob("*-gpu/config.ini")))
        cp = configparser.ConfigParser()
        cp.read(ini)
        gpt = dict(cp["gpt"]) if cp.has_section("gpt") else {}
        info.update(architecture="FasterTransformer " + gpt.get("model_name", "?"), layers=gpt.get("n_layer"),
                    hidden_size=gpt.get("n_embd"), dtype=gpt.get("storage_dtype"),
                    parallel={"tp_size": int(gpt.get("tensor_parallelism", 1))})
    info.update(family=entry.family.name, plugin=entry.plugin, distribution=entry.distribution)
    return info


def _detect(path: Path) -> str:
    from trtlm.convert.pipeline import detect_format

    return detect_format(path)
