"""``trtlm build``: check a checkpoint against the network and write an engine directory.

An engine directory holds ``config.json`` (``pretrained_config``: the
checkpoint's config, ``build_config``: the build settings and backend) and,
for the torch backend, one ``rank{r}.safetensors`` per rank in exactly the
layout the runtime's modules load (the checkpoint layout: the runtime keeps
TensorRT-LLM's names), checked against the network before it is written.
"""
from __future__ import annotations

import json
import os
import shutil
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from trtlm.errors import UserError
from trtlm.fsutil import atomic_dir


@dataclass
class BuildOptions:
    backend: str = "torch"
    max_batch_size: int = 8
    max_input_len: int = 1024
    max_seq_len: int | None = None
    workers: int = 1
    force: bool = False


def read_checkpoint_config(ckpt: Path) -> dict[str, Any]:
    from trtlm.modeldir import read_json

    if not ckpt.is_dir():
        raise UserError(f"{ckpt}: no such directory")
    config = read_json(ckpt / "config.json")
    for key in ("architecture", "num_hidden_layers", "hidden_size", "num_attention_heads", "vocab_size"):
        if key not in config:
            raise UserError(f"{ckpt / 'config.json'}: not a TensorRT-LLM checkpoint config (no {key!r})")
    return config


def network_for_rank(hooks, config: dict[str, Any], rank: int, options: BuildOptions, device="meta"):
    """The torch network of one rank, on the meta device unless asked otherwise."""
    from trtlm.mapping import Mapping
    from trtlm.runtime.distributed import rank_network

    return rank_network(hooks, config, Mapping.from_config(config), rank, options, device=device)


def check_rank(path: Path, expected: dict[str, tuple[tuple[int, ...], Any]]) -> list[str]:
    """Compare a rank file with the network's parameters, as TensorRT-LLM's loader does:
    a missing tensor or a wrong shape/dtype is an error, an extra tensor a warning."""
    from trtlm import dtypes
    from trtlm.sources import read_safetensors_header

    if not path.exists():
        raise UserError(f"{path}: missing")
    header = read_safetensors_header(path)
    for name, (shape, dtype) in expected.items():
        if name not in header:
            raise UserError(f"{path}: tensor {name} is missing (the network needs it)")
        got = tuple(header[name]["shape"])
        if got != tuple(shape):
            raise UserError(f"{path}: tensor {name} has shape {list(got)}, the network expects {list(shape)}")
        stored = dtypes.lookup(header[name]["dtype"])
        if stored is None or dtypes.torch_dtype(stored) != dtype:
            raise UserError(f"{path}: tensor {name} has dtype {header[name]['dtype']}, the network expects {dtype}")
    return sorted(set(header) - set(expected))


def build(checkpoint_dir: Path, output_dir: Path, options: BuildOptions) -> dict[str, Any]:
    """Check a TensorRT-LLM checkpoint and write an engine directory."""
    from trtlm.plugins import get_registry

    config = read_checkpoint_config(checkpoint_dir)
    registry = get_registry()
    entry = registry.resolve_trtllm(config["architecture"], where=str(checkpoint_dir / "config.json"))
    hooks = registry.hooks(entry)
    if options.backend not in ("torch", "tensorrt-llm"):
        raise UserError(f"--backend {options.backend!r}: choose torch or tensorrt-llm")
    max_seq = options.max_seq_len or int(config.get("max_position_embeddings", 2048))
    build_config = dict(asdict(options), max_seq_len=max_seq)
    build_config.pop("force")
    build_config.pop("workers")
    world = int((config.get("mapping") or {}).get("world_size", 1))
    if options.backend == "tensorrt-llm":
        network = hooks.trtlm_build_network(config=config, backend="tensorrt-llm", options=options)
        with atomic_dir(output_dir, options.force, inputs={"--checkpoint-dir": checkpoint_dir},
                        command="build") as tmp:
            used = network.build(checkpoint_dir, tmp)
        return used or build_config  # what TensorRT-LLM actually used

    def check(rank: int) -> list[str]:
        net = network_for_rank(hooks, config, rank, options)
        expected = {k: (tuple(v.shape), v.dtype) for k, v in net.state_dict().items()}
        return check_rank(checkpoint_dir / f"rank{rank}.safetensors", expected)

    with ThreadPoolExecutor(max_workers=max(1, options.workers)) as pool:
        extras = list(pool.map(check, range(world)))
    for rank, names in enumerate(extras):
        if names:
            warnings.warn(f"rank{rank}.safetensors: {len(names)} tensor(s) the network does not use "
                          f"(e.g. {names[0]}); ignored", stacklevel=2)
    engine_config = {"pretrained_config": config, "build_config": build_config,
                     "family": entry.family.name, "plugin": entry.plugin}
    with atomic_dir(output_dir, options.force, inputs={"--checkpoint-dir": checkpoint_dir}, command="build") as tmp:
        def place(rank: int) -> None:
            src = checkpoint_dir / f"rank{rank}.safetensors"
            try:
                os.link(src, tmp / src.name)  # same bytes, no copy, when on one filesystem
            except OSError:
                shutil.copy2(src, tmp / src.name)

        with ThreadPoolExecutor(max_workers=max(1, options.workers)) as pool:
            list(pool.map(place, range(world)))
        from trtlm.runtime.tokenizer import tokenizer_files

        for path in tokenizer_files(checkpoint_dir):
            shutil.copy2(path, tmp / path.name)
        (tmp / "config.json").write_text(json.dumps(engine_config, indent=2) + "\n")
    return build_config
