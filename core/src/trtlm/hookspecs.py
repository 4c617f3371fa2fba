"""Hook specifications: the contract between the trtlm core and family plugins.

A conversion runs these hooks in order::

    trtlm_load_weights -> trtlm_map_layers -> trtlm_quantize -> trtlm_shard -> (write)
    trtlm build:  trtlm_build_network

Every hook but :func:`trtlm_families` is called *for one family*: the core
resolves the model to its family first and then calls the hook with only
that family's plugin and the built-in defaults (``trtlm.builtin``, registered
with ``trylast``) taking part.  A family therefore implements only the hooks
where it differs from the defaults, and never checks whether the model is its
own.  All per-family hooks are ``firstresult``: the first non-``None`` return
value wins, so returning ``None`` means "use the default".

Type names in the signatures refer to :mod:`trtlm.convert.plan`
(``ConversionPlan``, ``TensorSpec``, ``RankPlan``), :mod:`trtlm.mapping` (``Mapping``),
:mod:`trtlm.convert.options` (``ConvertOptions``), :mod:`trtlm.registry` (``FamilyHooks``), :mod:`trtlm.weights`
(``TensorSource``, ``LoadedModel``), :mod:`trtlm.mcore.layout` (``MCoreLayout``) and :mod:`trtlm.build`
(``BuildOptions``).
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:  # pragma: no cover - type names only, nothing heavy at import
    from trtlm.build import BuildOptions
    from trtlm.convert.options import ConvertOptions
    from trtlm.convert.plan import ConversionPlan, RankPlan
    from trtlm.family import Family
    from trtlm.mapping import Mapping
    from trtlm.mcore.layout import MCoreLayout
    from trtlm.registry import FamilyHooks
    from trtlm.weights import LoadedModel

hookspec = pluggy.HookspecMarker("trtlm")


@hookspec
def trtlm_families() -> list[Family]:
    """Declare the model families this plugin provides.

    Called once per process when plugins load.  The registry routes HF
    architectures, HF model types and TensorRT-LLM architecture strings to
    the declaring plugin; two plugins claiming the same architecture is a
    conflict and the later one (in load order) is rejected.

    :return: a list of :class:`trtlm.family.Family` (may be empty).
    """


@hookspec(firstresult=True)
def trtlm_load_weights(family: Family, model_dir: Path, options: ConvertOptions) -> LoadedModel | None:
    """Open a model directory as a config plus a *lazy* tensor source.

    The default reads ``config.json`` and safetensors files (single or
    sharded through ``model.safetensors.index.json``; ``pytorch_model*.bin``
    only with ``options.allow_pickle``), and produces random weights when
    ``options.dummy_weights`` is set.  Implement it to read another on-disk
    format (the MPT plugin reads FasterTransformer directories).

    :param family: the family the directory was resolved to.
    :param model_dir: the directory given as ``--model-dir``.
    :param options: all conversion options.
    :return: a :class:`trtlm.weights.LoadedModel` whose ``hf_config`` is a
        Hugging Face style ``config.json`` dict and whose ``source`` reads
        tensors by Hugging Face name, one at a time; ``None`` to defer.
    :raises trtlm.errors.UserError: for unreadable or inconsistent input.

    ``firstresult``: stops at the first non-``None`` value.
    """


@hookspec(firstresult=True)
def trtlm_map_layers(family: Family, hf_config: dict[str, Any], options: ConvertOptions) -> ConversionPlan | None:
    """Describe the TensorRT-LLM checkpoint to write, tensor by tensor.

    Called with the config only, before any weight is read: the plan names
    every output tensor, the Hugging Face tensors (and shapes) it is built
    from, how they combine (fused qkv, TensorRT-LLM's inverted MLP naming,
    stacked experts), how it splits under tensor parallelism and which
    pipeline stage owns it.  Because the plan carries source shapes, the
    same plan validates a real checkpoint and synthesises dummy weights.

    The default maps Llama-style decoders (RMSNorm, RoPE, GQA, SwiGLU) via
    :func:`trtlm.llama.llama_plan`; families with other layouts implement it.

    :param family: the resolved family.
    :param hf_config: the model's ``config.json`` as a dict.
    :param options: all conversion options (dtype, parallelism, ...).
    :return: a :class:`trtlm.convert.plan.ConversionPlan` (TensorRT-LLM
        ``config.json`` without ``mapping``, and the tensor specs).

    ``firstresult``: stops at the first non-``None`` value.
    """


@hookspec(firstresult=True)
def trtlm_quantize(family: Family, plan: ConversionPlan, loaded: LoadedModel, options: ConvertOptions,
                   hooks: FamilyHooks) -> ConversionPlan | None:
    """Rewrite a plan for ``options.quant`` / ``options.kv_cache_dtype``.

    Runs *before* :func:`trtlm_shard` on the unsharded tensors, so every
    scale is computed once and agrees across ranks.  The default handles
    per-tensor linear weights generically (using ``TensorSpec.quant`` to
    know which tensors are linear weights and how they may be quantized)
    and calibrates activation/KV scales by running the unquantized model
    in trtlm's own runtime, one decoder layer at a time (or through NVIDIA
    Model Optimizer with ``--calibrator modelopt``).  Families with special tensors (MoE experts
    sharing scales, routers that must stay float32) mark them in
    ``map_layers`` or implement this hook.

    :param family: the resolved family.
    :param plan: the plan from :func:`trtlm_map_layers`.
    :param loaded: the weights, for scales that depend on data.
    :param options: ``options.quant`` is ``None`` when no quantization was asked.
    :param hooks: this family's hook callers (:class:`trtlm.registry.FamilyHooks`), for
        calibration to build the unquantized network through ``trtlm_build_network``
        without reaching for the process-wide registry.
    :return: the rewritten plan (``quantization`` filled in the config).

    ``firstresult``: stops at the first non-``None`` value.
    """


@hookspec(firstresult=True)
def trtlm_shard(family: Family, plan: ConversionPlan, mapping: Mapping) -> list[RankPlan] | None:
    """Assign every tensor of the plan to ranks.

    The default places layers on pipeline stages with ``torch.tensor_split``
    semantics (renumbering them from 0 on each stage), puts the embedding on
    the first stage and ``ln_f``/``lm_head`` on the last, and splits each
    tensor across tensor-parallel ranks with the split rule its
    :class:`~trtlm.convert.plan.TensorSpec` carries.  Implement it only for
    a placement that rules cannot express.

    :param family: the resolved family.
    :param plan: the (quantized) plan from :func:`trtlm_quantize`.
    :param mapping: world, tensor, pipeline and expert parallel sizes.
    :return: one :class:`~trtlm.convert.plan.RankPlan` per rank, rank order.

    ``firstresult``: stops at the first non-``None`` value.
    """


@hookspec(firstresult=True)
def trtlm_export(family: Family, fmt: str, loaded: LoadedModel, options: ConvertOptions, output_dir: Path,
                 hooks: FamilyHooks) -> Path | None:
    """Write a format other than a TensorRT-LLM checkpoint (``trtlm convert --to FMT``).

    The MPT plugin writes FasterTransformer directories through it; the
    core's default writes ``--to mcore`` (Megatron-Core) for families that
    list ``"mcore"`` in ``capabilities.formats_out``.  Write
    into ``output_dir`` (a temporary directory the core renames into place
    when the hook returns).

    :param family: the resolved family.
    :param fmt: the requested format, one of the family's
        ``capabilities.formats_out`` other than ``"trtllm"``.
    :param loaded: the model from :func:`trtlm_load_weights`.
    :param options: all conversion options.
    :param output_dir: the temporary directory to write into.
    :param hooks: this family's hook callers (:class:`trtlm.registry.FamilyHooks`): the
        core's ``--to mcore`` writer asks them for :func:`trtlm_mcore_layout`.
    :return: the directory written, or ``None`` if this plugin cannot.

    ``firstresult``: stops at the first non-``None`` value.
    """


@hookspec(firstresult=True)
def trtlm_mcore_layout(family: Family, hf_config: dict[str, Any], tp_size: int, pp_size: int, ep_size: int) -> MCoreLayout | None:
    """Name and layout table between Hugging Face tensors and Megatron-Core's GPT state dict.

    One table serves both directions: ``trtlm convert --to mcore`` walks it
    to write each ``mp_rank_*`` file, and reading a Megatron checkpoint
    (``--model-dir MCORE_CKPT``) walks it backwards to present Hugging Face
    tensors to the ordinary conversion.  The default,
    :func:`trtlm.mcore.layout.llama_layout`, maps Llama-style decoders
    (fused ``linear_qkv`` per query group, ``[gate; up]`` ``linear_fc1``,
    padded vocabulary, Transformer-Engine names); a family whose
    feed-forward differs calls it with its own ``mlp`` callback (the
    Mixtral plugin adds the router and the experts, placed by expert index
    on expert-parallel ranks) and adds its ``args`` (``num_experts``, ...).

    :param family: the resolved family.
    :param hf_config: the model's Hugging Face ``config.json`` as a dict.
    :param tp_size: Megatron's tensor parallel size.
    :param pp_size: Megatron's pipeline parallel size.
    :param ep_size: Megatron's expert parallel size (1 for dense models).
    :return: a :class:`trtlm.mcore.layout.MCoreLayout` (tensors with global
        layer and expert indices, and the Megatron ``args`` of the model).
    :raises trtlm.errors.UserError: for parallel sizes the model cannot be split by.

    ``firstresult``: stops at the first non-``None`` value.
    """


@hookspec(firstresult=True)
def trtlm_mcore_config(family: Family, args: dict[str, Any]) -> dict[str, Any] | None:
    """Describe a Megatron checkpoint's model as a Hugging Face ``config.json``.

    Called with the ``args`` Namespace of a Megatron-LM checkpoint (as a
    dict) before :func:`trtlm_mcore_layout`.  The default,
    :func:`trtlm.mcore.config.llama_hf_config`, returns the config trtlm
    recorded in ``args.trtlm_hf_config`` when it wrote the checkpoint, or
    derives a Llama-style one from the model arguments and refuses settings
    it cannot express (and Mixture-of-Experts args, which need a family
    with experts); the Mixtral plugin adds ``num_local_experts`` and
    ``num_experts_per_tok``.

    :param family: the family the checkpoint was resolved to (``--family``,
        the recorded architecture, or by whether ``args.num_experts`` is set).
    :param args: ``vars()`` of the checkpoint's ``args``.
    :return: a Hugging Face style config dict.
    :raises trtlm.errors.UserError: for models the family cannot map.

    ``firstresult``: stops at the first non-``None`` value.
    """


@hookspec(firstresult=True)
def trtlm_build_network(family: Family, config: dict[str, Any], backend: str, options: BuildOptions) -> Any | None:
    """Create the executable network for a TensorRT-LLM checkpoint config.

    For ``backend == "torch"`` the result is a *factory*: called as
    ``factory(comm=, mapping=, layers=, first=, last=, device=, dtype=)`` it
    returns the ``torch.nn.Module`` of one rank (its tensor-parallel shapes,
    its pipeline stage's layers).  The default is
    ``functools.partial(trtlm.runtime.model.Transformer, config)``, a decoder
    assembled from the config (RoPE or ALiBi, gated or plain MLP, MoE); a
    family passes options (MPT: ``norm="layer"``) or its own module class.
    For ``"tensorrt-llm"`` it returns an object whose ``build(checkpoint_dir,
    engine_dir)`` runs TensorRT-LLM's builder.

    :param family: the family the checkpoint's architecture resolved to.
    :param config: the checkpoint's ``config.json`` (with ``mapping``).
    :param backend: ``"torch"`` or ``"tensorrt-llm"``.
    :param options: build options (max batch size, sequence lengths, ...).
    :return: the network factory (torch) or builder (tensorrt-llm).

    ``firstresult``: stops at the first non-``None`` value.
    """


#: Hooks that are dispatched per family (everything except registration).
FAMILY_HOOKS = (
    "trtlm_load_weights",
    "trtlm_map_layers",
    "trtlm_quantize",
    "trtlm_shard",
    "trtlm_export",
    "trtlm_mcore_layout",
    "trtlm_mcore_config",
    "trtlm_build_network",
)
