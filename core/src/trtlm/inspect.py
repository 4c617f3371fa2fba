"""``trtlm inspect``: what a directory is and which plugin handles it.

Every format gets the same summary keys, so scripts can read ``--json``
without caring what they pointed at: ``format`` (hf, trtllm, engine, ft),
``architecture``, ``family`` / ``plugin`` / ``distribution``, ``parameters``,
``dtype``, ``size_bytes`` (on disk) and ``parallel`` (tp/pp layout).  Only
file headers are read, never tensor data.
"""
from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from trtlm.config import CheckpointConfig

from trtlm.errors import UserError

#: bytes per element of FasterTransformer storage dtypes.


def _dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _header(path: Path) -> dict[str, Any]:
    """A safetensors header (``{name: {dtype, shape, data_offsets}}``) without the data."""
    try:
        with open(path, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            if n > path.stat().st_size:
                raise ValueError(f"header length {n} exceeds the file size")
            header = json.loads(fh.read(n))
    except (OSError, struct.error, ValueError) as exc:
        raise UserError(f"{path}: not a readable safetensors file ({exc})") from None
    header.pop("__metadata__", None)
    return header


def _count(headers: list[dict[str, Any]]) -> tuple[int, dict[str, int]]:
    """(elements, {safetensors dtype: elements}) over headers."""
    params, dtypes = 0, {}
    for header in headers:
        for info in header.values():
            count = math.prod(info["shape"])
            params += count
            dtypes[info["dtype"]] = dtypes.get(info["dtype"], 0) + count
    return params, dtypes


def checkpoint_parameters(config: "CheckpointConfig | dict[str, Any]", headers: list[dict[str, Any]]) -> int:
    """Parameters of a TensorRT-LLM checkpoint: every tensor merged across its tensor-parallel
    ranks with the split rules of :mod:`trtlm.layout` (on shapes only), so replicated tensors
    count once, duplicated KV heads are undone and vocabulary padding is left out; pipeline
    stages hold disjoint tensors."""
    from trtlm.config import as_checkpoint_config

    cfg = as_checkpoint_config(config)
    mapping = cfg.mapping
    if mapping.tp_size == 1:
        return _count(headers)[0]
    import torch

    from trtlm.layout import Split, split_rule

    vocab = cfg.vocab_size

    total = 0
    for pp_rank in range(mapping.pp_size):
        stage = headers[pp_rank * mapping.tp_size:(pp_rank + 1) * mapping.tp_size]
        for name, info in stage[0].items():
            parts = [torch.empty(h[name]["shape"], device="meta") for h in stage if name in h]
            if len(parts) != mapping.tp_size:
                raise UserError(f"tensor {name} is missing from some tensor-parallel ranks of stage {pp_rank}")
            try:
                rule = split_rule(name, cfg, tuple(info["shape"]))
                shape = list(rule.merge(parts, mapping).shape)
            except (ValueError, RuntimeError, IndexError):  # a layout the rules do not know: count what is stored
                rule, shape = None, [sum(math.prod(p.shape) for p in parts)]
            if isinstance(rule, Split) and rule.pad and vocab and shape[rule.dim] > vocab:
                shape[rule.dim] = vocab  # rows padded to a multiple of tp
            total += math.prod(shape)
    return total


def inspect_path(path: Path) -> dict[str, Any]:
    """Summary of a HF, TensorRT-LLM checkpoint, engine or FT directory.

    Raises :class:`UserError` for an unsupported architecture (naming it, the
    installed families and the plugin to install).
    """
    from trtlm.plugins import get_registry

    registry = get_registry()
    fmt = _detect(path)
    info: dict[str, Any] = {"path": str(path), "format": fmt}
    if fmt == "hf":
        from trtlm.hf_config import torch_dtype_name
        from trtlm.modeldir import read_json

        cfg = read_json(path / "config.json")
        entry = registry.resolve_hf(cfg, where=str(path / "config.json"))
        files = sorted(path.glob("*.safetensors"))
        params, dtypes = _count([_header(f) for f in files])
        pickles = sorted(path.glob("pytorch_model*.bin"))
        info.update(architecture=(cfg.get("architectures") or [cfg.get("model_type")])[0],
                    layers=cfg.get("num_hidden_layers", cfg.get("n_layers")),
                    hidden_size=cfg.get("hidden_size", cfg.get("d_model")),
                    parameters=params if files else None, dtype=torch_dtype_name(cfg), dtypes=dtypes,
                    parallel={"tp_size": 1, "pp_size": 1},
                    weight_files=[f.name for f in files] or [f.name for f in pickles])
    elif fmt in ("trtllm", "engine"):
        from trtlm.modeldir import read_json

        cfg = read_json(path / "config.json")
        build_cfg = None
        if fmt == "engine":
            build_cfg, cfg = cfg.get("build_config"), cfg["pretrained_config"]
        entry = registry.resolve_trtllm(cfg.get("architecture", "?"), where=str(path / "config.json"))
        from trtlm.config import CheckpointConfig

        ckpt = CheckpointConfig.from_dict(cfg, where=str(path / "config.json"))
        files = sorted(path.glob("rank*.safetensors"), key=lambda f: int(f.stem[4:]) if f.stem[4:].isdigit() else -1)
        headers = [_header(f) for f in files]
        stored, dtypes = _count(headers)
        info.update(architecture=ckpt.architecture, layers=ckpt.num_hidden_layers,
                    hidden_size=ckpt.hidden_size,
                    parameters=checkpoint_parameters(ckpt, headers) if len(files) == ckpt.mapping.world_size else None,
                    parameters_all_ranks=stored, dtype=ckpt.dtype, dtypes=dtypes,
                    parallel=cfg.get("mapping"), quantization=cfg.get("quantization"),
                    rank_files=[f.name for f in files])
        if build_cfg is not None:
            info["build_config"] = build_cfg
            from trtlm.runtime.trtllm_backend import is_trtllm_engine

            if is_trtllm_engine(path):  # TensorRT-LLM's own engines: rank{r}.engine, run through tensorrt_llm
                info.update(backend="tensorrt-llm", rank_files=sorted(p.name for p in path.glob("rank*.engine")))
    elif fmt == "mcore":  # Megatron-Core (trtlm.mcore): described by its args
        from trtlm.mcore.reader import resolve_family

        entry, ckpt = resolve_family(path, None)
        a = ckpt.args
        dtype = "bfloat16" if a.get("bf16") else "float16" if a.get("fp16") else str(a.get("params_dtype") or "")
        info.update(architecture="Megatron-Core GPT" + (f" ({a['num_experts']} experts)" if a.get("num_experts") else ""),
                    layers=a.get("num_layers"), hidden_size=a.get("hidden_size"), parameters=None,
                    dtype=dtype.replace("torch.", "") or None, iteration=ckpt.iteration,
                    parallel={"tp_size": ckpt.tp, "pp_size": ckpt.pp, "ep_size": ckpt.ep},
                    rank_files=[str(p.relative_to(path)) for p in sorted(ckpt.paths.values())])
    else:  # ft
        readers = registry.families_reading("ft")
        if not readers:
            raise UserError(f"{path}: FasterTransformer directory, but no installed family reads FT "
                            f"(install one with: pip install trtlm-plugin-mpt)")
        entry = readers[0]
        import configparser

        ini = path / "config.ini" if (path / "config.ini").exists() else sorted(path.glob("*-gpu/config.ini"))[0]
        cp = configparser.ConfigParser()
        cp.read(ini)
        gpt = dict(cp["gpt"]) if cp.has_section("gpt") else {}
        dtype = gpt.get("storage_dtype") or gpt.get("weight_data_type")
        stored = sum(f.stat().st_size for f in ini.parent.glob("*.bin"))
        from trtlm import dtypes as dtype_table

        stored_as = dtype_table.lookup(str(dtype)) if dtype else None
        itemsize = stored_as.itemsize if stored_as is not None and stored_as.is_float else None
        info.update(architecture="FasterTransformer " + gpt.get("model_name", "?"),
                    layers=int(gpt["n_layer"]) if "n_layer" in gpt else None,
                    hidden_size=int(gpt["n_embd"]) if "n_embd" in gpt else None,
                    parameters=stored // itemsize if itemsize else None, dtype=dtype,
                    parallel={"tp_size": int(gpt.get("tensor_parallelism", 1)), "pp_size": 1})
    info.update(family=entry.family.name, plugin=entry.plugin, distribution=entry.distribution,
                size_bytes=_dir_size(path))
    return info


def _detect(path: Path) -> str:
    from trtlm.modeldir import detect_format

    return detect_format(path)
