"""From a ``quant_kernels_bench.py --gemv`` JSON, the int4 GEMV tiles with the least total time over
the narrow (N <= 4096) and the wide products, as ``step_anatomy.py --gemv-variants`` JSON."""
import json
import sys
from collections import defaultdict

res = json.load(open(sys.argv[1]))["gemv"]
total: dict[bool, dict[str, float]] = {False: defaultdict(float), True: defaultdict(float)}
count: dict[bool, dict[str, int]] = {False: defaultdict(int), True: defaultdict(int)}
shapes = {False: 0, True: 0}
for key, row in res.items():
    wide = int(key.split("x")[0]) > 4096
    for fmt, r in row.items():
        if not isinstance(r, dict) or "configs" not in r:
            continue
        shapes[wide] += 1
        for c in r["configs"]:
            if c.get("ok"):
                k = json.dumps(c["config"], sort_keys=True)
                total[wide][k] += c["us"]
                count[wide][k] += 1
best = {}
for wide in (False, True):
    full = {k: t for k, t in total[wide].items() if count[wide][k] == shapes[wide]}
    if full:
        best[f"int4,{int(wide)}"] = json.loads(min(full, key=full.get))
print(json.dumps({"best": best}))
