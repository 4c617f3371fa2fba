# run 17, call 8: L2 prefetch under the attention: GPU tests, step with it off/on (bf16, int4-awq), trtlm bench
python3 -m pip install -q --no-deps --no-index --force-reinstall dist_gpu/*.whl 2>&1 | tail -2
timeout 200 python3 -m pytest -q -p no:cacheprovider -rfEs tests/test_gpu.py -k "l2_prefetch or ((quantized_engine_gpu_path or programmatic) and int4)" > $OUT/gpu_tests.txt 2>&1
grep -E "^(FAILED|ERROR)|passed|failed|Error" $OUT/gpu_tests.txt | tail -8
timeout 240 python3 bench/results/h200_engine/run17/prefetch_variants.py $OUT/prefetch_variants.json none,int4-awq 2>&1 | grep "step "
B="trtlm bench --dummy-weights --dtype bfloat16 --device cuda --json --family mistral --preset 7b --mode latency --input-len 128 --output-len 128 --reps 2"
for q in none int4-awq int4-wo; do
  extra=(); [[ $q != none ]] && extra=(--quant "$q")
  echo "== $q"; timeout 150 $B "${extra[@]}" --batch-size 1,16,64 --output "$OUT/quant_mistral_7b_$q.json" 2>&1 | grep "latency batch"
done
