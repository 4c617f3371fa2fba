"""Rewrite a conversion plan into a quantized TensorRT-LLM checkpoint plan.

Every :class:`~trtlm.convert.plan.TensorSpec` marked ``quantizable`` (a linear weight
``[out, in]`` or an MoE expert stack ``[E, out, in]``) becomes the quantized weight plus its
scale tensors, with the same sources.  Their ``combine`` computes from the *source* tensors in
float32 (modelopt computes scales from the loaded float32 weights, never from weights already
rounded to the export dtype), on the full tensor before sharding, so scales agree across ranks;
int4 values are packed per rank after the split (``finalize``), so tensor-parallel splits cut
whole output rows.  The math is :mod:`trtlm.quant.formats` (bit-exact with modelopt).

Formats (``--quant``, declared once in :mod:`trtlm.quant.schemes`; the math below follows each
format's properties -- weight codes, scale granularity, activation quantization, smoother):

* ``fp8`` -> ``FP8``: per-tensor weight scale, static activation scale from calibration;
  qkv share one scale, the gated MLP's ``fc``/``gate`` share weight and activation scales;
  experts one scale per expert ``[E, 1]``.
* ``int8-wo`` -> ``W8A16``: int8 weights, per-output-channel scales.
* ``int4-wo`` -> ``W4A16_AWQ`` with ``pre_quant_scale: false``: group-wise int4 (the layout
  modelopt writes for INT4_BLOCKWISE_WEIGHT_ONLY_CFG) without pre-quant scales.
* ``int4-awq`` -> ``W4A16_AWQ``: awq_lite scale search over the calibration data, one common
  pre-quant scale for q/k/v (``fuse_prequant``), fc and gate keep their own (as modelopt).
* ``int8-sq`` -> ``W8A8_SQ_PER_CHANNEL``: SmoothQuant with ``--smoothquant-alpha`` (default
  0.5 as TensorRT-LLM's convert_checkpoint; modelopt's INT8_SMOOTHQUANT_CFG uses 1.0).

MoE experts have no pre-quant scales: under ``int4-awq`` they are group-wise int4 without the
AWQ search, under ``int8-sq`` int8 per channel with an unsmoothed static activation scale.
``--kv-cache-dtype fp8|int8`` adds ``attention.{kv,k,v}_cache_scaling_factor`` per layer.
"""
from __future__ import annotations

import threading
from typing import Any, Callable, Sequence

import torch

from trtlm.convert.plan import ConversionPlan, TensorSpec
from trtlm.errors import UserError
from trtlm.quant import formats as qf
from trtlm.quant import schemes
from trtlm.quant.schemes import QuantFormat

#: ``--quant`` -> ``quant_algo`` and ``--kv-cache-dtype`` -> ``kv_cache_quant_algo`` (derived views of the registry)
QUANT_ALGOS = {f.name: f.quant_algo for f in schemes.FORMATS.values()}
KV_ALGOS = schemes.KV_FORMATS
_TORCH_DTYPES = {"float8_e4m3fn": torch.float8_e4m3fn, "int8": torch.int8, "float32": torch.float32, None: None}
_ROW_MODULES = ("attention.dense", "mlp.proj")


def _module(spec: TensorSpec) -> str:
    return spec.name[: -len(".weight")]


def _meta_full(spec: TensorSpec) -> torch.Tensor:
    return spec.combine([torch.empty(s, dtype=torch.float32, device="meta") for s in spec.shapes])


def _f32(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return [t.float() if t.is_floating_point() else t for t in tensors]


class _Linear:
    """One quantizable linear: computes all its output tensors once from the source tensors."""

    def __init__(self, spec: TensorSpec, fmt: QuantFormat, partner: TensorSpec | None, ctx: dict[str, Any]):
        self.spec, self.fmt, self.partner, self.ctx = spec, fmt, partner, ctx
        self.module = _module(spec)
        full = _meta_full(spec)
        self.shape = tuple(full.shape)
        self.experts = full.dim() == 3
        rows = [s[0] for s in spec.shapes]
        if (not self.experts and len(spec.shapes) > 1 and all(len(s) == 2 for s in spec.shapes)
                and sum(rows) == self.shape[0]):
            self.part_rows = rows  # fused q, k, v: separate HF linears sharing one input
        else:
            self.part_rows = [self.shape[-2]]
        self.sources = spec.sources + (partner.sources if partner else ())
        self._lock = threading.Lock()
        self._memo: dict[str, torch.Tensor] | None = None
        self._left = 0

    # -- output specs -------------------------------------------------------------------
    def outputs(self) -> dict[str, tuple[tuple[int, ...], torch.dtype | None]]:
        """Suffix -> (full shape, fixed dtype or None for the checkpoint dtype)."""
        shape = self.shape
        stored = self.fmt.tensors(shape[-2], shape[-1], experts=shape[0] if self.experts else 0,
                                  group_size=self.ctx["group_size"])
        # int4 weights are packed per rank after the split (finalize): the plan's weight is unpacked
        return {suffix: (shape if suffix == "weight" else s, _TORCH_DTYPES[dt]) for suffix, (s, dt) in stored.items()}

    def specs(self) -> list[TensorSpec]:
        outs = self.outputs()
        self._left = len(outs)
        result = []
        for suffix, (shape, dtype) in outs.items():
            result.append(self.spec.with_(
                name=f"{self.module}.{suffix}", sources=self.sources,
                shapes=self.spec.shapes + (self.partner.shapes if self.partner else ()),
                combine=self._combine(suffix, shape, dtype), dtype=dtype, quantizable=False, transform=None,
                finalize=qf.pack_int4 if (suffix == "weight" and self.fmt.packed_int4) else None,
                split=None))
        return result

    def _combine(self, suffix: str, shape, dtype) -> Callable[[Sequence[torch.Tensor]], torch.Tensor]:
        def combine(sources: Sequence[torch.Tensor]) -> torch.Tensor:
            if any(t.is_meta for t in sources):
                return torch.empty(shape, dtype=dtype or torch.float32, device="meta")
            with self._lock:
                if self._memo is None:
                    self._memo = self.compute(sources)
                    self._left = len(self.outputs())
                t = self._memo[suffix]
                self._left -= 1
                if self._left <= 0:
                    self._memo = None
            return t
        return combine

    # -- the math -------------------------------------------------------------------------
    def compute(self, sources: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        n = len(self.spec.sources)
        full = self.spec.combine(_f32(sources[:n])).float()
        g, stats = self.ctx["group_size"], self.ctx.get("stats")
        fmt = self.fmt
        parts = list(full.split(self.part_rows, dim=0)) if len(self.part_rows) > 1 else [full]
        smoother = None if self.experts else fmt.smoother  # experts carry no pre-quant scale
        if fmt.weight == "fp8":  # per-tensor (per-expert) scale, static fp8 activation scale
            if self.experts:
                ws = qf.fp8_expert_weight_scale(full)
            elif self.partner is not None:
                ws = qf.fp8_weight_scale(full, self.partner.combine(_f32(sources[n:])).float())
            else:
                ws = qf.fp8_weight_scale(full)
            act = self._act_amax(stats, self.module)
            if self.partner is not None:
                act = torch.maximum(act, self._act_amax(stats, _module(self.partner)))
            return {"weight": qf.quantize_fp8(full, ws), "weights_scaling_factor": ws,
                    "activation_scaling_factor": qf.fp8_activation_scale(act)}
        if smoother == "smoothquant":
            act_amax = stats.linears[self.module].amax
            return qf.quantize_smoothquant(parts, act_amax, self.ctx["alpha"])
        if fmt.weight == "int8":  # per output channel
            ws = qf.int8_weight_scale(full)
            res = {"weight": qf.quantize_int8(full, ws), "weights_scaling_factor": ws}
            if fmt.activation == "int8":  # unsmoothed static activation scale (SmoothQuant experts)
                res["activation_scaling_factor"] = (self._act_amax(stats, self.module) / qf.INT8_MAX).reshape(1)
            return res
        if smoother == "awq":
            pqs = self.ctx["awq"][self.module]
            w, common = qf._awq_smoothed(parts, pqs)
            ws = qf.int4_group_scales(w, g)
            return {"weight": qf.quantize_int4(w, ws, g), "weights_scaling_factor": ws,
                    "prequant_scaling_factor": common.float()}
        ws = qf.int4_group_scales(full, g)
        return {"weight": qf.quantize_int4(full, ws, g), "weights_scaling_factor": ws}

    @staticmethod
    def _act_amax(stats, module: str) -> torch.Tensor:
        st = stats.linears.get(module) if stats else None
        if st is None or st.amax is None:
            raise UserError(f"calibration saw no input of {module} (is it reached by the forward pass?)")
        return st.amax.float().amax()


def _partner(spec: TensorSpec, by_module: dict[str, TensorSpec]) -> TensorSpec | None:
    """The fused sibling sharing FP8 scales: dense gated MLP ``fc`` <-> ``gate``."""
    m = _module(spec)
    for a, b in (("mlp.fc", "mlp.gate"), ("mlp.gate", "mlp.fc")):
        if m.endswith(a):
            other = by_module.get(m[: -len(a)] + b)
            if other is not None and len(_meta_full(other).shape) == 2:
                return other
    return None


def _check_groups(linears: list[_Linear], group: int, options) -> None:
    for lin in linears:
        inp = lin.shape[-1]
        tp = options.tp_size if (lin.module.endswith(_ROW_MODULES) and not lin.experts) else 1
        if lin.experts and lin.module.endswith("mlp.proj"):
            tp = options.moe_tp_size or (options.tp_size // (options.moe_ep_size or options.tp_size) or 1)
        if inp % tp or (inp // tp) % group:
            raise UserError(f"--awq-group-size {group} does not divide {lin.module}'s {inp // max(tp, 1)} input "
                            f"features per rank; pick a group size dividing it (e.g. {min(inp // tp, 64)})")
        if lin.shape[-2] % (2 * (options.tp_size if not lin.module.endswith(_ROW_MODULES) else 1)):
            raise UserError(f"int4 packs pairs of output rows: {lin.module} has {lin.shape[-2]} rows, "
                            f"not a multiple of 2 x --tp-size")


def quantize_plan(plan: ConversionPlan, loaded, options, hooks) -> ConversionPlan:
    """The quantized plan for ``options.quant`` / ``options.kv_cache_dtype`` (see the module doc).

    ``hooks`` are the family's hook callers (:class:`trtlm.registry.FamilyHooks`): calibration
    builds the unquantized network through them."""
    mode, kv = options.quant, options.kv_cache_dtype
    if mode and mode not in schemes.FORMATS:
        raise UserError(f"--quant {mode!r}: choose one of {', '.join(schemes.names())}")
    fmt = schemes.FORMATS[mode] if mode else None
    if kv and kv not in KV_ALGOS:
        raise UserError(f"--kv-cache-dtype {kv!r}: choose one of {', '.join(KV_ALGOS)}")
    group = int(options.awq_group_size)
    quantizable = [s for s in plan.tensors if s.quantizable] if mode else []
    by_module = {_module(s): s for s in quantizable}
    ctx: dict[str, Any] = {"group_size": group, "alpha": float(options.smoothquant_alpha)}
    linears = [_Linear(s, fmt, _partner(s, by_module) if fmt.fuse_fc_gate else None, ctx) for s in quantizable]
    if fmt is not None and fmt.packed_int4:
        _check_groups(linears, group, options)

    config = dict(plan.config)
    config["trtlm"] = dict(config.get("trtlm") or {})
    if (fmt is not None and fmt.calibrates) or kv:
        stats, awq, where = _calibrate(plan, loaded, hooks, options, config, fmt, linears, group, bool(kv))
        ctx["stats"] = stats
        if awq is not None:
            ctx["awq"] = awq
        config["trtlm"]["calibration"] = where

    replaced = {id(lin.spec): lin for lin in linears}
    tensors: list[TensorSpec] = []
    for spec in plan.tensors:
        lin = replaced.get(id(spec))
        tensors.extend(lin.specs() if lin else [spec])
        if kv and spec.name.endswith("attention.qkv.weight") and spec.layer is not None:
            tensors.extend(_kv_specs(spec, ctx["stats"], KV_ALGOS[kv]))

    routers = [s.name[: -len(".weight")] for s in plan.tensors if s.name.endswith("mlp.router.weight")]
    q = quantization_block(mode, kv, group, routers)
    if fmt is not None and fmt.smoother == "smoothquant":
        config["trtlm"]["smoothquant_alpha"] = ctx["alpha"]
    config["quantization"] = q
    return ConversionPlan(config=config, tensors=tensors)


def _calibrate(plan: ConversionPlan, loaded, hooks, options, config: dict[str, Any], fmt: QuantFormat | None,
               linears: list[_Linear], group: int, kv: bool):
    """Calibration statistics for the plan: ``(stats, awq pre-quant scales or None, where the data
    came from)``, from ``--calibrator`` trtlm (layer by layer in trtlm's runtime,
    :mod:`trtlm.quant.layerwise`) or modelopt (:mod:`trtlm.quant.modelopt_calib`)."""
    from pathlib import Path

    from trtlm.config import CheckpointConfig
    from trtlm.quant import calibrate as cal

    origin = Path(loaded.origin)
    vocab = CheckpointConfig.from_dict(config, where="the plan's config").vocab_size
    progress = cal.progress_mode(options)
    batches, where = cal.calibration_batches(options.calib_data, vocab, [origin if origin.is_dir() else None],
                                             options.calib_size, options.calib_max_seq_len, progress=progress)
    awq = fmt is not None and fmt.smoother == "awq"
    if getattr(options, "calibrator", "trtlm") == "modelopt":
        from trtlm.quant import modelopt_calib

        stats, pqs = modelopt_calib.calibrate(plan, loaded, options, batches, fmt, kv, group)
        config["trtlm"]["calibrator"] = "modelopt"
        return stats, pqs, where
    from trtlm.quant import layerwise

    device = layerwise.resolve_calib_device(getattr(options, "calib_device", "auto"))
    dtype = layerwise.resolve_calib_dtype(getattr(options, "calib_dtype", "auto"), loaded.hf_config)
    awq_rows = {lin.module: lin.part_rows for lin in linears if not lin.experts} if awq else None
    stats, pqs = layerwise.calibrate_layerwise(
        plan, loaded, hooks, options, batches, [lin.module for lin in linears if not lin.experts], kv=kv,
        awq_rows=awq_rows, group_size=group, dtype=dtype, device=device, progress=progress)
    return stats, pqs, where


def quantization_block(mode: str | None, kv: str | None, group: int, routers: Sequence[str] = ()) -> dict[str, Any]:
    """The checkpoint config's ``quantization`` block for ``--quant mode`` / ``--kv-cache-dtype kv``
    (``routers``: the MoE router modules, kept in floating point like ``lm_head``)."""
    fmt = schemes.FORMATS[mode] if mode else None
    q: dict[str, Any] = {"quant_algo": QUANT_ALGOS.get(mode) if mode else None,
                         "kv_cache_quant_algo": KV_ALGOS.get(kv) if kv else None}
    if fmt is not None and fmt.weight_scale == "group":
        q.update(group_size=group, has_zero_point=False, pre_quant_scale=fmt.smoother is not None)
    if mode:
        q["exclude_modules"] = list(routers) + ["lm_head"]
    return q


def _kv_specs(qkv: TensorSpec, stats, algo: str) -> list[TensorSpec]:
    layer = qkv.layer
    scales = qf.kv_cache_scale(stats.k_amax[layer], stats.v_amax[layer], algo)
    base = qkv.name[: -len("qkv.weight")]
    return [TensorSpec(base + name, (), (), combine=lambda _s, t=t: t.clone(), layer=layer, dtype=torch.float32)
            for name, t in (("kv_cache_scaling_factor", scales["kv_cache_scaling_factor"]),
                            ("k_cache_scaling_factor", scales["k_cache_scaling_factor"]),
                            ("v_cache_scaling_factor", scales["v_cache_scaling_factor"]))]
