"""A TensorRT-LLM checkpoint's ``config.json``, parsed once into typed fields.

Code that reads a checkpoint config asks :class:`CheckpointConfig` (``cfg.num_key_value_heads``,
``cfg.quantization.quant_algo``, ``cfg.sliding_window``) instead of repeating
``int(config.get("num_key_value_heads") or config["num_attention_heads"])`` and
``(config.get("quantization") or {}).get("quant_algo")`` with their defaults each time, like
gpt-fast's ``ModelArgs``.  Defaults are TensorRT-LLM's ``PretrainedConfig`` ones.

:meth:`CheckpointConfig.from_dict` / :meth:`~CheckpointConfig.to_dict` round-trip: keys this
class has no field for (``logits_dtype``, ``rotary_scaling``, ``trtlm``, ...) are kept, and a
field absent from the dict it was parsed from is written back only when it was changed, so
``CheckpointConfig.from_dict(d).to_dict() == d`` for a checkpoint's config (``mapping`` is always
written: a plan's config, which has none yet, gets the default single-rank one).  Nothing heavy is imported (no torch): dtypes
stay names, resolved through :mod:`trtlm.dtypes` where a tensor is built.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any
from typing import Mapping as MappingType

from trtlm import dtypes
from trtlm.errors import UserError
from trtlm.mapping import Mapping

__all__ = ["CheckpointConfig", "MoeConfig", "QuantConfig", "dtypes"]


def _int(d: MappingType[str, Any], key: str, where: str, default: int | None = None) -> int | None:
    value = d.get(key)
    if value is None:
        if default is None:
            return None
        return default
    try:
        return int(value)
    except (TypeError, ValueError):
        raise UserError(f"{where}: {key} is {value!r}, not an integer; fix the checkpoint's config.json") from None


def _float(d: MappingType[str, Any], key: str, where: str) -> float | None:
    value = d.get(key)
    if value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        raise UserError(f"{where}: {key} is {value!r}, not a number; fix the checkpoint's config.json") from None


@dataclass(frozen=True)
class QuantConfig:
    """The ``quantization`` block (TensorRT-LLM's ``QuantConfig``)."""

    quant_algo: str | None = None  #: "FP8", "W8A16", "W4A16_AWQ", "W8A8_SQ_PER_CHANNEL", ... or None
    kv_cache_quant_algo: str | None = None  #: "FP8", "INT8" or None
    group_size: int | None = None  #: int4 weight groups (AWQ / block-wise)
    has_zero_point: bool = False
    pre_quant_scale: bool = False
    exclude_modules: tuple[str, ...] | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False)  #: keys without a field, kept

    _KEYS = ("quant_algo", "kv_cache_quant_algo", "group_size", "has_zero_point", "pre_quant_scale",
             "exclude_modules")

    @classmethod
    def from_dict(cls, d: MappingType[str, Any] | None, where: str = "config.json") -> "QuantConfig":
        d = dict(d or {})
        excl = d.get("exclude_modules")
        return cls(quant_algo=d.get("quant_algo"), kv_cache_quant_algo=d.get("kv_cache_quant_algo"),
                   group_size=_int(d, "group_size", where), has_zero_point=bool(d.get("has_zero_point", False)),
                   pre_quant_scale=bool(d.get("pre_quant_scale", False)),
                   exclude_modules=tuple(excl) if excl is not None else None,
                   extra={k: v for k, v in d.items() if k not in cls._KEYS})

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"quant_algo": self.quant_algo, "kv_cache_quant_algo": self.kv_cache_quant_algo}
        if self.group_size is not None:
            out.update(group_size=self.group_size, has_zero_point=self.has_zero_point,
                       pre_quant_scale=self.pre_quant_scale)
        if self.exclude_modules is not None:
            out["exclude_modules"] = list(self.exclude_modules)
        out.update(self.extra)
        return out

    @property
    def quantized(self) -> bool:
        """Weights (or the KV cache) are stored quantized."""
        return bool(self.quant_algo or self.kv_cache_quant_algo)


@dataclass(frozen=True)
class MoeConfig:
    """The ``moe`` block: experts, experts per token, routing-weight normalization."""

    num_experts: int = 0
    top_k: int = 0
    normalization_mode: int | None = None  #: TensorRT-LLM's ExpertScaleNormalizationMode (0 none, 1 renormalize)
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    @classmethod
    def from_dict(cls, d: MappingType[str, Any] | None, where: str = "config.json") -> "MoeConfig | None":
        if not d:
            return None
        return cls(num_experts=_int(d, "num_experts", where, 0), top_k=_int(d, "top_k", where, 0),
                   normalization_mode=_int(d, "normalization_mode", where),
                   extra={k: v for k, v in d.items() if k not in ("num_experts", "top_k", "normalization_mode")})

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"num_experts": self.num_experts, "top_k": self.top_k}
        if self.normalization_mode is not None:
            out["normalization_mode"] = self.normalization_mode
        out.update(self.extra)
        return out


#: Field -> config.json key, for the fields stored under their own key.
_SCALAR_KEYS = ("architecture", "dtype", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_size", "intermediate_size", "hidden_act", "norm_epsilon",
                "position_embedding_type", "rotary_base", "max_position_embeddings", "alibi_bias_max", "clip_qkv",
                "bias", "lm_head_bias", "use_parallel_embedding", "embedding_sharding_dim")


@dataclass(frozen=True)
class CheckpointConfig:
    """Typed view of a TensorRT-LLM checkpoint ``config.json`` (or of a plan's config, which has no
    ``mapping`` yet and ``dtype`` ``None`` until the pipeline fills them)."""

    architecture: str
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_size: int
    dtype: str | None = None  #: a :mod:`trtlm.dtypes` name ("bfloat16")
    intermediate_size: int | None = None
    hidden_act: str | None = None
    norm_epsilon: float = 1e-5
    position_embedding_type: str = "learned_absolute"
    rotary_base: float = 10000.0
    max_position_embeddings: int | None = None
    alibi_bias_max: float | None = None  #: MPT's ALiBi slope base (None: 8)
    clip_qkv: float | None = None  #: clamp of the fused qkv output (MPT)
    bias: bool = True  #: linear layers carry biases (TensorRT-LLM's default)
    lm_head_bias: bool = False
    use_parallel_embedding: bool = False
    embedding_sharding_dim: int = 0
    sliding_window: int | None = None  #: from runtime_defaults.max_attention_window (one value for all layers)
    mapping: Mapping = field(default_factory=Mapping)
    quantization: QuantConfig = field(default_factory=QuantConfig)
    moe: MoeConfig | None = None
    #: The dict this was parsed from (keys without a field are written back from it).
    source: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_dict(cls, d: MappingType[str, Any], where: str = "config.json") -> "CheckpointConfig":
        """Parse ``d`` (an engine's ``config.json`` is unwrapped from ``pretrained_config``);
        a missing or malformed required key is a one-line :class:`~trtlm.errors.UserError` naming it."""
        if "pretrained_config" in d and "architecture" not in d:
            d = d["pretrained_config"]
        for key in ("architecture", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads"):
            if d.get(key) is None:
                raise UserError(f"{where}: no {key!r}; not a TensorRT-LLM checkpoint config (re-run trtlm convert)")
        heads = _int(d, "num_attention_heads", where)
        hidden = _int(d, "hidden_size", where)
        dtype = d.get("dtype")
        if dtype is not None and dtypes.lookup(dtype) is None:
            raise UserError(f"{where}: dtype {dtype!r} is not one of {', '.join(dtypes.CHECKPOINT_DTYPES)}")
        window = None
        attention_window = (d.get("runtime_defaults") or {}).get("max_attention_window")
        if attention_window:
            window = int(attention_window[0] if isinstance(attention_window, (list, tuple)) else attention_window)
        return cls(
            architecture=str(d["architecture"]), vocab_size=_int(d, "vocab_size", where), hidden_size=hidden,
            num_hidden_layers=_int(d, "num_hidden_layers", where), num_attention_heads=heads,
            num_key_value_heads=_int(d, "num_key_value_heads", where, heads),
            head_size=_int(d, "head_size", where, hidden // heads if heads else 0),
            dtype=dtypes.get(dtype).name if dtype is not None else None,
            intermediate_size=_int(d, "intermediate_size", where), hidden_act=d.get("hidden_act"),
            norm_epsilon=_float(d, "norm_epsilon", where) or 1e-5,
            position_embedding_type=d.get("position_embedding_type") or "learned_absolute",
            rotary_base=_float(d, "rotary_base", where) or 10000.0,
            max_position_embeddings=_int(d, "max_position_embeddings", where),
            alibi_bias_max=_float(d, "alibi_bias_max", where), clip_qkv=_float(d, "clip_qkv", where) or None,
            bias=bool(d.get("bias", True)), lm_head_bias=bool(d.get("lm_head_bias", False)),
            use_parallel_embedding=bool(d.get("use_parallel_embedding", False)),
            embedding_sharding_dim=_int(d, "embedding_sharding_dim", where, 0),
            sliding_window=window, mapping=Mapping.from_config(d),
            quantization=QuantConfig.from_dict(d.get("quantization"), where),
            moe=MoeConfig.from_dict(d.get("moe"), where), source=dict(d),
        )

    def to_dict(self) -> dict[str, Any]:
        """The ``config.json`` dict: the parsed one with every field's current value written back."""
        out = dict(self.source)
        parsed = CheckpointConfig.from_dict(self.source) if self.source else None
        for key in _SCALAR_KEYS:
            value = getattr(self, key)
            if key in out or parsed is None or getattr(parsed, key) != value:
                out[key] = value
        out["mapping"] = self.mapping.to_config(moe=self.moe is not None)  # every checkpoint has one
        if "quantization" in out or parsed is None or parsed.quantization != self.quantization:
            out["quantization"] = self.quantization.to_dict()
        if self.moe is not None:
            out["moe"] = self.moe.to_dict()
        else:
            out.pop("moe", None)
        if (parsed.sliding_window != self.sliding_window) if parsed else self.sliding_window is not None:
            defaults = dict(out.get("runtime_defaults") or {})
            if self.sliding_window is None:
                defaults.pop("max_attention_window", None)
            else:
                defaults["max_attention_window"] = [self.sliding_window]
            out["runtime_defaults"] = defaults
        return out

    def replace(self, **changes: Any) -> "CheckpointConfig":
        """A copy with ``changes`` (``cfg.replace(dtype="bfloat16", mapping=m).to_dict()``)."""
        return dataclasses.replace(self, **changes)

    # -- derived values asked for in several places ------------------------------------------
    @property
    def kv_heads_per_rank(self) -> int:
        """KV heads one tensor-parallel rank holds (repeated when there are fewer than ranks)."""
        return max(self.num_key_value_heads // self.mapping.tp_size, 1)

    @property
    def torch_dtype(self):
        """``torch.<dtype>`` (imports torch)."""
        return dtypes.torch_dtype(self.dtype or "float32")


def as_checkpoint_config(config: CheckpointConfig | MappingType[str, Any], where: str = "config.json"
                         ) -> CheckpointConfig:
    """``config`` itself, or parsed from a dict (for functions that accept either)."""
    return config if isinstance(config, CheckpointConfig) else CheckpointConfig.from_dict(config, where)


def quant_config(config: CheckpointConfig | MappingType[str, Any]) -> QuantConfig:
    """The ``quantization`` block of a checkpoint config (parsed or a dict, even a partial one: the
    plan's config before sharding has no ``mapping`` yet)."""
    if isinstance(config, CheckpointConfig):
        return config.quantization
    return QuantConfig.from_dict(config.get("quantization"))
