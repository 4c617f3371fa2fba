"""Triton Python-backend model that serves a trtlm (torch) engine with continuous batching.

``trtlm triton-repo`` copies this file to ``REPO/<model>/1/model.py``.  It is
loaded by Triton's Python-backend stub, not imported by trtlm itself (it needs
``triton_python_backend_utils``, which only the stub provides).

One model instance holds one :class:`trtlm.runtime.engine.Engine`.  A
background thread owns it — the engine is single-threaded — and steps it
while requests are in flight: ``execute`` only parses requests and hands them
to the thread, so requests that arrive while others are generating join the
running batch at the next step (continuous batching inside one instance).
With a decoupled transaction policy (the default) each request gets its
responses through its response sender: one per step that produced text when
``stream`` is true, else one at the end.  Without it, ``execute`` waits for
its requests to finish and returns their responses.

Inputs and outputs are those of tensorrtllm_backend's ``ensemble`` model
(``text_input``, ``max_tokens``, ``bad_words``, ``stop_words``, ``end_id``,
``pad_id``, ``temperature``, ``top_k``, ``top_p``, ``min_tokens``, ``seed``,
``stream``, ``exclude_input_in_output``, ``return_log_probs`` ->
``text_output``, ``cum_log_probs``, ``output_log_probs``), with its
semantics: the prompt is echoed unless ``exclude_input_in_output`` (streamed
responses carry only new text, as TensorRT-LLM's do), ``stop_words`` and
``bad_words`` are lists of CSV strings, a stop word ends generation and stays
in the output, ``end_id`` replaces the model's end-of-sequence ids.
"""
from __future__ import annotations

import csv
import itertools
import json
import queue
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

#: Seconds between checks of whether Triton cancelled a request (client gone), and between metric updates.
CANCEL_CHECK_S = 0.1
METRICS_S = 0.1


class BadRequest(Exception):
    """A request this model refuses; the message goes back as Triton's error JSON."""


@dataclass
class Job:
    """One Triton request on its way through the engine."""

    request_id: str
    prompt: str
    params: Any
    stream: bool
    exclude_input: bool
    log_probs: bool
    sender: Any = None  # decoupled: the request's response sender
    done: threading.Event = field(default_factory=threading.Event)  # non-decoupled: set with ``response``
    response: Any = None
    sent_logprobs: int = 0


def _first(request, name: str):
    """First element of an optional input, or None when the request lacks it."""
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return None
    array = tensor.as_numpy()
    if array.size == 0:
        return None
    if array.size != 1 and name != "text_input":
        raise BadRequest(f"input {name!r}: expected one value, got shape {list(array.shape)}")
    return array.reshape(-1)[0]


def _text(value, name: str) -> str:
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            raise BadRequest(f"input {name!r} is not valid UTF-8") from None
    return str(value)


def _words(request, name: str) -> list[str]:
    """tensorrtllm_backend's word lists: each element a CSV string of words ("" = none)."""
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return []
    words: list[str] = []
    for item in tensor.as_numpy().reshape(-1):
        text = _text(item, name)
        if text:
            words += [w for row in csv.reader([text]) for w in row if w]
    return words


class TritonPythonModel:
    """The model Triton loads (``initialize`` / ``execute`` / ``finalize``)."""

    def initialize(self, args: dict[str, str]) -> None:
        import torch

        from trtlm.runtime.engine import Engine, EngineConfig

        config = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in (config.get("parameters") or {}).items()}
        model_dir = Path(args["model_repository"])

        def path(key: str) -> Path:
            p = Path(params[key])
            return p if p.is_absolute() else model_dir / p

        device = params.get("device") or "auto"
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device.startswith("cuda") and args.get("model_instance_kind") == "GPU":
            device = f"cuda:{args['model_instance_device_id']}"
        engine_config = EngineConfig(
            max_batch_size=int(config.get("max_batch_size") or 0) or None,
            kv_cache_free_gpu_mem_fraction=float(params.get("kv_cache_free_gpu_mem_fraction") or 0.9))
        self.engine = Engine.from_engine_dir(path("engine_dir"), device=device, tokenizer_dir=path("tokenizer_dir"),
                                             config=engine_config)
        if self.engine.tokenizer is None:
            raise RuntimeError(f"{path('tokenizer_dir')}: no tokenizer; text_input needs one")
        self.decoupled = pb_utils.using_decoupled_model_transaction_policy(config)
        self.exclude_input_default = params.get("exclude_input_in_output", "false").lower() == "true"
        self.name = args["model_name"]
        self._ids = itertools.count()
        self._inbox: queue.SimpleQueue[Job] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stopping = False
        self._jobs: dict[str, Job] = {}
        self._metrics = self._make_metrics(args)
        self._report()
        self._thread = threading.Thread(target=self._loop, name="trtlm-engine", daemon=True)
        self._thread.start()

    def _make_metrics(self, args: dict[str, str]) -> dict[str, Any]:
        """Gauges under tensorrtllm_backend's names and labels (``nv_trt_llm_request_metrics``,
        ``nv_trt_llm_kv_cache_block_metrics``), on Triton's ``/metrics``, fed from the engine's stats."""
        labels = {"model": args["model_name"], "version": args["model_version"]}
        requests = pb_utils.MetricFamily(name="nv_trt_llm_request_metrics", description="TRT LLM request metrics",
                                         kind=pb_utils.MetricFamily.GAUGE)
        blocks = pb_utils.MetricFamily(name="nv_trt_llm_kv_cache_block_metrics",
                                       description="TRT LLM KV cache block metrics", kind=pb_utils.MetricFamily.GAUGE)
        gauges = {f"request_{k}": requests.Metric(labels={**labels, "request_type": k})
                  for k in ("active", "max", "scheduled", "waiting")}
        gauges.update({f"kv_{k}": blocks.Metric(labels={**labels, "kv_cache_block_type": k})
                       for k in ("max", "free", "used", "tokens_per", "fraction")})
        self._metric_families = (requests, blocks)  # keep the families alive as long as their metrics
        return gauges

    def _report(self) -> None:
        stats = self.engine.stats()
        total, used = stats.kv_blocks_total, stats.kv_blocks_used
        block_size = getattr(stats, "block_size", None) or getattr(self.engine, "block_size", 0)
        values = {"request_active": len(self._jobs), "request_max": getattr(self.engine, "max_batch_size", 0),
                  "request_scheduled": stats.running, "request_waiting": stats.waiting, "kv_max": total,
                  "kv_free": total - used, "kv_used": used, "kv_tokens_per": block_size,
                  "kv_fraction": used / total if total else 0.0}
        for key, value in values.items():
            self._metrics[key].set(float(value))

    # -- requests -----------------------------------------------------------------------------------------
    def _job(self, request) -> Job:
        """Parse one Triton request into engine sampling settings (BadRequest when it cannot run)."""
        from trtlm.errors import UserError
        from trtlm.runtime.sampling import SamplingParams

        text_tensor = pb_utils.get_input_tensor_by_name(request, "text_input")
        if text_tensor.as_numpy().size != 1:
            raise BadRequest(f"input 'text_input': one prompt per request, got shape "
                             f"{list(text_tensor.as_numpy().shape)}")
        prompt = _text(_first(request, "text_input"), "text_input")

        def opt(name: str, kind, default):
            value = _first(request, name)
            return default if value is None else kind(value)

        stream = opt("stream", bool, False)
        if stream and not self.decoupled:
            raise BadRequest("stream=true needs a decoupled model: write the repository with --decoupled")
        end_id = opt("end_id", int, None)
        tokenizer = self.engine.tokenizer
        bad_words_ids = []
        for word in _words(request, "bad_words"):
            ids = tokenizer.encode(word)
            if tokenizer.add_bos and ids[:1] == [tokenizer.bos_id]:
                ids = ids[1:]  # words are encoded without special tokens, as tensorrtllm_backend does
            if ids:
                bad_words_ids.append(ids)
        seed = opt("seed", int, None)
        params = SamplingParams(
            max_tokens=int(_first(request, "max_tokens")), min_tokens=opt("min_tokens", int, 0),
            temperature=opt("temperature", float, 0.0), top_k=opt("top_k", int, 0), top_p=opt("top_p", float, 1.0),
            seed=seed, stop=list(_words(request, "stop_words")), bad_words_ids=bad_words_ids,
            stop_token_ids=[end_id] if end_id is not None else [], ignore_eos=end_id is not None,
            logprobs=0 if opt("return_log_probs", bool, False) else None)
        try:
            params.validate()
        except UserError as exc:
            raise BadRequest(str(exc)) from None
        return Job(f"{self.name}-{next(self._ids)}", prompt, params, stream,
                   opt("exclude_input_in_output", bool, self.exclude_input_default), params.logprobs is not None)

    def execute(self, requests: list) -> list | None:
        jobs: list[Job | None] = []
        responses: list = []
        for request in requests:
            try:
                job = self._job(request)
            except (BadRequest, ValueError, TypeError, OverflowError) as exc:
                error = pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc)))
                if self.decoupled:
                    request.get_response_sender().send(error, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
                jobs.append(None)
                responses.append(error)
                continue
            if self.decoupled:
                job.sender = request.get_response_sender()
            jobs.append(job)
            responses.append(None)
            self._inbox.put(job)
        self._wake.set()
        if self.decoupled:
            return None
        for i, job in enumerate(jobs):
            if job is not None:
                job.done.wait()
                responses[i] = job.response
        return responses

    # -- the engine thread ----------------------------------------------------------------------------------
    def _loop(self) -> None:
        last_check = last_report = 0.0
        while not self._stopping:
            if not self._jobs:
                self._wake.wait(0.5)
            self._wake.clear()
            self._admit()
            now = time.monotonic()
            if now - last_check > CANCEL_CHECK_S:
                self._drop_cancelled()
                last_check = now
            if now - last_report > METRICS_S or not self._jobs:
                self._report()
                last_report = now
            if not self._jobs:
                continue
            try:
                outputs = self.engine.step()
            except Exception as exc:  # noqa: BLE001 - every request in flight gets the error; the model lives on
                message = f"trtlm engine step failed: {type(exc).__name__}: {exc}"
                pb_utils.Logger.log_error(message + "\n" + traceback.format_exc())
                for rid in list(self._jobs):
                    self.engine.abort(rid)
                    self._fail(self._jobs.pop(rid), message)
                continue
            for out in outputs:
                self._emit(out)

    def _admit(self) -> None:
        from trtlm.errors import UserError

        while True:
            try:
                job = self._inbox.get_nowait()
            except queue.Empty:
                return
            try:
                self.engine.add_request(job.prompt, job.params, request_id=job.request_id)
            except UserError as exc:
                self._fail(job, str(exc))
                continue
            self._jobs[job.request_id] = job

    def _drop_cancelled(self) -> None:
        """Abort the requests whose client went away (Triton marks them cancelled): their KV blocks are freed."""
        for rid, job in list(self._jobs.items()):
            if job.sender is not None and job.sender.is_cancelled():
                self._abort(rid)
                self._send(job, None, pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def _abort(self, rid: str) -> None:
        self.engine.abort(rid)
        self._jobs.pop(rid, None)

    def _send(self, job: Job, response, flags: int) -> None:
        """Send on a decoupled request; a request Triton no longer takes responses for is aborted."""
        try:
            if response is None:
                job.sender.send(flags=flags)
            else:
                job.sender.send(response, flags=flags)
        except Exception as exc:  # noqa: BLE001 - e.g. the request was cancelled meanwhile
            pb_utils.Logger.log_warn(f"{job.request_id}: response not delivered ({exc}); request aborted")
            self._abort(job.request_id)

    def _fail(self, job: Job, message: str) -> None:
        response = pb_utils.InferenceResponse(error=pb_utils.TritonError(message))
        if job.sender is not None:
            self._send(job, response, pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        else:
            job.response = response
            job.done.set()

    def _emit(self, out) -> None:
        job = self._jobs.get(out.request_id)
        if job is None:
            return
        completion = out.outputs[0]
        stop_word = completion.stop_reason if (completion.finish_reason == "stop"
                                               and isinstance(completion.stop_reason, str)) else ""
        if out.finished:
            del self._jobs[out.request_id]
        if job.stream:
            text = completion.new_text + (stop_word if out.finished else "")
            new_logprobs = completion.logprobs[job.sent_logprobs:] if job.log_probs else []
            new_ids = completion.token_ids[job.sent_logprobs:] if job.log_probs else []
            if not text and not new_logprobs and not out.finished:
                return  # nothing printable yet (half a UTF-8 character held back)
            job.sent_logprobs = len(completion.token_ids)
            response = self._response(text, completion, new_ids, new_logprobs, job.log_probs)
            self._send(job, response, pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL if out.finished else 0)
            return
        if not out.finished:
            return
        text = ("" if job.exclude_input else job.prompt) + completion.text + stop_word
        response = self._response(text, completion, completion.token_ids, completion.logprobs or [], job.log_probs)
        if job.sender is not None:
            self._send(job, response, pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        else:
            job.response = response
            job.done.set()

    @staticmethod
    def _response(text: str, completion, token_ids: list[int], logprobs: list[dict[int, float]], log_probs: bool):
        tensors = [pb_utils.Tensor("text_output", np.array([[text.encode("utf-8")]], dtype=np.object_))]
        if log_probs:
            per_token = [lp[t] for t, lp in zip(token_ids, logprobs)]
            tensors.append(pb_utils.Tensor("cum_log_probs",
                                           np.array([[completion.cumulative_logprob or 0.0]], dtype=np.float32)))
            tensors.append(pb_utils.Tensor("output_log_probs", np.array([[per_token]], dtype=np.float32)))
        return pb_utils.InferenceResponse(output_tensors=tensors)

    def finalize(self) -> None:
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout=30)
        for rid, job in list(self._jobs.items()):
            self._fail(job, "the model is being unloaded")
        self._jobs.clear()
        close = getattr(self.engine, "close", None)  # frees the executor (GPU memory) before Triton unloads
        if close is not None:
            close()
