# run 18, call 4: the engine with the new GEMM up to 64 rows (config rule from call 3): GPU tests; trtlm bench at batch 1, 16, 64
python3 -m pip install -q --no-deps --no-index --force-reinstall dist_gpu/*.whl 2>&1 | tail -2
timeout 240 python3 -m pytest -q -p no:cacheprovider -rfEs tests/test_quant_kernels.py tests/test_gpu.py -k "not test_gpu or int4" > $OUT/gpu_tests.txt 2>&1
grep -E "^(FAILED|ERROR)|passed|failed|Error" $OUT/gpu_tests.txt | tail -8
B="trtlm bench --dummy-weights --dtype bfloat16 --device cuda --json --family mistral --preset 7b --mode latency --input-len 128 --output-len 128 --reps 2"
for q in none int4-awq int4-wo; do
  extra=(); [[ $q != none ]] && extra=(--quant "$q")
  echo "== $q"; timeout 110 $B "${extra[@]}" --batch-size 1,16,64 --output "$OUT/quant_mistral_7b_$q.json" 2>&1 | grep -E "latency batch|int4|Error"
done
