"""Run 17: the batch-1 decode step (bench/step_anatomy.py) with the L2 prefetch after qkv off and
at several budgets (a share of the L2), bf16 and int4, the same weights per format."""
import json, sys
sys.path.insert(0, "bench")
import step_anatomy as sa
from trtlm.runtime.kernels import l2_prefetch

out = []
for quant in sys.argv[2].split(","):
    for frac in (0.0, 0.25, 0.5, 0.75, 0.0):
        l2_prefetch.L2_PREFETCH_FRACTION = frac
        r = sa.anatomy(None if quant == "none" else quant, 128, 128, ["on"])[0]
        r.pop("kernel_paths", None); r.pop("profile", None)
        r["l2_prefetch_fraction"] = frac
        out.append(r)
        print(f"{r['quant']:9s} L2 prefetch {frac:.2f}  step {r['step_ms']:.3f} ms  replay {r['replay_ms']:.3f} ms", flush=True)
        json.dump(out, open(sys.argv[1], "w"), indent=1)
