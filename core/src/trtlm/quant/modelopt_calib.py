"""NVIDIA Model Optimizer as an optional calibration engine (``--calibrator modelopt``).

Where ``nvidia-modelopt`` is installed (``pip install 'trtlm[modelopt]'``), the Hugging Face model
is loaded with transformers and calibrated by ``modelopt.torch.quantization.quantize`` with the
modelopt config matching trtlm's format (``FP8_DEFAULT_CFG``, ``INT8_SMOOTHQUANT_CFG``,
``INT4_AWQ_CFG``, plus ``FP8_KV_CFG``'s K/V quantizers for ``--kv-cache-dtype``).  Only its
*calibration results* are used: the quantizers' amaxes, SmoothQuant's per-channel activation amax
and AWQ's pre-quant scales are translated into the :class:`~trtlm.quant.calibrate.CalibStats`
trtlm's own plan consumes, so the weights, scales, sharding and files are written by trtlm exactly
as with its built-in calibrator.  modelopt's exporter is not used (it breaks on Mixtral with
transformers 5).

The translation is by the plan's sources: a TensorRT-LLM linear (``...attention.qkv``) is built
from HF tensors (``...q_proj.weight``, ``k_proj``, ``v_proj``), whose modules carry modelopt's
quantizers.  MoE experts are found under their layer (transformers 5's fused ``experts`` module
has ``gate_up_proj_input_quantizer`` / ``down_proj_input_quantizer``), K/V under the attention
module of the layer (``k_bmm_quantizer``/``v_bmm_quantizer``).

modelopt also offers algorithms trtlm's runtime cannot execute (:data:`MODELOPT_ONLY`); asking for
one is a one-line error, never a checkpoint trtlm could not run.  modelopt is imported lazily:
nothing here loads it unless ``--calibrator modelopt`` is used.
"""
from __future__ import annotations

import contextlib
import copy
import re
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from trtlm.errors import UserError

CALIBRATORS = ("trtlm", "modelopt")

#: trtlm format -> the modelopt config calibrating it
MODELOPT_CONFIGS = {"fp8": "FP8_DEFAULT_CFG", "int8-sq": "INT8_SMOOTHQUANT_CFG", "int4-awq": "INT4_AWQ_CFG"}

#: modelopt algorithms whose checkpoints trtlm's runtime cannot execute: name -> (config, quant_algo)
MODELOPT_ONLY = {
    "w4a8-awq": ("W4A8_AWQ_BETA_CFG", "W4A8_AWQ"),
    "nvfp4": ("NVFP4_DEFAULT_CFG", "NVFP4"),
    "fp8-per-channel-per-token": ("FP8_PER_CHANNEL_PER_TOKEN_CFG", "FP8_PER_CHANNEL_PER_TOKEN"),
    "mxfp4": ("MXFP4_DEFAULT_CFG", "MXFP4"),
}

_LAYER = re.compile(r"^(.*?\.(?:layers|blocks|h)\.\d+)\.")


def reject_modelopt_only(quant: str | None) -> None:
    """A one-line UserError for a modelopt-only ``--quant`` (its checkpoint would not run here)."""
    key = str(quant or "").lower().replace("_", "-")
    if key in MODELOPT_ONLY:
        cfg, algo = MODELOPT_ONLY[key]
        from trtlm.quant.schemes import names

        raise UserError(f"--quant {quant}: modelopt's {cfg} writes quant_algo {algo}, which trtlm's runtime cannot "
                        f"execute; choose one of {', '.join(names())}")


def check_options(options: Any) -> None:
    """Validate ``--calibrator`` against the other options, before any work."""
    reject_modelopt_only(getattr(options, "quant", None))
    calibrator = getattr(options, "calibrator", "trtlm") or "trtlm"
    if calibrator not in CALIBRATORS:
        raise UserError(f"--calibrator {calibrator!r}: choose one of {', '.join(CALIBRATORS)}")
    device = getattr(options, "calib_device", "auto") or "auto"
    if device != "auto" and (getattr(options, "quant", None) or getattr(options, "kv_cache_dtype", None)):
        from trtlm.quant.layerwise import resolve_calib_device

        resolve_calib_device(device)  # a missing GPU is said before any work
    if calibrator == "modelopt" and getattr(options, "dummy_weights", False):
        raise UserError("--calibrator modelopt calibrates a Hugging Face checkpoint: give --model-dir, "
                        "not --dummy-weights (or use --calibrator trtlm)")


def import_mtq():
    """``modelopt.torch.quantization``, or a one-line UserError saying how to install it."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import modelopt.torch.quantization as mtq
    except ImportError as e:
        missing = getattr(e, "name", None) or str(e)
        raise UserError(f"--calibrator modelopt: cannot import modelopt ({missing} missing); "
                        f"pip install 'trtlm[modelopt]' or use --calibrator trtlm") from None
    return mtq


def modelopt_config(mtq, fmt, kv: bool, group_size: int, alpha: float) -> dict[str, Any]:
    """The modelopt quantize config for trtlm format ``fmt`` (None: K/V only) and ``kv``."""
    if fmt is not None and fmt.calibrates:
        if fmt.name not in MODELOPT_CONFIGS:
            raise UserError(f"--calibrator modelopt: no modelopt config for --quant {fmt.name}")
        cfg = copy.deepcopy(getattr(mtq, MODELOPT_CONFIGS[fmt.name]))
    else:  # weight-only or no --quant: calibrate only the K/V quantizers
        cfg = {"quant_cfg": [{"quantizer_name": "*", "enable": False}], "algorithm": "max"}
    if fmt is not None and fmt.smoother == "smoothquant":
        cfg["algorithm"] = {"method": "smoothquant", "alpha": float(alpha)}
    if fmt is not None and fmt.smoother == "awq":
        for entry in cfg["quant_cfg"]:
            if entry.get("quantizer_name") == "*weight_quantizer" and isinstance(entry.get("cfg"), dict):
                entry["cfg"] = dict(entry["cfg"], block_sizes={-1: int(group_size), "type": "static"})
    if kv:  # the K/V amax is format-independent (max calibration): FP8_KV_CFG's quantizers collect it
        cfg["quant_cfg"] = list(cfg["quant_cfg"]) + copy.deepcopy(mtq.FP8_KV_CFG["quant_cfg"])
    return cfg


def load_hf_model(model_dir: Path, dtype, device, show_progress: bool = True):
    """The Hugging Face model of ``model_dir`` in ``dtype`` on ``device`` (transformers needed)."""
    try:
        from transformers import AutoModelForCausalLM
    except ImportError:
        raise UserError("--calibrator modelopt needs transformers: pip install 'trtlm[modelopt]'") from None
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    if not show_progress:
        hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype)
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()
    return model.to(device).eval()


def calibrate(plan, loaded, options, batches: Sequence, fmt, kv: bool, group_size: int):
    """Calibrate with modelopt and translate: ``(CalibStats, AWQ pre-quant scales or None)``."""
    import torch

    from trtlm.quant import calibrate as cal
    from trtlm.quant.layerwise import resolve_calib_device, resolve_calib_dtype

    origin = Path(str(loaded.origin))
    if not origin.is_dir() or not (origin / "config.json").is_file():
        raise UserError(f"--calibrator modelopt calibrates a Hugging Face checkpoint directory; {origin} is not "
                        f"one (use --calibrator trtlm)")
    mtq = import_mtq()
    import modelopt as modelopt_version
    device = resolve_calib_device(getattr(options, "calib_device", "auto"))
    dtype = resolve_calib_dtype(getattr(options, "calib_dtype", "auto"), loaded.hf_config)
    progress = cal.progress_mode(options)
    model = load_hf_model(origin, dtype, device, show_progress=progress != "off")
    cfg = modelopt_config(mtq, fmt, kv, group_size, float(options.smoothquant_alpha))

    def forward_loop(m):
        bar = cal.Progress("calibration: modelopt", len(batches), progress) if progress != "off" else None
        with torch.no_grad():
            for ids in batches:
                m(ids.to(device))
                if bar:
                    bar.update()
        if bar:
            bar.close()
    sink = sys.stderr if progress != "off" else open("/dev/null", "w")  # modelopt prints to stdout
    try:
        with contextlib.redirect_stdout(sink), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = mtq.quantize(model, cfg, forward_loop)
    except UserError:
        raise
    except Exception as e:  # modelopt's own failure on this architecture: one line, and the way out
        why = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise UserError(f"--calibrator modelopt: modelopt {getattr(modelopt_version, '__version__', '')} failed "
                        f"to calibrate {origin.name} ({type(e).__name__}: {why[:200]}); use --calibrator trtlm "
                        f"(the default)") from None
    finally:
        if sink is not sys.stderr:
            sink.close()
    return translate(plan, model, fmt, kv)


# ----------------------------------------------------------------------------- translation
def _amax(quantizer, per_channel: bool):
    """A quantizer's calibrated input amax: per channel (SmoothQuant's, before smoothing) or a scalar."""
    import torch

    smooth = getattr(quantizer, "_amax_for_smoothing", None)
    if smooth is not None:
        a = smooth.float().reshape(-1)
        return a if per_channel else a.amax()
    a = getattr(quantizer, "amax", None)
    if a is None:
        return None
    a = torch.as_tensor(a).float()
    if a.numel() == 0:
        return None
    return a.reshape(-1) if per_channel and a.numel() > 1 else a.amax()


def _module_of(name: str) -> str:
    return name[: -len(".weight")] if name.endswith(".weight") else name


def _layer_prefix(spec) -> str:
    m = _LAYER.match(spec.sources[0]) if spec.sources else None
    if m is None:
        raise UserError(f"--calibrator modelopt: cannot tell the HF layer of {spec.name} (sources {spec.sources})")
    return m.group(1)


def translate(plan, model, fmt, kv: bool):
    """modelopt's calibrated quantizers -> trtlm's ``(CalibStats, AWQ pre-quant scales or None)``."""
    import torch

    from trtlm.quant.calibrate import CalibStats, LinearStats

    modules = dict(model.named_modules())
    stats = CalibStats()
    awq: dict[str, list[torch.Tensor]] | None = {} if (fmt is not None and fmt.smoother == "awq") else None
    per_channel = fmt is not None and fmt.smoother == "smoothquant"
    needs_act = fmt is not None and fmt.calibrates
    for spec in plan.tensors:
        if not (needs_act and spec.quantizable):
            continue
        module = _module_of(spec.name)
        full = spec.combine([torch.empty(s, dtype=torch.float32, device="meta") for s in spec.shapes])
        if full.dim() == 3:  # an MoE expert stack [E, out, in]
            amax = _expert_amax(modules, _layer_prefix(spec), module.endswith("mlp.proj"))
            stats.linears[module] = LinearStats(amax=amax)
            continue
        hf = [modules.get(_module_of(s)) for s in spec.sources]
        if any(m is None or not hasattr(m, "input_quantizer") for m in hf):
            raise UserError(f"--calibrator modelopt: no quantized HF module for {spec.sources[0]} "
                            f"(its layout differs from the checkpoint's names); use --calibrator trtlm")
        if awq is not None:
            pqs = []
            for m, shape in zip(hf, spec.shapes, strict=True):
                pq = getattr(m.input_quantizer, "pre_quant_scale", None)
                pqs.append(torch.ones(shape[-1]) if pq is None else pq.detach().float().cpu())
            awq[module] = pqs
        else:
            amaxes = [_amax(m.input_quantizer, per_channel) for m in hf]
            if any(a is None for a in amaxes):
                raise UserError(f"--calibrator modelopt: modelopt calibrated no input amax for {spec.sources[0]}")
            amax = amaxes[0]
            for a in amaxes[1:]:  # q/k/v read the same input: equal up to rounding
                amax = torch.maximum(amax, a)
            stats.linears[module] = LinearStats(amax=amax.cpu())
    if kv:
        for spec in plan.tensors:
            if spec.name.endswith("attention.qkv.weight") and spec.layer is not None:
                k, v = _kv_amax(modules, spec)
                stats.k_amax[spec.layer], stats.v_amax[spec.layer] = k, v
    return stats, awq


def _expert_amax(modules: dict[str, Any], layer: str, proj: bool):
    """The amax of the experts' fc (or proj) input over one layer's experts."""
    import torch

    fused = "down_proj_input_quantizer" if proj else "gate_up_proj_input_quantizer"
    per_expert = ("w2", "down_proj") if proj else ("w1", "w3", "gate_proj", "up_proj")
    found = []
    for name, mod in modules.items():
        if not name.startswith(layer + ".") or "expert" not in name:
            continue
        if hasattr(mod, fused):
            found.append(_amax(getattr(mod, fused), False))
        elif name.rsplit(".", 1)[-1] in per_expert and hasattr(mod, "input_quantizer"):
            found.append(_amax(mod.input_quantizer, False))
    found = [a for a in found if a is not None]
    if not found:
        raise UserError(f"--calibrator modelopt: modelopt calibrated no expert inputs under {layer}; "
                        f"use --calibrator trtlm")
    return torch.stack([a.reshape(()) for a in found]).amax().cpu()


def _kv_amax(modules: dict[str, Any], qkv_spec):
    """K and V amax of the layer of ``qkv_spec`` from the attention module's bmm quantizers."""
    parent = _module_of(qkv_spec.sources[0]).rsplit(".", 1)[0]
    attn = modules.get(parent)
    kq, vq = getattr(attn, "k_bmm_quantizer", None), getattr(attn, "v_bmm_quantizer", None)
    k = _amax(kq, False) if kq is not None else None
    v = _amax(vq, False) if vq is not None else None
    if k is None or v is None:
        raise UserError(f"--calibrator modelopt: modelopt did not calibrate the KV cache of {parent} "
                        f"(no k/v_bmm_quantizer); use --calibrator trtlm for --kv-cache-dtype")
    return k.cpu(), v.cpu()
