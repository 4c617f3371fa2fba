"""The MPT -> TensorRT-LLM checkpoint mapping (``trtlm_map_layers`` for family ``mpt``).

Tensor names follow TensorRT-LLM's ``examples/mpt/convert_checkpoint.py`` and
the checkpoints NVIDIA modelopt exports (``tests/fixtures/modelopt/trtllm/mpt_*``):

==========================================  ===========================================
HF (transformers ``MptForCausalLM`` names)  TensorRT-LLM
==========================================  ===========================================
transformer.wte.weight                      transformer.vocab_embedding.weight, and
                                            lm_head.weight (a copy: MPT ties them)
blocks.{i}.norm_1.weight                    layers.{i}.input_layernorm.weight
blocks.{i}.attn.Wqkv.weight                 layers.{i}.attention.qkv.weight
blocks.{i}.attn.out_proj.weight             layers.{i}.attention.dense.weight
blocks.{i}.norm_2.weight                    layers.{i}.post_layernorm.weight
blocks.{i}.ffn.up_proj.weight               layers.{i}.mlp.fc.weight
blocks.{i}.ffn.down_proj.weight             layers.{i}.mlp.proj.weight
transformer.norm_f.weight                   transformer.ln_f.weight
==========================================  ===========================================

``Wqkv`` already is ``cat(q, k, v)``; tensor parallelism splits q, k and v by
heads (:class:`trtlm.layout.QKVSplit`).  MPT never duplicates KV heads, so
MQA/GQA needs ``kv_n_heads % tp == 0``.

Settings TensorRT-LLM's MPT model has no key for are either folded into the
weights, exactly, or refused:

* ``no_bias: false`` (llm-foundry only; transformers' MPT has no biases):
  TensorRT-LLM's MPT LayerNorms have no bias but its linears (and its
  ``lm_head``) do, so each LayerNorm bias is folded into the bias of the
  linear that reads the LayerNorm: ``qkv.bias += Wqkv @ norm_1.bias``,
  ``fc.bias += up_proj @ norm_2.bias``, ``lm_head.bias = wte @ norm_f.bias``.
* ``attn_config.softmax_scale`` other than ``1/sqrt(head_dim)``: folded into
  the query rows of ``qkv`` (refused together with ``clip_qkv``, which clamps
  before the scale).
* ``logit_scale``: folded into ``lm_head``.
* refused: ``qk_ln``, ``prefix_lm``, ``alibi: false`` / ``rope`` (learned or
  rotary positions), a sliding window, non-LayerNorm ``norm_type``, an FFN
  other than MPT's GELU MLP, ``expansion_ratio != 4`` (TensorRT-LLM's MPT
  builds its MLP as ``4 * d_model``).
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch

from trtlm.convert.options import ConvertOptions
from trtlm.convert.plan import ConversionPlan, TensorSpec
from trtlm.errors import UserError
from trtlm.hf_config import require

__all__ = ["mpt_dims", "mpt_kv_heads", "mpt_plan", "unsupported_settings", "logit_scale", "query_scale"]


def _attn(hf: dict[str, Any]) -> dict[str, Any]:
    attn = hf.get("attn_config") or {}
    return dict(attn) if isinstance(attn, dict) else dict(vars(attn))


def mpt_kv_heads(hf: dict[str, Any]) -> int:
    """KV heads, llm-foundry semantics: ``attn_type`` decides, ``kv_n_heads`` gives the count
    for grouped-query attention; a config without ``attn_type`` uses ``kv_n_heads`` if present."""
    heads = int(require(hf, "n_heads"))
    attn = _attn(hf)
    attn_type = attn.get("attn_type")
    kv = attn.get("kv_n_heads")
    if attn_type is None:
        return int(kv) if kv is not None else heads
    if attn_type == "multihead_attention":
        return heads
    if attn_type == "multiquery_attention":
        return 1
    if attn_type == "grouped_query_attention":
        if kv is None:
            raise UserError("config.json: attn_config.attn_type is grouped_query_attention but kv_n_heads is missing")
        return int(kv)
    raise UserError(f"config.json: attn_config.attn_type {attn_type!r} is not one MPT defines "
                    f"(multihead_attention, multiquery_attention, grouped_query_attention)")


def mpt_dims(hf: dict[str, Any]) -> dict[str, int]:
    hidden = int(require(hf, "d_model"))
    heads = int(require(hf, "n_heads"))
    if hidden % heads:
        raise UserError(f"config.json: d_model {hidden} is not divisible by n_heads {heads}")
    kv = mpt_kv_heads(hf)
    if kv < 1 or heads % kv:
        raise UserError(f"config.json: n_heads {heads} is not a multiple of attn_config.kv_n_heads {kv}")
    ratio = hf.get("expansion_ratio", 4)
    return {
        "vocab": int(require(hf, "vocab_size")),
        "hidden": hidden,
        "layers": int(require(hf, "n_layers")),
        "heads": heads,
        "kv_heads": kv,
        "head_size": hidden // heads,
        "inter": int(round(float(ratio) * hidden)),
    }


def query_scale(hf: dict[str, Any]) -> float:
    """Factor folded into the query rows: ``softmax_scale * sqrt(head_dim)`` (1.0 by default)."""
    scale = _attn(hf).get("softmax_scale")
    if scale is None:
        return 1.0
    head_dim = int(hf["d_model"]) / int(hf["n_heads"])
    factor = float(scale) * math.sqrt(head_dim)
    return 1.0 if math.isclose(factor, 1.0, rel_tol=1e-7) else factor


def logit_scale(hf: dict[str, Any]) -> float:
    """MPT's ``logit_scale`` as a number (``"inv_sqrt_d_model"`` is llm-foundry's 1/sqrt(d_model))."""
    value = hf.get("logit_scale")
    if value is None:
        return 1.0
    if value == "inv_sqrt_d_model":
        return 1.0 / math.sqrt(int(hf["d_model"]))
    try:
        return float(value)
    except (TypeError, ValueError):
        raise UserError(f"config.json: logit_scale {value!r} is neither a number nor 'inv_sqrt_d_model'") from None


def unsupported_settings(hf: dict[str, Any]) -> list[str]:
    """Settings TensorRT-LLM's MPT model cannot express (and trtlm cannot fold into weights)."""
    attn = _attn(hf)
    out = []
    if attn.get("qk_ln") or attn.get("qk_gn"):
        out.append("attn_config.qk_ln (query/key LayerNorm)")
    if attn.get("prefix_lm"):
        out.append("attn_config.prefix_lm (bidirectional prefix attention)")
    if not attn.get("alibi", True):
        out.append("attn_config.alibi=false (TensorRT-LLM's MPT only has ALiBi positions)")
    if attn.get("rope"):
        out.append("attn_config.rope (rotary positions)")
    if attn.get("sliding_window_size") not in (None, -1):
        out.append(f"attn_config.sliding_window_size={attn['sliding_window_size']}")
    if attn.get("clip_qkv") and query_scale(hf) != 1.0:
        out.append(f"attn_config.softmax_scale={attn.get('softmax_scale')} together with clip_qkv "
                   f"(the scale can only be folded into the query weights when nothing clamps them)")
    norm = hf.get("norm_type", "low_precision_layernorm")
    if norm not in ("low_precision_layernorm", "layernorm"):
        out.append(f"norm_type={norm!r} (TensorRT-LLM's MPT uses LayerNorm)")
    ffn = hf.get("ffn_config") or {}
    if ffn.get("ffn_type", "mptmlp") != "mptmlp":
        out.append(f"ffn_config.ffn_type={ffn['ffn_type']!r} (TensorRT-LLM's MPT has a plain GELU MLP)")
    act = ffn.get("ffn_act_fn")
    if isinstance(act, dict) and act.get("name", "gelu") != "gelu":
        out.append(f"ffn_config.ffn_act_fn={act['name']!r} (TensorRT-LLM's MPT uses GELU)")
    ratio = hf.get("expansion_ratio", 4)
    if float(ratio) != 4.0:
        out.append(f"expansion_ratio={ratio} (TensorRT-LLM's MPT builds its MLP as 4 * d_model)")
    return out


def check_tp(d: dict[str, int], options: ConvertOptions) -> None:
    tp = options.tp_size
    if d["heads"] % tp:
        raise UserError(f"--tp-size {tp} does not divide the model's {d['heads']} attention heads (n_heads)")
    if d["kv_heads"] % tp:
        raise UserError(f"--tp-size {tp} does not divide the model's {d['kv_heads']} KV heads "
                        f"(attn_config.kv_n_heads): MPT does not duplicate KV heads across ranks, "
                        f"so use a --tp-size that divides {d['kv_heads']}")
    if d["inter"] % tp:
        raise UserError(f"--tp-size {tp} does not divide the MLP width {d['inter']}")


# -- combines (built from the sources, in float32 where they do arithmetic) ----------------

def _scaled_rows(rows: int, factor: float):
    """Multiply the first ``rows`` rows (the queries) by ``factor``."""
    def combine(ts: Sequence[torch.Tensor]) -> torch.Tensor:
        t = ts[0]
        if factor == 1.0:
            return t
        t = t.float().clone()
        t[:rows] *= factor
        return t
    return combine


def _folded_bias(q_rows: int = 0, factor: float = 1.0):
    """``bias + W @ norm_bias`` (sources: bias, W, norm_bias), queries scaled by ``factor``.

    Computed in float64: float32 matmul results depend on the kernel (and the memory
    alignment) the BLAS picks, so the same model read from safetensors or from FT files
    would otherwise fold to biases that differ in the last bit."""
    def combine(ts: Sequence[torch.Tensor]) -> torch.Tensor:
        bias, weight, norm_bias = (t.double() for t in ts)
        out = bias + weight @ norm_bias
        if factor != 1.0:
            out[:q_rows] *= factor
        return out.float()
    return combine


def _scaled(factor: float):
    def combine(ts: Sequence[torch.Tensor]) -> torch.Tensor:
        return ts[0] if factor == 1.0 else ts[0].float() * factor
    return combine


def _head_bias(factor: float):
    """lm_head.bias = factor * (W_lm @ norm_f.bias): ln_f's bias seen through the head."""
    def combine(ts: Sequence[torch.Tensor]) -> torch.Tensor:
        weight, norm_bias = ts[0].double(), ts[1].double()  # float64: see _folded_bias
        return ((weight @ norm_bias) * factor).float()
    return combine


def _number(value: Any) -> int | float:
    """8 stays 8 (as TensorRT-LLM writes it), 7.5 stays 7.5."""
    f = float(value)
    return int(f) if f.is_integer() else f


def mpt_plan(hf: dict[str, Any], options: ConvertOptions, architecture: str) -> ConversionPlan:
    """TensorRT-LLM checkpoint plan for an MPT config (transformers or llm-foundry style)."""
    problems = unsupported_settings(hf)
    if problems:
        raise UserError("this MPT model uses settings TensorRT-LLM's MPT model cannot express: "
                        + "; ".join(problems))
    d = mpt_dims(hf)
    check_tp(d, options)
    V, H, heads, kv, D, I = d["vocab"], d["hidden"], d["heads"], d["kv_heads"], d["head_size"], d["inter"]
    bias = not bool(hf.get("no_bias", True))
    attn = _attn(hf)
    qf = query_scale(hf)
    lf = logit_scale(hf)
    qkv_rows = (heads + 2 * kv) * D

    tensors: list[TensorSpec] = [
        TensorSpec("transformer.vocab_embedding.weight", ("transformer.wte.weight",), ((V, H),), stage="first"),
    ]
    for i in range(d["layers"]):
        p, t = f"transformer.blocks.{i}.", f"transformer.layers.{i}."
        tensors += [
            TensorSpec(t + "input_layernorm.weight", (p + "norm_1.weight",), ((H,),), layer=i),
            TensorSpec(t + "attention.qkv.weight", (p + "attn.Wqkv.weight",), ((qkv_rows, H),),
                       combine=_scaled_rows(heads * D, qf), layer=i, quantizable=True),
            TensorSpec(t + "attention.dense.weight", (p + "attn.out_proj.weight",), ((H, heads * D),),
                       layer=i, quantizable=True),
            TensorSpec(t + "post_layernorm.weight", (p + "norm_2.weight",), ((H,),), layer=i),
            TensorSpec(t + "mlp.fc.weight", (p + "ffn.up_proj.weight",), ((I, H),), layer=i, quantizable=True),
            TensorSpec(t + "mlp.proj.weight", (p + "ffn.down_proj.weight",), ((H, I),), layer=i, quantizable=True),
        ]
        if bias:
            tensors += [
                TensorSpec(t + "attention.qkv.bias", (p + "attn.Wqkv.bias", p + "attn.Wqkv.weight", p + "norm_1.bias"),
                           ((qkv_rows,), (qkv_rows, H), (H,)), combine=_folded_bias(heads * D, qf), layer=i),
                TensorSpec(t + "attention.dense.bias", (p + "attn.out_proj.bias",), ((H,),), layer=i),
                TensorSpec(t + "mlp.fc.bias", (p + "ffn.up_proj.bias", p + "ffn.up_proj.weight", p + "norm_2.bias"),
                           ((I,), (I, H), (H,)), combine=_folded_bias(), layer=i),
                TensorSpec(t + "mlp.proj.bias", (p + "ffn.down_proj.bias",), ((H,),), layer=i),
            ]
    tensors.append(TensorSpec("transformer.ln_f.weight", ("transformer.norm_f.weight",), ((H,),), stage="last"))
    tied = hf.get("tie_word_embeddings", True) is not False
    lm_source = "transformer.wte.weight" if tied else "lm_head.weight"
    tensors.append(TensorSpec("lm_head.weight", (lm_source,), ((V, H),), combine=_scaled(lf), stage="last"))
    if bias:
        tensors.append(TensorSpec("lm_head.bias", (lm_source, "transformer.norm_f.bias"), ((V, H), (H,)),
                                  combine=_head_bias(lf), stage="last"))

    config: dict[str, Any] = {
        "architecture": architecture,
        "dtype": None,  # filled by the pipeline
        "logits_dtype": "float32",
        "vocab_size": V,
        "hidden_size": H,
        "num_hidden_layers": d["layers"],
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "head_size": D,
        "intermediate_size": I,
        "hidden_act": "gelu",
        "norm_epsilon": float(hf.get("layer_norm_epsilon", 1e-5)),
        "position_embedding_type": "alibi",
        "max_position_embeddings": int(hf.get("max_seq_len", 2048)),
        "use_parallel_embedding": options.use_parallel_embedding,
        "embedding_sharding_dim": 0,
        "share_embedding_table": False,
        "bias": bias,
        # TensorRT-LLM's MPT gives lm_head a bias exactly when ``bias`` is set; trtlm's runtime reads this key.
        "lm_head_bias": bias,
        "residual_mlp": False,
        "clip_qkv": float(attn["clip_qkv"]) if attn.get("clip_qkv") else None,
        "alibi_bias_max": _number(attn.get("alibi_bias_max") if attn.get("alibi_bias_max") is not None else 8),
        "quantization": {"quant_algo": None, "kv_cache_quant_algo": None},
    }
    bos, eos = hf.get("bos_token_id"), hf.get("eos_token_id")
    config["trtlm"] = {"bos_token_id": bos, "eos_token_id": eos}
    return ConversionPlan(config=config, tensors=tensors)
