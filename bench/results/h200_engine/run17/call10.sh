# run 17, call 10: the SwiGLU applied by the int4 GEMV of proj (one kernel fewer per layer): GPU tests, step, trtlm bench batch 1
python3 -m pip install -q --no-deps --no-index --force-reinstall dist_gpu/*.whl 2>&1 | tail -2
timeout 150 python3 -m pytest -q -p no:cacheprovider -rfEs tests/test_quant_kernels.py tests/test_gpu.py -k "w4 or swiglu or (test_gpu and int4)" > $OUT/gpu_tests.txt 2>&1
grep -E "^(FAILED|ERROR)|passed|failed|Error" $OUT/gpu_tests.txt | tail -8
timeout 75 python3 bench/step_anatomy.py --quants none,int4-awq --out $OUT/anatomy.json > $OUT/anatomy.txt 2>&1; grep "step " $OUT/anatomy.txt
B="trtlm bench --dummy-weights --dtype bfloat16 --device cuda --json --family mistral --preset 7b --mode latency --input-len 128 --output-len 128 --reps 2"
for q in none int4-awq int4-wo; do
  extra=(); [[ $q != none ]] && extra=(--quant "$q")
  echo "== $q"; timeout 35 $B "${extra[@]}" --batch-size 1 --output "$OUT/quant_mistral_7b_$q.json" 2>&1 | grep "latency batch"
done
