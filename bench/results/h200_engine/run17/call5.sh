# run 17, call 5: the streamed GEMV (cp.async ring, measured configurations): tests, rows 1-8, step anatomy, trtlm bench
python3 -m pip install -q --no-deps --no-index --force-reinstall dist_gpu/*.whl 2>&1 | tail -2
timeout 120 python3 -m pytest -q -p no:cacheprovider -rfEs tests/test_quant_kernels.py -k "w4 or int4 or one_row" > $OUT/w4_tests.txt 2>&1
grep -E "^(FAILED|ERROR)|passed|failed|Error" $OUT/w4_tests.txt | tail -8
timeout 150 python3 bench/results/h200_engine/run17/gemv_rows.py $OUT/gemv_rows.json 2>&1 | tee $OUT/gemv_rows.txt
timeout 200 python3 bench/step_anatomy.py --quants none,int4-awq --gemv-variants '{"tinygemm": {"kernels": {"W4_GEMV": false}}}' --out $OUT/anatomy.json > $OUT/anatomy.txt 2>&1; grep "step " $OUT/anatomy.txt
B="trtlm bench --dummy-weights --dtype bfloat16 --device cuda --json --family mistral --preset 7b --mode latency --input-len 128 --output-len 128 --reps 2"
for q in none int4-awq int4-wo; do
  extra=(); [[ $q != none ]] && extra=(--quant "$q")
  echo "== $q"; timeout 150 $B "${extra[@]}" --batch-size 1,16,64 --output "$OUT/quant_mistral_7b_$q.json" 2>&1 | grep "latency batch"
done
