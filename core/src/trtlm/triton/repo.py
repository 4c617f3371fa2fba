"""``trtlm triton-repo``: a Triton model repository from an engine, ready to serve.

Which layout is written depends on the engine:

* a **torch** engine (``trtlm build --backend torch``: ``rank*.safetensors``)
  becomes one Python-backend model (:mod:`trtlm.triton.torch_repo`) running
  trtlm's own engine, under tensorrtllm_backend's ensemble interface;
* a **tensorrt-llm** engine (``rank*.engine``) becomes tensorrtllm_backend's
  ``inflight_batcher_llm`` layout (:mod:`trtlm.triton.trtllm_repo`), its
  templates filled from the engine's ``config.json``.

The engine and tokenizer are copied into the repository (hard links where the
filesystem allows, which cost no space) or, with ``link``, symlinked.  The
whole repository is written into a temporary sibling and renamed into place
(:func:`trtlm.fsutil.atomic_dir`), so a failure leaves nothing behind.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trtlm.errors import UserError


@dataclass
class RepoOptions:
    """What ``trtlm triton-repo`` was asked (see docs/deploy-triton.md for each generated parameter).

    :param max_batch_size: Triton ``max_batch_size`` and the engine's batch (default: the engine's build value).
    :param decoupled: decoupled transaction policy; needed for ``stream: true``.
    :param instance_count: model instances (torch: engines; tensorrt-llm: pre/post-processing and BLS instances).
    :param kv_cache_free_gpu_mem_fraction: share of free GPU memory the KV cache takes.
    :param max_queue_delay_us: Triton dynamic batcher's ``max_queue_delay_microseconds``.
    :param link: symlink engine and tokenizer instead of copying them (the repository then cannot move).
    """

    model_name: str = "ensemble"
    max_batch_size: int | None = None
    decoupled: bool = True
    instance_count: int = 1
    kv_cache_free_gpu_mem_fraction: float = 0.9
    max_queue_delay_us: int = 0
    link: bool = False
    force: bool = False

    def validate(self) -> None:
        import re

        if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", self.model_name) or self.model_name in (
                "preprocessing", "postprocessing", "tensorrt_llm", "tensorrt_llm_bls"):
            raise UserError(f"--model-name {self.model_name!r}: use letters, digits, '_', '-', '.', and not the "
                            f"name of another model of the repository")
        if self.max_batch_size is not None and self.max_batch_size < 1:
            raise UserError(f"--max-batch-size {self.max_batch_size}: must be >= 1")
        if self.instance_count < 1:
            raise UserError(f"--instance-count {self.instance_count}: must be >= 1")
        if not 0 < self.kv_cache_free_gpu_mem_fraction <= 1:
            raise UserError(f"--kv-cache-free-gpu-mem-fraction {self.kv_cache_free_gpu_mem_fraction}: must be in (0, 1]")
        if self.max_queue_delay_us < 0:
            raise UserError(f"--max-queue-delay-us {self.max_queue_delay_us}: must be >= 0")


def engine_kind(engine_dir: Path) -> tuple[str, dict[str, Any]]:
    """``("torch" | "tensorrt-llm", config)`` of an engine directory; :class:`UserError` if it is none."""
    cfg_path = engine_dir / "config.json"
    if not engine_dir.is_dir():
        raise UserError(f"--engine-dir {engine_dir}: no such directory")
    if not cfg_path.is_file():
        raise UserError(f"--engine-dir {engine_dir}: no config.json (build an engine with `trtlm build` first)")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{cfg_path}: not valid JSON ({exc})") from None
    if not isinstance(cfg, dict) or "pretrained_config" not in cfg or "build_config" not in cfg:
        raise UserError(f"{cfg_path}: not an engine config (no pretrained_config/build_config); "
                        f"build the checkpoint with `trtlm build` first")
    world = int(((cfg["pretrained_config"].get("mapping") or {}).get("world_size")) or 1)
    ranks = range(world)
    if all((engine_dir / f"rank{r}.engine").is_file() for r in ranks):
        return "tensorrt-llm", cfg
    if all((engine_dir / f"rank{r}.safetensors").is_file() for r in ranks):
        return "torch", cfg
    missing = next(r for r in ranks if not (engine_dir / f"rank{r}.safetensors").is_file())
    raise UserError(f"--engine-dir {engine_dir}: rank{missing}.safetensors / rank{missing}.engine missing "
                    f"(the config says world_size {world}); rebuild the engine")


def place(src: Path, dst: Path, link: bool) -> None:
    """Put file or directory ``src`` at ``dst``: a symlink, or a copy made of hard links where possible."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if link:
        os.symlink(src.resolve(), dst, target_is_directory=src.is_dir())
        return

    def copy(s: str, d: str) -> None:
        try:
            os.link(s, d)  # same bytes, no copy, on one filesystem; engines are never edited in place
        except OSError:
            shutil.copy2(s, d)

    if src.is_dir():
        shutil.copytree(src, dst, copy_function=copy)
    else:
        copy(str(src), str(dst))


def place_tokenizer(tokenizer_dir: Path, dst: Path, link: bool) -> None:
    """The tokenizer files of ``tokenizer_dir`` (those trtlm carries along) into directory ``dst``."""
    from trtlm.runtime.tokenizer import tokenizer_files

    files = tokenizer_files(tokenizer_dir)
    if not any(f.name == "tokenizer.json" or "tekken" in f.name or ".model" in f.name for f in files):
        raise UserError(f"--tokenizer-dir {tokenizer_dir}: no tokenizer.json, tokenizer.model* or tekken*.json")
    dst.mkdir(parents=True, exist_ok=True)
    for f in files:
        place(f, dst / f.name, link)


def write_repo(engine_dir: Path, output_dir: Path, options: RepoOptions,
               tokenizer_dir: Path | None = None) -> dict[str, Any]:
    """Write the repository; return a summary (kind, models, the generated parameters)."""
    from trtlm.fsutil import atomic_dir

    options.validate()
    engine_dir = Path(engine_dir)
    kind, cfg = engine_kind(engine_dir)
    if tokenizer_dir is not None and not Path(tokenizer_dir).is_dir():
        raise UserError(f"--tokenizer-dir {tokenizer_dir}: no such directory")
    inputs = {"--engine-dir": engine_dir, "--tokenizer-dir": tokenizer_dir}
    with atomic_dir(Path(output_dir), options.force, inputs=inputs, command="triton-repo") as tmp:
        final = Path(os.path.abspath(output_dir))
        if kind == "torch":
            from trtlm.triton.torch_repo import write_torch_repo

            summary = write_torch_repo(tmp, engine_dir, cfg, options, tokenizer_dir)
        else:
            from trtlm.triton.trtllm_repo import write_trtllm_repo

            summary = write_trtllm_repo(tmp, final, engine_dir, cfg, options, tokenizer_dir)
    return {"kind": kind, "repository": str(final), **summary}
