"""The engine cache of ``trtlm run --model-dir`` / ``LLM(model_dir=...)``: where, what, how big.

A Hugging Face checkpoint given instead of an engine is converted and built once into
``$TRTLM_CACHE/engines/<key>/{checkpoint,engine}`` (default ``~/.cache/trtlm``), ``<key>`` hashing
the model directory's path and files, the options and trtlm's version; ``source.json`` next to
them records what it was built from.  ``trtlm cache list`` shows the entries and their size on
disk, ``trtlm cache clear`` removes them, ``trtlm run --no-cache`` builds into a temporary
directory instead.  Listing and clearing do not import torch.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from trtlm.errors import UserError
from trtlm.fsutil import looks_like_output


def cache_root() -> Path:
    """``$TRTLM_CACHE`` or ``~/.cache/trtlm``."""
    return Path(os.environ.get("TRTLM_CACHE") or Path.home() / ".cache" / "trtlm")


def engines_root() -> Path:
    return cache_root() / "engines"


@dataclass
class CacheEntry:
    key: str
    path: Path
    size_bytes: int
    model_dir: str | None  #: what it was converted from (None for entries older than source.json)
    family: str | None
    complete: bool  #: holds a built engine (an interrupted first run leaves only a checkpoint)
    last_used: float  #: engine config.json's access time, else the entry's modification time


def dir_size(path: Path) -> int:
    """Bytes on disk of the files below ``path`` (hard links counted once: a torch engine links the
    checkpoint's rank files)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                st = os.lstat(os.path.join(root, name))
            except OSError:
                continue
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            total += st.st_size
    return total


def _is_entry(path: Path) -> bool:
    """Only directories trtlm wrote are listed or removed, whatever $TRTLM_CACHE points at."""
    return path.is_dir() and not path.name.startswith(".") and any(
        (path / sub).is_dir() and looks_like_output(path / sub) for sub in ("engine", "checkpoint"))


def list_entries() -> list[CacheEntry]:
    root = engines_root()
    if not root.is_dir():
        return []
    entries = []
    for path in sorted(root.iterdir()):
        if not _is_entry(path):
            continue
        source: dict[str, Any] = {}
        try:
            source = json.loads((path / "source.json").read_text())
        except (OSError, json.JSONDecodeError):
            pass
        family = source.get("family")
        engine_cfg = path / "engine" / "config.json"
        if family is None and engine_cfg.is_file():
            try:
                family = json.loads(engine_cfg.read_text()).get("family")
            except (OSError, json.JSONDecodeError):
                family = None
        used = engine_cfg.stat().st_atime if engine_cfg.is_file() else path.stat().st_mtime
        entries.append(CacheEntry(path.name, path, dir_size(path), source.get("model_dir"), family,
                                  engine_cfg.is_file(), used))
    return entries


def remove_entry(entry: CacheEntry) -> None:
    """Remove one entry: renamed aside first, so a concurrent run never sees half of it."""
    aside = entry.path.with_name(f".{entry.key}.removing-{os.getpid()}")
    try:
        entry.path.rename(aside)
    except OSError as exc:
        raise UserError(f"{entry.path}: cannot remove ({exc.strerror})") from None
    shutil.rmtree(aside, ignore_errors=True)


def engine_cache_key(model_dir: Path, convert_options: Any, build_options: Any) -> str:
    """Changes when the checkpoint's files, the options or trtlm's version change.

    The files are the directory's own and, for a Megatron-Core checkpoint, every rank file of its
    ``iter_*/mp_rank_*`` directories (an iteration saved again in place changes them only)."""
    from trtlm import __version__

    h = hashlib.sha256()
    h.update(str(model_dir.resolve()).encode())
    files = [f for f in model_dir.iterdir() if f.is_file()] + list(model_dir.glob("iter_*/mp_rank_*/*.pt"))
    for f in sorted(files):
        st = f.stat()
        h.update(f"{f.relative_to(model_dir)}:{st.st_size}:{st.st_mtime_ns}".encode())
    opts = {k: str(v) for k, v in asdict(convert_options).items() if k not in ("workers", "progress", "force")}
    h.update(json.dumps([opts, asdict(build_options), __version__], sort_keys=True).encode())
    return h.hexdigest()[:16]


def prepare_engine(model_dir: Path, convert_options: Any = None, build_options: Any = None, *,
                   use_cache: bool = True, work_dir: Path | None = None,
                   log: Callable[[str], None] | None = None) -> Path:
    """The engine directory for the HF checkpoint ``model_dir``, converting and building it if needed.

    With ``use_cache`` the engine is kept under :func:`engines_root` and reused; without it, it is
    built below ``work_dir`` (a temporary directory the caller removes).  ``log`` is told when a
    conversion starts (it takes seconds to hours), and where the result goes.
    """
    from trtlm.build import BuildOptions, build
    from trtlm.convert.options import ConvertOptions
    from trtlm.convert.pipeline import convert
    from trtlm.modeldir import check_model_path

    model_dir = check_model_path(model_dir, "model", "--model-dir")
    convert_options = convert_options or ConvertOptions()
    build_options = build_options or BuildOptions()
    if use_cache:
        root = engines_root() / engine_cache_key(model_dir, convert_options, build_options)
    else:
        if work_dir is None:
            raise ValueError("prepare_engine(use_cache=False) needs a work_dir")
        root = Path(work_dir)
    engine = root / "engine"
    if use_cache and (engine / "config.json").exists():
        if log:
            log(f"using the cached engine {engine} for {model_dir}")
        return engine
    if log:
        where = f"the cache ({root}; `trtlm cache list` shows it, `trtlm cache clear` removes it)" if use_cache \
            else f"a temporary directory ({root}), removed afterwards"
        log(f"converting and building {model_dir} into {where}")
    t0 = time.perf_counter()
    ckpt = root / "checkpoint"
    result = convert(model_dir, ckpt, ConvertOptions(**{**asdict(convert_options), "force": True}))
    build(ckpt, engine, BuildOptions(**{**asdict(build_options), "force": True}))
    (root / "source.json").write_text(json.dumps(
        {"model_dir": str(model_dir.resolve()), "family": result.family, "created": time.time()}) + "\n")
    if log:
        log(f"built {engine} in {time.perf_counter() - t0:.1f} s")
    return engine


def human_size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"  # pragma: no cover
