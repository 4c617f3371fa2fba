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
    """``hf`` | ``trtllm`` | ``engine`` | ``ft`` for a directory, by its marker files."""
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
    raise UserError(f"{path}: no config.json (Hugging Face, TensorRT-LLM or engine) or config.ini (FasterTransformer)")


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: missing") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
