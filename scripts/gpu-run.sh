#!/usr/bin/env bash
# Runs the CUDA build of the check and bench programs on the GPU machine. The binaries travel
# gzipped in gpu-bin/ (git-ignored); build them here with
#   . ~/.cache/turbodiffusion-rs/cuda-13.0/env.sh
#   cargo build --release --features cuda --target-dir target-cuda \
#       --example gpu_check --example attention_bench --example t2v
# then `strip -o /tmp/<name> target-cuda/release/examples/<name>; gzip -9c /tmp/<name> > gpu-bin/<name>.gz`.
# Usage: scripts/gpu-run.sh <step>...   steps: check bench-1.3b bench-14b t2v-demo
# Each step has a time limit; a failing step is reported and the others still run.
set -uo pipefail
OUT="${OUT:-/tmp/gpu-out}"
BIN="$OUT/.bin"
mkdir -p "$OUT" "$BIN"
trap 'rm -rf "$BIN"' EXIT
export LD_LIBRARY_PATH="/opt/torch/.venv/lib/python3.12/site-packages/nvidia/cu13/lib:/usr/local/cuda-13.0/targets/x86_64-linux/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
for name in gpu_check attention_bench t2v; do
  [ -f "gpu-bin/$name.gz" ] && gunzip -c "gpu-bin/$name.gz" > "$BIN/$name" && chmod 755 "$BIN/$name"
done
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee -a "$OUT/device.txt"
# The attention ops are still candle-op compositions (the fused kernels are the next issue):
# sagesla emulates its quantisation on the host, so it gets one topk and one timed run.
bench() { # <tag> <seq-len> <heads>
  timeout 240 "$BIN/attention_bench" --device cuda --dtype bf16 --seq-len "$2" --heads "$3" \
    --modes original,sla --topk 0.05,0.1,0.15 --warmup 1 --iters 3 --json "$OUT/attention_$1.json" 2>&1 | tee "$OUT/attention_$1.txt"
  timeout 150 "$BIN/attention_bench" --device cuda --dtype bf16 --seq-len "$2" --heads "$3" \
    --modes sagesla --topk 0.1 --warmup 0 --iters 1 --json "$OUT/attention_$1_sagesla.json" 2>&1 | tee -a "$OUT/attention_$1.txt"
}
for step in "$@"; do
  case "$step" in
    check) timeout 240 "$BIN/gpu_check" --device cuda 2>&1 | tee "$OUT/gpu_check.txt" ;;
    bench-1.3b) bench 1.3b 32760 12 ;;
    # At 14B 720p the composed ops take seconds per call: one timed run of original and sla 0.1.
    bench-14b) timeout 400 "$BIN/attention_bench" --device cuda --dtype bf16 --seq-len 75600 --heads 40 \
        --modes original,sla --topk 0.1 --warmup 0 --iters 1 --json "$OUT/attention_14b.json" 2>&1 | tee "$OUT/attention_14b.txt" ;;
    t2v-demo) (cd "$OUT" && timeout 120 "$BIN/t2v" --device cuda --dtype f32 --output demo_cuda.mp4 2>&1 | tee t2v_demo.txt) ;;
    *) echo "unknown step: $step" >&2 ;;
  esac || echo "FAILED: $step" | tee -a "$OUT/failures.txt"
done
