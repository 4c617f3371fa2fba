"""The name and layout table between Hugging Face tensors and Megatron-Core's GPT state dict.

One table serves both directions.  Each :class:`MCoreTensor` is one tensor
of the *unsharded* Megatron-Core model (global layer and expert indices):
the Hugging Face tensors it is made of, how to build it from them
(``to_mcore``) and back (``from_mcore``), and how it is split across
tensor-parallel ranks (``split``).  Pipeline and expert placement follow
from ``layer`` / ``stage`` / ``expert``.  The writer walks the table per
rank file; the reader walks it backwards to present a Megatron checkpoint
as Hugging Face tensors, one at a time, to the ordinary conversion.

The core builds the Llama-style part (:func:`llama_layout`: embedding,
attention, norms, dense SwiGLU MLP, output layer); a family with another
feed-forward passes its own ``mlp`` callback, as Mixtral does for its
experts (``trtlm_mixtral.mcore``) through the ``trtlm_mcore_layout`` hook.

Megatron-Core facts encoded here (Megatron-LM ``tools/checkpoint/``
``loader_llama_mistral.py``/``loader_mixtral_hf.py``/``saver_base.py``,
``megatron/core``; see docs/megatron.md for the version):

* ``linear_qkv`` is grouped per KV head: ``[q_g; k_g; v_g]`` for each query
  group ``g``, so a plain row split gives each TP rank whole groups;
* ``linear_fc1`` of a SwiGLU MLP (dense or expert) is ``[gate; up]`` *per TP
  shard*: rank ``r`` holds ``cat(gate_r, up_r)`` (split ``"gate_up"``);
* the vocabulary is padded to a multiple of ``make_vocab_size_divisible_by
  * TP`` (128 by default) by repeating the last row, as the saver does;
* Transformer-Engine names: the input norm is ``linear_qkv.layer_norm_weight``,
  the dense MLP's norm ``mlp.linear_fc1.layer_norm_weight``, an MoE layer's
  ``pre_mlp_layernorm.weight``.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from trtlm.errors import UserError

#: Megatron's default ``--make-vocab-size-divisible-by``.
VOCAB_DIVISIBLE_BY = 128
SPLITS = ("replicated", "column", "row", "gate_up")

ToMCore = Callable[[Sequence[torch.Tensor]], torch.Tensor]
FromMCore = Callable[[torch.Tensor], Sequence[torch.Tensor]]


def _one(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    return tensors[0]


def _same(t: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return (t,)


@dataclass(frozen=True)
class MCoreTensor:
    """One tensor of the unsharded Megatron-Core model.

    :param name: Megatron-Core state-dict name with the *global* layer and
        expert index (the writer renumbers per pipeline stage / EP rank).
    :param hf: the Hugging Face tensors it is made of.
    :param hf_shapes: their shapes.
    :param split: ``"replicated"``, ``"column"`` (rows), ``"row"`` (columns)
        or ``"gate_up"`` (``[gate; up]`` halves split separately).
    :param layer: global decoder layer, ``None`` for embedding/final tensors.
    :param stage: ``"first"`` or ``"last"`` pipeline stage for global tensors.
    :param expert: global expert index (placed on EP rank ``expert // local``).
    :param to_mcore: HF tensors -> full tensor (``hf`` order).
    :param from_mcore: full tensor -> HF tensors (``hf`` order).
    :param dtype: fixed dtype (the float32 router); ``None``: the checkpoint dtype.
    :param read: ``False`` for a duplicate (tied output layer on the last
        stage) the reader never reads back.
    """

    name: str
    hf: tuple[str, ...]
    hf_shapes: tuple[tuple[int, ...], ...]
    split: str = "replicated"
    layer: int | None = None
    stage: str | None = None
    expert: int | None = None
    to_mcore: ToMCore = _one
    from_mcore: FromMCore = _same
    dtype: torch.dtype | None = None
    read: bool = True
    shape: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.split not in SPLITS:
            raise ValueError(f"{self.name}: split {self.split!r} is not one of {SPLITS}")
        if not self.shape:
            full = self.to_mcore([torch.empty(s, device="meta") for s in self.hf_shapes])
            object.__setattr__(self, "shape", tuple(full.shape))


@dataclass
class MCoreLayout:
    """What one model is in Megatron-Core terms: its tensors and the ``args`` describing it."""

    tensors: list[MCoreTensor]
    args: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# Tensor-parallel split and merge, one pair per split kind
# --------------------------------------------------------------------------------------------
def take(split: str, full: torch.Tensor, tp: int, rank: int) -> torch.Tensor:
    """Rank ``rank``'s part of ``full`` under ``tp``-way tensor parallelism."""
    if split == "replicated" or tp == 1:
        return full
    if split == "column":
        return full.chunk(tp, dim=0)[rank]
    if split == "row":
        return full.chunk(tp, dim=-1)[rank]
    gate, up = full.chunk(2, dim=0)
    return torch.cat([gate.chunk(tp, dim=0)[rank], up.chunk(tp, dim=0)[rank]], dim=0)


def merge(split: str, parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """The full tensor from every TP rank's part (inverse of :func:`take`)."""
    if split == "replicated" or len(parts) == 1:
        return parts[0]
    if split == "column":
        return torch.cat(list(parts), dim=0)
    if split == "row":
        return torch.cat(list(parts), dim=-1)
    halves = [p.chunk(2, dim=0) for p in parts]
    return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)


def local_shape(t: MCoreTensor, tp: int) -> tuple[int, ...]:
    shape = list(t.shape)
    if tp > 1 and t.split in ("column", "gate_up"):
        shape[0] //= tp
    elif tp > 1 and t.split == "row":
        shape[-1] //= tp
    return tuple(shape)


_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")
_EXPERT = re.compile(r"\.local_experts\.(\d+)\.")


def local_name(t: MCoreTensor, layers_per_stage: int, experts_per_rank: int) -> str:
    """The name in its rank file: layer counted within the stage, expert within the EP rank."""
    name = t.name
    if t.layer is not None:
        name = _LAYER.sub(f"decoder.layers.{t.layer % layers_per_stage}.", name, count=1)
    if t.expert is not None:
        name = _EXPERT.sub(f".local_experts.{t.expert % experts_per_rank}.", name, count=1)
    return name


def padded_vocab(vocab: int, tp: int, divisible_by: int = VOCAB_DIVISIBLE_BY) -> int:
    """Megatron's ``vocab_size_with_padding``: up to a multiple of ``divisible_by * tp``."""
    multiple = divisible_by * tp
    return -(-vocab // multiple) * multiple


# --------------------------------------------------------------------------------------------
# Tensor transforms
# --------------------------------------------------------------------------------------------
def vocab_transforms(vocab: int, rows: int) -> tuple[ToMCore, FromMCore]:
    """Vocabulary padding to ``rows``: repeat the last row (Megatron's saver), drop the padding on the way back."""

    def to(ts: Sequence[torch.Tensor]) -> torch.Tensor:
        t = ts[0]
        extra = rows - t.shape[0]
        return t if extra == 0 else torch.cat([t, t[-1:].expand(extra, -1)], dim=0)

    def back(t: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (t[:vocab],)

    return to, back


def qkv_transforms(heads: int, kv_heads: int, head_size: int) -> tuple[ToMCore, FromMCore]:
    """HF ``q, k, v`` <-> Megatron's ``linear_qkv``, grouped per KV head ``[q_g; k_g; v_g]``."""
    per = heads // kv_heads

    def to(ts: Sequence[torch.Tensor]) -> torch.Tensor:
        q, k, v = ts
        hidden = q.shape[-1]
        return torch.cat([q.reshape(kv_heads, per * head_size, hidden), k.reshape(kv_heads, head_size, hidden),
                          v.reshape(kv_heads, head_size, hidden)], dim=1).reshape(-1, hidden)

    def back(t: torch.Tensor) -> tuple[torch.Tensor, ...]:
        hidden = t.shape[-1]
        g = t.reshape(kv_heads, (per + 2) * head_size, hidden)
        q, k, v = g.split([per * head_size, head_size, head_size], dim=1)
        return (q.reshape(-1, hidden), k.reshape(-1, hidden), v.reshape(-1, hidden))

    return to, back


def gate_up_cat(ts: Sequence[torch.Tensor]) -> torch.Tensor:
    """SwiGLU ``linear_fc1`` = ``[gate; up]`` (the TP split then takes each half separately)."""
    return torch.cat([ts[0], ts[1]], dim=0)


def gate_up_split(t: torch.Tensor) -> tuple[torch.Tensor, ...]:
    gate, up = t.chunk(2, dim=0)
    return (gate, up)


# --------------------------------------------------------------------------------------------
# The Llama-style table
# --------------------------------------------------------------------------------------------
MlpLayout = Callable[[int, dict[str, Any], dict[str, int]], list[MCoreTensor]]


def dense_mlp(i: int, hf: dict[str, Any], d: dict[str, int]) -> list[MCoreTensor]:
    """Dense SwiGLU MLP with Transformer-Engine names (the pre-MLP norm fused into ``linear_fc1``)."""
    p, m = f"model.layers.{i}.", f"decoder.layers.{i}.mlp."
    H, inter = d["hidden"], d["inter"]
    return [
        MCoreTensor(m + "linear_fc1.layer_norm_weight", (p + "post_attention_layernorm.weight",), ((H,),), layer=i),
        MCoreTensor(m + "linear_fc1.weight", (p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"),
                    ((inter, H), (inter, H)), split="gate_up", layer=i, to_mcore=gate_up_cat,
                    from_mcore=gate_up_split),
        MCoreTensor(m + "linear_fc2.weight", (p + "mlp.down_proj.weight",), ((H, inter),), split="row", layer=i),
    ]


def check_parallel(d: dict[str, int], tp: int, pp: int, dense: bool = True) -> None:
    """Megatron-Core's own constraints, refused before anything is written."""
    if d["heads"] % tp or d["kv_heads"] % tp:
        raise UserError(f"--tp-size {tp}: Megatron-Core splits whole query groups, so tp must divide the "
                        f"{d['heads']} attention heads and the {d['kv_heads']} KV heads")
    if dense and d["inter"] % tp:
        raise UserError(f"--tp-size {tp} does not divide intermediate_size {d['inter']}")
    if d["layers"] % pp:
        raise UserError(f"--pp-size {pp} does not divide the model's {d['layers']} layers "
                        f"(Megatron-Core gives every stage the same number of layers)")


def llama_args(hf: dict[str, Any], d: dict[str, int], tp: int, pp: int, ep: int, vocab_padded: int) -> dict[str, Any]:
    """Megatron ``args`` for a Llama-style model (the fields ``load_args_from_checkpoint`` and the
    model provider read, as Megatron-LM's loader_llama_mistral/loader_mixtral_hf set them)."""
    from trtlm.hf_config import rope_theta

    tied = bool(hf.get("tie_word_embeddings"))
    return {
        "num_layers": d["layers"], "hidden_size": d["hidden"], "ffn_hidden_size": d["inter"],
        "num_attention_heads": d["heads"], "num_query_groups": d["kv_heads"],
        "group_query_attention": d["kv_heads"] != d["heads"], "kv_channels": d["head_size"],
        "seq_length": int(hf.get("max_position_embeddings", 2048)),
        "max_position_embeddings": int(hf.get("max_position_embeddings", 2048)),
        "position_embedding_type": "rope", "add_position_embedding": False,
        "use_rotary_position_embeddings": True, "rotary_base": rope_theta(hf, default=10000.0),
        "rotary_percent": 1.0, "rotary_interleaved": False, "add_bias_linear": False, "add_qkv_bias": False,
        "disable_bias_linear": True, "swiglu": True, "squared_relu": False,
        "untie_embeddings_and_output_weights": not tied, "apply_layernorm_1p": False, "normalization": "RMSNorm",
        "norm_epsilon": float(hf.get("rms_norm_eps", 1e-6)), "qk_layernorm": False,
        "apply_query_key_layer_scaling": False, "attention_dropout": 0.0, "hidden_dropout": 0.0,
        "vocab_size": d["vocab"], "padded_vocab_size": vocab_padded,
        "make_vocab_size_divisible_by": VOCAB_DIVISIBLE_BY,
        "tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp, "expert_model_parallel_size": ep,
        "expert_tensor_parallel_size": tp, "world_size": tp * pp * ep,
        "num_experts": None, "transformer_impl": "transformer_engine", "ckpt_format": "torch",
        "model_type_name": "GPT", "tokenizer_type": "HuggingFaceTokenizer",
        "consumed_train_samples": 0, "consumed_valid_samples": 0,
    }


def llama_layout(hf: dict[str, Any], tp: int = 1, pp: int = 1, ep: int = 1, mlp: MlpLayout = dense_mlp,
                 dense: bool = True) -> MCoreLayout:
    """The Megatron-Core table of a Llama-style HF model for the given parallel sizes."""
    from trtlm.llama import llama_dims

    d = llama_dims(hf)
    check_parallel(d, tp, pp, dense=dense)
    H, D, heads, kv, V = d["hidden"], d["head_size"], d["heads"], d["kv_heads"], d["vocab"]
    rows = padded_vocab(V, tp)
    pad, unpad = vocab_transforms(V, rows)
    qkv_to, qkv_back = qkv_transforms(heads, kv, D)
    tensors = [MCoreTensor("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), ((V, H),),
                           split="column", stage="first", to_mcore=pad, from_mcore=unpad)]
    for i in range(d["layers"]):
        p, a = f"model.layers.{i}.", f"decoder.layers.{i}.self_attention."
        tensors += [
            MCoreTensor(a + "linear_qkv.layer_norm_weight", (p + "input_layernorm.weight",), ((H,),), layer=i),
            MCoreTensor(a + "linear_qkv.weight",
                        (p + "self_attn.q_proj.weight", p + "self_attn.k_proj.weight", p + "self_attn.v_proj.weight"),
                        ((heads * D, H), (kv * D, H), (kv * D, H)), split="column", layer=i,
                        to_mcore=qkv_to, from_mcore=qkv_back),
            MCoreTensor(a + "linear_proj.weight", (p + "self_attn.o_proj.weight",), ((H, heads * D),), split="row",
                        layer=i),
        ]
        tensors += mlp(i, hf, d)
    tensors.append(MCoreTensor("decoder.final_layernorm.weight", ("model.norm.weight",), ((H,),), stage="last"))
    tied = bool(hf.get("tie_word_embeddings"))
    if not tied:
        tensors.append(MCoreTensor("output_layer.weight", ("lm_head.weight",), ((V, H),), split="column",
                                   stage="last", to_mcore=pad, from_mcore=unpad))
    elif pp > 1:
        # A tied output layer still exists on the last stage (GPTModel keeps its own copy there).
        tensors.append(MCoreTensor("output_layer.weight", ("model.embed_tokens.weight",), ((V, H),),
                                   split="column", stage="last", to_mcore=pad, from_mcore=unpad, read=False))
    return MCoreLayout(tensors, llama_args(hf, d, tp, pp, ep, rows))


#: Transformer-Engine modules with an ``_extra_state`` entry, by the suffix of their weight.
TE_EXTRA_STATE = ("self_attention.linear_qkv.weight", "self_attention.linear_proj.weight",
                  "mlp.linear_fc1.weight", "mlp.linear_fc2.weight", ".linear_fc1.weight", ".linear_fc2.weight")


def extra_state_names(names: Sequence[str]) -> list[str]:
    """``_extra_state`` keys a Transformer-Engine GPTModel holds for these local names: one per TE
    linear layer and one per TEDotProductAttention (``self_attention.core_attention``)."""
    out: list[str] = []
    for n in names:
        if n.endswith(TE_EXTRA_STATE):
            out.append(n[: -len("weight")] + "_extra_state")
        if n == "output_layer.weight":  # Megatron's own ColumnParallelLinear keeps a (None) extra state too
            out.append("output_layer._extra_state")
        if n.endswith("self_attention.linear_qkv.weight"):
            out.append(n[: -len("linear_qkv.weight")] + "core_attention._extra_state")
    return out
