"""Options of one conversion, as given on the command line or through the API."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

DTYPES = ("auto", "float32", "float16", "bfloat16")


@dataclass
class ConvertOptions:
    dtype: str = "auto"
    tp_size: int = 1
    pp_size: int = 1
    moe_tp_size: int | None = None
    moe_ep_size: int | None = None
    moe_normalization_mode: str | None = None  #: "none" | "renormalize" | None (the model's own)
    workers: int = 1
    use_parallel_embedding: bool = True
    dummy_weights: bool = False
    allow_pickle: bool = False
    check_finite: bool = True
    to: str = "trtllm"
    force: bool = False
    seed: int = 0
    quant: str | None = None
    kv_cache_dtype: str | None = None
    calib_data: Path | None = None
    calib_size: int = 64
    calib_max_seq_len: int = 256
    calibrator: str = "trtlm"  #: "trtlm" (built in, layer by layer) | "modelopt" (trtlm.quant.modelopt_calib)
    calib_device: str = "auto"  #: "auto" (cuda when visible, else cpu) | "cpu" | "cuda[:N]"
    calib_dtype: str = "auto"  #: "auto" (the source checkpoint's dtype) | "float32" | "float16" | "bfloat16"
    awq_group_size: int = 128
    smoothquant_alpha: float = 0.5
    progress: bool = False
    extra: dict = field(default_factory=dict)  #: family-specific options
