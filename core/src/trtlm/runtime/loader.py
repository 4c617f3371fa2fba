"""Loading an engine directory: its config, its tokenizer and its network — the one place that does.

``trtlm build`` writes ``config.json`` (``pretrained_config`` + ``build_config``)
and one ``rank{r}.safetensors`` per rank.  :func:`load_engine` reads that into
a :class:`LoadedEngine` for one process (all ranks merged, as a tp = pp = 1
model with the same numerics); :func:`load_rank` loads only this rank's file
for one rank of a multi-process job.  The network comes from the family's
``build_network`` hook, so plugins load in whichever process calls this
(every rank of a job does).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from trtlm.config import CheckpointConfig, as_checkpoint_config, quant_config
from trtlm.errors import UserError
from trtlm.mapping import Mapping


@dataclass
class LoadedEngine:
    engine_dir: Path
    model: torch.nn.Module
    device: torch.device
    config: dict[str, Any]  #: the checkpoint's (pretrained) config
    build_config: dict[str, Any]
    tokenizer: Any  #: None when the engine carries no (readable) tokenizer files
    eos_ids: tuple[int, ...]
    tokenizer_error: str | None = None  #: why there is no tokenizer, said when a text prompt needs one
    kernel_paths: dict[str, str] | None = None  #: quantized layer type -> the kernel it runs on (and why)

    @property
    def cfg(self) -> CheckpointConfig:
        """The checkpoint config, parsed (``config`` is the dict plugins' hooks receive)."""
        return as_checkpoint_config(self.config, str(self.engine_dir / "config.json"))

    @property
    def max_seq_len(self) -> int:
        return int(self.build_config.get("max_seq_len") or self.cfg.max_position_embeddings or 2048)

    @property
    def max_input_len(self) -> int:
        return int(self.build_config.get("max_input_len") or self.max_seq_len)

    @property
    def max_batch_size(self) -> int:
        return int(self.build_config.get("max_batch_size") or 8)

    @property
    def vocab_size(self) -> int:
        return self.cfg.vocab_size

    @property
    def name(self) -> str:
        return self.engine_dir.resolve().name


def load_engine_config(engine_dir: Path) -> dict[str, Any]:
    """``config.json`` of an engine directory (one clear line for anything else)."""
    from trtlm.modeldir import check_model_path, read_json

    check_model_path(engine_dir, "engine", "--engine-dir")
    cfg = read_json(Path(engine_dir) / "config.json")
    if "pretrained_config" not in cfg:
        raise UserError(f"{engine_dir}: not an engine directory (run `trtlm build` on a checkpoint first)")
    return cfg


def load_tokenizer_and_eos(config: dict[str, Any], tokenizer_dir: Path) -> tuple[Any, tuple[int, ...], str | None]:
    """The tokenizer (None when ``tokenizer_dir`` has none, or it cannot be read: then also why),
    and the EOS ids generation stops at (the model's generation config first, else the tokenizer's)."""
    from trtlm.hf_config import eos_ids
    from trtlm.runtime.tokenizer import load_tokenizer, tokenizer_files

    tokenizer, error = None, None
    try:
        tokenizer = load_tokenizer(tokenizer_dir)
    except UserError as exc:  # token-id prompts still work; a text prompt reports this
        error = str(exc) if (tokenizer_files(tokenizer_dir) or tokenizer_dir.is_file()) else None
    ids = tuple(eos_ids(config.get("trtlm") or {}))
    if not ids and tokenizer is not None:
        ids = tuple(tokenizer.eos_ids)
    return tokenizer, ids, error


def family_hooks(config: dict[str, Any], where: str):
    """The hooks of the family plugin that handles this config's architecture."""
    from trtlm.plugins import get_registry

    registry = get_registry()
    return registry.hooks(registry.resolve_trtllm(config["architecture"], where=where))


def load_network(config: dict[str, Any], tensors: dict[str, torch.Tensor], mapping: Mapping, rank: int,
                 device: torch.device, hooks, comm: Any = None, where: str = "") -> torch.nn.Module:
    """Rank ``rank``'s network, built through the family's ``build_network`` hook, with ``tensors`` loaded."""
    from trtlm.build import BuildOptions
    from trtlm.runtime.distributed import rank_network

    model = rank_network(hooks, config, mapping, rank, BuildOptions(), device=device, comm=comm)
    missing, _unexpected = model.load_state_dict(tensors, strict=False)
    if missing:
        raise UserError(f"{where}: engine lacks tensor {missing[0]} (rebuild the engine with `trtlm build`)")
    prepare_for_device(model)
    return model.eval()


def prepare_for_device(model: torch.nn.Module) -> dict[str, str]:
    """Load-time preparation, once, before any step or CUDA graph: quantized layers repack their
    weights for their kernels; on CUDA the SwiGLU's two input products become one matrix."""
    from trtlm.quant.runtime import prepare_model
    from trtlm.runtime.model import Block, GatedMLP

    paths = prepare_model(model)
    device = next(model.parameters()).device
    if device.type == "cuda":
        for module in model.modules():
            if isinstance(module, GatedMLP):
                module.fuse()
        if any(isinstance(m, GatedMLP) and m.fused_fp8 is not None for m in model.modules()):
            for kind in ("mlp.fc", "mlp.gate"):
                if kind in paths:
                    paths[kind] += "; fc and gate as one FP8 GEMM, their input quantized by the RMSNorm's kernel"
            if "mlp.proj" in paths:
                paths["mlp.proj"] += "; input quantized by the SwiGLU's kernel"
        if any(isinstance(m, GatedMLP) and m.fused_quant is not None for m in model.modules()):
            for kind in ("mlp.fc", "mlp.gate"):
                if kind in paths:
                    paths[kind] += "; fc and gate stacked into one quantized product"
        if "mlp.proj" in paths and any(isinstance(m, GatedMLP) and m.proj_takes_swiglu for m in model.modules()):
            paths["mlp.proj"] += "; the SwiGLU applied by its GEMV as it reads its input (up to 8 rows)"
        if "attention.qkv" in paths and any(isinstance(m, Block) and m.qkv_fp8_scale is not None
                                            for m in model.modules()):
            paths["attention.qkv"] += "; input quantized by the RMSNorm's kernel"
    model.kernel_paths = paths
    return paths


def merged_model(engine_dir: Path, config: dict[str, Any], device: torch.device) -> torch.nn.Module:
    """All ranks of an engine as one single-process network (ranks merged)."""
    from trtlm.runtime.checkpoint import merge_ranks, read_rank, single_process_config

    mapping = Mapping.from_config(config)
    hooks = family_hooks(config, str(engine_dir / "config.json"))
    if mapping.world_size == 1:
        tensors = read_rank(engine_dir, 0)
        cfg = config
    else:
        ranks = [read_rank(engine_dir, r) for r in range(mapping.world_size)]
        cfg = single_process_config(config)
        if quant_config(cfg).quant_algo:  # merged still quantized (same numerics as tp=1)
            from trtlm.quant.runtime import merge_quantized_ranks

            tensors = merge_quantized_ranks(config, ranks)
        else:
            tensors = merge_ranks(config, ranks)
    return load_network(cfg, tensors, Mapping.from_config(cfg), 0, device, hooks, where=str(engine_dir))


def resolve(device: str | torch.device) -> torch.device:
    from trtlm.devices import resolve_device

    return resolve_device(device)


def load_engine(engine_dir: Path, device: str | torch.device = "cpu",
                tokenizer_dir: str | Path | None = None) -> LoadedEngine:
    """An engine directory loaded into this process (ranks merged)."""
    engine_dir = Path(engine_dir)
    cfg = load_engine_config(engine_dir)
    dev = resolve(device)
    config = cfg["pretrained_config"]
    tokenizer, eos, error = load_tokenizer_and_eos(config, Path(tokenizer_dir) if tokenizer_dir else engine_dir)
    model = merged_model(engine_dir, config, dev)
    return LoadedEngine(engine_dir, model, dev, config, cfg["build_config"], tokenizer, eos, error,
                        getattr(model, "kernel_paths", None))


def load_rank(engine_dir: Path, state: Any, tokenizer_dir: str | Path | None = None) -> LoadedEngine:
    """Only this rank's file, for one rank of a multi-process job (``state`` from
    :func:`trtlm.runtime.distributed.init_rank`)."""
    from trtlm.runtime.checkpoint import read_rank

    engine_dir = Path(engine_dir)
    cfg = load_engine_config(engine_dir)
    config = cfg["pretrained_config"]
    tokenizer, eos, error = load_tokenizer_and_eos(config, Path(tokenizer_dir) if tokenizer_dir else engine_dir)
    where = str(engine_dir / f"rank{state.rank}.safetensors")
    model = load_network(config, read_rank(engine_dir, state.rank), state.mapping, state.rank, state.device,
                         family_hooks(config, str(engine_dir / "config.json")), comm=state.comm, where=where)
    return LoadedEngine(engine_dir, model, state.device, config, cfg["build_config"], tokenizer, eos, error,
                        getattr(model, "kernel_paths", None))
