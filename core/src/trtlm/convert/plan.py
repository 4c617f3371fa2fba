"""A conversion plan: every output tensor described before any weight is read.

``map_layers`` returns a :class:`ConversionPlan`; ``quantize`` rewrites it;
``shard`` turns it into one :class:`RankPlan` per rank; the writer executes
the rank plans, streaming one tensor at a time.  Describing tensors rather
than computing them is what lets one plan validate shapes, synthesise dummy
weights, precompute the safetensors headers (so ranks are written in
parallel at fixed offsets) and keep memory bounded by a few tensors.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Callable, Sequence

from trtlm.config import CheckpointConfig
from trtlm.errors import UserError
from trtlm.layout import SplitRule, split_rule
from trtlm.mapping import Mapping
from trtlm.meta import cat

if TYPE_CHECKING:  # pragma: no cover
    import torch

# Describing a plan needs no torch (an unquantized conversion never imports it,
# :mod:`trtlm.convert.bytecopy`); only building tensors does.
Combine = Callable[[Sequence["torch.Tensor"]], "torch.Tensor"]


def take_first(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Combine for a one-to-one tensor (the common case)."""
    return tensors[0]


def concat_rows(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Combine for fused projections (qkv = cat(q, k, v))."""
    return cat(list(tensors), dim=0)


@dataclass(frozen=True)
class TensorSpec:
    """One TensorRT-LLM tensor of the *unsharded* checkpoint.

    :param name: TensorRT-LLM name with the global layer index.
    :param sources: Hugging Face tensor names it is built from.
    :param shapes: the shape each source must have (checked on load; used
        to synthesise dummy weights).
    :param combine: builds the full tensor from the loaded sources.
    :param layer: the decoder layer it belongs to (``None`` for global ones).
    :param stage: ``"first"`` (embedding) or ``"last"`` (ln_f, lm_head)
        pipeline stage for global tensors.
    :param dtype: fixed output dtype (e.g. ``torch.float32`` for an MoE
        router); ``None`` means the checkpoint dtype.
    :param quantizable: a linear weight ``[out, in]`` (or ``[E, out, in]``)
        the ``quantize`` step may replace.
    :param transform: applied to the combined, dtype-cast full tensor
        (quantization rewrites plug in here).
    :param finalize: applied to each rank's part after splitting (e.g.
        packing int4 pairs into bytes).
    :param split: overrides the split rule derived from the name.
    """

    name: str
    sources: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    combine: Combine = take_first
    layer: int | None = None
    stage: str | None = None
    dtype: torch.dtype | None = None
    quantizable: bool = False
    transform: Callable[["torch.Tensor"], "torch.Tensor"] | None = None
    finalize: Callable[["torch.Tensor"], "torch.Tensor"] | None = None
    split: SplitRule | None = None

    def with_(self, **changes: Any) -> "TensorSpec":
        return replace(self, **changes)


@dataclass
class ConversionPlan:
    """TensorRT-LLM ``config.json`` (without ``mapping``) plus the tensor specs."""

    config: dict[str, Any]
    tensors: list[TensorSpec]

    def spec(self, name: str) -> TensorSpec:
        for t in self.tensors:
            if t.name == name:
                return t
        raise KeyError(name)

    def source_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every HF tensor the plan reads, with its expected shape."""
        out: dict[str, tuple[int, ...]] = {}
        for spec in self.tensors:
            for src, shape in zip(spec.sources, spec.shapes):
                out.setdefault(src, shape)
        return out


@dataclass(frozen=True)
class RankTensor:
    """A tensor of one rank file: its local name and the spec it comes from."""

    name: str
    spec: TensorSpec
    split: SplitRule


@dataclass
class RankPlan:
    rank: int
    tp_rank: int
    pp_rank: int
    tensors: list[RankTensor] = field(default_factory=list)


def by_spec(rank_plans: list[RankPlan]) -> dict[str, list[tuple[RankPlan, RankTensor]]]:
    """Each spec's rank tensors, with the rank plan each belongs to, in rank-plan order."""
    targets: dict[str, list[tuple[RankPlan, RankTensor]]] = {}
    for rp in rank_plans:
        for rt in rp.tensors:
            targets.setdefault(rt.spec.name, []).append((rp, rt))
    return targets


_LAYER_PREFIX = re.compile(r"^transformer\.layers\.(\d+)\.")


def local_name(name: str, local_layer: int) -> str:
    """Renumber a layer tensor for its pipeline stage."""
    return _LAYER_PREFIX.sub(f"transformer.layers.{local_layer}.", name, count=1)


def default_shard(plan: ConversionPlan, mapping: Mapping) -> list[RankPlan]:
    """Pipeline placement with ``tensor_split`` semantics plus per-tensor split rules."""
    config = CheckpointConfig.from_dict(plan.config, where="the plan's config").replace(mapping=mapping)
    num_layers = config.num_hidden_layers
    if mapping.pp_size > num_layers:
        raise UserError(f"--pp-size {mapping.pp_size} is larger than the model's {num_layers} layers")
    ranks = []
    for rank in range(mapping.world_size):
        tp_rank, pp_rank = mapping.tp_rank(rank), mapping.pp_rank(rank)
        layers = mapping.stage_layers(pp_rank, num_layers)
        rp = RankPlan(rank, tp_rank, pp_rank)
        for spec in plan.tensors:
            if spec.layer is not None:
                if spec.layer not in layers:
                    continue
                name = local_name(spec.name, spec.layer - layers.start)
            elif spec.stage == "first" and pp_rank != 0:
                continue
            elif spec.stage == "last" and pp_rank != mapping.pp_size - 1:
                continue
            else:
                name = spec.name
            rule = spec.split or split_rule(spec.name, config, full_shape(spec))
            rp.tensors.append(RankTensor(name, spec, rule))
        ranks.append(rp)
    return ranks


def build_full(spec: TensorSpec, sources: Sequence[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """Combine, cast and transform: the full (unsharded) tensor of ``spec``."""
    t = spec.combine(sources)
    target = spec.dtype or dtype
    if t.dtype != target and t.is_floating_point():
        t = t.to(target)
    if spec.transform is not None:
        t = spec.transform(t)
    return t


def static_shape(spec: TensorSpec) -> tuple[int, ...] | None:
    """The full shape of a spec that copies or row-concatenates its sources unchanged (most
    of an unquantized plan), without torch; ``None`` for anything else."""
    if spec.transform is not None or not spec.shapes:
        return None
    if spec.combine is take_first:
        return tuple(spec.shapes[0])
    if spec.combine is concat_rows and all(len(s) >= 1 and tuple(s[1:]) == tuple(spec.shapes[0][1:])
                                           for s in spec.shapes):
        return (sum(s[0] for s in spec.shapes), *spec.shapes[0][1:])
    return None


def full_shape(spec: TensorSpec) -> tuple[int, ...]:
    """The full (unsharded) shape of ``spec``: :func:`static_shape`, else built on the meta device."""
    shape = static_shape(spec)
    if shape is None:
        import torch

        metas = [torch.empty(s, dtype=torch.float32, device="meta") for s in spec.shapes]
        shape = tuple(build_full(spec, metas, torch.float32).shape)
    return shape


def spec_shapes(plan: ConversionPlan, dtype: torch.dtype | None = None) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Full shape and dtype of every spec, computed on the meta device (no data)."""
    import torch

    dtype = dtype or torch.float32
    out = {}
    for spec in plan.tensors:
        metas = [torch.empty(s, dtype=torch.float32, device="meta") for s in spec.shapes]
        t = build_full(spec, metas, dtype)
        out[spec.name] = (tuple(t.shape), t.dtype)
    return out


def rank_part(rt: RankTensor, full: torch.Tensor, mapping: Mapping, tp_rank: int) -> torch.Tensor:
    """One rank's part of a full tensor, finalized and contiguous."""
    try:
        part = rt.split.take(full, mapping, tp_rank)
    except ValueError as exc:
        raise UserError(f"cannot split {rt.spec.name} {tuple(full.shape)} for tp={mapping.tp_size}: {exc}") from None
    if rt.spec.finalize is not None:
        part = rt.spec.finalize(part)
    return part.contiguous()
