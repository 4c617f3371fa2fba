# run 17, call 4: the GEMV with stages in registers (copy 2) and the cp.async ring, swept at each shape
python3 -m pip install -q --no-deps --no-index --force-reinstall dist_gpu/*.whl 2>&1 | tail -2
timeout 100 python3 -m pytest -q -p no:cacheprovider -rfEs tests/test_quant_kernels.py -k "w4_kernels and gemv" -x > $OUT/w4_tests.txt 2>&1
grep -E "^(FAILED|ERROR)|passed|failed|Error|assert" $OUT/w4_tests.txt | tail -15
timeout 330 python3 bench/results/h200_engine/run17/gemv_sweep.py $OUT/gemv_sweep.json sweep 62 > $OUT/gemv_sweep.txt 2>&1
grep -v "^   " $OUT/gemv_sweep.txt
for s in 6144x4096 4096x4096 28672x4096 4096x14336; do echo "== $s best"; awk -v s=$s '$1==s && $3=="rows"{on=($4=="1:")} /^[0-9]/{if($1!=s)on=0} on && /^   /' $OUT/gemv_sweep.txt | sort -t'}' -k1 | awk '{print}' | sort -k9 -n | head -0; done
python3 - $OUT/gemv_sweep.json <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
for k, v in r.items():
    cs = sorted(v["configs"], key=lambda c: c["us"])
    print(k, "best:", [(tuple(c["cfg"]), round(c["us"], 1)) for c in cs[:6]])
    for copy in (0, 2):
        b = [c for c in cs if c["cfg"][5] == copy][:1]
        print("   copy", copy, [(tuple(c["cfg"]), round(c["us"], 1), c["blocks"]) for c in b])
PY
