# run 16, call 8 (final): GPU tests at this code (quantized kernels; the int4 engines on the GPU path
# against the CPU path, PDL on/off bit-identical); trtlm bench int4-awq and bf16 at batch 1 and 16
python3 -m pip install -q --no-deps --no-index --force-reinstall dist_gpu/*.whl 2>&1 | tail -2
timeout 110 python3 -m pytest -q -p no:cacheprovider -rfEs tests/test_quant_kernels.py > $OUT/gpu_tests_kernels.txt 2>&1
grep -E "^(FAILED|ERROR)|passed|failed" $OUT/gpu_tests_kernels.txt | tail -8
timeout 90 python3 -m pytest -q -p no:cacheprovider -rfEs tests/test_gpu.py -k "(quantized_engine_gpu_path or programmatic) and int4" > $OUT/gpu_tests_engine.txt 2>&1
grep -E "^(FAILED|ERROR)|passed|failed" $OUT/gpu_tests_engine.txt | tail -8
B="trtlm bench --dummy-weights --dtype bfloat16 --device cuda --json --family mistral --preset 7b --mode latency --input-len 128 --output-len 128 --reps 2"
for q in none int4-awq; do
  extra=(); [[ $q != none ]] && extra=(--quant "$q")
  echo "== $q"; timeout 45 $B "${extra[@]}" --batch-size 1,16 --output "$OUT/quant_mistral_7b_$q.json" 2>&1 | grep "latency batch"
done
