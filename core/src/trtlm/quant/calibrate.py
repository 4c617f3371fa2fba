"""Calibration: run the *unquantized* model in trtlm's own runtime and record activation statistics.

The tp=1 :class:`~trtlm.runtime.model.Transformer` is built from the conversion plan (the plan's
specs executed in memory) through the family's ``trtlm_build_network`` hook, and forward hooks on
its linears collect the statistics.  The runtime's module names *are* TensorRT-LLM's names, so
statistics are keyed by the plan's names (``transformer.layers.0.attention.qkv``).  Given the
same weights and the same token ids this reproduces modelopt's calibrated amaxes (tested on the
modelopt fixtures, within fp32 summation order).  Conversion runs it one layer at a time
(:mod:`trtlm.quant.layerwise`, the hooks and the AWQ search below are shared); the whole-model
pass here (:func:`dense_model`, :func:`collect`, :func:`awq_search`) is its reference.
NVIDIA Model Optimizer can calibrate instead (:mod:`trtlm.quant.modelopt_calib`).

Calibration data (``--calib-data``):

* a ``.txt`` file (one sample per non-empty line) or ``.jsonl`` (a ``"text"`` field per line),
  tokenised with the model directory's tokenizer;
* ``random:seed=0,batches=4,batch_size=2,seq_len=32``: uniform random token ids
  (``torch.Generator().manual_seed(seed)``, ``randint(0, vocab_size, (batch_size, seq_len))``
  per batch) — exactly modelopt's fixture calibration with those values;
* nothing: the bundled natural-language ``trtlm/data/calib/english.txt`` (English prose, a sample
  per line) when the model has a tokenizer (else the bundled tiny-mistral one) whose ids fit its
  vocabulary, else the random default above.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from trtlm.errors import UserError

_DATA = Path(__file__).resolve().parent.parent / "data"
#: the default calibration text: natural-language English prose (not source code), one sample a line
BUNDLED_CALIB = _DATA / "calib" / "english.txt"
#: the tokenizer used for the default text when the model directory has none
BUNDLED_TOKENIZER = _DATA / "tiny-mistral"

# ----------------------------------------------------------------------------- progress
#: "bar": a tqdm bar on stderr (a terminal); "lines": a line on stderr every LINE_EVERY_S seconds
#: and at the end (logs, CI); "off": nothing (--quiet).  "auto": bar on a terminal, else lines.
PROGRESS_MODES = ("auto", "bar", "lines", "off")
LINE_EVERY_S = 10.0


def progress_mode(options: Any) -> str:
    """The mode for a conversion's options: off with --quiet, else auto."""
    extra = getattr(options, "extra", None) or {}
    return "off" if extra.get("quiet") or getattr(options, "quiet", False) else "auto"


class Progress:
    """Batches done of one calibration pass, reported on stderr as ``mode`` says.

    Calibration is the slow part of a quantized conversion (seconds on a tiny model, hours on a
    large one), so each pass reports what it is doing, how far it is and how long it has taken.
    """

    def __init__(self, desc: str, total: int, mode: str = "auto", stream: Any = None) -> None:
        import sys
        import time

        if mode not in PROGRESS_MODES:
            raise ValueError(f"progress mode {mode!r}: one of {PROGRESS_MODES}")
        self.stream = stream if stream is not None else sys.stderr
        if mode == "auto":
            mode = "bar" if getattr(self.stream, "isatty", lambda: False)() else "lines"
        self.mode, self.desc, self.total, self.done = mode, desc, total, 0
        self._clock = time.monotonic
        self._t0 = self._last = self._clock()
        self._bar = None
        if mode == "bar":
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, unit="batch", file=self.stream, leave=True)
        elif mode == "lines":
            self._line(f"{desc}: {total} batch(es)")

    def _line(self, text: str) -> None:
        self.stream.write(text + "\n")
        self.stream.flush()

    def update(self, n: int = 1) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
        elif self.mode == "lines":
            now = self._clock()
            if now - self._last >= LINE_EVERY_S and self.done < self.total:
                self._last = now
                self._line(f"{self.desc}: {self.done}/{self.total} batches ({now - self._t0:.0f} s)")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self.mode == "lines":
            self._line(f"{self.desc}: {self.done}/{self.total} batches done in {self._clock() - self._t0:.1f} s")


def announce(text: str, mode: str = "auto") -> None:
    """One line on stderr unless ``mode`` is off (what calibration data is used, and why)."""
    if mode != "off":
        import sys

        sys.stderr.write(text + "\n")
        sys.stderr.flush()
RANDOM_DEFAULTS = {"seed": 0, "batches": 4, "batch_size": 2, "seq_len": 32}


@dataclass
class LinearStats:
    """Statistics of one linear's input (or one MoE layer's inputs)."""

    amax: torch.Tensor | None = None  #: per input channel |x| max [in], float32
    awq_sum: torch.Tensor | None = None  #: sum over forward calls of mean |x| per channel
    calls: int = 0
    proj_amax: torch.Tensor | None = None  #: MoE only: amax of the experts' proj inputs (routed tokens)

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().float().reshape(-1, x.shape[-1])
        a = x.abs().amax(0)
        self.amax = a if self.amax is None else torch.maximum(self.amax, a)
        m = x.abs().mean(0)
        self.awq_sum = m if self.awq_sum is None else self.awq_sum + m
        self.calls += 1

    @property
    def awq_act_scale(self) -> torch.Tensor:
        return self.awq_sum / self.calls


@dataclass
class CalibStats:
    linears: dict[str, LinearStats] = field(default_factory=dict)  #: by module name
    k_amax: dict[int, torch.Tensor] = field(default_factory=dict)  #: by global layer
    v_amax: dict[int, torch.Tensor] = field(default_factory=dict)
    awq: dict[str, list[torch.Tensor]] = field(default_factory=dict)  #: module -> per-part prequant


# ----------------------------------------------------------------------------- data

def parse_random(spec: str) -> dict[str, int]:
    out = dict(RANDOM_DEFAULTS)
    body = spec.split(":", 1)[1] if ":" in spec else ""
    for item in filter(None, body.split(",")):
        key, _, val = item.partition("=")
        if key.strip() not in out:
            raise UserError(f"--calib-data {spec}: unknown key {key!r} (keys: {', '.join(out)})")
        try:
            out[key.strip()] = int(val)
        except ValueError:
            raise UserError(f"--calib-data {spec}: {key} must be an integer") from None
    return out


def random_batches(vocab: int, seed: int, batches: int, batch_size: int, seq_len: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (batch_size, seq_len), generator=gen) for _ in range(batches)]


def read_texts(path: Path) -> list[str]:
    if not path.is_file():
        raise UserError(f"--calib-data {path}: no such file")
    lines = path.read_text(encoding="utf-8").splitlines()
    if path.suffix == ".jsonl":
        texts = []
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                texts.append(str(json.loads(line)["text"]))
            except (json.JSONDecodeError, KeyError, TypeError):
                raise UserError(f"{path}:{n}: expected a JSON object with a \"text\" field") from None
    else:
        texts = [line for line in lines if line.strip()]
    if not texts:
        raise UserError(f"--calib-data {path}: no text")
    return texts


def calibration_batches(calib_data: Path | str | None, vocab: int, tokenizer_dirs: Iterable[Path],
                        calib_size: int, max_seq_len: int, progress: str = "auto") -> tuple[list[torch.Tensor], str]:
    """Token-id batches ``[B, T]`` and a description of where they came from.

    Without ``calib_data`` the choice made is said on stderr (unless ``progress`` is off): the
    statistics, hence the quantized weights, depend on it."""
    batches, where = _calibration_batches(calib_data, vocab, tokenizer_dirs, calib_size, max_seq_len)
    if calib_data is None:
        announce(f"calibration: no --calib-data given, using {where}", progress)
    return batches, where


def _calibration_batches(calib_data: Path | str | None, vocab: int, tokenizer_dirs: Iterable[Path],
                         calib_size: int, max_seq_len: int) -> tuple[list[torch.Tensor], str]:
    spec = str(calib_data) if calib_data is not None else None
    if spec is not None and spec.startswith("random"):
        r = parse_random(spec)
        return random_batches(vocab, **r), f"random ids {r}"
    path = Path(spec) if spec else BUNDLED_CALIB
    tok = None
    from trtlm.runtime.tokenizer import load_tokenizer

    for d in tokenizer_dirs:
        if d is not None and Path(d).is_dir() and (Path(d) / "tokenizer.json").is_file():
            tok = load_tokenizer(Path(d))
            break
    if tok is None and spec is None and (BUNDLED_TOKENIZER / "tokenizer.json").is_file():
        tok = load_tokenizer(BUNDLED_TOKENIZER)
    if spec is None and (tok is None or not path.is_file()):
        return random_batches(vocab, **RANDOM_DEFAULTS), f"random ids {RANDOM_DEFAULTS} (no tokenizer/calib text)"
    if tok is None:
        raise UserError(f"--calib-data {path}: text needs a tokenizer (tokenizer.json) in the model directory; "
                        f"or use --calib-data random:seed=0,batches=4,batch_size=2,seq_len=32")
    batches = []
    for text in read_texts(path)[:calib_size]:
        ids = tok.encode(text)[:max_seq_len]
        if ids:
            batches.append(torch.tensor([ids]))
    if any(int(b.max()) >= vocab for b in batches):
        if spec is None:
            return random_batches(vocab, **RANDOM_DEFAULTS), f"random ids {RANDOM_DEFAULTS} (tokenizer exceeds vocab)"
        raise UserError(f"--calib-data {path}: the tokenizer produces ids >= the model's vocab_size {vocab}")
    return batches, f"{path} ({len(batches)} samples)"


# ----------------------------------------------------------------------------- model

def calib_config(plan_config: dict[str, Any], dtype: str = "float32") -> dict[str, Any]:
    """The plan's checkpoint config as the unquantized tp=1 model calibration runs, in ``dtype``."""
    from trtlm.config import CheckpointConfig, QuantConfig
    from trtlm.mapping import Mapping

    return CheckpointConfig.from_dict(plan_config, where="the plan's config").replace(
        dtype=dtype, quantization=QuantConfig(), mapping=Mapping()).to_dict()


def dense_model(plan, loaded, hooks, options, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The whole tp=1 model of ``plan``'s (unquantized) tensors in ``dtype`` on the CPU (the
    reference the layer-by-layer calibration is tested against; it needs the whole model's memory)."""
    from trtlm.convert.plan import build_full
    from trtlm.mapping import Mapping
    from trtlm.runtime.distributed import rank_network

    config = calib_config(plan.config, str(dtype).replace("torch.", ""))
    tensors = {}
    for spec in plan.tensors:
        srcs = [loaded.source.get(n) for n in spec.sources]
        tensors[spec.name] = build_full(spec.with_(dtype=spec.dtype or dtype), srcs, dtype)
    model = rank_network(hooks, config, Mapping(), 0, options, device="cpu", dtype=dtype)
    missing, _ = model.load_state_dict(tensors, strict=False)
    if missing:
        raise UserError(f"calibration model: tensor {missing[0]} missing from the plan")
    return model.eval()


def run_model(model, batches: list[torch.Tensor], per_batch: Callable[[Any], None] | None = None,
              progress: str = "off", desc: str = "calibration") -> None:
    bar = Progress(desc, len(batches), progress) if progress != "off" else None
    try:
        with torch.inference_mode():
            for ids in batches:
                from trtlm.runtime.executor import TeacherForcing

                runner = TeacherForcing(model, ids.shape[0], ids.shape[1], device="cpu")
                runner(ids)
                if per_batch:
                    per_batch(runner.pool)
                if bar:
                    bar.update()
    finally:
        if bar:
            bar.close()


def _moe_proj_amax(mlp, x: torch.Tensor) -> torch.Tensor:
    """amax of the experts' down-projection inputs over the tokens routed to each expert."""
    from trtlm.runtime.moe import route

    x = x.detach().float().reshape(-1, x.shape[-1])
    logits = torch.nn.functional.linear(x, mlp.router.weight.float())
    _scales, ids = route(logits, mlp.top_k, mlp.normalization_mode)
    fc = mlp.fc.weight.float()
    out = torch.zeros((), dtype=torch.float32)
    for e in range(fc.shape[0]):
        rows = (ids == e).any(-1)
        if rows.any():
            up, gate = (x[rows] @ fc[e].t()).chunk(2, dim=-1)
            out = torch.maximum(out, (torch.nn.functional.silu(gate) * up).abs().amax())
    return out


def add_stat_hooks(modules: dict[str, torch.nn.Module], names: Iterable[str], stats: CalibStats) -> list[Any]:
    """Forward hooks recording into ``stats`` the inputs of the linears ``names`` and of every MoE
    layer among ``modules`` (name -> module; the names are the statistics' keys, so a one-layer
    model renamed to global layer indices records under the same keys as the whole model).
    Returns the hook handles (remove them when done)."""
    handles = []
    for name in names:
        mod = modules.get(name)
        if mod is None:
            continue
        st = stats.linears.setdefault(name, LinearStats())

        def hook(_m, args, _out, st=st):
            st.add(args[0])
        handles.append(mod.register_forward_hook(hook))
    for name, mod in modules.items():  # MoE: the experts' inputs are the MoE layer's input
        if hasattr(mod, "router") and hasattr(mod, "top_k"):
            fc_st = stats.linears.setdefault(name + ".fc", LinearStats())
            pr_st = stats.linears.setdefault(name + ".proj", LinearStats())

            def moe_hook(m, args, _out, fc_st=fc_st, pr_st=pr_st):
                fc_st.add(args[0])
                a = _moe_proj_amax(m, args[0])
                pr_st.amax = a if pr_st.amax is None else torch.maximum(pr_st.amax, a)
            handles.append(mod.register_forward_hook(moe_hook))
    return handles


def add_kv_amax(stats: CalibStats, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
    """Fold one pass's K/V cache of global ``layer`` into the running amax."""
    ka, va = k.abs().amax().float().cpu(), v.abs().amax().float().cpu()
    stats.k_amax[layer] = torch.maximum(stats.k_amax.get(layer, ka), ka)
    stats.v_amax[layer] = torch.maximum(stats.v_amax.get(layer, va), va)


def collect(model, batches: list[torch.Tensor], names: Iterable[str], kv: bool, progress: str = "auto") -> CalibStats:
    """Input statistics of the modules ``names`` (and K/V amax per layer when ``kv``) over the
    whole model at once; the pass reports its progress on stderr as ``progress`` says
    (:class:`Progress`).  Conversion calibrates layer by layer (:mod:`trtlm.quant.layerwise`);
    this whole-model pass is the reference it is tested against."""
    stats = CalibStats()
    handles = add_stat_hooks(dict(model.named_modules()), names, stats)
    layers = list(model.layer_ids)

    def kv_stats(cache):
        for i, layer in enumerate(layers):
            add_kv_amax(stats, layer, cache.k[i], cache.v[i])
    try:
        run_model(model, batches, kv_stats if kv else None, progress, "calibration: activation statistics")
    finally:
        for h in handles:
            h.remove()
    return stats


AwqState = dict[str, list[tuple[torch.Tensor, dict, dict]]]


def awq_prepare(parts: dict[str, list[torch.Tensor]], stats: CalibStats, group_size: int,
                alpha_step: float = 0.1) -> AwqState:
    """The candidate scales of modelopt's awq_lite for every linear in ``parts`` (module -> its HF
    parts' weights, float32), from the first pass's act scale; losses start at zero.

    The fake-quantized weights of each alpha are *not* kept: 11 copies of every weight would be
    11x the layer's memory; the hooks recompute them per call (elementwise work, ~1/T of the
    matrix products of T calibration tokens)."""
    from trtlm.quant import formats as qf

    alphas = qf.awq_alphas(alpha_step)
    state: AwqState = {}
    for name, ws in parts.items():
        xs = stats.linears[name].awq_act_scale.to(ws[0].device)
        per = []
        for w in ws:
            wscale = qf.awq_weight_scale(w, group_size)
            scales = {a: qf.awq_scale_for_alpha(xs, wscale, a) for a in alphas}
            per.append((w, scales, {a: torch.zeros((), dtype=torch.float32, device=w.device) for a in alphas}))
        state[name] = per
    return state


def add_awq_hooks(modules: dict[str, torch.nn.Module], state: AwqState, group_size: int) -> list[Any]:
    """Hooks accumulating every alpha's loss online (no activations stored); arithmetic as
    :func:`trtlm.quant.formats.awq_lite_search`."""
    import torch.nn.functional as F

    from trtlm.quant import formats as qf

    handles = []
    for name, per in state.items():
        def hook(_m, args, _out, per=per):
            x = args[0].detach().float()
            for w, scales, loss in per:
                ref = F.linear(x, w)
                for a, s in scales.items():
                    fq = qf.fake_quant_int4(w * s.to(w.dtype), group_size)
                    out = F.linear(x * (1 / s).to(w.dtype), fq)
                    loss[a] += (out - ref).float().pow(2).mean()
                    del fq
        handles.append(modules[name].register_forward_hook(hook))
    return handles


def awq_finish(state: AwqState) -> dict[str, list[torch.Tensor]]:
    """module -> per-part pre-quant scales (1 / the best alpha's scale, float32, on the CPU)."""
    result = {}
    for name, per in state.items():
        pqs = []
        for _w, scales, loss in per:
            losses = {a: float(v) for a, v in loss.items()}
            best = min(losses, key=losses.get)
            pqs.append((1.0 / scales[best]).to(torch.float32).cpu())
        result[name] = pqs
    return result


def awq_search(model, batches: list[torch.Tensor], parts: dict[str, list[torch.Tensor]], stats: CalibStats,
               group_size: int, alpha_step: float = 0.1, progress: str = "auto") -> dict[str, list[torch.Tensor]]:
    """modelopt's awq_lite for every linear in ``parts`` (module -> its HF parts' fp32 weights)
    over the whole model: the second calibration pass, with the act scale of the first.
    Returns module -> per-part prequant scales."""
    state = awq_prepare(parts, stats, group_size, alpha_step)
    handles = add_awq_hooks(dict(model.named_modules()), state, group_size)
    try:
        run_model(model, batches, progress=progress, desc="calibration: AWQ scale search")
    finally:
        for h in handles:
            h.remove()
    return awq_finish(state)
