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
from pathlib import Path
from typing import Any

from trtlm.errors import UserError
from trtlm.triton.files import RepoOptions, place, place_tokenizer  # noqa: F401 - re-exported


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
