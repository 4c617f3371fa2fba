"""What kind of directory a path is, and reading its JSON: no torch here.

Kept apart from the conversion pipeline (which imports torch) so that
``trtlm inspect`` can identify a directory, and say which plugin handles it,
without loading torch.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from trtlm.errors import UserError


def detect_format(path: Path) -> str:
    """``hf`` | ``trtllm`` | ``engine`` | ``ft`` | ``mcore`` for a directory, by its marker files."""
    if not path.is_dir():
        raise UserError(f"{path}: no such directory")
    cfg = path / "config.json"
    if cfg.exists():
        try:
            data = json.loads(cfg.read_text())
        except json.JSONDecodeError as exc:
            raise UserError(f"{cfg}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
        if "build_config" in data and "pretrained_config" in data:
            return "engine"
        if "architecture" in data and ("mapping" in data or list(path.glob("rank*.safetensors"))):
            return "trtllm"
        return "hf"
    if (path / "config.ini").exists() or list(path.glob("*-gpu/config.ini")):
        return "ft"
    from trtlm.mcore.files import is_mcore_dir

    if is_mcore_dir(path):
        return "mcore"
    raise UserError(f"{path}: no config.json (Hugging Face, TensorRT-LLM or engine), config.ini (FasterTransformer) "
                    f"or latest_checkpointed_iteration.txt / iter_*/mp_rank_* (Megatron-Core)")


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: missing") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None


#: What each role accepts, by :func:`detect_format`'s names, and how to make one.
_ROLES = {
    "engine": (("engine",), "an engine directory written by `trtlm build`"),
    "checkpoint": (("trtllm",), "a TensorRT-LLM checkpoint written by `trtlm convert`"),
    "model": (("hf", "ft", "mcore"), "a Hugging Face (or FasterTransformer, Megatron-Core) checkpoint directory"),
}


def check_model_path(path: str | Path, role: str, arg: str) -> Path:
    """``path`` as a :class:`Path` if it is an existing directory of the ``role`` asked for
    (``"engine"``, ``"checkpoint"`` or ``"model"``); otherwise a one-line :class:`UserError` naming
    ``arg`` (``--engine-dir`` on the CLI, ``LLM(model_dir=...)`` in Python) and what it needs.

    The Python API calls this before touching the path, so ``trtlm.LLM("path/to/engine")`` fails
    the way the CLI does instead of with a raw ``FileNotFoundError``.
    """
    formats, what = _ROLES[role]
    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"{arg} {path}: no such directory (expected {what})")
    if not p.is_dir():
        raise UserError(f"{arg} {path}: not a directory (expected {what})")
    fmt = detect_format(p)
    if fmt not in formats:
        raise UserError(f"{arg} {path}: is a {_FORMAT_NAMES.get(fmt, fmt)}, expected {what}")
    return p


_FORMAT_NAMES = {"hf": "Hugging Face checkpoint", "trtllm": "TensorRT-LLM checkpoint",
                 "engine": "trtlm engine", "ft": "FasterTransformer checkpoint", "mcore": "Megatron-Core checkpoint"}
