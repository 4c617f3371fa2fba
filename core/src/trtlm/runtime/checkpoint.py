"""Reading TensorRT-LLM checkpoints (and engines) rank by rank, and merging ranks.

Merging uses the same split rules the converter shards with
(:func:`trtlm.layout.split_rule`), so ``merge(shard(x)) == x`` holds by
construction and is tested for every layout.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from trtlm.config import as_checkpoint_config
from trtlm.convert.plan import local_name
from trtlm.errors import UserError
from trtlm.layout import split_rule
from trtlm.mapping import Mapping


def read_rank(directory: Path, rank: int) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    from trtlm.sources import read_safetensors_header

    path = directory / f"rank{rank}.safetensors"
    if not path.exists():
        raise UserError(f"{path}: missing (the config's mapping has world_size > {rank})")
    read_safetensors_header(path)  # one clear line for truncated or corrupt files
    return load_file(str(path))


def merge_ranks(config: dict[str, Any], ranks: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """All ranks of a checkpoint -> the tensors of an equivalent tp=pp=1 checkpoint
    (vocabulary padding removed)."""
    mapping = Mapping.from_config(config)
    num_layers = as_checkpoint_config(config).num_hidden_layers
    merged: dict[str, torch.Tensor] = {}
    for pp_rank in range(mapping.pp_size):
        stage = [ranks[pp_rank * mapping.tp_size + t] for t in range(mapping.tp_size)]
        layers = mapping.stage_layers(pp_rank, num_layers)
        for name in stage[0]:
            parts = [s[name] for s in stage]
            if name.startswith("transformer.layers."):
                local = int(name.split(".")[2])
                gname = local_name(name, layers.start + local)
            else:
                gname = name
            rule = split_rule(gname, config, tuple(parts[0].shape))
            merged[gname] = rule.merge(parts, mapping) if mapping.tp_size > 1 else parts[0]
    vocab = as_checkpoint_config(config).vocab_size
    for name in ("lm_head.weight", "lm_head.bias", "transformer.vocab_embedding.weight"):
        if name in merged and merged[name].shape[0] > vocab:
            merged[name] = merged[name][:vocab]
    return merged


def single_process_config(config: dict[str, Any]) -> dict[str, Any]:
    """The config of the merged (tp = pp = 1) model."""
    cfg = dict(config)
    moe = bool(cfg.get("moe"))
    cfg["mapping"] = Mapping().to_config(moe=moe)
    return cfg
