"""Where a Megatron checkpoint keeps its rank files, and checking them against its ``args``.

Megatron-LM (``megatron/training/checkpointing.py``: ``get_checkpoint_name``,
``get_checkpoint_tracker_filename``) lays a ``--ckpt-format torch``
checkpoint out as::

    latest_checkpointed_iteration.txt          # "1", or "release"
    iter_0000001/                              # iter_{iteration:07d}, or release/
        mp_rank_{tp:02d}[_{pp:03d}][_{ep:03d}]/model_optim_rng.pt

with the ``_{pp:03d}`` part only when pipeline parallel size > 1 and the
``_{ep:03d}`` part only when expert parallel size > 1.  Each file holds
``{'args': Namespace, 'checkpoint_version': 3.0, 'iteration': N, 'model':
state_dict, ...}``.  No torch import here: detection runs in ``trtlm inspect``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trtlm.errors import UserError

TRACKER = "latest_checkpointed_iteration.txt"
RANK_FILE = "model_optim_rng.pt"
_RANK_DIR = re.compile(r"^mp_rank_\d{2}(_\d{3}){0,2}$")


def rank_dir_name(tp_rank: int, pp_rank: int, ep_rank: int, pp: int, ep: int) -> str:
    """Megatron's ``get_checkpoint_name`` directory for one rank."""
    name = f"mp_rank_{tp_rank:02d}"
    if pp > 1:
        name += f"_{pp_rank:03d}"
    if ep > 1:
        name += f"_{ep_rank:03d}"
    return name


def iteration_dir_name(iteration: int | str) -> str:
    return "release" if iteration == "release" else f"iter_{int(iteration):07d}"


def _rank_dirs(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir() if p.is_dir() and _RANK_DIR.match(p.name))


def is_mcore_dir(path: Path) -> bool:
    """A Megatron checkpoint root (tracker file, or an ``iter_*``/``release`` directory of ranks or a
    distributed checkpoint), or one iteration directory itself."""
    if (path / TRACKER).is_file():
        return True
    if _rank_dirs(path):
        return True
    return any(p.is_dir() and (p.name == "release" or p.name.startswith("iter_")) and
               (_rank_dirs(p) or is_torch_dist(p)) for p in path.iterdir())


def is_torch_dist(path: Path) -> bool:
    """Megatron's ``--ckpt-format torch_dist`` (PyTorch distributed checkpoint) iteration directory."""
    return (path / ".metadata").is_file() or any(path.glob("*.distcp"))


@dataclass
class RankFiles:
    """The rank files of one iteration of a Megatron checkpoint."""

    root: Path
    iter_dir: Path
    dirs: list[str] = field(default_factory=list)

    def path(self, name: str) -> Path:
        return self.iter_dir / name / RANK_FILE


def find_iteration(root: Path) -> RankFiles:
    """The iteration the tracker file names (or the only one there is), with its rank directories."""
    root = Path(root)
    if _rank_dirs(root):  # given the iteration directory itself
        return RankFiles(root.parent, root, _rank_dirs(root))
    tracker = root / TRACKER
    if tracker.is_file():
        text = tracker.read_text().strip()
        if text != "release" and not text.isdigit():
            raise UserError(f"{tracker}: holds {text[:40]!r}, not an iteration number or 'release'")
        iter_dir = root / iteration_dir_name(text if text == "release" else int(text))
        if not iter_dir.is_dir():
            raise UserError(f"{tracker}: names iteration {text} but {iter_dir.name}/ is missing")
    else:
        iters = sorted(p for p in root.iterdir() if p.is_dir() and (p.name == "release" or p.name.startswith("iter_")))
        if len(iters) != 1:
            raise UserError(f"{root}: no {TRACKER} and {len(iters)} iteration directories; "
                            f"pass the one to convert (e.g. --model-dir {root}/{iters[-1].name if iters else 'iter_0000001'})")
        iter_dir = iters[0]
    if is_torch_dist(iter_dir):
        raise UserError(f"{iter_dir}: a torch_dist (distributed) checkpoint; trtlm reads --ckpt-format torch: "
                        f"re-save it with Megatron-LM (load it with --ckpt-format torch_dist and "
                        f"--ckpt-convert-format torch --ckpt-convert-save DIR)")
    dirs = _rank_dirs(iter_dir)
    if not dirs:
        raise UserError(f"{iter_dir}: no mp_rank_* directories")
    return RankFiles(root, iter_dir, dirs)


def parallel_sizes(args: dict[str, Any], where: str) -> tuple[int, int, int]:
    """``(tp, pp, ep)`` from Megatron ``args``."""
    def size(key: str, required: bool) -> int:
        value = args.get(key)
        if value is None:
            if required:
                raise UserError(f"{where}: args has no {key}; not a Megatron-LM training checkpoint")
            return 1
        return int(value)

    return (size("tensor_model_parallel_size", True), size("pipeline_model_parallel_size", True),
            size("expert_model_parallel_size", False))


def check_rank_dirs(files: RankFiles, tp: int, pp: int, ep: int, where: str) -> dict[tuple[int, int, int], Path]:
    """Every rank file ``args`` implies is there and nothing else: ``(pp, ep, tp) -> path``."""
    expected = {rank_dir_name(t, p, e, pp, ep): (p, e, t) for p in range(pp) for e in range(ep) for t in range(tp)}
    present = set(files.dirs)
    sizes = (f"args say tensor_model_parallel_size={tp}, pipeline_model_parallel_size={pp}, "
             f"expert_model_parallel_size={ep}")
    extra = sorted(present - set(expected))
    if extra:
        raise UserError(f"{files.iter_dir / extra[0]}: rank directory not expected: {sizes} "
                        f"({len(expected)} rank directories) but {files.iter_dir.name}/ holds {len(present)}; "
                        f"the args and the files disagree (a partial copy or edited args?)")
    for name in sorted(expected):
        if name not in present or not files.path(name).is_file():
            raise UserError(f"{files.path(name)}: missing ({sizes}: {len(expected)} rank files expected, "
                            f"{len(present)} present); copy the whole checkpoint")
    return {rank: files.path(name) for name, rank in expected.items()}
