OUT=$OUT bash scripts/gpu-run.sh check > /dev/null 2>&1; grep -E "FAIL|kernel (layer|gated|linear)|checks," $OUT/gpu_check.txt | tail -20
export LD_LIBRARY_PATH="/opt/torch/.venv/lib/python3.12/site-packages/nvidia/cu13/lib:/usr/local/cuda-13.0/targets/x86_64-linux/lib"
mkdir -p /tmp/b && gunzip -c gpu-bin/bench.gz > /tmp/b/bench && chmod +x /tmp/b/bench
/tmp/b/bench --sections dit --json $OUT/bench_dit.json 2>&1 | grep "^| dit" | head -6
bash scripts/.prof.sh 2>&1 | tail -30
