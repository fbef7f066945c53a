#!/usr/bin/env bash
# Runs the CUDA build of the check and bench programs on the GPU machine. The binaries travel
# gzipped in gpu-bin/ (git-ignored; build them here with
#   . ~/.cache/turbodiffusion-rs/cuda-13.0/env.sh
#   cargo build --release --features cuda --target-dir target-cuda --example gpu_check ...
# then `gzip -c target-cuda/release/examples/<name> > gpu-bin/<name>.gz`).
# Usage: scripts/gpu-run.sh <what>   with what = check | bench-1.3b | bench-14b | t2v-demo
set -euo pipefail
OUT="${OUT:-/tmp/gpu-out}"
mkdir -p "$OUT" /tmp/gpu-bin
export LD_LIBRARY_PATH="/opt/torch/.venv/lib/python3.12/site-packages/nvidia/cu13/lib:/usr/local/cuda-13.0/targets/x86_64-linux/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
bin() {
  [ -x "/tmp/gpu-bin/$1" ] || gunzip -c "gpu-bin/$1.gz" > "/tmp/gpu-bin/$1" && chmod +x "/tmp/gpu-bin/$1"
  echo "/tmp/gpu-bin/$1"
}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee -a "$OUT/device.txt"
for what in "$@"; do
  # One failing step is reported and the others still run.
  case "$what" in
    check) "$(bin gpu_check)" --device cuda 2>&1 | tee "$OUT/gpu_check.txt" || echo "FAILED: $what" ;;
    bench-1.3b)
      "$(bin attention_bench)" --device cuda --dtype bf16 --seq-len 32760 --heads 12 \
        --topk 0.05,0.1,0.15 --warmup 2 --iters 10 --json "$OUT/attention_1.3b.json" 2>&1 | tee "$OUT/attention_1.3b.txt" || echo "FAILED: $what" ;;
    bench-14b)
      "$(bin attention_bench)" --device cuda --dtype bf16 --seq-len 75600 --heads 40 \
        --topk 0.05,0.1,0.15 --warmup 1 --iters 3 --json "$OUT/attention_14b.json" 2>&1 | tee "$OUT/attention_14b.txt" || echo "FAILED: $what" ;;
    t2v-demo) (cd "$OUT" && "$(bin t2v)" --device cuda --dtype f32 --output demo_cuda.mp4 2>&1 | tee t2v_demo.txt) || echo "FAILED: $what" ;;
    *) echo "unknown: $what" >&2; exit 2 ;;
  esac
done
