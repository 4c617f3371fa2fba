"""``trtlm convert --to hf``: a Hugging Face directory from any model trtlm can read.

Its use is the way back from Megatron-Core (``--model-dir MCORE_CKPT --to hf``): the checkpoint's
tensors are already presented under Hugging Face names by :class:`trtlm.mcore.reader.MCoreSource`,
so this writes ``config.json`` (the recorded or derived config) and one ``model.safetensors``
through the converter's streaming writer (header first, then each tensor at its offset, one in
memory at a time).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from trtlm.errors import UserError
from trtlm.weights import LoadedModel

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def export_hf(loaded: LoadedModel, options, output_dir: Path) -> Path:
    from trtlm.convert.writer import RankFileWriter
    from trtlm.hf_config import torch_dtype_name

    if options.quant or options.kv_cache_dtype or options.tp_size > 1 or options.pp_size > 1 \
            or (options.moe_ep_size or 1) > 1:
        raise UserError("--to hf writes one unquantized, unsharded model; drop --quant / --kv-cache-dtype / "
                        "--tp-size / --pp-size / --moe-ep-size")
    if options.dummy_weights:
        raise UserError("--to hf converts a checkpoint; --dummy-weights does not apply")
    hf = {k: v for k, v in loaded.hf_config.items() if not k.startswith("trtlm_")}
    name = options.dtype if options.dtype != "auto" else (torch_dtype_name(hf) or "float32")
    if name not in DTYPES:
        raise UserError(f"--dtype {name!r}: --to hf writes one of {', '.join(DTYPES)}")
    dtype = DTYPES[name]
    source = loaded.source
    names = source.keys()
    writer = RankFileWriter(Path(output_dir) / "model.safetensors",
                            {n: (tuple(source.shape(n)), dtype) for n in names}, metadata={"format": "pt"})
    try:
        for n in names:
            writer.write(n, source.get(n).to(dtype))
        writer.close()
    except BaseException:
        writer.discard()
        raise
    hf["dtype"] = name
    hf.pop("torch_dtype", None)
    (Path(output_dir) / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    return Path(output_dir)
