"""The Python API: ``trtlm.LLM(...).generate(...)``, used by ``trtlm run`` itself."""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from trtlm.convert.mapping import Mapping
from trtlm.convert.options import ConvertOptions
from trtlm.errors import UserError
from trtlm.runtime.engine import BuildOptions, build
from trtlm.runtime.generate import Runner, SamplingParams


def cache_root() -> Path:
    return Path(os.environ.get("TRTLM_CACHE", Path.home() / ".cache" / "trtlm"))


def engine_cache_key(model_dir: Path, convert: ConvertOptions, build_opts: BuildOptions) -> str:
    """Changes when the checkpoint's files, the options or trtlm's version change."""
    from trtlm import __version__

    h = hashlib.sha256()
    h.update(str(model_dir.resolve()).encode())
    for f in sorted(model_dir.iterdir()):
        if f.is_file():
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    opts = {k: str(v) for k, v in asdict(convert).items() if k not in ("workers", "progress", "force")}
    h.update(json.dumps([opts, asdict(build_opts), __version__], sort_keys=True).encode())
    return h.hexdigest()[:16]


def prepare_engine(model_dir: Path, convert_options: ConvertOptions | None = None,
                   build_options: BuildOptions | None = None) -> Path:
    """Convert and build ``model_dir`` once into the cache; return the engine directory."""
    from trtlm.convert.pipeline import convert

    convert_options = convert_options or ConvertOptions()
    build_options = build_options or BuildOptions()
    root = cache_root() / "engines" / engine_cache_key(model_dir, convert_options, build_options)
    engine = root / "engine"
    if (engine / "config.json").exists():
        return engine
    ckpt = root / "checkpoint"
    convert(model_dir, ckpt, ConvertOptions(**{**asdict(convert_options), "force": True}))
    build(ckpt, engine, BuildOptions(**{**asdict(build_options), "force": True}))
    return engine


def load_engine_config(engine_dir: Path) -> dict[str, Any]:
    from trtlm.modeldir import read_json

    cfg = read_json(engine_dir / "config.json")
    if "pretrained_config" not in cfg:
        raise UserError(f"{engine_dir}: not an engine directory (run `trtlm build` on a checkpoint first)")
    return cfg


class LLM:
    """A built engine loaded for generation in this process.

    :param engine_dir: a directory written by ``trtlm build`` (torch backend).
    :param model_dir: alternatively a Hugging Face checkpoint, converted and
        built on the fly into a cache keyed by its files and the options.
    :param tokenizer_dir: where to find the tokenizer (default: the engine,
        which carries the checkpoint's tokenizer files).
    :param device: ``"cpu"``, ``"cuda"``...
    """

    def __init__(self, engine_dir: str | Path | None = None, *, model_dir: str | Path | None = None,
                 tokenizer_dir: str | Path | None = None, device: str | torch.device = "cpu",
                 convert_options: ConvertOptions | None = None, build_options: BuildOptions | None = None):
        if (engine_dir is None) == (model_dir is None):
            raise UserError("give exactly one of --engine-dir and --model-dir")
        if model_dir is not None:
            engine_dir = prepare_engine(Path(model_dir), convert_options, build_options)
        self.engine_dir = Path(engine_dir)
        engine_cfg = load_engine_config(self.engine_dir)
        self.config: dict[str, Any] = engine_cfg["pretrained_config"]
        self.build_config: dict[str, Any] = engine_cfg["build_config"]
        self.device = torch.device(device)
        self.tokenizer_dir = Path(tokenizer_dir) if tokenizer_dir else (
            Path(model_dir) if model_dir is not None else self.engine_dir)
        self._tokenizer = None
        self.model = load_model(self.engine_dir, self.config, self.device)
        self._cache = None
        if self.device.type == "cuda":  # static cache, decode steps replayed from CUDA graphs, no per-token sync
            from trtlm.runtime.cuda_graph import GraphForward

            graph = GraphForward(self.model)
            self.runner = Runner(graph, graph.new_cache, self.device, sync_every=GraphForward.SYNC_EVERY)
        else:
            self.runner = Runner(self._forward, self._new_cache, self.device)
        self.last_generation = None

    # -- model plumbing -----------------------------------------------------------------
    def _new_cache(self, batch: int, max_seq: int) -> None:
        self._cache = self.model.new_cache(batch, max_seq, self.device)

    def _forward(self, tokens: torch.Tensor, start: int, pad: torch.Tensor) -> torch.Tensor:
        step = self.model.step(start, tokens.shape[1], pad)
        return self.model(tokens, step, self._cache)

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from trtlm.runtime.tokenizer import load_tokenizer

            self._tokenizer = load_tokenizer(self.tokenizer_dir)
        return self._tokenizer

    def eos_ids(self) -> tuple[int, ...]:
        from trtlm.hf_config import eos_ids

        ids = eos_ids(self.config.get("trtlm") or {})
        return tuple(ids) or (self.tokenizer.eos_ids if self._tokenizer is not None else ())

    # -- public -------------------------------------------------------------------------
    def generate(self, prompts: Sequence[str] | Sequence[Sequence[int]], max_new_tokens: int = 32,
                 temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
                 on_tokens: Callable[[int, list[int]], None] | None = None,
                 keep_logits: bool = False) -> list[dict[str, Any]]:
        """Generate for each prompt (text, or token ids); greedy unless ``temperature > 0``.

        :return: one ``{"output_ids": [...], "text": str | None}`` per prompt
            (generated ids only; EOS, when reached, is the last id).
        """
        request = self._request(prompts, SamplingParams(max_new_tokens, temperature, top_k, top_p, seed),
                                keep_logits)
        return self._generate(request, on_tokens)

    def _request(self, prompts, params: SamplingParams, keep_logits: bool) -> dict[str, Any]:
        """Token ids and complete sampling settings for ``prompts`` (checked against the engine)."""
        texts = all(isinstance(p, str) for p in prompts)
        ids = [self.tokenizer.encode(p) for p in prompts] if texts else [list(map(int, p)) for p in prompts]
        max_seq = int(self.build_config.get("max_seq_len") or 0)
        longest = max((len(p) for p in ids), default=0) + params.max_new_tokens
        if max_seq and longest > max_seq:
            raise UserError(f"prompt + --max-output-len = {longest} tokens exceeds the engine's max_seq_len {max_seq}")
        if texts:
            self.tokenizer  # noqa: B018 - loads eos ids from the tokenizer too
        params.eos_ids = self.eos_ids()
        return {"ids": ids, "texts": texts, "params": params, "keep_logits": keep_logits}

    def _generate(self, request: dict[str, Any], on_tokens) -> list[dict[str, Any]]:
        """Run the generation loop on a prepared request and decode the outputs."""
        gen = self.runner.generate(request["ids"], request["params"], on_tokens, request["keep_logits"])
        self.last_generation = gen
        return [{"output_ids": o, "text": self.tokenizer.decode(o) if request["texts"] else None}
                for o in gen.output_ids]


def load_model(engine_dir: Path, config: dict[str, Any], device: torch.device):
    """All ranks of an engine as one single-process network (ranks merged)."""
    from trtlm.runtime.checkpoint import merge_ranks, read_rank, single_process_config

    mapping = Mapping.from_config(config)
    if mapping.world_size == 1:
        tensors = read_rank(engine_dir, 0)
        cfg = config
    else:
        ranks = [read_rank(engine_dir, r) for r in range(mapping.world_size)]
        cfg = single_process_config(config)
        if (cfg.get("quantization") or {}).get("quant_algo"):  # merged still quantized (same numerics as tp=1)
            from trtlm.quant.runtime import merge_quantized_ranks

            tensors = merge_quantized_ranks(config, ranks)
        else:
            tensors = merge_ranks(config, ranks)
    return load_network(engine_dir, cfg, tensors, Mapping.from_config(cfg), 0, device, where=str(engine_dir))


def load_network(engine_dir: Path, config: dict[str, Any], tensors: dict[str, torch.Tensor], mapping: Mapping,
                 rank: int, device: torch.device, comm: Any = None, where: str = "") -> torch.nn.Module:
    """Rank ``rank``'s network, built through the family's ``build_network`` hook, with ``tensors`` loaded.

    Plugins load in whichever process calls this (every rank of a multi-process job does)."""
    from trtlm.plugins import get_registry
    from trtlm.runtime.distributed import rank_network

    registry = get_registry()
    hooks = registry.hooks(registry.resolve_trtllm(config["architecture"], where=str(engine_dir / "config.json")))
    model = rank_network(hooks, config, mapping, rank, BuildOptions(), device=device, comm=comm)
    missing, _unexpected = model.load_state_dict(tensors, strict=False)
    if missing:
        raise UserError(f"{where}: engine lacks tensor {missing[0]} (rebuild the engine with `trtlm build`)")
    return model.eval()


class DistributedLLM(LLM):
    """One rank of a multi-process (tensor / pipeline / expert parallel) engine.

    Every rank of the job constructs it (under ``torchrun``, or as a worker of
    ``trtlm run``'s launcher, so ``RANK``/``WORLD_SIZE`` are set) and loads only
    its own ``rank{r}.safetensors``.  ``generate`` is collective: every rank
    calls it, the arguments of rank 0 are used (broadcast to the others, which
    may pass anything), and every rank returns the same outputs.  Generation
    runs the same :class:`~trtlm.runtime.generate.Runner` loop as :class:`LLM`.

    :param timeout_s: bound on every collective; a rank that stops answering
        makes the others fail after this long instead of hanging.
    """

    def __init__(self, engine_dir: str | Path, *, tokenizer_dir: str | Path | None = None,
                 device: str | torch.device = "cpu", timeout_s: float | None = None, env=None):
        from trtlm.runtime.distributed import (DEFAULT_TIMEOUT_S, BroadcastSampler, PipelineForward, init_rank,
                                               rank_env)

        env = env or rank_env()
        if env is None:
            raise UserError("DistributedLLM runs as one rank of a job: start it with torchrun (RANK and "
                            "WORLD_SIZE unset here), or use `trtlm run`, which starts the ranks itself")
        self.engine_dir = Path(engine_dir)
        engine_cfg = load_engine_config(self.engine_dir)
        self.config = engine_cfg["pretrained_config"]
        self.build_config = engine_cfg["build_config"]
        self.tokenizer_dir = Path(tokenizer_dir) if tokenizer_dir else self.engine_dir
        self._tokenizer = None
        self.last_generation = None
        self.state = init_rank(Mapping.from_config(self.config), env, device,
                               DEFAULT_TIMEOUT_S if timeout_s is None else timeout_s)
        self.device = self.state.device
        self.model = load_rank_model(self.engine_dir, self.config, self.state)
        self.state.ready()
        self.pipeline = PipelineForward(self.model, self.state)
        self.runner = Runner(self.pipeline, self.pipeline.new_cache, self.device, BroadcastSampler(self.state))

    @property
    def rank(self) -> int:
        return self.state.rank

    def _generate(self, request: dict[str, Any] | None, on_tokens) -> list[dict[str, Any]]:
        from trtlm.runtime.distributed import RemoteError, broadcast_object

        # The default group (long timeout): the other ranks wait here for rank 0's next request.
        request = broadcast_object(request, src=0)
        if "error" in request:  # rank 0 refused the request: every rank raises the same error
            raise (UserError if self.rank == 0 else RemoteError)(request["error"])
        self.pipeline.logits_to_rank0 = bool(request["keep_logits"])
        return super()._generate(request, on_tokens)

    def generate(self, prompts=None, max_new_tokens: int = 32, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, seed: int | None = None,
                 on_tokens: Callable[[int, list[int]], None] | None = None,
                 keep_logits: bool = False) -> list[dict[str, Any]]:
        """As :meth:`LLM.generate`; collective, rank 0's arguments count.  With
        ``keep_logits`` the logits are kept on rank 0 (and the last pipeline stage)."""
        request: dict[str, Any] | None = None
        if self.rank == 0:
            try:
                request = self._request(prompts, SamplingParams(max_new_tokens, temperature, top_k, top_p, seed),
                                        keep_logits)
            except UserError as exc:
                request = {"error": str(exc)}
        return self._generate(request, on_tokens)

    def close(self) -> None:
        """Leave the process group (the other ranks must close too)."""
        from trtlm.runtime.distributed import shutdown

        shutdown()

    def __enter__(self) -> "DistributedLLM":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:  # after a failure the peers may be gone: leave without a collective
            self.close()


def load_rank_model(engine_dir: Path, config: dict[str, Any], state):
    """This rank's network with its own rank file (``state`` from
    :func:`trtlm.runtime.distributed.init_rank`)."""
    from trtlm.runtime.checkpoint import read_rank

    return load_network(engine_dir, config, read_rank(engine_dir, state.rank), state.mapping, state.rank,
                        state.device, comm=state.comm, where=str(engine_dir / f"rank{state.rank}.safetensors"))
