"""Mixtral's conversion plan: the Llama mapping with a sparse-MoE feed-forward.

Everything but the feed-forward is :func:`trtlm.llama.llama_plan`; this module
only supplies the per-layer MoE tensor specs, the ``moe`` config block and the
checks that must fail before anything is written.

TensorRT-LLM's MoE tensors, per layer ``i`` (``E`` experts, ``I`` intermediate size):

* ``mlp.router.weight`` ``[E, H]`` float32, never quantized, never split;
* ``mlp.fc.weight`` ``[E, 2I, H]``: per expert ``cat(w3, w1)``, the UP (linear) rows
  first and the GATE (SiLU) rows second;
* ``mlp.proj.weight`` ``[E, H, I]``: per expert ``w2``.

Two on-disk layouts of Hugging Face Mixtral checkpoints exist, and the plan's
sources name whichever one the directory holds (:func:`expert_layout`):

``"per-expert"``
    ``block_sparse_moe.gate.weight`` and ``block_sparse_moe.experts.{e}.w1/w2/w3.weight``:
    every hub checkpoint, transformers 4, and transformers 5's ``save_pretrained``
    (it converts its in-memory fused experts back to this layout by default).
``"fused"``
    ``mlp.gate.weight``, ``mlp.experts.gate_up_proj`` ``[E, 2I, H]`` (GATE rows
    first, then UP: the reverse of TensorRT-LLM's order) and
    ``mlp.experts.down_proj`` ``[E, H, I]``: transformers 5's in-memory layout,
    written by ``save_pretrained(..., save_original_format=False)``.

The layout is a property of the files, not of config.json, while the plan is
built from the config alone; so the plugin's ``trtlm_load_weights`` wrapper
looks at the tensor names and records the layout in the config under
:data:`LAYOUT_KEY` (absent means per-expert, as for ``--preset`` dummy weights).
"""
from __future__ import annotations

from typing import Any, Iterable, Sequence

import torch

from trtlm import meta
from trtlm.config import MoeConfig
from trtlm.mapping import Mapping
from trtlm.convert.options import ConvertOptions
from trtlm.convert.plan import ConversionPlan, TensorSpec
from trtlm.errors import UserError
from trtlm.hf_config import require
from trtlm.llama import llama_dims, llama_plan

#: hf_config key the loader sets to the on-disk expert layout ("per-expert" | "fused").
LAYOUT_KEY = "trtlm_expert_layout"
PER_EXPERT, FUSED = "per-expert", "fused"

#: ``--moe-normalization-mode`` values -> TensorRT-LLM's ``ExpertScaleNormalizationMode``.
NORMALIZATION_MODES = {"none": 0, "renormalize": 1}
#: Mixtral's routing (transformers: softmax, top-k, divide by the sum) is RENORMALIZE.
DEFAULT_NORMALIZATION = "renormalize"


def expert_layout(names: Iterable[str]) -> str:
    """The expert layout of a checkpoint, from its tensor names."""
    for name in names:
        if name.endswith(".mlp.experts.gate_up_proj"):
            return FUSED
    return PER_EXPERT


def up_gate_from_experts(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per-expert sources ``(w3_0, w1_0, w3_1, w1_1, ...)`` -> ``[E, 2I, H]`` with
    ``fc[e] = cat(w3_e, w1_e)`` (up first, as TensorRT-LLM's MoE expects)."""
    pairs = [meta.cat([tensors[j], tensors[j + 1]], dim=0) for j in range(0, len(tensors), 2)]
    return meta.stack(pairs)


def stack_experts(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per-expert ``w2`` sources -> ``[E, H, I]``."""
    return meta.stack(list(tensors))


def up_gate_from_fused(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """transformers 5's ``gate_up_proj`` ``[E, 2I, H]`` (gate first) -> up first."""
    gate, up = tensors[0].chunk(2, dim=1)
    return meta.cat([up, gate], dim=1)


def moe_settings(hf: dict[str, Any], options: ConvertOptions) -> dict[str, int]:
    """TensorRT-LLM's ``moe`` config block."""
    experts = int(require(hf, "num_local_experts"))
    top_k = int(require(hf, "num_experts_per_tok"))
    if not 1 <= top_k <= experts:
        raise UserError(f"config.json: num_experts_per_tok {top_k} must be between 1 and "
                        f"num_local_experts {experts}")
    mode = options.moe_normalization_mode or DEFAULT_NORMALIZATION
    if mode not in NORMALIZATION_MODES:
        raise UserError(f"--moe-normalization-mode {mode!r}: choose one of {', '.join(NORMALIZATION_MODES)}")
    return MoeConfig(experts, top_k, NORMALIZATION_MODES[mode]).to_dict()


def check_expert_parallel(experts: int, inter: int, options: ConvertOptions) -> Mapping:
    """The mapping the conversion will use, refused early when the experts cannot be split by it."""
    mapping = Mapping(options.tp_size, options.pp_size, options.moe_tp_size or 0, options.moe_ep_size or 0)
    ep, mtp = mapping.moe_ep_size, mapping.moe_tp_size
    if experts % ep:
        raise UserError(f"--moe-ep-size {ep} does not divide the model's {experts} experts (num_local_experts); "
                        f"pick an expert-parallel size that divides {experts}")
    if inter % mtp:
        implicit = "" if options.moe_tp_size else " (= --tp-size / --moe-ep-size by default)"
        raise UserError(f"moe_tp_size {mtp}{implicit} does not divide the experts' intermediate_size {inter}; "
                        f"use --moe-ep-size to split experts across ranks instead, or a --moe-tp-size dividing {inter}")
    return mapping


def moe_specs_for(num_experts: int, layout: str):
    """The ``mlp_specs`` callback :func:`llama_plan` calls for every layer."""

    def specs(i: int, hf: dict[str, Any], d: dict[str, Any]) -> list[TensorSpec]:
        H, I, E = d["hidden"], d["inter"], num_experts
        t = f"transformer.layers.{i}.mlp."
        if layout == FUSED:
            p = f"model.layers.{i}.mlp."
            return [
                TensorSpec(t + "router.weight", (p + "gate.weight",), ((E, H),), layer=i, dtype=torch.float32),
                TensorSpec(t + "fc.weight", (p + "experts.gate_up_proj",), ((E, 2 * I, H),),
                           combine=up_gate_from_fused, layer=i, quantizable=True),
                TensorSpec(t + "proj.weight", (p + "experts.down_proj",), ((E, H, I),), layer=i, quantizable=True),
            ]
        p = f"model.layers.{i}.block_sparse_moe."
        up_gate = tuple(p + f"experts.{e}.{w}.weight" for e in range(E) for w in ("w3", "w1"))
        down = tuple(p + f"experts.{e}.w2.weight" for e in range(E))
        return [
            TensorSpec(t + "router.weight", (p + "gate.weight",), ((E, H),), layer=i, dtype=torch.float32),
            TensorSpec(t + "fc.weight", up_gate, ((I, H),) * (2 * E), combine=up_gate_from_experts, layer=i,
                       quantizable=True),
            TensorSpec(t + "proj.weight", down, ((H, I),) * E, combine=stack_experts, layer=i, quantizable=True),
        ]

    return specs


def mixtral_plan(hf: dict[str, Any], options: ConvertOptions, architecture: str) -> ConversionPlan:
    """TensorRT-LLM checkpoint plan for a Hugging Face Mixtral config."""
    act = hf.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise UserError(f"config.json: hidden_act {act!r}; Mixtral experts are SwiGLU (silu) in TensorRT-LLM")
    moe = moe_settings(hf, options)
    d = llama_dims(hf)
    check_expert_parallel(moe["num_experts"], d["inter"], options)
    layout = hf.get(LAYOUT_KEY, PER_EXPERT)
    return llama_plan(hf, options, architecture, mlp_specs=moe_specs_for(moe["num_experts"], layout),
                      hidden_act="swiglu", extra_config={"moe": moe})
