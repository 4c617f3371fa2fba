"""The Triton repository of a torch engine: one Python-backend model running trtlm's engine.

Layout (``<name>`` is ``--model-name``, ``ensemble`` by default, so the URLs
tensorrtllm_backend documents work unchanged)::

    REPO/<name>/config.pbtxt       inputs/outputs named and typed as tensorrtllm_backend's ensemble
    REPO/<name>/1/model.py         trtlm.triton.python_model (a copy of its source)
    REPO/<name>/1/engine/          the engine (copy or link)
    REPO/<name>/1/tokenizer/       tokenizer files (when --tokenizer-dir is given; else the engine's own)

Paths in ``config.pbtxt`` are relative to ``REPO/<name>``, so the repository can be moved.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from trtlm.errors import UserError
from trtlm.triton.files import RepoOptions, place, place_tokenizer

#: (name, data_type, dims, optional): the subset of tensorrtllm_backend's ensemble inputs this model serves,
#: with the ensemble's own types and dims (tests/test_triton.py checks them against the template).
INPUTS = [
    ("text_input", "TYPE_STRING", "1", False),
    ("max_tokens", "TYPE_INT32", "1", False),
    ("bad_words", "TYPE_STRING", "-1", True),
    ("stop_words", "TYPE_STRING", "-1", True),
    ("exclude_input_in_output", "TYPE_BOOL", "1", True),
    ("end_id", "TYPE_INT32", "1", True),
    ("pad_id", "TYPE_INT32", "1", True),
    ("top_k", "TYPE_INT32", "1", True),
    ("top_p", "TYPE_FP32", "1", True),
    ("temperature", "TYPE_FP32", "1", True),
    ("min_tokens", "TYPE_INT32", "1", True),
    ("seed", "TYPE_UINT64", "1", True),
    ("return_log_probs", "TYPE_BOOL", "1", True),
    ("stream", "TYPE_BOOL", "1", True),
]
OUTPUTS = [
    ("text_output", "TYPE_STRING", "-1"),
    ("cum_log_probs", "TYPE_FP32", "-1"),
    ("output_log_probs", "TYPE_FP32", "-1, -1"),
]


def config_pbtxt(name: str, max_batch_size: int, options: RepoOptions, parameters: dict[str, str]) -> str:
    """The model's ``config.pbtxt`` (protobuf text format of Triton's ModelConfig)."""
    def tensor(n: str, t: str, dims: str, optional: bool | None) -> str:
        opt = "\n    optional: true" if optional else ""
        return f"  {{\n    name: \"{n}\"\n    data_type: {t}\n    dims: [ {dims} ]{opt}\n  }}"

    inputs = ",\n".join(tensor(*spec) for spec in INPUTS)
    outputs = ",\n".join(tensor(*spec, None) for spec in OUTPUTS)
    params = "".join(f'parameters: {{\n  key: "{k}"\n  value: {{\n    string_value: "{v}"\n  }}\n}}\n'
                     for k, v in parameters.items())
    return (f'# Written by `trtlm triton-repo`: trtlm\'s engine as a Triton Python-backend model,\n'
            f'# under tensorrtllm_backend\'s ensemble interface (docs/deploy-triton.md).\n'
            f'name: "{name}"\nbackend: "python"\nmax_batch_size: {max_batch_size}\n\n'
            f'model_transaction_policy {{\n  decoupled: {"true" if options.decoupled else "false"}\n}}\n\n'
            f'dynamic_batching {{\n  preferred_batch_size: [ {max_batch_size} ]\n'
            f'  max_queue_delay_microseconds: {options.max_queue_delay_us}\n}}\n\n'
            f'input [\n{inputs}\n]\noutput [\n{outputs}\n]\n\n'
            f'instance_group [\n  {{\n    count: {options.instance_count}\n    kind: KIND_CPU\n  }}\n]\n\n'
            f'{params}')


def write_torch_repo(repo: Path, engine_dir: Path, cfg: dict[str, Any], options: RepoOptions,
                     tokenizer_dir: Path | None) -> dict[str, Any]:
    """Write the model into ``repo`` (the temporary directory being filled)."""
    from trtlm.runtime.tokenizer import tokenizer_files

    model = repo / options.model_name
    version = model / "1"
    version.mkdir(parents=True)
    build = cfg.get("build_config") or {}
    max_batch_size = options.max_batch_size or int(build.get("max_batch_size") or 8)
    place(engine_dir, version / "engine", options.link)
    if tokenizer_dir is not None:
        place_tokenizer(Path(tokenizer_dir), version / "tokenizer", options.link)
        tokenizer_rel = "1/tokenizer"
    elif tokenizer_files(engine_dir):
        tokenizer_rel = "1/engine"
    else:
        raise UserError(f"--engine-dir {engine_dir}: the engine carries no tokenizer files; pass --tokenizer-dir "
                        f"(Triton's text_input needs a tokenizer)")
    shutil.copyfile(Path(__file__).with_name("python_model.py"), version / "model.py")
    parameters = {
        "engine_dir": "1/engine",
        "tokenizer_dir": tokenizer_rel,
        "device": "auto",
        "kv_cache_free_gpu_mem_fraction": repr(float(options.kv_cache_free_gpu_mem_fraction)),
        "exclude_input_in_output": "false",
    }
    (model / "config.pbtxt").write_text(config_pbtxt(options.model_name, max_batch_size, options, parameters))
    return {"models": [options.model_name], "max_batch_size": max_batch_size, "decoupled": options.decoupled,
            "parameters": {options.model_name: parameters}}
