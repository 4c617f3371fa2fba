"""The Python API: ``trtlm.LLM(...).generate(...)``, a thin facade over the engine.

Loading is :mod:`trtlm.runtime.loader`'s job, generation the
:class:`~trtlm.runtime.engine.Engine`'s; this module only turns the
familiar ``generate(prompts, max_new_tokens=...)`` call into engine requests
and the outputs back into dicts.  ``trtlm run`` uses the same class.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from trtlm.errors import UserError


@dataclass
class Generation:
    """What the last ``generate`` computed, for callers that look at logits (tests, eval)."""

    output_ids: list[list[int]]
    prompt_logits: list[Any] = field(default_factory=list)  #: per prompt [T, V] (float32) when kept
    step_logits: list[Any] = field(default_factory=list)  #: per decode step [B, V] (NaN rows: already finished)
    outputs: list[Any] = field(default_factory=list)  #: the engine's RequestOutputs


class LLM:
    """A built engine loaded for generation in this process.

    :param engine_dir: a directory written by ``trtlm build`` (torch backend).
    :param model_dir: alternatively a Hugging Face checkpoint, converted and
        built on the fly into a cache keyed by its files and the options.
    :param tokenizer_dir: where to find the tokenizer (default: the engine,
        which carries the checkpoint's tokenizer files).
    :param device: ``"cpu"``, ``"cuda"``...
    :param engine_config: batching and KV-cache settings
        (:class:`~trtlm.runtime.engine.EngineConfig`).
    """

    def __init__(self, engine_dir: str | Path | None = None, *, model_dir: str | Path | None = None,
                 tokenizer_dir: str | Path | None = None, device: Any = "cpu", convert_options: Any = None,
                 build_options: Any = None, engine_config: Any = None):
        from trtlm.runtime.executor import LocalExecutor
        from trtlm.runtime.loader import load_engine

        if (engine_dir is None) == (model_dir is None):
            raise UserError("give exactly one of engine_dir and model_dir")
        if model_dir is not None:
            from trtlm.cache import prepare_engine
            from trtlm.modeldir import check_model_path

            model_dir = check_model_path(model_dir, "model", "model_dir")
            engine_dir = prepare_engine(Path(model_dir), convert_options, build_options)
            tokenizer_dir = tokenizer_dir or model_dir
        loaded = load_engine(Path(engine_dir), device=device, tokenizer_dir=tokenizer_dir)
        use_graphs = getattr(engine_config, "use_cuda_graphs", None)
        self._attach(loaded, LocalExecutor(loaded.model, loaded.device, use_cuda_graphs=use_graphs), engine_config)

    def _attach(self, loaded, executor, engine_config) -> None:
        from trtlm.runtime.engine import Engine

        self.loaded = loaded
        self.engine_dir = loaded.engine_dir
        self.config: dict[str, Any] = loaded.config
        self.build_config: dict[str, Any] = loaded.build_config
        self.device = loaded.device
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.engine = Engine.for_loaded(loaded, executor, engine_config)
        self.last_generation: Generation | None = None

    def eos_ids(self) -> tuple[int, ...]:
        return self.engine.eos_ids

    # -- public -------------------------------------------------------------------------------------
    def generate(self, prompts: Sequence[str] | Sequence[Sequence[int]], max_new_tokens: int = 32,
                 temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
                 on_tokens: Callable[[int, list[int]], None] | None = None, keep_logits: bool = False,
                 sampling_params: Any = None,
                 on_output: Callable[[int, Any], None] | None = None) -> list[dict[str, Any]]:
        """Generate for each prompt (text, or token ids); greedy unless ``temperature > 0``.

        ``sampling_params``: one :class:`~trtlm.runtime.sampling.SamplingParams` for all prompts
        or one per prompt (then the keyword settings are ignored).  Streaming: ``on_output(i, out)``
        gets prompt ``i``'s :class:`~trtlm.runtime.outputs.RequestOutput` after every step that
        advanced it (``out.outputs[0].new_text`` is the new text); ``on_tokens(step, ids)`` is
        called after every engine step with each prompt's new token (``-1``: none this step).

        :return: one ``{"output_ids": [...], "text": str | None, "finish_reason": ...}`` per prompt
            (generated ids only; a stop token, when reached, is the last id; ``text`` for text
            prompts).  With ``n > 1`` the dict also has ``"outputs"``, one per completion.
        """
        from trtlm.runtime.sampling import SamplingParams

        prompts = list(prompts)
        if not prompts:
            raise UserError("no prompts given")
        if sampling_params is None:
            if max_new_tokens is None or max_new_tokens < 1:
                raise UserError(f"max_new_tokens={max_new_tokens!r}: must be >= 1")
            sampling_params = SamplingParams(max_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                                             top_p=top_p, seed=seed)
        per_prompt = list(sampling_params) if isinstance(sampling_params, (list, tuple)) else \
            [sampling_params] * len(prompts)
        return self._generate(prompts, per_prompt, keep_logits, on_tokens, on_output)

    def _generate(self, prompts, params, keep_logits, on_tokens, user_on_output=None) -> list[dict[str, Any]]:
        on_output = user_on_output
        if on_tokens is not None:
            step_box = {"step": -1, "ids": None}

            def flush():
                if step_box["ids"] is not None:
                    on_tokens(step_box["step"], step_box["ids"])
                    step_box["ids"] = None

            def on_output(i, out):
                if self.engine.steps != step_box["step"]:
                    flush()
                    step_box["step"] = self.engine.steps
                    step_box["ids"] = [-1] * len(prompts)
                new = out.outputs[0].new_token_ids
                if new:
                    step_box["ids"][i] = new[-1]
                if user_on_output is not None:
                    user_on_output(i, out)

        outs = self.engine.generate(prompts, params, keep_logits=keep_logits, on_output=on_output)
        if on_tokens is not None:
            flush()
        self.last_generation = _generation(outs, keep_logits)
        return [_as_dict(prompt, out) for prompt, out in zip(prompts, outs)]


def _as_dict(prompt, out) -> dict[str, Any]:
    texts = isinstance(prompt, str)
    first = out.outputs[0]
    d: dict[str, Any] = {"output_ids": first.token_ids, "text": first.text if texts else None,
                         "finish_reason": first.finish_reason}
    if len(out.outputs) > 1:
        d["outputs"] = [{"output_ids": c.token_ids, "text": c.text if texts else None,
                         "finish_reason": c.finish_reason} for c in out.outputs]
    if first.logprobs is not None:
        d["logprobs"] = first.logprobs
    return d


def _generation(outs, keep_logits: bool) -> Generation:
    gen = Generation([o.outputs[0].token_ids for o in outs], outputs=list(outs))
    if keep_logits:
        import torch

        gen.prompt_logits = [o.prompt_logits for o in outs]
        steps = max((len(o.step_logits) for o in outs), default=0)
        for i in range(steps):
            rows = [o.step_logits[i] if i < len(o.step_logits) else None for o in outs]
            like = next(r for r in rows if r is not None)
            gen.step_logits.append(torch.stack([r if r is not None else torch.full_like(like, float("nan"))
                                                for r in rows]))
    return gen


class DistributedLLM(LLM):
    """One rank of a multi-process (tensor / pipeline / expert parallel) engine.

    Every rank of the job constructs it (under ``torchrun``, or as a worker of
    ``trtlm run``'s launcher, so ``RANK``/``WORLD_SIZE`` are set) and loads only
    its own ``rank{r}.safetensors``.  Rank 0 owns the engine (scheduler,
    sampling); every step is broadcast and the other ranks execute their
    shard of it.  ``generate`` is collective: every rank calls it, the
    arguments of rank 0 are used (the others may pass anything), and every
    rank returns the same outputs.

    :param timeout_s: bound on every collective; a rank that stops answering
        makes the others fail after this long instead of hanging.
    """

    def __init__(self, engine_dir: str | Path, *, tokenizer_dir: str | Path | None = None, device: Any = "cpu",
                 timeout_s: float | None = None, env=None, engine_config: Any = None):
        from trtlm.mapping import Mapping
        from trtlm.runtime.distributed import DEFAULT_TIMEOUT_S, init_rank, rank_env
        from trtlm.runtime.executor import DistributedExecutor
        from trtlm.runtime.loader import load_engine_config, load_rank, resolve

        env = env or rank_env()
        if env is None:
            raise UserError("DistributedLLM runs as one rank of a job: start it with torchrun (RANK and "
                            "WORLD_SIZE unset here), or use `trtlm run`, which starts the ranks itself")
        config = load_engine_config(Path(engine_dir))["pretrained_config"]
        resolve(device)  # a misspelled or missing device is one line, before joining the job
        self.state = init_rank(Mapping.from_config(config), env, device,
                               DEFAULT_TIMEOUT_S if timeout_s is None else timeout_s)
        loaded = load_rank(Path(engine_dir), self.state, tokenizer_dir)
        self.state.ready()
        self._pool_box: dict = {}
        if self.rank == 0:
            self._attach(loaded, DistributedExecutor(loaded.model, self.state), engine_config)
            self.engine.executor.release(None)  # the followers have their KV pool now
        else:
            from trtlm.runtime.executor import follow

            self.loaded, self.engine_dir, self.config = loaded, loaded.engine_dir, loaded.config
            self.build_config, self.device, self.model = loaded.build_config, loaded.device, loaded.model
            self.tokenizer, self.engine, self.last_generation = loaded.tokenizer, None, None
            follow(self.model, self.state, self._pool_box)  # the engine's start-up (pool size)

    @property
    def rank(self) -> int:
        return self.state.rank

    def generate(self, prompts=None, max_new_tokens: int = 32, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, seed: int | None = None,
                 on_tokens: Callable[[int, list[int]], None] | None = None, keep_logits: bool = False,
                 sampling_params: Any = None, on_output: Callable[[int, Any], None] | None = None
                 ) -> list[dict[str, Any]]:
        """As :meth:`LLM.generate`; collective, rank 0's arguments count; the logits are kept on rank 0."""
        from trtlm.runtime.distributed import RemoteError
        from trtlm.runtime.executor import follow

        if self.rank != 0:
            kind, result = follow(self.model, self.state, self._pool_box)
            if kind == "stop":
                raise RemoteError("rank 0 stopped the job")
            if "error" in result:
                raise RemoteError(result["error"])
            self.last_generation = Generation([o["output_ids"] for o in result["outputs"]])
            return result["outputs"]
        try:
            outputs = super().generate(prompts, max_new_tokens, temperature, top_k, top_p, seed, on_tokens,
                                       keep_logits, sampling_params, on_output)
        except UserError as exc:
            self.engine.executor.release({"error": str(exc)})
            raise
        self.engine.executor.release({"outputs": outputs})
        return outputs

    def close(self) -> None:
        """Leave the process group (every rank closes)."""
        from trtlm.runtime.distributed import shutdown

        if self.rank == 0 and self.engine is not None:
            self.engine.executor.shutdown()
            self.engine = None
        elif self.rank != 0:
            from trtlm.runtime.executor import follow

            follow(self.model, self.state, self._pool_box)  # until rank 0 says stop
        shutdown()

    def __enter__(self) -> "DistributedLLM":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:  # after a failure the peers may be gone: leave without a collective
            self.close()
