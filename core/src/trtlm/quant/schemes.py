"""The quantization formats trtlm writes and runs, each declared once.

A :class:`QuantFormat` says everything the rest of trtlm needs to know about a format:

* its ``--quant`` name and the TensorRT-LLM ``quantization.quant_algo`` it writes;
* what a quantized linear *stores* (:meth:`QuantFormat.tensors`: suffix -> shape, dtype), which
  is both the plan's output tensors (:mod:`trtlm.quant.plan`) and the runtime module's buffers
  (:mod:`trtlm.quant.runtime`), so the two cannot drift apart;
* how it is computed and run, as properties rather than names: the weight codes (``fp8``,
  ``int8``, ``int4``), the weight scale granularity, the static activation quantization
  (``fp8``/``int8``/none) and the calibrated smoother (SmoothQuant, AWQ).  The plan derives the
  math and the calibration it needs from these, the runtime the kernel it picks.

The CLI's ``--quant`` choices (:func:`names`), the families' capabilities
(:data:`trtlm.family.ALL_QUANT`) and the runtime's supported ``quant_algo`` values
(:func:`runtime_algos`) all come from :data:`FORMATS`.  A new format is one :func:`register`
call (plus its math in :mod:`trtlm.quant.formats` if the properties are new).

Pure data: no torch import (``trtlm --help`` reads :func:`names`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from trtlm.config import quant_config

__all__ = ["QuantFormat", "FORMATS", "KV_FORMATS", "register", "get", "names", "kv_names", "for_algo",
           "runtime_algos", "from_config"]

Shape = tuple[int, ...]


@dataclass(frozen=True)
class QuantFormat:
    """One quantization format (see the module doc).

    :param name: the ``trtlm convert --quant`` value.
    :param quant_algo: TensorRT-LLM's ``quantization.quant_algo``.
    :param weight: stored weight codes: ``"fp8"`` (float8_e4m3fn), ``"int8"``, ``"int4"`` (two per
        int8 byte along the output dimension, :func:`trtlm.quant.formats.pack_int4`).
    :param weight_scale: ``"tensor"`` ([1]; [E, 1] for experts), ``"channel"`` ([out]) or
        ``"group"`` ([out, in/group_size]).
    :param activation: static per-tensor activation quantization the runtime applies
        (``"fp8"``, ``"int8"``) from the calibrated ``activation_scaling_factor``; None: weight-only.
    :param smoother: calibrated per-input-channel ``prequant_scaling_factor`` folded out of the
        weight: ``"smoothquant"`` or ``"awq"``; None: none.  MoE experts never have one.
    :param fuse_fc_gate: the gated MLP's ``fc`` and ``gate`` share one weight and activation scale
        (modelopt does this for FP8 only: TensorRT-LLM runs them as one GEMM).
    :param description: one line for ``--help`` and docs.
    """

    name: str
    quant_algo: str
    weight: str
    weight_scale: str
    activation: str | None = None
    smoother: str | None = None
    fuse_fc_gate: bool = False
    description: str = ""

    @property
    def calibrates(self) -> bool:
        """Whether conversion must run calibration data through the model."""
        return self.activation is not None or self.smoother is not None

    @property
    def packed_int4(self) -> bool:
        return self.weight == "int4"

    def has_prequant(self, experts: bool = False, config: dict[str, Any] | None = None) -> bool:
        """Whether a linear stores ``prequant_scaling_factor``.

        From a checkpoint's config, W4A16_AWQ says it with ``pre_quant_scale`` (trtlm's own
        ``int4-wo`` writes false); experts never carry one.
        """
        if experts or self.smoother is None:
            return False
        if config is not None and self.smoother == "awq":
            return quant_config(config).pre_quant_scale
        return True

    def tensors(self, out: int, inp: int, *, experts: int = 0, group_size: int = 128,
                prequant: bool | None = None) -> dict[str, tuple[Shape, str | None]]:
        """What one quantized linear stores: suffix -> (shape, dtype name or None = the model dtype).

        :param out: output features (unpacked), :param inp: input features (of this rank's tensor).
        :param experts: number of stacked experts (0: a plain linear ``[out, in]``).
        :param prequant: override :meth:`has_prequant` (e.g. from a checkpoint's config).
        """
        lead: Shape = (experts,) if experts else ()
        wshape = lead + ((out // 2, inp) if self.packed_int4 else (out, inp))
        res: dict[str, tuple[Shape, str | None]] = {
            "weight": (wshape, "float8_e4m3fn" if self.weight == "fp8" else "int8")}
        if self.weight_scale == "tensor":
            res["weights_scaling_factor"] = ((experts, 1) if experts else (1,), "float32")
        elif self.weight_scale == "channel":
            res["weights_scaling_factor"] = (lead + (out,), "float32")
        else:
            res["weights_scaling_factor"] = (lead + (out, max(inp // group_size, 1)), "float32")
        if prequant is None:
            prequant = self.has_prequant(bool(experts))
        if prequant:
            res["prequant_scaling_factor"] = ((inp,), None)
        if self.activation:
            res["activation_scaling_factor"] = ((1,), "float32")
        return res


#: name -> format, in registration order (the order of the CLI choices)
FORMATS: dict[str, QuantFormat] = {}

#: ``--kv-cache-dtype`` value -> ``quantization.kv_cache_quant_algo``
KV_FORMATS: dict[str, str] = {"fp8": "FP8", "int8": "INT8"}


def register(fmt: QuantFormat) -> QuantFormat:
    """Add a format (its name must be new)."""
    if fmt.name in FORMATS:
        raise ValueError(f"quantization format {fmt.name!r} is already registered")
    if fmt.weight not in ("fp8", "int8", "int4") or fmt.weight_scale not in ("tensor", "channel", "group"):
        raise ValueError(f"format {fmt.name!r}: unknown weight {fmt.weight!r} / weight_scale {fmt.weight_scale!r}")
    FORMATS[fmt.name] = fmt
    return fmt


register(QuantFormat("fp8", "FP8", "fp8", "tensor", activation="fp8", fuse_fc_gate=True,
                     description="FP8 e4m3 weights (per-tensor scale) and activations (static calibrated scale)"))
register(QuantFormat("int8-wo", "W8A16", "int8", "channel",
                     description="int8 weights, per-output-channel scales; 16-bit activations"))
register(QuantFormat("int4-wo", "W4A16_AWQ", "int4", "group",
                     description="int4 weights in groups (--awq-group-size), no pre-quant scale"))
register(QuantFormat("int4-awq", "W4A16_AWQ", "int4", "group", smoother="awq",
                     description="int4 weights in groups with AWQ's calibrated pre-quant scales"))
register(QuantFormat("int8-sq", "W8A8_SQ_PER_CHANNEL", "int8", "channel", activation="int8", smoother="smoothquant",
                     description="SmoothQuant: int8 weights per channel, int8 activations (static scale)"))


def get(name: str) -> QuantFormat:
    """The format named ``name`` (a ``--quant`` value); KeyError naming the choices otherwise."""
    try:
        return FORMATS[name]
    except KeyError:
        raise KeyError(f"unknown quantization format {name!r} (known: {', '.join(FORMATS)})") from None


def names() -> tuple[str, ...]:
    """The ``--quant`` choices."""
    return tuple(FORMATS)


def kv_names() -> tuple[str, ...]:
    """The ``--kv-cache-dtype`` choices."""
    return tuple(KV_FORMATS)


def runtime_algos() -> tuple[str, ...]:
    """The ``quant_algo`` values trtlm's runtime executes."""
    return tuple(dict.fromkeys(f.quant_algo for f in FORMATS.values()))


def for_algo(quant_algo: str, config: dict[str, Any] | None = None) -> QuantFormat | None:
    """The format a checkpoint's ``quant_algo`` runs as (None when no format writes it).

    Formats sharing a ``quant_algo`` (``int4-wo``/``int4-awq``) are told apart by the config's
    ``pre_quant_scale``; they run alike anyway, the difference is only the stored pre-quant scale.
    """
    algo = str(quant_algo).upper()
    matches = [f for f in FORMATS.values() if f.quant_algo == algo]
    if not matches:
        return None
    if len(matches) > 1 and config is not None:
        want = quant_config(config).pre_quant_scale
        for f in matches:
            if (f.smoother is not None) == want:
                return f
    return matches[0]


def from_config(config: dict[str, Any]) -> QuantFormat | None:
    """The format of a TensorRT-LLM checkpoint config (None when unquantized or not one of ours)."""
    algo = quant_config(config).quant_algo
    return for_algo(algo, config) if algo else None
