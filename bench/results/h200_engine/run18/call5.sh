# run 18, call 5: where the GEMM's time goes at 16 and 64 rows (probes that each remove one part of the kernel)
python3 -m pip install -q --no-deps --no-index --force-reinstall dist_gpu/*.whl 2>&1 | tail -2
timeout 300 python3 bench/results/h200_engine/run18/gemm_probe.py $OUT/gemm_probe.json 2>&1 | tee $OUT/gemm_probe.txt
