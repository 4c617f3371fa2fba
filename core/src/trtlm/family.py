"""What a family plugin declares about itself.

A :class:`Family` is pure data: the registry uses it to route a model to the
plugin that owns it, so hook implementations never have to ask "is this my
model?".  Keep this module free of heavy imports: it is loaded by
``trtlm --help``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from trtlm.quant import schemes as _quant_schemes  # pure data, no torch

ALL_DTYPES = ("float32", "float16", "bfloat16")
ALL_PARALLEL = ("tp", "pp")
ALL_QUANT = _quant_schemes.names()  #: every registered quantization format (trtlm.quant.schemes)
ALL_KV_QUANT = _quant_schemes.kv_names()


@dataclass(frozen=True)
class Capabilities:
    """What a family can do; the CLI checks requests against it before any work."""

    dtypes: tuple[str, ...] = ALL_DTYPES
    parallel: tuple[str, ...] = ALL_PARALLEL  #: any of "tp", "pp", "ep"
    quantization: tuple[str, ...] = ()  #: values accepted by ``trtlm convert --quant``
    kv_cache_quantization: tuple[str, ...] = ()  #: "fp8", "int8"
    formats_in: tuple[str, ...] = ("hf",)  #: directory formats ``load_weights`` reads ("hf", "ft")
    formats_out: tuple[str, ...] = ("trtllm",)  #: what ``trtlm convert --to`` may write ("trtllm", "ft")

    def as_dict(self) -> dict[str, list[str]]:
        return {k: list(v) for k, v in self.__dict__.items()}


@dataclass(frozen=True)
class Family:
    """A model family, as declared through the ``trtlm_families`` hook.

    :param name: short name, also the entry-point name and the ``<name>`` in
        ``trtlm-plugin-<name>``.
    :param hf_architectures: ``config.json["architectures"]`` values handled.
    :param hf_model_types: ``config.json["model_type"]`` values handled (used
        when a config names no architecture).
    :param trtllm_architecture: the ``architecture`` string written into
        TensorRT-LLM checkpoints.
    :param trtllm_aliases: other TensorRT-LLM architecture strings that mean
        this family when reading a checkpoint.
    :param presets: named HF ``config.json`` dicts for ``--preset`` with
        ``--dummy-weights`` (e.g. ``tiny`` and the real model sizes).
    """

    name: str
    hf_architectures: tuple[str, ...]
    trtllm_architecture: str
    hf_model_types: tuple[str, ...] = ()
    trtllm_aliases: tuple[str, ...] = ()
    capabilities: Capabilities = field(default_factory=Capabilities)
    presets: dict[str, dict[str, Any]] = field(default_factory=dict, hash=False, compare=False)
    description: str = ""

    @property
    def trtllm_architectures(self) -> tuple[str, ...]:
        return (self.trtllm_architecture, *self.trtllm_aliases)
