# run 18, call 7: the int4 GEMM on wgmma (sm_90a): descriptor check, kernel sweep against call 4's mma.sync GEMM; kernel tests
python3 -m pip install -q --no-deps --no-index --force-reinstall dist_gpu/*.whl 2>&1 | tail -2
timeout 330 python3 bench/results/h200_engine/run18/gemm_wgmma.py $OUT/gemm_wgmma.json 2>&1 | tee $OUT/gemm_wgmma.txt
timeout 150 python3 -m pytest -q -p no:cacheprovider -rfEs -x tests/test_quant_kernels.py -k "w4" > $OUT/w4_tests.txt 2>&1
grep -E "^(FAILED|ERROR)|passed|failed|Error|assert" $OUT/w4_tests.txt | tail -8
