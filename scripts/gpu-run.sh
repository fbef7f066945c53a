#!/usr/bin/env bash
# Runs the CUDA build of the check and bench programs on the GPU machine. The binaries travel
# compressed in gpu-bin/ (git-ignored); build them here (with nasm installed, or OpenH264's
# encoder is built without its assembly and the MP4 rows measure the slow one) with
#   . ~/.cache/turbodiffusion-rs/cuda-13.0/env.sh
#   cargo build --release --features cuda --target-dir target-cuda \
#       --example gpu_check --example bench --example t2v
# then `strip -o /tmp/<name> target-cuda/release/examples/<name>; xz -9e -c /tmp/<name> > gpu-bin/<name>.xz`
# (a quarter of the size; the working tree and the binaries must stay under 64 MiB; .gz also works).
# Usage: scripts/gpu-run.sh <step>...
#   steps: check, bench-<section> (attention, linear, dit, vae, t2v), bench-dit-14b (a 14B DiT
#   forward at 720p), bench-t2v-14b (14B T2V at 720p), bench-i2v (Wan2.2 A14B I2V at 720p),
#   bench-i2v-14b (Wan2.1 I2V-14B with CLIP at 720p, W8A8, the teacher cut to 2 steps),
#   bench-lora (a rank-32 LoRA on the 14B: merge time, forward merged / as a run-time branch),
#   bench-ti2v (TI2V-5B 1280x704, 121 frames, bf16 and W8A8),
#   bench-e2e / bench-e2e-a14b (time to video from released-format files, cold and warm),
#   bench-e2e-resident / bench-e2e-resident-all (the same with umT5 / every model kept loaded),
#   bench-e2e-resident-all-bf16 (every model kept loaded, the DiT from its bf16 .pth),
#   bench-e2e-a14b-resident-all (the A14B I2V with both experts, umT5 and the VAE kept loaded),
#   bench-e2e-14b-resident-all (the 14B T2V at 720p, every model kept loaded),
#   anchors-vae and torch-probes (the upstream references, see below), torch-int8 (cuBLAS's
#   plain int8 GEMM beside its bf16 Linear), ncu-linear and ncu-bf16-linear (Nsight Compute on
#   the W8A8 GEMMs; on our bf16 Linear and F.linear), t2v-demo,
#   profile-dit-14b (GPU time per kernel of a 14B forward's blocks, scripts/gpu-profile.sh),
#   bench-multi-gpu-1 (the 14B T2V and A14B I2V at 720p on one GPU: the baseline) and
#   bench-multi-gpu-N for N = 2, 4, 8 (the same on N GPUs through scripts/multi-gpu.sh, with the
#   speedup and scaling efficiency against bench_multi_gpu_1.json when an earlier step made it;
#   these need the binaries built with --features nccl and libnccl.so, see docs/usage.md)
# The models' W8A8 GEMM is the fastest per shape, timed in-process; set W8A8_GEMM (e.g.
# wgmma-cvt) before the call to fix one for the bench steps.
# Results go to $OUT (default /tmp/gpu-out; the device tool brought back at most 8 files of a
# call, so put ncu-linear, with its 4–5 files, in a call of its own or with torch-int8); the
# binaries come from $GPU_BIN (default gpu-bin), so that two builds can be compared on one warm
# machine (in two calls: the tree and two builds are over the 64 MiB a call carries).
# Each step has a time limit; a failing step is reported and the others still run.
set -uo pipefail
OUT="${OUT:-/tmp/gpu-out}"
GPU_BIN="${GPU_BIN:-gpu-bin}"
BIN="$OUT/.bin"
mkdir -p "$OUT" "$BIN"
trap 'rm -rf "$BIN"' EXIT
export LD_LIBRARY_PATH="/opt/torch/.venv/lib/python3.12/site-packages/nvidia/cu13/lib:/usr/local/cuda-13.0/targets/x86_64-linux/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
# libnccl.so.2 for binaries built with --features nccl: the copy PyTorch's wheels bring.
nccl_lib=$(find /opt/torch/.venv -name 'libnccl.so.2' -print -quit 2>/dev/null)
[ -n "$nccl_lib" ] && export LD_LIBRARY_PATH="$(dirname "$nccl_lib"):$LD_LIBRARY_PATH"
for name in gpu_check bench t2v; do
  [ -f "$GPU_BIN/$name.gz" ] && gunzip -c "$GPU_BIN/$name.gz" > "$BIN/$name" && chmod 755 "$BIN/$name"
  # xz where the machine has it, else Python's lzma module.
  [ -f "$GPU_BIN/$name.xz" ] && { xz -dc "$GPU_BIN/$name.xz" 2>/dev/null \
    || python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), sys.stdout.buffer)' "$GPU_BIN/$name.xz"; } \
    > "$BIN/$name" && chmod 755 "$BIN/$name"
done
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee -a "$OUT/device.txt"
bench() { # <section> <time limit, s> [<output name> <bench arguments>...]
  local section="$1" limit="$2" name="${3:-$1}"
  shift $(($# < 3 ? $# : 3))
  # One JSON per step and one shared log (its tables included): few files come back.
  timeout "$limit" "$BIN/bench" --sections "$section" "$@" ${W8A8_GEMM:+--w8a8-gemm "$W8A8_GEMM"} \
    --json "$OUT/bench_$name.json" \
    2>&1 | tee -a "$OUT/bench.log"
}
ncu_linear() {
  local ncu rep="$OUT/ncu_linear"
  ncu="$(command -v ncu || echo /usr/local/cuda/bin/ncu)"
  timeout 300 "$ncu" --set full --import-source no -k 'regex:w8a8_gemm_wgmma' --launch-count 6 -f \
    -o "$rep" "$BIN/bench" --sections linear --shapes 14b --warmup 0 --iters 1 \
    > "$OUT/ncu_linear.log" 2>&1 || return 1
  "$ncu" -i "$rep.ncu-rep" --page details --csv > "$OUT/ncu_linear_details.csv"
  # The whole SASS table and raw page are too large to come back: the hot lines and the stall
  # reasons only.
  "$ncu" -i "$rep.ncu-rep" --page source --print-source sass --csv > "$BIN/sass.csv"
  python3 scripts/ncu-hot-lines.py source "$BIN/sass.csv" 40 > "$OUT/ncu_linear_hot_lines.txt" \
    || head -c 100000 "$BIN/sass.csv" > "$OUT/ncu_linear_sass_head.csv"
  "$ncu" -i "$rep.ncu-rep" --page raw --csv > "$BIN/raw.csv"
  python3 scripts/ncu-hot-lines.py stalls "$BIN/raw.csv" > "$OUT/ncu_linear_stalls.txt" \
    || head -c 100000 "$BIN/raw.csv" > "$OUT/ncu_linear_raw_head.csv"
  rm -f "$rep.ncu-rep"
}
# The kernels that our bf16 Linear and PyTorch's F.linear run, with their GPU time at ncu's
# locked base clock (so that boost and heat do not enter the comparison): our bench's linear
# rows at the 1.3B shapes, and torch-int8-ceiling.py (F.linear and _int_mm at all six shapes;
# its JSON, timed under ncu, is left out of $OUT).
ncu_bf16_linear() {
  local ncu keep="Kernel Name|gemm|sm90|cutlass|nvjet|xmma"
  ncu="$(command -v ncu || echo /usr/local/cuda/bin/ncu)"
  timeout 240 "$ncu" --csv --metrics gpu__time_duration.sum \
    "$BIN/bench" --sections linear --shapes 1.3b --warmup 0 --iters 1 2>&1 \
    | grep -E "$keep" > "$OUT/ncu_bf16_linear_ours.csv" || return 1
  OUT="$BIN" timeout 300 "$ncu" --csv --metrics gpu__time_duration.sum \
    python3 scripts/torch-int8-ceiling.py 2>&1 | grep -E "$keep" > "$OUT/ncu_bf16_linear_torch.csv"
}
for step in "$@"; do
  case "$step" in
    check) timeout 420 "$BIN/gpu_check" --device cuda 2>&1 | tee "$OUT/gpu_check.txt" ;;
    bench-attention) bench attention 240 ;;
    bench-linear) bench linear 150 linear --log debug ;;
    bench-dit) bench dit 240 ;;
    bench-dit-sparse) bench dit 240 dit_sparse --dit-attention sla:0.1,sagesla:0.1 ;;
    bench-vae) bench vae 240 ;;
    bench-t2v) bench t2v 300 ;;
    bench-dit-14b) bench dit 500 dit_14b --dit-model 14b --dit-attention sagesla:0.1 --dit-linears w8a8 ;;
    bench-t2v-14b) bench t2v 600 t2v_14b --t2v-model 14b --t2v-size 1280x720 --skip-cold-run ;;
    bench-i2v) bench i2v 600 i2v --i2v-size 1280x720 --skip-cold-run ;;
    bench-i2v-14b) bench i2v 500 i2v_14b --i2v-model wan21-i2v-14b --i2v-size 1280x720 --skip-cold-run --teacher-steps 2 ;;
    bench-ti2v) bench ti2v 400 ti2v --skip-cold-run ;;
    bench-lora) bench lora 500 lora --dit-model 14b --dit-attention sagesla:0.1 --lora-rank 32 ;;
    # Time to video from files in the released formats (written under /tmp first, once).
    bench-e2e) bench e2e 400 e2e --e2e-model 1.3b ;;
    bench-e2e-resident) bench e2e 300 e2e_resident --e2e-model 1.3b --e2e-processes 1 --e2e-residency text-encoder ;;
    bench-e2e-resident-all) bench e2e 300 e2e_resident_all --e2e-model 1.3b --e2e-processes 2 --e2e-requests 3 --e2e-residency all --log info ;;
    bench-e2e-resident-all-bf16) bench e2e 300 e2e_resident_all_bf16 --e2e-model 1.3b --e2e-processes 1 --e2e-requests 3 --e2e-residency all --e2e-linears bf16 ;;
    bench-e2e-a14b) bench e2e 590 e2e_a14b --e2e-model a14b-i2v --e2e-processes 1 ;;
    bench-e2e-a14b-resident-all) bench e2e 590 e2e_a14b_all --e2e-model a14b-i2v --e2e-processes 1 --e2e-residency all ;;
    bench-e2e-14b-resident-all) bench e2e 590 e2e_14b_all --e2e-model 14b --t2v-size 1280x720 --e2e-processes 1 --e2e-residency all ;;
    # The upstream reference (PyTorch, Wan2.1's VAE) in the same run: copy the Wan2.1
    # wan/modules folder to .upstream/wan21/modules and make .upstream/vae_anchor.py from the
    # VAE part of ../shared/bench/upstream_anchors.py (its README); torch_probes.py from there.
    anchors-vae) UPSTREAM="$PWD/.upstream" OUT="$OUT" timeout 300 python3 .upstream/vae_anchor.py 2>&1 | tee "$OUT/anchors_vae.txt" ;;
    torch-probes) OUT="$OUT" timeout 200 python3 .upstream/torch_probes.py 2>&1 | tee "$OUT/torch_probes.txt" ;;
    # cuBLAS's plain int8 GEMM (torch._int_mm) beside its bf16 F.linear: the int8 ceiling.
    torch-int8) OUT="$OUT" timeout 200 python3 scripts/torch-int8-ceiling.py 2>&1 | tee "$OUT/torch_int8.txt" ;;
    bench-multi-gpu-1) bench multi-gpu 590 multi_gpu_1 --skip-cold-run ;;
    bench-multi-gpu-[248])
      n="${step##*-}"
      baseline=()
      [ -f "$OUT/bench_multi_gpu_1.json" ] && baseline=(--multi-gpu-baseline "$OUT/bench_multi_gpu_1.json")
      timeout 590 scripts/multi-gpu.sh "$n" "$BIN/bench" --sections multi-gpu --skip-cold-run \
        "${baseline[@]}" --json "$OUT/bench_multi_gpu_$n.json" 2>&1 | tee -a "$OUT/bench.log" ;;
    # Nsight Compute's full set on the six wgmma W8A8 GEMMs of the first 14B linear shape (M 75 600,
    # K = N = 5 120): the details page, each kernel's hottest SASS lines and its stall reasons.
    ncu-linear) ncu_linear ;;
    # The cuBLAS kernels and their times under ncu: our bf16 Linear against F.linear (1.3B).
    ncu-bf16-linear) ncu_bf16_linear ;;
    # GPU time per kernel over 600 launches of a 14B forward at 720p (after the ~4 000 launches
    # that draw and quantise its random weights): attention against the W8A8 linears and the rest.
    profile-dit-14b) OUT="$OUT/profile_dit_14b" scripts/gpu-profile.sh 4000 600 --sections dit \
      --dit-model 14b --dit-attention sagesla:0.1 --dit-linears w8a8 --slow-iters 1 --warmup 0 \
      ${W8A8_GEMM:+--w8a8-gemm "$W8A8_GEMM"} \
      2>&1 | tee "$OUT/profile_dit_14b.txt" ;;
    t2v-demo) (cd "$OUT" && timeout 120 "$BIN/t2v" --device cuda --dtype f32 --output demo_cuda.mp4 2>&1 | tee t2v_demo.txt) ;;
    *) echo "unknown step: $step" >&2; false ;;
  esac
  [ "${PIPESTATUS[0]}" -eq 0 ] || echo "FAILED: $step" | tee -a "$OUT/failures.txt"
done
