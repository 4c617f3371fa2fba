"""MPT in FasterTransformer (FT) format, as TensorRT-LLM's MPT example writes it.

The layout follows TensorRT-LLM ``examples/mpt/convert_hf_mpt_to_ft.py``
(``hf_mpt_converter``, ``transpose_weights``, ``mpt_to_trt_llm_name``) and
``examples/mpt/convert.py`` (``split_and_save_weight``, ``save_split``,
``write_zero_bias``):

* ``<out_dir>/<tp>-gpu/config.ini`` with one ``[gpt]`` section (keys below);
* one raw little-endian array per file, no header, storage dtype from
  ``storage_dtype`` (bfloat16 as its raw 2-byte pattern);
* the four GEMM weights transposed to ``[in, out]``; embeddings not transposed;
* ``attention.query_key_value.weight.R.bin``: rank R's ``cat(q_R, k_R, v_R)``
  along the last dim (for MHA that is exactly ``[hidden, 3, hidden/tp]``);
  q, k and v are each split by heads, so MQA/GQA need ``kv_n_heads % tp == 0``;
* ``attention.dense.weight.R.bin`` / ``mlp.dense_4h_to_h.weight.R.bin``: split
  on dim 0; ``mlp.dense_h_to_4h.weight.R.bin``: split on the last dim;
* LayerNorm weights once (no rank suffix) plus a ``.bias.bin`` of zeros when
  the model has no LayerNorm bias (FT always expects one).

``config.ini`` keys, in TensorRT-LLM's order: model_name, n_head, n_embd,
n_inner, n_positions, n_layer, vocab_size, bos_token_id, eos_token_id,
storage_dtype, tensor_parallelism, activation_function (gelu),
calibrate_kv_cache (False), smoothquant (None), layer_norm_epsilon,
position_embedding_type (alibi), then ``n_kv_head`` only for MQA/GQA models and
``bias = False`` only for bias-free models (readers default ``bias`` to True).

Deliberate differences from TensorRT-LLM's script (each one a case where the
script would produce a broken or wrong directory):

* MQA/GQA is decided from ``attn_type`` (llm-foundry semantics: a
  ``multihead_attention`` model ignores a stray ``kv_n_heads``) and checked
  against the Wqkv shape; TensorRT-LLM treats any ``kv_n_heads`` key as MQA.
* ``kv_n_heads % tp != 0`` is refused; TensorRT-LLM would split inside a head.
* A biased model writes the qkv bias per rank as ``cat(q_R, k_R, v_R)`` (the
  ``[3, hidden/tp]`` layout of TensorRT-LLM's GPT FT writer); the MPT script
  crashes on 1-D qkv biases.
* ``layer_norm_epsilon`` is the model's value (TensorRT-LLM hard-codes 1e-05,
  which is every MPT's value).

Settings FT has no key for (``clip_qkv``, ``qk_ln``, ``alibi_bias_max != 8``,
``alibi = false``, a non-default ``softmax_scale``, ``prefix_lm``,
``logit_scale``, non-LayerNorm ``norm_type``, non-default ``ffn_config``, a
learned ``wpe``) make :func:`write_ft` raise :class:`FTUnsupported` unless
``force=True``; then they are dropped and each is logged as a warning on this
module's logger (``ft_unsupported_settings`` returns the same list up front).
"""
from __future__ import annotations

import configparser
import logging
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from trtlm import dtypes
from trtlm_mpt.plan import mpt_kv_heads

__all__ = [
    "FTUnsupported",
    "FTSource",
    "write_ft",
    "ft_hf_config",
    "ft_unsupported_settings",
    "is_ft_dir",
    "resolve_ft_dir",
]

log = logging.getLogger(__name__)


class FTUnsupported(ValueError):
    """The model uses a setting the FT format cannot carry."""


# --------------------------------------------------------------------------
# dtypes: the core's table (trtlm.dtypes) restricted to FT's storage types

FT_STORAGE = ("float32", "float16", "bfloat16")


def _storage_name(dtype: torch.dtype | str) -> str:
    """``"float32"`` / ``"float16"`` / ``"bfloat16"`` for any spelling :mod:`trtlm.dtypes` knows
    (``torch.bfloat16``, ``"bf16"``, ``"half"``, ...); ``ValueError`` for anything else."""
    entry = dtypes.lookup(str(dtype).lower() if isinstance(dtype, str) else dtype)
    if entry is None or entry.name not in FT_STORAGE:
        raise ValueError(f"FT storage dtype must be float32, float16 or bfloat16, got "
                         f"{dtype if isinstance(dtype, torch.dtype) else repr(dtype)}")
    return entry.name


def _as_torch_dtype(dtype: torch.dtype | str) -> torch.dtype:
    return dtypes.torch_dtype(_storage_name(dtype))


def _np_dtype(dtype: torch.dtype | str) -> np.dtype:
    """numpy dtype of the on-disk element; bfloat16 travels as its raw bits."""
    entry = dtypes.get(_storage_name(dtype))
    return np.dtype("<u2") if entry.name == "bfloat16" else np.dtype(f"<f{entry.itemsize}")


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    """Contiguous little-endian numpy view/copy of a CPU tensor (bf16 as uint16 bits)."""
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        arr = t.view(torch.int16).numpy().view(np.uint16)
    else:
        arr = t.numpy()
    return arr.astype(_np_dtype(t.dtype), copy=False)


def _from_numpy(arr: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    arr = arr.astype(arr.dtype.newbyteorder("="), copy=False)
    if dtype == torch.bfloat16:
        return torch.from_numpy(arr.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(arr)


def _save(arr: np.ndarray, path: Path) -> None:
    np.ascontiguousarray(arr).tofile(path)


# --------------------------------------------------------------------------
# config helpers

def _plain_dict(obj: Any) -> dict:
    if obj is None:
        return {}
    if isinstance(obj, dict):
        return dict(obj)
    if hasattr(obj, "to_dict"):
        return dict(obj.to_dict())
    return dict(vars(obj))


def _attn(hf_config: dict) -> dict:
    return _plain_dict(hf_config.get("attn_config"))


def _first_id(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return value[0] if value else None
    return value


def ft_unsupported_settings(hf_config: dict, source=None) -> list[str]:
    """Settings of ``hf_config`` (and tensors of ``source``) FT cannot carry.

    Each entry is a human-readable sentence naming the setting.  Empty list:
    the model converts losslessly.
    """
    cfg = _plain_dict(hf_config)
    attn = _attn(cfg)
    out: list[str] = []
    if attn.get("clip_qkv"):
        out.append(f"attn_config.clip_qkv={attn['clip_qkv']} (FT has no key for clamping the qkv output)")
    if attn.get("qk_ln"):
        out.append("attn_config.qk_ln=true (FT has no query/key LayerNorm)")
    if "alibi" in attn and not attn.get("alibi"):
        out.append("attn_config.alibi=false (FT's MPT path only knows ALiBi positions)")
    bias_max = attn.get("alibi_bias_max", 8)
    if bias_max is not None and float(bias_max) != 8.0:
        out.append(f"attn_config.alibi_bias_max={bias_max} (FT has no key for it; readers assume 8)")
    n_heads, d_model = cfg.get("n_heads"), cfg.get("d_model")
    scale = attn.get("softmax_scale")
    if scale is not None and n_heads and d_model:
        default = 1.0 / math.sqrt(int(d_model) / int(n_heads))
        if not math.isclose(float(scale), default, rel_tol=1e-6):
            out.append(f"attn_config.softmax_scale={scale} (FT always scales by 1/sqrt(head_dim)={default:g})")
    if attn.get("prefix_lm"):
        out.append("attn_config.prefix_lm=true (FT attention is causal only)")
    if attn.get("rope"):
        out.append("attn_config.rope=true (FT's MPT path has no rotary embeddings)")
    if attn.get("sliding_window_size") not in (None, -1):
        out.append(f"attn_config.sliding_window_size={attn['sliding_window_size']} (FT has no key for it)")
    if cfg.get("logit_scale") not in (None, 1, 1.0):
        out.append(f"logit_scale={cfg['logit_scale']} (FT has no key for scaling the logits)")
    norm_type = cfg.get("norm_type", "low_precision_layernorm")
    if norm_type not in ("low_precision_layernorm", "layernorm"):
        out.append(f"norm_type={norm_type!r} (FT's MPT path uses LayerNorm)")
    ffn = _plain_dict(cfg.get("ffn_config"))
    if ffn.get("ffn_type") not in (None, "mptmlp"):
        out.append(f"ffn_config.ffn_type={ffn['ffn_type']!r} (FT's MPT path has a plain GELU MLP)")
    act_fn = ffn.get("ffn_act_fn")
    act = act_fn.get("name") if isinstance(act_fn, dict) else None
    if act not in (None, "gelu"):
        out.append(f"ffn_config.ffn_act_fn={act!r} (FT's MPT path uses gelu)")
    if source is not None:
        keys = set(source.keys())
        if "transformer.wpe.weight" in keys:
            out.append("transformer.wpe.weight (learned position embeddings; FT's MPT path uses ALiBi)")
        if any(".attn.q_ln." in k or ".attn.k_ln." in k for k in keys) and not attn.get("qk_ln"):
            out.append("attn.q_ln / attn.k_ln tensors (query/key LayerNorm; FT has none)")
    return out


# --------------------------------------------------------------------------
# writer

_GLOBAL_OK = {"transformer.wte.weight", "transformer.norm_f.weight", "transformer.norm_f.bias",
              "lm_head.weight"}
_DROPPABLE = re.compile(r"^transformer\.(wpe\.weight|blocks\.\d+\.attn\.[qk]_ln\..*)$")


@dataclass(frozen=True)
class FTTensor:
    """One tensor of a block in both layouts, the one table the writer and the reader share."""

    hf: str  #: transformers' name under ``transformer.blocks.{i}.``
    ft: str  #: FT's file key under ``model.layers.{i}.``
    split: str  #: ``none`` (one file), ``rows`` / ``cols`` (rank files along FT's first / last axis), ``qkv``
    transpose: bool  #: a GEMM weight: FT stores ``[in, out]``
    bias_free: str  #: in a model without biases: ``kept`` (a weight), ``zeros`` (FT still wants it), ``absent``


BLOCK = (
    FTTensor("norm_1.weight", "input_layernorm.weight", "none", False, "kept"),
    FTTensor("norm_1.bias", "input_layernorm.bias", "none", False, "zeros"),
    FTTensor("attn.Wqkv.weight", "attention.query_key_value.weight", "qkv", True, "kept"),
    FTTensor("attn.Wqkv.bias", "attention.query_key_value.bias", "qkv", False, "absent"),
    FTTensor("attn.out_proj.weight", "attention.dense.weight", "rows", True, "kept"),
    FTTensor("attn.out_proj.bias", "attention.dense.bias", "none", False, "absent"),
    FTTensor("norm_2.weight", "post_attention_layernorm.weight", "none", False, "kept"),
    FTTensor("norm_2.bias", "post_attention_layernorm.bias", "none", False, "zeros"),
    FTTensor("ffn.up_proj.weight", "mlp.dense_h_to_4h.weight", "cols", True, "kept"),
    FTTensor("ffn.up_proj.bias", "mlp.dense_h_to_4h.bias", "cols", False, "absent"),
    FTTensor("ffn.down_proj.weight", "mlp.dense_4h_to_h.weight", "rows", True, "kept"),
    FTTensor("ffn.down_proj.bias", "mlp.dense_4h_to_h.bias", "none", False, "absent"),
)


def _block_name(i: int, t: FTTensor) -> str:
    return f"transformer.blocks.{i}.{t.hf}"


def _hf_shapes(d: int, kv_dim: int, n_inner: int) -> dict[str, tuple[int, ...]]:
    """transformers' shape of each :data:`BLOCK` tensor."""
    return {
        "norm_1.weight": (d,), "norm_1.bias": (d,), "norm_2.weight": (d,), "norm_2.bias": (d,),
        "attn.Wqkv.weight": (d + 2 * kv_dim, d), "attn.Wqkv.bias": (d + 2 * kv_dim,),
        "attn.out_proj.weight": (d, d), "attn.out_proj.bias": (d,),
        "ffn.up_proj.weight": (n_inner, d), "ffn.up_proj.bias": (n_inner,),
        "ffn.down_proj.weight": (d, n_inner), "ffn.down_proj.bias": (d,),
    }


def _split_qkv(arr: np.ndarray, d: int, kv_dim: int, tp: int) -> list[np.ndarray]:
    """arr: [..., d + 2*kv_dim] (transposed weight or bias) -> per-rank cat(q_r, k_r, v_r)."""
    q, k, v = np.split(arr, [d, d + kv_dim], axis=-1)
    qs, ks, vs = (np.split(x, tp, axis=-1) for x in (q, k, v))
    return [np.concatenate((qs[r], ks[r], vs[r]), axis=-1) for r in range(tp)]


@dataclass(frozen=True)
class FTLayout:
    """What an MPT checkpoint looks like in FT terms, every shape checked (see :func:`ft_layout`)."""

    d: int  #: d_model
    n_heads: int
    n_layers: int
    kv: int  #: KV heads
    kv_dim: int  #: kv * head_dim
    vocab: int
    n_inner: int
    has_bias: bool
    write_lm_head: bool


def write_ft(
    source,
    hf_config: dict,
    out_dir: Path,
    tp: int,
    dtype: torch.dtype | str,
    force: bool = False,
    *,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
) -> Path:
    """Write an MPT ``source`` (transformers MptForCausalLM names) as FT files.

    Writes ``out_dir/<tp>-gpu/`` one tensor at a time and returns that path.
    ``bos_token_id`` / ``eos_token_id`` fill the config.ini ids when
    ``hf_config`` has none (TensorRT-LLM falls back to the tokenizer's ids);
    if neither knows them the string ``None`` is written.
    Existing ``config.ini`` and ``model.*.bin`` files in the target directory
    are removed first so no stale tensor survives; ``config.ini`` is written
    last, so a directory without it is an interrupted conversion.

    Raises :class:`FTUnsupported` for settings FT cannot carry (see
    :func:`ft_unsupported_settings`) unless ``force``; forced conversions drop
    them and log one warning per setting.  Raises ``ValueError`` for shapes
    or parallelism that cannot be written (e.g. ``n_heads % tp``).

    The steps: refuse (or drop) what FT cannot carry, check every shape
    (:func:`ft_layout`), empty the target, write the tensors
    (:func:`_write_tensors`), then ``config.ini`` (:func:`_write_config_ini`).
    """
    cfg = _plain_dict(hf_config)
    storage = _as_torch_dtype(dtype)
    tp = int(tp)
    if tp < 1:
        raise ValueError(f"tensor parallelism must be >= 1, got {tp}")
    _refuse_lossy(cfg, source, force)
    layout = ft_layout(cfg, source, tp)  # everything checked before anything is written
    saved = _prepare_dir(Path(out_dir) / f"{tp}-gpu")
    _write_tensors(source, layout, storage, tp, saved)
    _write_config_ini(cfg, layout, storage, tp, saved, bos_token_id, eos_token_id)
    return saved


def _refuse_lossy(cfg: dict, source, force: bool) -> None:
    problems = ft_unsupported_settings(cfg, source)
    if problems and not force:
        raise FTUnsupported(
            "this MPT model uses settings the FasterTransformer format cannot carry: "
            + "; ".join(problems)
            + ". Pass force=True to convert anyway (they are dropped, and the FT model will compute differently)."
        )
    for p in problems:
        log.warning("FT conversion forced: dropping %s", p)


def ft_layout(cfg: dict, source, tp: int) -> FTLayout:
    """Dimensions, KV heads, MLP width and bias presence of an MPT ``source``, each checked against
    the config and ``tp``; ``ValueError`` naming the first problem."""
    keyset = set(source.keys())

    def need(name: str) -> tuple[int, ...]:
        if name not in keyset:
            raise ValueError(f"MPT checkpoint has no tensor {name!r}")
        return tuple(source.shape(name))

    for req in ("d_model", "n_heads", "n_layers"):
        if req not in cfg:
            raise ValueError(f"MPT config has no {req!r}")
    d, n_heads, n_layers = int(cfg["d_model"]), int(cfg["n_heads"]), int(cfg["n_layers"])
    if d % n_heads:
        raise ValueError(f"d_model={d} is not divisible by n_heads={n_heads}")
    if n_heads % tp:
        raise ValueError(f"n_heads={n_heads} is not divisible by tensor parallelism tp={tp}")
    vocab = _vocab(cfg, need("transformer.wte.weight"), d)
    kv = _kv_heads(cfg, need, d, n_heads, n_layers, tp)
    n_inner = _mlp_width(cfg, need, d, n_layers, tp)
    has_bias = _has_bias(cfg, keyset, n_layers)
    kv_dim = kv * (d // n_heads)
    _check_shapes(need, d, kv_dim, n_inner, n_layers, has_bias)
    tied = bool(cfg.get("tie_word_embeddings", True))
    write_lm_head = (not tied) and "lm_head.weight" in keyset
    if write_lm_head and tuple(source.shape("lm_head.weight")) != (vocab, d):
        raise ValueError(f"lm_head.weight has shape {tuple(source.shape('lm_head.weight'))}, expected {(vocab, d)}")
    wanted = {"transformer.wte.weight", "transformer.norm_f.weight"} | ({"transformer.norm_f.bias"} if has_bias else set())
    for i in range(n_layers):
        wanted |= {_block_name(i, t) for t in BLOCK if has_bias or t.bias_free == "kept"}
    unknown = [k for k in source.keys() if k not in wanted and k not in _GLOBAL_OK and not _DROPPABLE.match(k)]
    if unknown:
        raise ValueError(f"MPT checkpoint holds tensors FT conversion does not know: {unknown[:5]}")
    return FTLayout(d, n_heads, n_layers, kv, kv_dim, vocab, n_inner, has_bias, write_lm_head)


def _vocab(cfg: dict, wte: tuple[int, ...], d: int) -> int:
    if len(wte) != 2 or wte[1] != d:
        raise ValueError(f"transformer.wte.weight has shape {wte}, expected [vocab, {d}]")
    if "vocab_size" in cfg and int(cfg["vocab_size"]) != wte[0]:
        raise ValueError(f"config vocab_size={cfg['vocab_size']} but transformer.wte.weight has {wte[0]} rows")
    return wte[0]


def _kv_heads(cfg: dict, need: Callable[[str], tuple[int, ...]], d: int, n_heads: int, n_layers: int, tp: int) -> int:
    """KV heads from the Wqkv shape, which must agree with ``attn_config`` (llm-foundry semantics,
    the same rule the converter uses: :func:`trtlm_mpt.plan.mpt_kv_heads`)."""
    hd = d // n_heads
    qkv_rows = need("transformer.blocks.0.attn.Wqkv.weight")[0] if n_layers else 3 * d
    if (qkv_rows - d) % (2 * hd) or qkv_rows <= d:
        raise ValueError(f"attn.Wqkv.weight has {qkv_rows} rows, not d_model + 2*kv_heads*head_dim")
    kv = (qkv_rows - d) // (2 * hd)
    kv_cfg = mpt_kv_heads(cfg)
    if kv != kv_cfg:
        raise ValueError(
            f"attn_config implies {kv_cfg} KV heads (attn_type={_attn(cfg).get('attn_type')!r}, "
            f"kv_n_heads={_attn(cfg).get('kv_n_heads')!r}) but attn.Wqkv.weight has {qkv_rows} rows, "
            f"i.e. {kv} KV heads"
        )
    if n_heads % kv:
        raise ValueError(f"n_heads={n_heads} is not a multiple of kv_n_heads={kv}")
    if kv % tp:
        raise ValueError(
            f"kv_n_heads={kv} is not divisible by tensor parallelism tp={tp}: TensorRT-LLM's MPT FT layout "
            f"splits K and V by heads on every rank and MPT does not duplicate KV heads"
        )
    return kv


def _mlp_width(cfg: dict, need: Callable[[str], tuple[int, ...]], d: int, n_layers: int, tp: int) -> int:
    n_inner = d * cfg.get("expansion_ratio", 4)
    if n_layers:
        up_rows = need("transformer.blocks.0.ffn.up_proj.weight")[0]
        if float(n_inner) != float(up_rows):
            raise ValueError(f"d_model*expansion_ratio={n_inner} but ffn.up_proj.weight has {up_rows} rows")
        n_inner = up_rows
    n_inner = int(n_inner)
    if n_inner % tp:
        raise ValueError(f"MLP width {n_inner} is not divisible by tp={tp}")
    return n_inner


def _has_bias(cfg: dict, keyset: set[str], n_layers: int) -> bool:
    """Biases are all there or all absent, and agree with ``no_bias``."""
    bias_names = [_block_name(i, t) for i in range(n_layers) for t in BLOCK if t.bias_free != "kept"]
    bias_names.append("transformer.norm_f.bias")
    present = [n for n in bias_names if n in keyset]
    no_bias_cfg = bool(cfg.get("no_bias", True))
    if no_bias_cfg and present:
        raise ValueError(f"config has no_bias=true but the checkpoint holds bias tensors, e.g. {present[0]!r}")
    if present and len(present) != len(bias_names):
        missing = [n for n in bias_names if n not in keyset]
        raise ValueError(f"checkpoint holds some bias tensors but lacks others, e.g. {missing[0]!r}")
    if not no_bias_cfg and not present:
        log.info("config has no_bias=false but the checkpoint holds no bias tensors; writing bias = False")
    return bool(present)


def _check_shapes(need: Callable[[str], tuple[int, ...]], d: int, kv_dim: int, n_inner: int, n_layers: int,
                  has_bias: bool) -> None:
    expected = _hf_shapes(d, kv_dim, n_inner)
    for i in range(n_layers):
        for t in BLOCK:
            if t.bias_free != "kept" and not has_bias:
                continue
            shp = need(_block_name(i, t))
            if shp != expected[t.hf]:
                raise ValueError(f"{_block_name(i, t)} has shape {shp}, expected {expected[t.hf]}")
    shp = need("transformer.norm_f.weight")
    if shp != (d,):
        raise ValueError(f"transformer.norm_f.weight has shape {shp}, expected {(d,)}")


def _prepare_dir(saved: Path) -> Path:
    """Create ``<tp>-gpu`` and remove an earlier ``config.ini`` and ``model.*.bin`` (no stale tensor survives)."""
    saved.mkdir(parents=True, exist_ok=True)
    for old in list(saved.iterdir()):
        if old.is_file() and (old.name == "config.ini" or (old.name.startswith("model.") and old.name.endswith(".bin"))):
            old.unlink()
    return saved


def _write_tensors(source, layout: FTLayout, storage: torch.dtype, tp: int, saved: Path) -> None:
    """Every ``model.*.bin``, one source tensor in memory at a time: GEMM weights transposed to
    ``[in, out]`` and split per rank, norms once, zero LayerNorm biases for a bias-free model."""
    d, kv_dim, has_bias = layout.d, layout.kv_dim, layout.has_bias

    def load(name: str) -> np.ndarray:
        return _to_numpy(source.get(name).to(storage))

    def load_t(name: str) -> np.ndarray:  # [out, in] -> [in, out]
        return _to_numpy(source.get(name).to(storage).t())

    def save(arr: np.ndarray, key: str) -> None:
        _save(arr, saved / f"model.{key}.bin")

    def save_ranks(parts: list[np.ndarray], key: str) -> None:
        for r, part in enumerate(parts):
            save(part, f"{key}.{r}")

    zeros = _to_numpy(torch.zeros(d, dtype=storage))
    save(load("transformer.wte.weight"), "wte")
    if layout.write_lm_head:
        save(load("lm_head.weight"), "lm_head.weight")
    for i in range(layout.n_layers):
        for t in BLOCK:
            key = f"layers.{i}.{t.ft}"
            if not has_bias and t.bias_free != "kept":
                if t.bias_free == "zeros":
                    save(zeros, key)
                continue
            arr = (load_t if t.transpose else load)(_block_name(i, t))
            if t.split == "none":
                save(arr, key)
            elif t.split == "qkv":
                save_ranks(_split_qkv(arr, d, kv_dim, tp), key)
            else:
                save_ranks(np.split(arr, tp, axis=0 if t.split == "rows" else -1), key)
    save(load("transformer.norm_f.weight"), "final_layernorm.weight")
    save(load("transformer.norm_f.bias") if has_bias else zeros, "final_layernorm.bias")


def _write_config_ini(cfg: dict, layout: FTLayout, storage: torch.dtype, tp: int, saved: Path,
                      bos_token_id: int | None, eos_token_id: int | None) -> None:
    """``config.ini`` in TensorRT-LLM's key order, written last and atomically."""
    bos = _first_id(cfg.get("bos_token_id"))
    eos = _first_id(cfg.get("eos_token_id"))
    bos = bos if bos is not None else bos_token_id
    eos = eos if eos is not None else eos_token_id
    name_or_path = cfg.get("_name_or_path") or ""
    gpt: dict[str, str] = {
        "model_name": "mpt" if name_or_path == "" else str(name_or_path),
        "n_head": str(layout.n_heads),
        "n_embd": str(layout.d),
        "n_inner": str(layout.n_inner),
        "n_positions": str(int(cfg.get("max_seq_len", 2048))),
        "n_layer": str(layout.n_layers),
        "vocab_size": str(layout.vocab),
        "bos_token_id": str(bos),
        "eos_token_id": str(eos),
        "storage_dtype": _storage_name(storage),
        "tensor_parallelism": str(tp),
        "activation_function": "gelu",
        "calibrate_kv_cache": "False",
        "smoothquant": str(None),
        "layer_norm_epsilon": str(float(cfg.get("layer_norm_epsilon", 1e-5))),
        "position_embedding_type": "alibi",
    }
    if layout.kv != layout.n_heads:
        gpt["n_kv_head"] = str(layout.kv)
    if not layout.has_bias:
        gpt["bias"] = str(False)
    ini = configparser.ConfigParser()
    ini["gpt"] = gpt
    tmp = saved / "config.ini.tmp"
    with open(tmp, "w") as f:
        ini.write(f)
    os.replace(tmp, saved / "config.ini")


# --------------------------------------------------------------------------
# reader

def resolve_ft_dir(path: Path) -> Path:
    """The ``<tp>-gpu`` directory for ``path`` (itself, or its only ``*-gpu`` child)."""
    path = Path(path)
    if (path / "config.ini").is_file():
        return path
    if not path.is_dir():
        raise ValueError(f"FT directory {path} does not exist")
    children = sorted(c for c in path.iterdir() if c.is_dir() and c.name.endswith("-gpu"))
    with_ini = [c for c in children if (c / "config.ini").is_file()]
    if len(with_ini) == 1:
        return with_ini[0]
    if not with_ini:
        raise ValueError(f"{path} is not an FT directory: no config.ini in it or in a '<tp>-gpu' child")
    raise ValueError(
        f"{path} holds several FT directories ({', '.join(c.name for c in with_ini)}); pass one of them"
    )


def is_ft_dir(path) -> bool:
    """True when ``path`` (or its only ``*-gpu`` child) holds an FT ``config.ini`` with a [gpt] section."""
    try:
        d = resolve_ft_dir(Path(path))
        ini = configparser.ConfigParser()
        ini.read(d / "config.ini")
        return ini.has_section("gpt")
    except (ValueError, OSError, configparser.Error):
        return False


class _FTConfig:
    def __init__(self, ft_dir: Path):
        self.dir = ft_dir
        ini = configparser.ConfigParser()
        try:
            ini.read(ft_dir / "config.ini")
        except configparser.Error as e:
            raise ValueError(f"{ft_dir / 'config.ini'} is not a valid config.ini: {e}") from e
        if not ini.has_section("gpt"):
            raise ValueError(f"{ft_dir / 'config.ini'} has no [gpt] section")
        g = ini["gpt"]

        def req_int(key: str) -> int:
            if key not in g:
                raise ValueError(f"{ft_dir / 'config.ini'} has no '{key}' in [gpt]")
            return int(g[key])

        self.raw = dict(g)
        self.n_head = req_int("n_head")
        self.n_embd = req_int("n_embd")
        self.n_layer = req_int("n_layer")
        self.vocab_size = req_int("vocab_size")
        self.n_positions = int(g.get("n_positions", "2048"))
        inner = g.get("n_inner", g.get("intermediate_size"))
        self.n_inner = int(inner) if inner not in (None, "", "None") else 4 * self.n_embd
        if "tensor_parallelism" in g:
            self.tp = int(g["tensor_parallelism"])
        else:
            m = re.fullmatch(r"(\d+)-gpu", ft_dir.name)
            if not m:
                raise ValueError(f"{ft_dir / 'config.ini'} has no tensor_parallelism and the directory is not named '<tp>-gpu'")
            self.tp = int(m.group(1))
        self.storage_name = g.get("storage_dtype", "float32")  # TensorRT-LLM's parse_ft_config default
        self.dtype = _as_torch_dtype(self.storage_name)
        kv = g.get("n_kv_head")
        self.n_kv_head = int(kv) if kv not in (None, "", "None") else self.n_head
        if g.getboolean("multi_query_mode", fallback=False):
            self.n_kv_head = 1
        self.bias = g.getboolean("bias", fallback=True)
        self.eps = float(g.get("layer_norm_epsilon", "1e-5"))
        self.pos = g.get("position_embedding_type", "alibi")
        self.act = g.get("activation_function", "gelu")
        if self.n_embd % self.n_head:
            raise ValueError(f"{ft_dir}: n_embd={self.n_embd} not divisible by n_head={self.n_head}")
        self.head_dim = self.n_embd // self.n_head
        for what, val in (("n_head", self.n_head), ("n_inner", self.n_inner)):
            if val % self.tp:
                raise ValueError(f"{ft_dir}: {what}={val} not divisible by tensor_parallelism={self.tp}")
        if self.smoothquant_or_int8():
            raise ValueError(f"{ft_dir}: SmoothQuant / int8 FT directories are not supported")

    def smoothquant_or_int8(self) -> bool:
        sq = self.raw.get("smoothquant", "None")
        return sq not in ("None", "", None)

    def ids(self, key: str):
        v = self.raw.get(key)
        if v in (None, "", "None"):
            return None
        try:
            return int(v)
        except ValueError:
            return None


class FTSource:
    """A FasterTransformer MPT directory of any tensor parallelism as a TensorSource.

    Tensors carry transformers ``MptForCausalLM`` names and shapes (ranks
    merged, weights back to ``[out, in]``), in the storage dtype.  Nothing is
    read until :meth:`get`; the constructor only parses ``config.ini`` and
    checks every expected ``.bin`` exists with the right byte size.

    Bias tensors (LayerNorm and linear) are presented only when config.ini
    says ``bias`` is true; the zero LayerNorm biases of a bias-free model are
    not.  ``lm_head.weight`` / ``transformer.wpe.weight`` appear only when
    ``model.lm_head.weight.bin`` / ``model.wpe.bin`` exist.

    qkv per-rank files may hold either this module's (and TensorRT-LLM's MPT)
    layout, K/V split by heads, or, for MQA, K/V replicated on every rank (the
    layout TensorRT-LLM's GPT FT writer and MPT FT loader use); the file size
    tells them apart.
    """

    def __init__(self, ft_dir: Path, validate: bool = True):
        self.dir = resolve_ft_dir(Path(ft_dir))
        self.cfg = _FTConfig(self.dir)
        self._itemsize = _np_dtype(self.cfg.dtype).itemsize
        self._plan: dict[str, tuple[tuple[int, ...], Callable[[], torch.Tensor]]] = {}
        self._build()
        if validate:
            self.check_files()

    # -- TensorSource
    def keys(self) -> list[str]:
        return list(self._plan)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entry(name)[0]

    def dtype(self, name: str) -> torch.dtype:
        self._entry(name)
        return self.cfg.dtype

    def get(self, name: str) -> torch.Tensor:
        return self._entry(name)[1]().contiguous()

    # -- extras
    @property
    def tp(self) -> int:
        return self.cfg.tp

    def files(self) -> list[Path]:
        """Every .bin file the presented tensors read."""
        return [self.dir / f for f in self._files]

    def check_files(self) -> None:
        """Raise ValueError naming the first missing or wrongly sized .bin file."""
        for fname, sizes in self._files.items():
            self._check(fname, sizes)

    # -- internals
    def _entry(self, name: str):
        try:
            return self._plan[name]
        except KeyError:
            raise KeyError(f"{name!r} is not a tensor of FT directory {self.dir}") from None

    def _check(self, fname: str, numels: tuple[int, ...]) -> int:
        path = self.dir / fname
        if not path.is_file():
            raise ValueError(f"FT directory {self.dir} is missing {fname}")
        size = path.stat().st_size
        allowed = {n * self._itemsize: n for n in numels}
        if size not in allowed:
            exp = " or ".join(str(b) for b in allowed)
            raise ValueError(
                f"FT file {path} is {size} bytes, expected {exp} "
                f"({' or '.join(str(n) for n in numels)} {self.cfg.storage_name} elements)"
            )
        return allowed[size]

    def _read(self, fname: str, shape: tuple[int, ...]) -> np.ndarray:
        numel = self._check(fname, (math.prod(shape),))
        return np.fromfile(self.dir / fname, dtype=_np_dtype(self.cfg.dtype), count=numel).reshape(shape)

    def _build(self) -> None:
        c = self.cfg
        d, tp, L = c.n_embd, c.tp, c.n_layer
        kv_dim = c.n_kv_head * c.head_dim
        inner = c.n_inner
        files: dict[str, tuple[int, ...]] = {}
        plan = self._plan
        dt = c.dtype

        def t(arr: np.ndarray) -> torch.Tensor:
            return _from_numpy(arr, dt)

        def single(fname: str, shape: tuple[int, ...]):
            files[fname] = (math.prod(shape),)
            return lambda: t(self._read(fname, shape))

        def ranked(key: str, rank_shape: tuple[int, ...], axis: int, transpose: bool):
            names = [f"model.{key}.{r}.bin" for r in range(tp)]
            for f in names:
                files[f] = (math.prod(rank_shape),)

            def load() -> torch.Tensor:
                full = t(np.concatenate([self._read(f, rank_shape) for f in names], axis=axis))
                return full.t() if transpose else full
            return load

        # qkv per-rank width: K/V split by heads (d/tp + 2*kv_dim/tp), or for MQA
        # written GPT-style, K/V replicated on every rank (d/tp + 2*kv_dim).
        widths = []
        if kv_dim % tp == 0:
            widths.append(d // tp + 2 * kv_dim // tp)
        if tp > 1 or not widths:
            widths.append(d // tp + 2 * kv_dim)
        split_width = widths[0] if kv_dim % tp == 0 else None

        def qkv(key: str, lead: tuple[int, ...]):
            names = [f"model.{key}.{r}.bin" for r in range(tp)]
            lead_n = math.prod(lead)
            numels = tuple(w * lead_n for w in widths)
            for f in names:
                files[f] = numels

            def load() -> torch.Tensor:
                qs, ks, vs = [], [], []
                for r, f in enumerate(names):
                    numel = self._check(f, numels)
                    width = numel // lead_n
                    arr = np.fromfile(self.dir / f, dtype=_np_dtype(dt), count=numel).reshape(lead + (width,))
                    kvw = (width - d // tp) // 2
                    q, k, v = np.split(arr, [d // tp, d // tp + kvw], axis=-1)
                    qs.append(q)
                    if width == split_width or r == 0:  # replicated K/V: rank 0's copy is all of it
                        ks.append(k)
                        vs.append(v)
                full = np.concatenate([np.concatenate(x, axis=-1) for x in (qs, ks, vs)], axis=-1)
                out = t(full)
                return out.t() if lead else out
            return load

        plan["transformer.wte.weight"] = ((c.vocab_size, d), single("model.wte.bin", (c.vocab_size, d)))
        if (self.dir / "model.wpe.bin").is_file():
            plan["transformer.wpe.weight"] = ((c.n_positions, d), single("model.wpe.bin", (c.n_positions, d)))
        shapes = _hf_shapes(d, kv_dim, inner)
        for i in range(L):
            for bt in BLOCK:
                if not c.bias and bt.bias_free != "kept":  # a bias-free model's zero LayerNorm biases: not shown
                    continue
                shape, key = shapes[bt.hf], f"layers.{i}.{bt.ft}"
                if bt.split == "none":
                    load = single(f"model.{key}.bin", shape)
                elif bt.split == "qkv":
                    load = qkv(key, shape[1:])  # (d,) for the weight ([in, out] on disk), () for the bias
                else:
                    ft_shape = list(shape[::-1] if bt.transpose else shape)
                    axis = 0 if bt.split == "rows" else len(ft_shape) - 1
                    ft_shape[axis] //= tp
                    load = ranked(key, tuple(ft_shape), axis, bt.transpose)
                plan[_block_name(i, bt)] = (shape, load)
        plan["transformer.norm_f.weight"] = ((d,), single("model.final_layernorm.weight.bin", (d,)))
        if c.bias:
            plan["transformer.norm_f.bias"] = ((d,), single("model.final_layernorm.bias.bin", (d,)))
        if (self.dir / "model.lm_head.weight.bin").is_file():
            plan["lm_head.weight"] = ((c.vocab_size, d), single("model.lm_head.weight.bin", (c.vocab_size, d)))
        self._files = files


def ft_hf_config(ft_dir: Path) -> dict:
    """The transformers/llm-foundry MPT ``config.json`` dict equivalent to an FT directory.

    FT stores no ALiBi settings, so ``alibi_bias_max`` is 8 (what every FT
    reader assumes) and ``clip_qkv`` / ``qk_ln`` / ``softmax_scale`` are off.
    MQA writes ``attn_type: multiquery_attention`` and GQA
    ``grouped_query_attention`` (llm-foundry's names; transformers' MptConfig
    accepts only the first and its MPT model has MHA only), each with
    ``kv_n_heads``.
    """
    d = resolve_ft_dir(Path(ft_dir))
    c = _FTConfig(d)
    attn: dict[str, Any] = {
        "attn_type": "multihead_attention",
        "attn_pdrop": 0,
        "attn_impl": "torch",
        "clip_qkv": None,
        "softmax_scale": None,
        "prefix_lm": False,
        "qk_ln": False,
        "attn_uses_sequence_id": False,
        "alibi": True,
        "alibi_bias_max": 8,
    }
    if c.n_kv_head != c.n_head:
        attn["attn_type"] = "multiquery_attention" if c.n_kv_head == 1 else "grouped_query_attention"
        attn["kv_n_heads"] = c.n_kv_head
    ratio = c.n_inner / c.n_embd
    tied = not (d / "model.lm_head.weight.bin").is_file()
    return {
        "architectures": ["MptForCausalLM"],
        "model_type": "mpt",
        "d_model": c.n_embd,
        "n_heads": c.n_head,
        "n_layers": c.n_layer,
        "expansion_ratio": int(ratio) if ratio.is_integer() else ratio,
        "max_seq_len": c.n_positions,
        "vocab_size": c.vocab_size,
        "no_bias": not c.bias,
        "attn_config": attn,
        "layer_norm_epsilon": c.eps,
        "learned_pos_emb": False,
        "logit_scale": None,
        "norm_type": "low_precision_layernorm",
        "bos_token_id": c.ids("bos_token_id"),
        "eos_token_id": c.ids("eos_token_id"),
        "tie_word_embeddings": tied,
        "torch_dtype": _storage_name(c.dtype),  # transformers 4.x name
        "dtype": _storage_name(c.dtype),  # transformers 5.x name
    }
