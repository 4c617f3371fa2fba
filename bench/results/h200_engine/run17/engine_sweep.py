"""Run 17: choose the GEMV's configuration per shape by the batch-1 int4-awq step it gives (the
engine, bench/step_anatomy.py), one shape at a time, the others at W4_MEASURED's."""
import json, sys, time
sys.path.insert(0, "bench")
import step_anatomy as sa
from trtlm.quant import w4_gemv as w4

C = w4.W4GemvConfig
BASE = dict(w4.W4_MEASURED)
CANDS = {
    (6144, 4096): [C(4, 2, 1, 2, 8), C(4, 2, 2, 2, 8), C(8, 2, 1, 2, 8), C(4, 2, 2, 4, 4), C(4, 1, 2, 2, 8), C(4, 2, 1, 2, 16)],
    (4096, 4096): [C(4, 2, 1, 2, 16), C(4, 2, 2, 2, 8), C(8, 1, 2, 2, 8), C(4, 2, 1, 4, 8), C(4, 2, 1, 2, 32)],
    (28672, 4096): [C(8, 1, 4, 2, 1), C(4, 2, 4, 2, 1), C(4, 2, 2, 4, 1), C(8, 1, 2, 4, 1), C(4, 2, 4, 4, 1), C(8, 1, 2, 2, 2)],
    (4096, 14336): [C(8, 2, 1, 2, 16), C(4, 2, 1, 2, 16), C(4, 2, 2, 2, 16), C(8, 1, 4, 2, 8), C(4, 2, 1, 2, 28)],
}
t0 = time.monotonic()
out = []

def run(name, table):
    w4.W4_MEASURED.clear(); w4.W4_MEASURED.update(table); w4.w4_gemv_config.cache_clear()
    r = sa.anatomy("int4-awq", 128, 128, ["on"])[0]
    r.pop("kernel_paths", None); r.pop("profile", None)
    r["variant"] = name
    out.append(r)
    print(f"{name:40s} step {r['step_ms']:.3f} ms  replay {r['replay_ms']:.3f} ms", flush=True)
    json.dump(out, open(sys.argv[1], "w"), indent=1)

run("measured (isolated sweep)", BASE)
for shape, cands in CANDS.items():
    for c in cands:
        if time.monotonic() - t0 > float(sys.argv[2]):
            break
        run(f"{shape[0]}x{shape[1]} {tuple(c)}", {**BASE, shape: c})
run("measured (isolated sweep), again", BASE)
