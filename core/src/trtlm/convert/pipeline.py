"""The conversion driver: load -> map -> quantize -> shard -> write, through the hooks."""
from __future__ import annotations

import bisect
import json
import math
import shutil
import sys
import threading
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from trtlm.convert.mapping import Mapping
from trtlm.convert.options import DTYPES, ConvertOptions
from trtlm.convert.plan import (ConversionPlan, RankPlan, TensorSpec, build_full, concat_rows, rank_part,
                                take_first)
from trtlm.convert.writer import RankFileWriter
from trtlm.errors import UserError
from trtlm.fsutil import atomic_dir
from trtlm.hf_config import torch_dtype_name
from trtlm.modeldir import detect_format, read_json  # noqa: F401  (re-exported)
from trtlm.plugins import FamilyEntry, FamilyHooks, get_registry
from trtlm.sources import DummySource
from trtlm.weights import LoadedModel

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class ConvertResult:
    output_dir: Path
    family: str
    config: dict[str, Any]
    num_tensors: int
    bytes_written: int


def resolve_model(model_dir: Path | None, family: str | None) -> tuple[FamilyEntry, str]:
    """The family handling ``model_dir`` (or named ``family``) and the directory format."""
    registry = get_registry()
    if model_dir is None:
        if family is None:
            raise UserError("give --model-dir, or --family with --preset and --dummy-weights")
        return registry.family(family), "preset"
    fmt = detect_format(model_dir)
    if fmt == "hf":
        entry = registry.resolve_hf(read_json(model_dir / "config.json"), where=str(model_dir / "config.json"))
    elif fmt == "ft":
        readers = registry.families_reading("ft")
        if family:
            readers = [e for e in readers if e.family.name == family]
        if len(readers) != 1:
            names = ", ".join(e.family.name for e in readers) or "none installed"
            raise UserError(f"{model_dir}: FasterTransformer directory; families reading FT: {names} "
                            f"(pass --family, or pip install trtlm-plugin-mpt)")
        entry = readers[0]
    else:
        raise UserError(f"{model_dir}: is a {fmt} directory, not a model checkpoint to convert")
    if family and entry.family.name != family:
        raise UserError(f"{model_dir}: is a {entry.family.name} model, not --family {family}")
    return entry, fmt


def resolve_dtype(options: ConvertOptions, hf_config: dict[str, Any], entry: FamilyEntry) -> str:
    if options.dtype not in DTYPES:
        raise UserError(f"--dtype {options.dtype!r} is not one of {', '.join(DTYPES)}")
    name = options.dtype
    if name == "auto":
        name = torch_dtype_name(hf_config) or "float32"
        if name not in TORCH_DTYPES:
            name = "float32"
    if name not in entry.family.capabilities.dtypes:
        raise UserError(f"--dtype {name} is not supported by family {entry.family.name} "
                        f"(supported: {', '.join(entry.family.capabilities.dtypes)})")
    return name


def check_capabilities(entry: FamilyEntry, options: ConvertOptions) -> None:
    caps = entry.family.capabilities
    if options.pp_size > 1 and "pp" not in caps.parallel:
        raise UserError(f"family {entry.family.name} does not support --pp-size")
    if options.tp_size > 1 and "tp" not in caps.parallel:
        raise UserError(f"family {entry.family.name} does not support --tp-size")
    if (options.moe_ep_size or 1) > 1 and "ep" not in caps.parallel:
        raise UserError(f"family {entry.family.name} has no experts: --moe-ep-size does not apply")
    if options.quant and options.quant not in caps.quantization:
        raise UserError(f"--quant {options.quant} is not supported by family {entry.family.name} "
                        f"(supported: {', '.join(caps.quantization) or 'none'})")
    if options.kv_cache_dtype and options.kv_cache_dtype not in caps.kv_cache_quantization:
        raise UserError(f"--kv-cache-dtype {options.kv_cache_dtype} is not supported by family {entry.family.name}")
    if options.to not in caps.formats_out:
        raise UserError(f"--to {options.to} is not supported by family {entry.family.name} "
                        f"(supported: {', '.join(caps.formats_out)})")


def load(hooks: FamilyHooks, model_dir: Path | None, preset: str | None, options: ConvertOptions) -> LoadedModel:
    if model_dir is None:
        presets = hooks.family.presets
        if preset not in presets:
            raise UserError(f"--preset {preset!r} is not a preset of family {hooks.family.name} "
                            f"(presets: {', '.join(sorted(presets)) or 'none'})")
        if not options.dummy_weights:
            raise UserError("--preset builds a model from a config only: add --dummy-weights")
        return LoadedModel(dict(presets[preset]), DummySource({}), origin=f"{hooks.family.name}:{preset}:dummy")
    loaded = hooks.trtlm_load_weights(model_dir=model_dir, options=options)
    if loaded is None:
        raise UserError(f"{model_dir}: no plugin could load it")
    return loaded


def validate_sources(plan: ConversionPlan, loaded: LoadedModel) -> None:
    """Every tensor the plan needs is present with the shape config.json implies."""
    have = set(loaded.source.keys())
    for name, shape in plan.source_shapes().items():
        if name not in have:
            raise UserError(f"{loaded.origin}: tensor {name} is missing (needed for config.json's model)")
        actual = tuple(loaded.source.shape(name))
        if actual != tuple(shape):
            raise UserError(f"{loaded.origin}: tensor {name} has shape {list(actual)} but config.json "
                            f"implies {list(shape)}; the config and the weights do not match")


def all_finite(t: torch.Tensor) -> bool:
    """No NaN or Inf in a floating-point tensor.

    One reduction pass, no temporary: ``aminmax`` propagates NaN and shows
    +-Inf (``isfinite(t).all()`` allocates a bool tensor of the same size and
    was 30x slower on a 130 MB bf16 embedding).
    """
    if not t.is_floating_point() or t.numel() == 0:
        return True
    if t.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        return bool(torch.isfinite(t.float()).all())  # float8: no aminmax kernel
    lo, hi = torch.aminmax(t)
    return bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))


class _SourceCache:
    """Loaded source tensors shared by specs built from the same sources
    (a quantized weight and its scales), dropped once the last user is done."""

    def __init__(self, loaded: LoadedModel, specs: list[TensorSpec], check_finite: bool) -> None:
        self._loaded = loaded
        self._check = check_finite
        self._users: dict[tuple[str, ...], int] = defaultdict(int)
        for s in specs:
            self._users[s.sources] += 1
        self._cache: dict[tuple[str, ...], list[torch.Tensor]] = {}
        self._lock = threading.Lock()
        self._key_locks: dict[tuple[str, ...], threading.Lock] = defaultdict(threading.Lock)

    def acquire(self, key: tuple[str, ...]) -> list[torch.Tensor]:
        with self._lock:
            klock = self._key_locks[key]
        with klock:
            with self._lock:
                if key in self._cache:
                    return self._cache[key]
            tensors = []
            for name in key:
                t = self._loaded.source.get(name)
                if self._check and not all_finite(t):
                    raise UserError(f"{self._loaded.origin}: tensor {name} contains NaN or Inf values")
                tensors.append(t)
            with self._lock:
                if self._users[key] > 1:
                    self._cache[key] = tensors
            return tensors

    def release(self, key: tuple[str, ...]) -> None:
        with self._lock:
            self._users[key] -= 1
            if self._users[key] <= 0:
                self._cache.pop(key, None)


def _selects_rows(rule: Any) -> bool:
    """Split rules whose parts are whole rows of the full tensor (other dims untouched)."""
    from trtlm.layout import QKVSplit, Replicate, Split

    return isinstance(rule, (Replicate, QKVSplit)) or (isinstance(rule, Split) and rule.dim == 0)


def direct_copies(spec: TensorSpec, targets: list[tuple[RankFileWriter, RankPlan, Any]], source: Any,
                  mapping: Mapping, dtype: torch.dtype) -> list[list[tuple[int | None, int, int]]] | None:
    """Each rank part of ``spec`` as byte ranges of the source files, when converting changes no byte.

    That holds for most of a same-dtype conversion: a tensor taken as is or
    row-concatenated (fused qkv), split into blocks of rows (column-parallel
    weights, vocabulary rows, q/k/v heads with KV repetition) or replicated,
    with zero rows for vocabulary padding.  The rows a rank takes are found by
    applying the tensor's own split rule to a column of row numbers, so no
    layout knowledge is repeated here.  Returns ``None`` (build the tensor
    instead) for anything else: a dtype cast, a transform or finalize step
    (quantization), a split of another dimension, or a source that is not in files.
    """
    locate = getattr(source, "locate", None)
    if locate is None or spec.transform is not None or spec.finalize is not None:
        return None
    if spec.combine is take_first:
        names = spec.sources[:1]
    elif spec.combine is concat_rows:
        names = spec.sources
    else:
        return None
    target = spec.dtype or dtype
    shapes = [tuple(source.shape(n)) for n in names]
    if (any(source.dtype(n) != target for n in names) or any(len(s) == 0 for s in shapes)
            or len({s[1:] for s in shapes}) != 1):
        return None
    row_bytes = math.prod(shapes[0][1:]) * target.itemsize
    starts = [0]
    for shape in shapes:
        starts.append(starts[-1] + shape[0])
    numbers = torch.arange(1, starts[-1] + 1).view(-1, 1)  # 0 marks a padding row
    inner_starts = torch.tensor(starts[1:-1], dtype=torch.long)
    located = [locate(n) for n in names]
    result = []
    for writer, rp, rt in targets:
        if not _selects_rows(rt.split):
            return None
        try:
            rows = rt.split.take(numbers, mapping, rp.tp_rank)[:, 0]
        except ValueError:
            return None
        if writer.planned(rt.name) != ((rows.numel(),) + shapes[0][1:], target):
            return None
        segments = []
        for first, count in _runs(rows, inner_starts):
            if first == 0:
                segments.append((None, 0, count * row_bytes))
            else:
                src = bisect.bisect_right(starts, first - 1) - 1
                fd, offset = located[src]
                segments.append((fd, offset + (first - 1 - starts[src]) * row_bytes, count * row_bytes))
        result.append(segments)
    return result


def _runs(numbers: torch.Tensor, boundaries: torch.Tensor) -> list[tuple[int, int]]:
    """``(first number, count)`` of each run of consecutive row numbers (1-based; runs of
    0 are padding), broken where a new source tensor starts (0-based rows in ``boundaries``)."""
    if numbers.numel() == 0:
        return []
    prev, nxt = numbers[:-1], numbers[1:]
    joined = ((nxt == prev + 1) & (prev != 0) & ~torch.isin(nxt - 1, boundaries)) | ((nxt == 0) & (prev == 0))
    heads = torch.cat([torch.zeros(1, dtype=torch.long), torch.nonzero(~joined).flatten() + 1])
    counts = torch.diff(heads, append=torch.tensor([numbers.numel()]))
    return list(zip(numbers[heads].tolist(), counts.tolist()))


def final_config(plan: ConversionPlan, mapping: Mapping, dtype: str) -> dict[str, Any]:
    config = dict(plan.config)
    config["dtype"] = dtype
    config["mapping"] = mapping.to_config(moe=bool(config.get("moe")))
    return config


def write_checkpoint(plan: ConversionPlan, rank_plans: list[RankPlan], mapping: Mapping, loaded: LoadedModel,
                     dtype: str, out: Path, workers: int = 1, progress: bool = False) -> tuple[int, int]:
    """Execute rank plans into ``out`` (an empty directory). Returns (tensors, bytes)."""
    tdtype = TORCH_DTYPES[dtype]
    by_spec: dict[str, list[tuple[RankFileWriter, RankPlan, Any]]] = defaultdict(list)
    writers = []
    meta_full: dict[str, torch.Tensor] = {}
    for spec in plan.tensors:
        metas = [torch.empty(s, dtype=loaded.source.dtype(n), device="meta") for n, s in zip(spec.sources, spec.shapes)]
        meta_full[spec.name] = build_full(spec, metas, tdtype)
    total = 0
    for rp in rank_plans:
        layout = {}
        for rt in rp.tensors:
            part = rank_part(rt, meta_full[rt.spec.name], mapping, rp.tp_rank)
            layout[rt.name] = (tuple(part.shape), part.dtype)
            total += part.numel() * part.dtype.itemsize
        writer = RankFileWriter(out / f"rank{rp.rank}.safetensors", layout, metadata={"format": "pt"})
        writers.append(writer)
        for rt in rp.tensors:
            by_spec[rt.spec.name].append((writer, rp, rt))
    specs = [s for s in plan.tensors if s.name in by_spec]
    cache = _SourceCache(loaded, specs, check_finite=True)

    def convert_one(spec: TensorSpec) -> None:
        copies = direct_copies(spec, by_spec[spec.name], loaded.source, mapping, tdtype)
        sources = cache.acquire(spec.sources)  # also the NaN/Inf check
        try:
            if copies is not None:  # bytes unchanged: copy file ranges, no tensor is built
                for (writer, _rp, rt), segments in zip(by_spec[spec.name], copies):
                    writer.copy(rt.name, segments)
                return
            full = build_full(spec, sources, tdtype)
        finally:
            cache.release(spec.sources)
        for writer, rp, rt in by_spec[spec.name]:
            writer.write(rt.name, rank_part(rt, full, mapping, rp.tp_rank))

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(specs), unit="tensor", desc="convert", file=sys.stderr)
    # Writing is memory-bound copying: parallelism is per tensor (--workers), and torch's
    # intra-op threads only contend with them (measured on 2 shared cores: the bf16 tp2
    # benchmark ran 1.6x faster with one intra-op thread).
    intra_op_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        if workers <= 1:
            for spec in specs:
                convert_one(spec)
                if bar:
                    bar.update()
        else:
            with ThreadPoolExecutor(max_workers=workers) as pool:
                # Bounded in-flight work keeps memory at ~2 tensors per worker.
                pending = []
                for spec in specs:
                    pending.append(pool.submit(convert_one, spec))
                    if len(pending) >= 2 * workers:
                        pending.pop(0).result()
                        if bar:
                            bar.update()
                for f in pending:
                    f.result()
                    if bar:
                        bar.update()
        for w in writers:
            w.close()
    finally:
        torch.set_num_threads(intra_op_threads)
        for w in writers:
            w.discard()
        if bar:
            bar.close()
    return sum(len(rp.tensors) for rp in rank_plans), total


def copy_tokenizer(model_dir: Path | None, out: Path) -> None:
    """Carry the tokenizer files along (TensorRT-LLM ignores extra files), so an
    engine built from this checkpoint can decode text without --tokenizer-dir."""
    from trtlm.runtime.tokenizer import tokenizer_files

    if model_dir is None:
        return
    for path in tokenizer_files(model_dir):
        shutil.copy2(path, out / path.name)


def convert(model_dir: Path | None, output_dir: Path, options: ConvertOptions,
            family: str | None = None, preset: str | None = None) -> ConvertResult:
    """Convert a model into a TensorRT-LLM checkpoint (or another ``options.to`` format)."""
    entry, _fmt = resolve_model(model_dir, family)
    check_capabilities(entry, options)
    registry = get_registry()
    hooks = registry.hooks(entry)
    loaded = load(hooks, model_dir, preset, options)
    if options.to != "trtllm":
        with atomic_dir(output_dir, options.force) as tmp:
            written = hooks.trtlm_export(fmt=options.to, loaded=loaded, options=options, output_dir=tmp)
            if written is None:
                raise UserError(f"no plugin writes --to {options.to} for family {entry.family.name}")
        return ConvertResult(output_dir, entry.family.name, {}, 0, 0)
    dtype = resolve_dtype(options, loaded.hf_config, entry)
    plan = hooks.trtlm_map_layers(hf_config=loaded.hf_config, options=options)
    if options.dummy_weights:
        loaded.source = DummySource(plan.source_shapes(), seed=options.seed)
    validate_sources(plan, loaded)
    plan = hooks.trtlm_quantize(plan=plan, loaded=loaded, options=options) or plan
    mapping = Mapping(options.tp_size, options.pp_size, options.moe_tp_size or 0, options.moe_ep_size or 0)
    rank_plans = hooks.trtlm_shard(plan=plan, mapping=mapping)
    config = final_config(plan, mapping, dtype)
    with atomic_dir(output_dir, options.force) as tmp:
        n, nbytes = write_checkpoint(plan, rank_plans, mapping, loaded, dtype, tmp, options.workers, options.progress)
        (tmp / "config.json").write_text(json.dumps(config, indent=4) + "\n")
        copy_tokenizer(model_dir, tmp)
    return ConvertResult(output_dir, entry.family.name, config, n, nbytes)
