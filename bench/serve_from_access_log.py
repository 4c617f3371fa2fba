"""Throughput of a `trtlm bench serve` run recomputed from `trtlm serve`'s JSON access log.

Used when the client's own JSON was not kept (serving run 10 in docs/benchmarks.md: the device tool
returns at most 8 files).  Each access-log line has its end time ``ts`` (whole seconds, UTC) and its
``duration_ms``, so the run's wall time is known to within one second either way; the output tokens
are the sum of ``completion_tokens``.  Prints the bounds of output token throughput as JSON.

    python bench/serve_from_access_log.py SERVER_LOG --skip 0 --count 1000
"""
from __future__ import annotations

import argparse
import datetime
import json


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("log")
    ap.add_argument("--skip", type=int, default=0, help="completions requests before the run's first")
    ap.add_argument("--count", type=int, default=1000, help="requests of the run")
    args = ap.parse_args()
    rows = [json.loads(line) for line in open(args.log) if line.startswith("{") and '"/v1/completions"' in line]
    rows = rows[args.skip:args.skip + args.count]

    def end(r):
        return datetime.datetime.strptime(r["ts"], "%Y-%m-%dT%H:%M:%SZ").timestamp()

    first_start = min(end(r) - r["duration_ms"] / 1000 for r in rows)  # ts is truncated: start may be up to 1 s later
    last_end = max(end(r) for r in rows)  # ... and the end up to 1 s later
    tokens = sum(r["completion_tokens"] for r in rows)
    shortest, longest = last_end - first_start - 1, last_end - first_start + 1
    print(json.dumps({"requests": len(rows), "failed": sum(r["status"] != 200 for r in rows),
                      "output_tokens": tokens, "duration_s": [round(shortest, 2), round(longest, 2)],
                      "output_token_throughput": [round(tokens / longest), round(tokens / shortest)]}))


if __name__ == "__main__":
    main()
