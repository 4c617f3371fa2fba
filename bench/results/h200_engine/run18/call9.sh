# run 18, call 9: AWQ's pre-quant scale applied once before the GEMM where a block's share is large (28672x4096 from 64 rows): trtlm bench int4-awq and bf16 at batch 16 and 64
python3 -m pip install -q --no-deps --no-index --force-reinstall dist_gpu/*.whl 2>&1 | tail -2
B="trtlm bench --dummy-weights --dtype bfloat16 --device cuda --json --family mistral --preset 7b --mode latency --input-len 128 --output-len 128 --reps 2"
for q in none int4-awq; do
  extra=(); [[ $q != none ]] && extra=(--quant "$q")
  echo "== $q"; timeout 110 $B "${extra[@]}" --batch-size 16,64 --output "$OUT/quant_mistral_7b_$q.json" 2>&1 | grep -E "latency batch|Error"
done
