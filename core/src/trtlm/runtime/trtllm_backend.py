"""The ``tensorrt-llm`` backend: hand a checkpoint to TensorRT-LLM's own builder.

TensorRT-LLM is imported lazily, only here; trtlm never depends on it.  The
checkpoint trtlm writes is the one ``trtllm-build --checkpoint_dir`` takes,
so this backend does what that command does, through the Python API
as ``tensorrt_llm/commands/build.py`` does: ``PretrainedConfig.from_json_file``,
``set_rank`` and ``MODEL_MAP[architecture].from_checkpoint`` per rank, then
``tensorrt_llm.build`` and ``engine.save``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from trtlm.errors import UserError

INSTALL_HINT = ("TensorRT-LLM is not installed; install it from NVIDIA's package index "
                "(pip install tensorrt-llm --extra-index-url https://pypi.nvidia.com) on a machine with an NVIDIA GPU, "
                "or use --backend torch")


def import_tensorrt_llm() -> Any:
    try:
        import tensorrt_llm
    except ImportError as exc:
        raise UserError(f"{INSTALL_HINT} ({exc})") from None
    return tensorrt_llm


class TensorRTLLMNetwork:
    """Builds one TensorRT engine per rank with TensorRT-LLM's Python API."""

    def __init__(self, config: dict[str, Any], options: Any) -> None:
        self.config = config
        self.options = options
        self.trtllm = import_tensorrt_llm()  # fail early, before any output is written

    def build_config(self) -> Any:
        o = self.options
        kwargs = {"max_batch_size": o.max_batch_size, "max_input_len": o.max_input_len}
        if o.max_seq_len:
            kwargs["max_seq_len"] = o.max_seq_len
        return self.trtllm.BuildConfig(**kwargs)

    def build(self, checkpoint_dir: Path, engine_dir: Path) -> None:
        import copy

        from tensorrt_llm.models import MODEL_MAP, PretrainedConfig

        config = PretrainedConfig.from_json_file(str(checkpoint_dir / "config.json"))
        if config.architecture not in MODEL_MAP:
            raise UserError(f"this TensorRT-LLM has no model class for architecture {config.architecture!r}")
        model_cls = MODEL_MAP[config.architecture]
        for rank in range(config.mapping.world_size):
            rank_config = copy.deepcopy(config)
            rank_config.set_rank(rank)
            model = model_cls.from_checkpoint(str(checkpoint_dir), config=rank_config)
            engine = self.trtllm.build(model, self.build_config())
            engine.save(str(engine_dir))
