"""What both kinds of Triton repository share: the options, and placing files (copy or link)."""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

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
