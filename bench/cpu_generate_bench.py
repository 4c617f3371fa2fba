"""CPU: ``LLM.generate`` at batch 1 on the bundled tiny model, timed in the same run for two trees.

Run it once per source tree (PYTHONPATH decides which trtlm is imported) and compare the medians:

    python bench/cpu_generate_bench.py ENGINE_DIR            # this tree
    PYTHONPATH=OLD/core/src:OLD/plugins/mistral/src python bench/cpu_generate_bench.py ENGINE_DIR

Prints one JSON line: median seconds and tokens/s of ``--reps`` greedy generations of ``--new`` tokens.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("engine_dir")
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(1)
    import trtlm
    from trtlm.api import LLM

    llm = LLM(args.engine_dir)
    prompts = ["def fibonacci(n):\n    "] * args.batch
    llm.generate(prompts, max_new_tokens=args.new)  # warm-up
    times, tokens = [], 0
    for _ in range(args.reps):
        t0 = time.perf_counter()
        outs = llm.generate(prompts, max_new_tokens=args.new)
        times.append(time.perf_counter() - t0)
        tokens = sum(len(o["output_ids"]) for o in outs)
    med = statistics.median(times)
    print(json.dumps({"trtlm": trtlm.__file__, "batch": args.batch, "new_tokens": tokens, "median_s": med,
                      "tokens_per_s": tokens / med}))


if __name__ == "__main__":
    main()
