# run 18, call 1: the int4 GEMM streamed through the GEMV's ring: kernel tests, then rows 16-64 against bf16 / mixed_mm / run 17's GEMM, with a sweep (3 stages)
python3 -m pip install -q --no-deps --no-index --force-reinstall dist_gpu/*.whl 2>&1 | tail -2
timeout 200 python3 -m pytest -q -p no:cacheprovider -rfEs tests/test_quant_kernels.py -k "w4 or int4 or one_row" > $OUT/w4_tests.txt 2>&1
grep -E "^(FAILED|ERROR)|passed|failed|Error" $OUT/w4_tests.txt | tail -8
timeout 330 python3 bench/results/h200_engine/run18/gemm_rows.py $OUT/gemm_rows.json sweep 2>&1 | tee $OUT/gemm_rows.txt | grep -v "^   best" 
grep -B1 "^   best" $OUT/gemm_rows.txt | grep best
