"""CLI start-up time: the median wall time of ``trtlm --help``, ``--version`` and ``plugins``.

Each command runs N times as a fresh process (the way a user or a shell
script meets it), through the ``trtlm`` console script that sits next to the
running interpreter.  Besides wall time the script reports the CPU time
(user + system) of each child process: on a shared, busy machine the wall
time swings with the load while the CPU time stays close to the cost of the
command itself.  It also checks the property the numbers depend on: that
none of the commands imports torch.

    python bench/startup_bench.py                  # 21 runs each, JSON on stdout
    python bench/startup_bench.py --runs 51 --warmup 3

Targets (docs/benchmarks.md, "CLI start-up"): median wall time under 0.5 s
for each command on a 2-core machine.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

COMMANDS = {
    "--help": ["--help"],
    "--version": ["--version"],
    "plugins": ["plugins"],
}

# Runs the CLI's main() in-process and reports whether torch got imported.
_TORCH_PROBE = (
    "import sys\n"
    "from trtlm.cli import main\n"
    "try:\n"
    "    main(sys.argv[1:])\n"
    "except SystemExit:\n"
    "    pass\n"
    "sys.stdout.flush()\n"
    "sys.stderr.write('TORCH_IMPORTED=%d\\n' % ('torch' in sys.modules))\n"
)


def trtlm_script() -> Path:
    """The console script installed with trtlm in this interpreter's environment."""
    script = Path(sys.executable).parent / ("trtlm.exe" if os.name == "nt" else "trtlm")
    if not script.exists():
        raise SystemExit(f"{script}: no trtlm console script next to {sys.executable}; "
                         f"install trtlm into this environment (pip install -e ./core)")
    return script


def time_once(argv: list[str]) -> tuple[float, float]:
    """(wall seconds, child CPU seconds) of one run of ``argv``."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} exited {proc.returncode}: {proc.stderr.decode()[-2000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def imports_torch(args: list[str]) -> bool:
    proc = subprocess.run([sys.executable, "-c", _TORCH_PROBE, *args], capture_output=True, text=True)
    return "TORCH_IMPORTED=1" in proc.stderr


def bench(runs: int, warmup: int) -> dict:
    script = str(trtlm_script())
    baseline = [sys.executable, "-c", "pass"]
    result: dict = {
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "runs": runs,
        "commands": {},
    }
    for name, args in {"python -c pass": None, **COMMANDS}.items():
        argv = baseline if args is None else [script, *args]
        for _ in range(warmup):
            time_once(argv)
        walls, cpus = zip(*(time_once(argv) for _ in range(runs)))
        entry = {
            "median_wall_s": round(statistics.median(walls), 4),
            "min_wall_s": round(min(walls), 4),
            "max_wall_s": round(max(walls), 4),
            "median_cpu_s": round(statistics.median(cpus), 4),
        }
        if args is not None:
            entry["imports_torch"] = imports_torch(args)
        result["commands"][name] = entry
    result["load_average_1min_after"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=21, help="timed runs per command (default 21)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs first (default 2)")
    parser.add_argument("--limit", type=float, default=0.5, help="median wall-time target in seconds")
    ns = parser.parse_args()
    result = bench(ns.runs, ns.warmup)
    result["limit_s"] = ns.limit
    result["within_limit"] = all(c["median_wall_s"] < ns.limit for k, c in result["commands"].items()
                                 if k in COMMANDS)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
