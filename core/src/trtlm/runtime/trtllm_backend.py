"""The ``tensorrt-llm`` backend: TensorRT-LLM's own builder and runtime, where it is installed.

TensorRT-LLM is imported lazily, only in this module; trtlm never depends on it.  Every name
used from it is listed, with the source file it comes from, in docs/tensorrt-llm.md (a test
keeps the list and this module in step).

Building: the checkpoint trtlm writes is the one ``trtllm-build --checkpoint_dir`` takes, so
:class:`TensorRTLLMNetwork` does what ``tensorrt_llm/commands/build.py`` does through the Python
API: ``PretrainedConfig.from_json_file``, ``set_rank`` and
``MODEL_MAP[architecture].from_checkpoint`` per rank, ``tensorrt_llm.builder.build`` and
``Engine.save`` (``BuildConfig`` and ``build`` come from ``tensorrt_llm.builder``: newer
releases no longer re-export them from the package root).  Ranks build in parallel in spawned
processes (``--workers``, at most one per GPU, as ``trtllm-build`` does); an architecture
TensorRT-LLM has no model class for is a one-line error before its own ``KeyError``; the
build config TensorRT-LLM actually used (its ``config.json``'s ``build_config``, defaults
filled in) is returned; the tokenizer files are copied next to the engines.

Running: an engine directory TensorRT-LLM built holds ``rank{r}.engine`` files, not trtlm's
``rank{r}.safetensors``.  :func:`is_trtllm_engine` tells them apart, and
:func:`run_trtllm_engine` generates with TensorRT-LLM's ``ModelRunnerCpp`` (its C++ executor;
``ModelRunner``, the Python session, where the bindings are missing) — or says in one line that
it needs ``tensorrt_llm``.
"""
from __future__ import annotations

import json
import shutil
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from trtlm.errors import UserError

INSTALL_HINT = ("TensorRT-LLM is not installed; install it from NVIDIA's package index "
                "(pip install tensorrt-llm --extra-index-url https://pypi.nvidia.com) on a machine with an NVIDIA GPU, "
                "or use --backend torch")
RUN_HINT = ("is an engine TensorRT-LLM built (rank0.engine); running it needs tensorrt_llm: install it from "
            "NVIDIA's package index (pip install tensorrt-llm --extra-index-url https://pypi.nvidia.com), "
            "or rebuild the checkpoint with trtlm build --backend torch")


def import_tensorrt_llm(hint: str = INSTALL_HINT) -> Any:
    """``tensorrt_llm``, or a one-line :class:`UserError` saying how to get it."""
    try:
        import tensorrt_llm
    except ImportError as exc:
        raise UserError(f"{hint} ({exc})") from None
    return tensorrt_llm


# ----------------------------------------------------------------------------- engines on disk

def is_trtllm_engine(engine_dir: str | Path) -> bool:
    """Whether ``engine_dir`` is an engine directory TensorRT-LLM built (``config.json`` with
    ``pretrained_config`` and ``build_config``, and ``rank0.engine``), rather than a trtlm torch
    engine (``rank0.safetensors``).  Reads only ``config.json``; no TensorRT-LLM needed."""
    path = Path(engine_dir)
    if not (path / "rank0.engine").is_file():
        return False
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and "pretrained_config" in config and "build_config" in config


@dataclass(frozen=True)
class TRTLLMEngineInfo:
    """What a TensorRT-LLM engine directory's ``config.json`` says (no TensorRT-LLM needed)."""

    architecture: str
    world_size: int
    max_batch_size: int | None
    max_input_len: int | None
    max_seq_len: int | None
    vocab_size: int | None
    version: str | None
    gather_context_logits: bool


def engine_info(engine_dir: str | Path) -> TRTLLMEngineInfo:
    path = Path(engine_dir) / "config.json"
    try:
        config = json.loads(path.read_text())
        pretrained, build = config["pretrained_config"], config["build_config"]
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(f"{path}: not a TensorRT-LLM engine config (no pretrained_config/build_config)") from None
    mapping = pretrained.get("mapping") or {}
    world = int(mapping.get("world_size") or int(mapping.get("tp_size", 1)) * int(mapping.get("pp_size", 1)))

    def num(key: str) -> int | None:
        return int(build[key]) if build.get(key) is not None else None

    return TRTLLMEngineInfo(
        architecture=str(pretrained.get("architecture")), world_size=world, max_batch_size=num("max_batch_size"),
        max_input_len=num("max_input_len"), max_seq_len=num("max_seq_len"),
        vocab_size=int(pretrained["vocab_size"]) if pretrained.get("vocab_size") is not None else None,
        version=config.get("version"), gather_context_logits=bool(build.get("gather_context_logits", False)))


# ----------------------------------------------------------------------------- running

@dataclass
class TRTLLMOutput:
    """One prompt's result: the generated ids (prompt excluded) and, when asked for and the engine
    was built with ``gather_context_logits``, the prompt's logits ``[len, vocab]``."""

    token_ids: list[int]
    context_logits: Any | None = None


def run_trtllm_engine(engine_dir: str | Path, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                      end_id: int | None = None, pad_id: int | None = None, temperature: float = 0.0,
                      top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
                      context_logits: bool = False, python_session: bool = False) -> list[TRTLLMOutput]:
    """Generate for token-id ``prompts`` with TensorRT-LLM's runtime, as its ``examples/run.py`` does.

    Greedy when ``temperature`` is 0 (``top_k=1``).  A multi-rank engine runs under MPI
    (``mpirun -n WORLD``); every rank calls this, and rank 0 gets the outputs (other ranks an
    empty list).  Raises a one-line :class:`UserError` when tensorrt_llm is missing, when the
    process count does not match the engine's ranks, when a prompt is longer than the engine's
    ``max_input_len``, or when ``context_logits`` is asked of an engine built without them.
    """
    engine_dir = Path(engine_dir)
    info = engine_info(engine_dir)
    for i, prompt in enumerate(prompts):
        if not prompt:
            raise UserError(f"prompt {i} is empty")
        if info.max_input_len is not None and len(prompt) > info.max_input_len:
            raise UserError(f"prompt {i} has {len(prompt)} tokens; {engine_dir} was built for at most "
                            f"max_input_len={info.max_input_len}")
    if context_logits and not info.gather_context_logits:
        raise UserError(f"{engine_dir}: built without gather_context_logits, so TensorRT-LLM returns no prompt "
                        f"logits; rebuild it with gather_context_logits enabled, or use --backend torch")
    trtllm = import_tensorrt_llm(f"{engine_dir} {RUN_HINT}")
    import torch
    from tensorrt_llm.runtime import PYTHON_BINDINGS, ModelRunner

    rank, world = trtllm.mpi_rank(), trtllm.mpi_world_size()
    if world != info.world_size:
        raise UserError(f"{engine_dir} has {info.world_size} ranks but this is {world} process(es); run it as "
                        f"mpirun -n {info.world_size} trtlm ...")
    if PYTHON_BINDINGS and not python_session:
        from tensorrt_llm.runtime import ModelRunnerCpp

        runner = ModelRunnerCpp.from_dir(engine_dir=str(engine_dir), rank=rank)
    else:
        runner = ModelRunner.from_dir(engine_dir=str(engine_dir), rank=rank)
    greedy = temperature <= 0
    sampling: dict[str, Any] = {"temperature": 1.0 if greedy else temperature, "top_k": 1 if greedy else top_k,
                                "top_p": 0.0 if greedy else top_p}
    if seed is not None:
        sampling["random_seed"] = seed
    end = end_id if end_id is not None else -1
    with torch.no_grad():
        out = runner.generate([torch.tensor(list(p), dtype=torch.int32) for p in prompts],
                              max_new_tokens=max_new_tokens, end_id=end, pad_id=pad_id if pad_id is not None else end,
                              output_sequence_lengths=True, return_dict=True, **sampling)
    if not out:  # not rank 0 of a multi-rank run
        return []
    ids, lengths = out["output_ids"], out["sequence_lengths"]
    logits = out.get("context_logits") if context_logits else None
    results = []
    for i, prompt in enumerate(prompts):
        end_at = int(lengths[i][0])
        results.append(TRTLLMOutput(ids[i][0][len(prompt):end_at].tolist(),
                                    logits[i] if logits is not None else None))
    return results


def generate_text(engine_dir: str | Path, prompts: Sequence[str] | Sequence[Sequence[int]], *, max_new_tokens: int,
                  tokenizer_dir: str | Path | None = None, **sampling: Any) -> list[dict[str, Any]]:
    """``trtlm run`` on a TensorRT-LLM engine: text (or token-id) prompts in, one dict per prompt out
    (``prompt_token_ids``, ``token_ids``, ``text``; ``text`` is ``None`` without a tokenizer).

    The tokenizer is the engine directory's own (trtlm copies it there when building) unless
    ``tokenizer_dir`` is given; it also gives the end id.  ``sampling``: the keyword arguments of
    :func:`run_trtllm_engine` (``temperature``, ``top_k``, ``top_p``, ``seed``)."""
    from trtlm.runtime.tokenizer import load_tokenizer, tokenizer_files

    engine_dir = Path(engine_dir)
    tok_dir = Path(tokenizer_dir) if tokenizer_dir is not None else engine_dir
    texts = bool(prompts) and isinstance(prompts[0], str)
    tokenizer = load_tokenizer(tok_dir) if texts or tokenizer_files(tok_dir) else None
    ids = [tokenizer.encode(p) for p in prompts] if texts else [list(p) for p in prompts]
    end_id = tokenizer.eos_ids[0] if tokenizer is not None and tokenizer.eos_ids else None
    outputs = run_trtllm_engine(engine_dir, ids, max_new_tokens=max_new_tokens, end_id=end_id, **sampling)
    return [{"prompt_token_ids": p, "token_ids": o.token_ids,
             "text": tokenizer.decode(o.token_ids) if tokenizer is not None else None}
            for p, o in zip(ids, outputs)]


# ----------------------------------------------------------------------------- building

def check_architecture(architecture: str, known: Iterable[str], where: str, version: str = "?") -> None:
    """One line, before TensorRT-LLM's own ``KeyError``/assert, when no model class builds ``architecture``."""
    known = sorted(known)
    if architecture not in known:
        close = [k for k in known if k.lower().startswith(architecture.lower()[:5])][:5]
        hint = f" (similar: {', '.join(close)})" if close else ""
        raise UserError(f"{where}: TensorRT-LLM {version} has no model class for architecture {architecture!r}{hint}; "
                        f"use --backend torch, or a TensorRT-LLM release that supports it")


def _build_rank(rank: int, gpu: int | None, checkpoint_dir: str, engine_dir: str, build_kwargs: dict[str, Any]) -> None:
    """Build and save one rank's engine (runs in a spawned process when ranks build in parallel)."""
    import copy

    from tensorrt_llm.builder import BuildConfig, build
    from tensorrt_llm.models import MODEL_MAP, PretrainedConfig

    if gpu is not None:
        import torch

        torch.cuda.set_device(gpu)
    config = PretrainedConfig.from_json_file(str(Path(checkpoint_dir) / "config.json"))
    rank_config = copy.deepcopy(config)
    rank_config.set_rank(rank)
    model = MODEL_MAP[config.architecture].from_checkpoint(checkpoint_dir, config=rank_config)
    engine = build(model, BuildConfig(**build_kwargs))
    engine.save(engine_dir)


class TensorRTLLMNetwork:
    """Builds one TensorRT engine per rank with TensorRT-LLM's Python API."""

    def __init__(self, config: dict[str, Any], options: Any) -> None:
        self.config = config
        self.options = options
        self.trtllm = import_tensorrt_llm()  # fail early, before any output is written
        from tensorrt_llm.models import MODEL_MAP

        check_architecture(str(config.get("architecture")), MODEL_MAP, "checkpoint config.json",
                           getattr(self.trtllm, "__version__", "?"))

    def build_kwargs(self) -> dict[str, Any]:
        """The ``BuildConfig`` arguments trtlm sets; TensorRT-LLM fills in the rest."""
        o = self.options
        kwargs = {"max_batch_size": o.max_batch_size, "max_input_len": o.max_input_len}
        if o.max_seq_len:
            kwargs["max_seq_len"] = o.max_seq_len
        return kwargs

    def build_config(self) -> Any:
        from tensorrt_llm.builder import BuildConfig

        return BuildConfig(**self.build_kwargs())

    def build(self, checkpoint_dir: Path, engine_dir: Path) -> dict[str, Any]:
        """Build every rank into ``engine_dir``, copy the tokenizer there, and return the build config
        TensorRT-LLM actually used (``config.json``'s ``build_config``, its defaults filled in)."""
        from trtlm.runtime.tokenizer import tokenizer_files

        mapping = self.config.get("mapping") or {}
        world = int(mapping.get("world_size") or 1)
        gpus = _gpu_count()
        workers = max(1, min(int(getattr(self.options, "workers", 1) or 1), world, gpus or 1))
        kwargs = self.build_kwargs()
        try:
            if workers == 1:
                for rank in range(world):
                    _build_rank(rank, rank % gpus if gpus else None, str(checkpoint_dir), str(engine_dir), kwargs)
            else:
                import multiprocessing

                with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
                    futures = {pool.submit(_build_rank, rank, rank % workers, str(checkpoint_dir), str(engine_dir),
                                           kwargs): rank for rank in range(world)}
                    for future in as_completed(futures):
                        future.result()
        except UserError:
            raise
        except Exception as exc:  # TensorRT-LLM's own failure: one line, its message
            first = next((line for line in str(exc).splitlines() if line.strip()), "")
            raise UserError(f"TensorRT-LLM failed to build {checkpoint_dir}: {type(exc).__name__}: {first}") from None
        for path in tokenizer_files(checkpoint_dir):
            shutil.copy2(path, engine_dir / path.name)
        return used_build_config(engine_dir)


def used_build_config(engine_dir: Path) -> dict[str, Any]:
    """The ``build_config`` TensorRT-LLM wrote into the engine's ``config.json``."""
    try:
        return dict(json.loads((Path(engine_dir) / "config.json").read_text())["build_config"])
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(f"{engine_dir}: TensorRT-LLM wrote no build_config into config.json") from None


def _gpu_count() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:  # noqa: BLE001 - no CUDA: build on whatever TensorRT-LLM picks
        return 0
