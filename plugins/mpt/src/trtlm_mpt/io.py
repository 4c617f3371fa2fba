"""Reading and writing MPT directories: the glue between the hooks and :mod:`trtlm_mpt.ft`.

* :func:`load_ft` opens a FasterTransformer directory as a Hugging Face style
  config plus a lazy :class:`~trtlm_mpt.ft.FTSource` (a Hugging Face directory
  is left to the core's reader); :func:`fix_no_bias`, run by the plugin's
  ``trtlm_load_weights`` wrapper on whatever was loaded, corrects ``no_bias``
  for transformers' own MPT saves, which never hold biases.
* :func:`export_ft` writes ``trtlm convert --to ft``.

``--force`` only ever means "replace a non-empty --output-dir".  Writing an
FT directory that drops settings FT cannot carry (``clip_qkv``, ...) needs
its own consent, ``--ft-allow-lossy`` (``options.extra["ft_allow_lossy"]``).
"""
from __future__ import annotations

import logging
from pathlib import Path

from trtlm.convert.options import ConvertOptions
from trtlm.errors import UserError
from trtlm.weights import LoadedModel

log = logging.getLogger(__name__)

from trtlm.dtypes import CHECKPOINT_DTYPES as FT_DTYPES  # FT stores the same three


def load_ft(model_dir: Path, options: ConvertOptions) -> LoadedModel | None:
    """A FasterTransformer directory as a config plus a lazy :class:`~trtlm_mpt.ft.FTSource`;
    ``None`` when ``model_dir`` is not one."""
    from trtlm_mpt.ft import FTSource, ft_hf_config, is_ft_dir, resolve_ft_dir

    if not is_ft_dir(model_dir):
        return None
    try:
        ft_dir = resolve_ft_dir(model_dir)
        hf_config = ft_hf_config(ft_dir)
        source = FTSource(ft_dir, validate=not options.dummy_weights)
    except ValueError as exc:
        raise UserError(f"{model_dir}: unreadable FasterTransformer directory: {exc}") from None
    return LoadedModel(hf_config, source, origin=f"{ft_dir} (FasterTransformer, tp={source.tp})")


def fix_no_bias(loaded: LoadedModel, model_dir: Path, options: ConvertOptions) -> None:
    """transformers' ``MptForCausalLM`` has no biases whatever ``no_bias`` says: a checkpoint that
    says ``no_bias: false`` but holds no bias tensors computes without them."""
    hf = loaded.hf_config
    if not options.dummy_weights and hf.get("no_bias") is False:
        if not any(k.endswith(".bias") for k in loaded.source.keys()):
            log.info("%s: config.json says no_bias=false but the checkpoint holds no bias tensors "
                     "(a transformers MPT save); converting it as a bias-free model", model_dir)
            loaded.hf_config = dict(hf, no_bias=True)


def export_ft(family, loaded: LoadedModel, options: ConvertOptions, output_dir: Path) -> Path:
    """Write ``output_dir/<tp>-gpu/`` (TensorRT-LLM's FT layout) and return ``output_dir``."""
    from trtlm.hf_config import torch_dtype_name
    from trtlm.sources import DummySource
    from trtlm_mpt.ft import ft_unsupported_settings, write_ft
    from trtlm_mpt.plan import mpt_plan

    if options.pp_size > 1:
        raise UserError("--to ft: FasterTransformer directories have no pipeline parallelism; drop --pp-size")
    if options.quant or options.kv_cache_dtype:
        raise UserError("--to ft writes unquantized weights only; drop --quant / --kv-cache-dtype "
                        "(quantize when converting the FT directory to a TensorRT-LLM checkpoint)")
    hf = loaded.hf_config
    source = loaded.source
    if options.dummy_weights:
        plan = mpt_plan(hf, options, family.trtllm_architecture)
        source = DummySource(plan.source_shapes(), seed=options.seed)
    dtype = options.dtype
    if dtype == "auto":
        dtype = torch_dtype_name(hf) or "float32"
        if dtype not in FT_DTYPES:
            dtype = "float32"
    if dtype not in FT_DTYPES:
        raise UserError(f"--dtype {dtype!r}: FT storage is one of {', '.join(FT_DTYPES)}")
    lossy = bool(options.extra.get("ft_allow_lossy"))
    problems = ft_unsupported_settings(hf, source)
    if problems and not lossy:
        raise UserError("--to ft: this MPT model uses settings the FasterTransformer format cannot carry: "
                        + "; ".join(problems)
                        + ". Pass --ft-allow-lossy to write it anyway (they are dropped and the FT model "
                          "computes differently), or convert to a TensorRT-LLM checkpoint, which keeps them")
    for p in problems:
        log.warning("--ft-allow-lossy: dropping %s", p)
    try:
        write_ft(source, hf, output_dir, options.tp_size, dtype, force=lossy)
    except ValueError as exc:
        raise UserError(f"--to ft --tp-size {options.tp_size}: {exc}") from None
    return output_dir
