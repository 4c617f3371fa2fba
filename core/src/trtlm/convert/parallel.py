"""Running a conversion's per-tensor work on ``--workers`` threads with bounded memory."""
from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, TypeVar

T = TypeVar("T")


def for_each_bounded(fn: Callable[[T], object], items: Iterable[T], workers: int, total: int,
                     progress: bool = False, desc: str = "convert") -> None:
    """``fn(item)`` for every item, on ``workers`` threads, with at most ``2 * workers`` items in
    flight (so memory stays at a couple of tensors per worker); a tqdm bar on stderr when
    ``progress``.  The first exception raised by ``fn`` propagates."""
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, unit="tensor", desc=desc, file=sys.stderr)
    try:
        if workers <= 1:
            for item in items:
                fn(item)
                if bar:
                    bar.update()
            return
        with ThreadPoolExecutor(max_workers=workers) as pool:
            pending = []
            for item in items:
                pending.append(pool.submit(fn, item))
                if len(pending) >= 2 * workers:
                    pending.pop(0).result()
                    if bar:
                        bar.update()
            for f in pending:
                f.result()
                if bar:
                    bar.update()
    finally:
        if bar:
            bar.close()
