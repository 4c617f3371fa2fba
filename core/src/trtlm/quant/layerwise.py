"""Layer-by-layer calibration: peak memory is one decoder layer plus the calibration activations.

The whole-model calibration (:func:`trtlm.quant.calibrate.dense_model` + ``collect``) holds the
float32 model in memory: ~190 GB for Mixtral-8x7B.  Calibration does not need the whole model at
once, only each layer's input: this module builds the embedding, runs every calibration batch
through it and keeps the hidden states; then, for each decoder layer in turn, it materialises only
that layer's weights (from the plan's specs, read from the source file), runs the stored hidden
states through it with the same statistics hooks as the whole-model pass (renamed to the global
layer index, so the statistics' keys are the same), keeps the outputs as the next layer's inputs
and frees the layer.  ``int4-awq``'s second pass (the scale search) runs on the same layer and the
same inputs right after the first, so the layer is read once.

The layers are one-layer pipeline stages of the runtime's own :class:`~trtlm.runtime.model.
Transformer` (built through the family's ``trtlm_build_network`` hook, ``first``/``last`` False),
so RoPE, ALiBi, sliding windows and MoE routing are the runtime's.  The statistics equal the
whole-model pass's in the same dtype up to summation order (tests/test_calib_layerwise.py).

Device and dtype (``--calib-device``, ``--calib-dtype``): ``auto`` is the GPU when one is
visible, else the CPU, and the source checkpoint's own dtype (what modelopt calibrates in, since
it calibrates the model as loaded): float32 fixtures calibrate in float32, a bfloat16 model in
bfloat16.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from trtlm.errors import UserError
from trtlm.quant.calibrate import (
    CalibStats,
    Progress,
    add_awq_hooks,
    add_kv_amax,
    add_stat_hooks,
    awq_finish,
    awq_prepare,
    calib_config,
)

CALIB_DEVICES = ("auto", "cpu", "cuda")
CALIB_DTYPES = ("auto", "float32", "float16", "bfloat16")
_TORCH = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
BLOCK_SIZE = 16


def resolve_calib_device(name: str | None) -> torch.device:
    """``auto``: the first visible GPU, else the CPU; otherwise the named device, checked."""
    from trtlm.devices import resolve_device

    if name in (None, "auto"):
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    try:
        return resolve_device(name, "--calib-device")
    except UserError as e:
        raise UserError(str(e).replace("use --device cpu", "use --calib-device cpu (or auto)")) from None


def resolve_calib_dtype(name: str | None, hf_config: dict[str, Any] | None) -> torch.dtype:
    """``auto``: the source checkpoint's dtype (float32 when it says none or another one)."""
    from trtlm.hf_config import torch_dtype_name

    if name in (None, "auto"):
        name = torch_dtype_name(hf_config or {}) or "float32"
        return _TORCH.get(name, torch.float32)
    if name not in _TORCH:
        raise UserError(f"--calib-dtype {name!r}: choose one of {', '.join(CALIB_DTYPES)}")
    return _TORCH[name]


@dataclass
class _Step:
    """One calibration batch as a packed runtime step of fresh sequences (what
    :class:`~trtlm.runtime.executor.TeacherForcing` feeds the whole model)."""

    batch: Any  #: ForwardBatch
    blocks: int  #: KV blocks it uses


def _step(ids: torch.Tensor, device: torch.device) -> _Step:
    from trtlm.runtime.executor import StepInputs, to_batch
    from trtlm.runtime.kv_cache import blocks_for

    B, T = ids.shape
    per_seq = blocks_for(T, BLOCK_SIZE)
    tables = [list(range(b * per_seq, (b + 1) * per_seq)) for b in range(B)]
    positions = list(range(T)) * B
    slots = [tables[b][p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE for b in range(B) for p in range(T)]
    inputs = StepInputs(ids.reshape(-1).tolist(), positions, slots, [T] * B, [T] * B, tables, list(range(B * T)))
    return _Step(to_batch(inputs, device), B * per_seq)


class StageBuilder:
    """Builds one pipeline stage (the embedding, or one decoder layer) of the unquantized tp=1
    model with only that stage's weights, read from the source on demand."""

    def __init__(self, plan, loaded, hooks, options, dtype: torch.dtype, device: torch.device):
        from trtlm.config import CheckpointConfig

        self.plan, self.loaded, self.dtype, self.device = plan, loaded, dtype, device
        self.config = calib_config(plan.config, str(dtype).replace("torch.", ""))
        self.num_layers = CheckpointConfig.from_dict(self.config, where="the plan's config").num_hidden_layers
        self.factory = hooks.trtlm_build_network(config=self.config, backend="torch", options=options)
        self.by_layer: dict[int | None, list] = {}
        for spec in plan.tensors:
            self.by_layer.setdefault(spec.layer, []).append(spec)

    def build(self, layer: int | None) -> torch.nn.Module:
        """The embedding stage (``layer`` None) or decoder ``layer`` alone, weights loaded."""
        from trtlm.convert.plan import build_full, local_name
        from trtlm.mapping import Mapping
        from trtlm.runtime.distributed import ShapeComm

        layers = range(0, 0) if layer is None else range(layer, layer + 1)
        model = self.factory(comm=ShapeComm(1, 0), mapping=Mapping(), layers=layers, first=layer is None, last=False,
                             device=self.device, dtype=self.dtype)
        if layer is None:  # the global tensors this stage holds (the embedding; not ln_f / lm_head)
            wanted = set(model.state_dict())
            specs = [s for s in self.by_layer.get(None, []) if s.name in wanted]
        else:
            specs = self.by_layer.get(layer, [])
        tensors = {}
        for spec in specs:
            srcs = [self.loaded.source.get(n) for n in spec.sources]
            t = build_full(spec.with_(dtype=spec.dtype or self.dtype), srcs, self.dtype)
            name = spec.name if layer is None else local_name(spec.name, 0)
            tensors[name] = t.to(self.device)
        missing, _ = model.load_state_dict(tensors, strict=False)
        if missing:
            where = "the embedding" if layer is None else f"layer {layer}"
            raise UserError(f"calibration model: tensor {missing[0]} of {where} missing from the plan")
        return model.eval()


def _global(layer: int) -> Callable[[str], str]:
    prefix = "transformer.layers.0."
    return lambda n: (f"transformer.layers.{layer}." + n[len(prefix):]) if n.startswith(prefix) else n


def calibrate_layerwise(plan, loaded, hooks, options, batches: Sequence[torch.Tensor], names: Sequence[str], *,
                        kv: bool, awq_rows: dict[str, list[int]] | None = None, group_size: int = 128,
                        dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                        progress: str = "off", on_layer: Callable[[int, torch.nn.Module], None] | None = None,
                        ) -> tuple[CalibStats, dict[str, list[torch.Tensor]] | None]:
    """Activation statistics of the linears ``names`` (global TensorRT-LLM module names), the
    MoE layers and, with ``kv``, each layer's K/V amax; with ``awq_rows`` (module -> the row
    sizes of its HF parts) also awq_lite's pre-quant scales.  One layer at a time (module doc).

    :param on_layer: called with (layer, stage module) while a layer is alive (tests measure
        what is held at once).
    :returns: ``(stats, awq)`` -- ``awq`` is None without ``awq_rows``.
    """
    device = torch.device(device)
    builder = StageBuilder(plan, loaded, hooks, options, dtype, device)
    stats = CalibStats()
    awq: dict[str, list[torch.Tensor]] | None = {} if awq_rows else None
    steps = [_step(ids, device) for ids in batches]
    passes = 2 if awq_rows else 1
    bar = Progress("calibration: activation statistics", builder.num_layers * len(steps) * passes,
                   progress) if progress != "off" else None
    try:
        with torch.inference_mode():
            embed = builder.build(None)
            hidden = [embed(s.batch.tokens, s.batch, None) for s in steps]
            del embed
            for layer in range(builder.num_layers):
                hidden = _one_layer(builder, layer, steps, hidden, names, stats, kv, awq_rows, awq, group_size,
                                    bar, on_layer)
    finally:
        if bar:
            bar.close()
    return stats_to_cpu(stats), awq


def stats_to_cpu(stats: CalibStats) -> CalibStats:
    """The statistics moved to the CPU in float32 (the plan's math runs there)."""
    for st in stats.linears.values():
        for attr in ("amax", "awq_sum", "proj_amax"):
            t = getattr(st, attr)
            if t is not None:
                setattr(st, attr, t.float().cpu())
    return stats


def _one_layer(builder: StageBuilder, layer: int, steps: list[_Step], hidden: list[torch.Tensor],
               names: Sequence[str], stats: CalibStats, kv: bool, awq_rows, awq, group_size: int, bar,
               on_layer) -> list[torch.Tensor]:
    """Run ``hidden`` through decoder ``layer`` (built, hooked, freed here); its outputs."""
    from trtlm.runtime.kv_cache import KVPool

    stage = builder.build(layer)
    if on_layer:
        on_layer(layer, stage)
    to_global = _global(layer)
    modules = {to_global(n): m for n, m in stage.named_modules()}
    spec = stage.kv_cache_spec()
    pool = KVPool(1, max(s.blocks for s in steps), BLOCK_SIZE, spec["kv_heads"], spec["head_size"], spec["dtype"],
                  builder.device, spec["kv_dtype"])
    handles = add_stat_hooks(modules, names, stats)
    outs = []
    try:
        for s, h in zip(steps, hidden, strict=True):
            pool.k[0].zero_()
            pool.v[0].zero_()
            outs.append(stage(h, s.batch, pool))
            if kv:
                add_kv_amax(stats, layer, pool.k[0], pool.v[0])
            if bar:
                bar.update()
    finally:
        for hd in handles:
            hd.remove()
    mine = {m: rows for m, rows in (awq_rows or {}).items() if m in modules}
    if mine:
        parts = {}
        for m, rows in mine.items():
            w = modules[m].weight.detach().float()
            parts[m] = list(w.split(rows, dim=0)) if len(rows) > 1 else [w]
        state = awq_prepare(parts, stats, group_size)
        handles = add_awq_hooks(modules, state, group_size)
        try:
            for s, h in zip(steps, hidden, strict=True):
                stage(h, s.batch, pool)
                if bar:
                    bar.update()
        finally:
            for hd in handles:
                hd.remove()
        awq.update(awq_finish(state))
    elif awq_rows and bar:
        bar.update(len(steps))
    del stage, pool
    return outs
