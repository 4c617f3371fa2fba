"""Mixtral in Megatron-Core terms: the MoE names, the expert-parallel placement, the MoE args.

The core's :func:`trtlm.mcore.layout.llama_layout` covers embedding,
attention, norms and output layer; this module supplies each layer's
feed-forward (Megatron-LM ``tools/checkpoint/schema_core.py``
``CoreMoETESchema``, ``loader_mixtral_hf.py``, ``megatron/core/transformer/moe``):

* ``decoder.layers.i.pre_mlp_layernorm.weight``: an MoE layer has its own
  norm module (not fused into ``linear_fc1`` as in a dense TE layer);
* ``decoder.layers.i.mlp.router.weight`` ``[E, H]``: float32 (``TopKRouter``
  creates it so), replicated on every TP and EP rank;
* ``decoder.layers.i.mlp.experts.local_experts.e.linear_fc1.weight``:
  ``[w1; w3]`` = ``[gate; up]``, split per TP rank half by half like a dense
  SwiGLU ``linear_fc1``; ``linear_fc2.weight`` = ``w2``, split by columns;
  expert ``e`` lives on EP rank ``e // (E / ep)`` as local expert ``e % (E / ep)``
  (the core renumbers it from ``expert=e``).

Experts are the SequentialMLP layout (``--moe-grouped-gemm`` off, as Megatron's
converter writes); a grouped-GEMM checkpoint is refused naming the argument.
"""
from __future__ import annotations

from typing import Any

import torch

from trtlm.errors import UserError
from trtlm.mcore.config import llama_hf_config, recorded_hf_config
from trtlm.mcore.layout import MCoreLayout, MCoreTensor, gate_up_cat, gate_up_split, llama_layout
from trtlm_mixtral.plan import FUSED, LAYOUT_KEY, moe_settings


def _pick(e: int):
    return lambda ts: ts[0][e]


def moe_mlp(num_experts: int, layout: str):
    """The ``mlp`` callback of :func:`llama_layout` for Mixtral's sparse MoE feed-forward."""

    def mlp(i: int, hf: dict[str, Any], d: dict[str, int]) -> list[MCoreTensor]:
        H, inter, E = d["hidden"], d["inter"], num_experts
        m = f"decoder.layers.{i}."
        out = [MCoreTensor(m + "pre_mlp_layernorm.weight", (f"model.layers.{i}.post_attention_layernorm.weight",),
                           ((H,),), layer=i)]
        if layout == FUSED:  # transformers 5's in-memory layout: gate_up_proj [E, 2I, H] is already [gate; up]
            p = f"model.layers.{i}.mlp."
            out.append(MCoreTensor(m + "mlp.router.weight", (p + "gate.weight",), ((E, H),), layer=i,
                                   dtype=torch.float32))
            for e in range(E):
                x = f"{m}mlp.experts.local_experts.{e}."
                out += [MCoreTensor(x + "linear_fc1.weight", (p + "experts.gate_up_proj",), ((E, 2 * inter, H),),
                                    split="gate_up", layer=i, expert=e, to_mcore=_pick(e), read=False),
                        MCoreTensor(x + "linear_fc2.weight", (p + "experts.down_proj",), ((E, H, inter),),
                                    split="row", layer=i, expert=e, to_mcore=_pick(e), read=False)]
            return out
        p = f"model.layers.{i}.block_sparse_moe."
        out.append(MCoreTensor(m + "mlp.router.weight", (p + "gate.weight",), ((E, H),), layer=i, dtype=torch.float32))
        for e in range(E):
            q, x = f"{p}experts.{e}.", f"{m}mlp.experts.local_experts.{e}."
            out += [MCoreTensor(x + "linear_fc1.weight", (q + "w1.weight", q + "w3.weight"), ((inter, H), (inter, H)),
                                split="gate_up", layer=i, expert=e, to_mcore=gate_up_cat, from_mcore=gate_up_split),
                    MCoreTensor(x + "linear_fc2.weight", (q + "w2.weight",), ((H, inter),), split="row", layer=i,
                                expert=e)]
        return out

    return mlp


def mixtral_layout(hf: dict[str, Any], tp: int, pp: int, ep: int) -> MCoreLayout:
    """The Megatron-Core table and args of a Hugging Face Mixtral config."""
    from trtlm.convert.options import ConvertOptions

    moe = moe_settings(hf, ConvertOptions())
    E = moe["num_experts"]
    if E % ep:
        raise UserError(f"--moe-ep-size {ep} does not divide the model's {E} experts (num_local_experts)")
    inter = int(hf["intermediate_size"])
    if inter % tp:
        raise UserError(f"--tp-size {tp} does not divide the experts' intermediate_size {inter} "
                        f"(Megatron-Core splits every expert by the tensor parallel size)")
    layout = llama_layout(hf, tp, pp, ep, mlp=moe_mlp(E, hf.get(LAYOUT_KEY, "per-expert")), dense=False)
    layout.args.update(
        num_experts=E, moe_router_topk=moe["top_k"], moe_ffn_hidden_size=inter, moe_grouped_gemm=False,
        moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=float(hf.get("router_aux_loss_coef") or 0.0),
        moe_router_pre_softmax=False, moe_router_score_function="softmax", moe_token_dispatcher_type="alltoall",
        moe_layer_freq=1, sequence_parallel=tp > 1,
    )
    return layout


#: MoE args Mixtral's routing cannot express, with the value it needs.
_MOE_REQUIRED = {"moe_grouped_gemm": False, "moe_router_pre_softmax": False,
                 "moe_shared_expert_intermediate_size": None, "moe_router_score_function": "softmax"}


def mixtral_hf_config(args: dict[str, Any], family) -> dict[str, Any] | None:
    """The Hugging Face Mixtral config of a Megatron MoE checkpoint (``None`` when it has no experts)."""
    if not args.get("num_experts"):
        raise UserError(f"a dense Megatron checkpoint (args.num_experts is not set): not a {family.name} model; "
                        f"leave out --family to pick a dense family")
    recorded = recorded_hf_config(args)
    if recorded is not None:
        return recorded
    for key, want in _MOE_REQUIRED.items():
        have = args.get(key, want)
        if have != want and not (want in (False, None) and not have):
            raise UserError(f"args: {key} = {have!r}; trtlm maps Mixtral-style MoE ({key} = {want!r}) only")
    freq = args.get("moe_layer_freq", 1)
    if freq not in (1, None):
        raise UserError(f"args: moe_layer_freq = {freq!r}; trtlm maps models whose every layer is MoE only")
    hf = llama_hf_config(args, family.hf_architectures[0], family.hf_model_types[0], where="args")
    hf.update(num_local_experts=int(args["num_experts"]), num_experts_per_tok=int(args.get("moe_router_topk") or 2),
              intermediate_size=int(args.get("moe_ffn_hidden_size") or hf["intermediate_size"]),
              router_aux_loss_coef=float(args.get("moe_aux_loss_coeff") or 0.0))
    return hf
