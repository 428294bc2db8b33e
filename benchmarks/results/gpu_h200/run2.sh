python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 3
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1
mkdir -p $OUT
timeout 95 python3 benchmarks/gemv_variants.py --budget 70 --out $OUT/gemv_variants.json > $OUT/gemv_variants.log 2>&1; echo "variants rc=$?"
cat $OUT/gemv_variants.log | tail -c 2500
timeout 180 python3 benchmarks/kernels_gpu.py --sections correctness,e2e --budget 170 --e2e-layers 4 --e2e-tokens 32 --out $OUT/kernels_gpu_check.json > $OUT/kernels_gpu_check.log 2>&1; echo "kernels rc=$?"
tail -c 3500 $OUT/kernels_gpu_check.log
