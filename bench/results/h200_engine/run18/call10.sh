# run 18, call 10: the w4 kernel tests after the pre-quant change (the GEMM test now checks x scaled once first gives the kernel's bits)
python3 -m pip install -q --no-deps --no-index --force-reinstall dist_gpu/*.whl 2>&1 | tail -2
timeout 200 python3 -m pytest -q -p no:cacheprovider -rfEs tests/test_quant_kernels.py -k "w4 or int4 or one_row" > $OUT/w4_tests.txt 2>&1
grep -E "^(FAILED|ERROR)|passed|failed|Error|assert" $OUT/w4_tests.txt | tail -8
