# run 17, call 3: read-bandwidth ceilings by access pattern; the 8-row slowdown of the GEMV
python3 -m pip install -q --no-deps --no-index --force-reinstall dist_gpu/*.whl 2>&1 | tail -2
timeout 200 python3 bench/results/h200_engine/run17/read_ceiling.py $OUT/read_ceiling.json 2>&1 | tee $OUT/read_ceiling.txt
timeout 150 python3 bench/results/h200_engine/run17/rows8.py 2>&1 | tee $OUT/rows8.txt
