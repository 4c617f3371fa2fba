"""Reading Hugging Face ``config.json`` values across transformers versions."""
from __future__ import annotations

from typing import Any

from trtlm.errors import UserError


def rope_theta(cfg: dict[str, Any], default: float | None = None) -> float:
    """``rope_theta`` (transformers 4) or ``rope_parameters.rope_theta`` (transformers 5)."""
    params = cfg.get("rope_parameters")
    if isinstance(params, dict) and params.get("rope_theta") is not None:
        return float(params["rope_theta"])
    if cfg.get("rope_theta") is not None:
        return float(cfg["rope_theta"])
    if default is None:
        raise UserError("config.json has neither rope_theta nor rope_parameters.rope_theta")
    return float(default)


def rope_scaling(cfg: dict[str, Any]) -> dict[str, Any] | None:
    params = cfg.get("rope_parameters") or cfg.get("rope_scaling")
    if isinstance(params, dict) and params.get("rope_type", params.get("type", "default")) not in ("default", None):
        return params
    return None


def require(cfg: dict[str, Any], key: str, where: str = "config.json") -> Any:
    if cfg.get(key) is None:
        raise UserError(f"{where} has no {key!r}")
    return cfg[key]


def torch_dtype_name(cfg: dict[str, Any]) -> str | None:
    """The checkpoint's dtype: ``dtype`` (transformers 5) or ``torch_dtype`` (4)."""
    name = cfg.get("dtype") or cfg.get("torch_dtype")
    if isinstance(name, str):
        return name.replace("torch.", "")
    return None


def eos_ids(cfg: dict[str, Any]) -> list[int]:
    eos = cfg.get("eos_token_id")
    if eos is None:
        return []
    return [int(e) for e in eos] if isinstance(eos, list) else [int(eos)]
