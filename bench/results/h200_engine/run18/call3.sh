# run 18, call 3: GEMM source variants (launch bounds for ptxas's registers; run 17's split-K hand-over) over every split, and the GEMV against run 17's
python3 -m pip install -q --no-deps --no-index --force-reinstall dist_gpu/*.whl 2>&1 | tail -2
timeout 450 python3 bench/results/h200_engine/run18/gemm_variants.py $OUT/gemm_variants.json 2>&1 | tee $OUT/gemm_variants.txt
