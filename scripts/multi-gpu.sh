#!/usr/bin/env bash
# Starts one process per GPU with the launch convention turbodiffusion-rs reads
# (turbo_core::parallel::LaunchEnv): RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT.
# Waits for all of them; the exit status is the first non-zero one to come. Each rank's output goes to
# the terminal with a "[rank N]" prefix.
#
#   scripts/multi-gpu.sh N PROGRAM [ARGS...]
#   scripts/multi-gpu.sh 4 target/release/examples/gpu_check --world-size 4
#
# One host. For several hosts, start PROGRAM on each with RANK / WORLD_SIZE / LOCAL_RANK set by
# your scheduler and MASTER_ADDR / MASTER_PORT naming rank 0's host (or TURBO_NCCL_ID_FILE on a
# shared file system).
set -euo pipefail

if [[ $# -lt 2 || ! $1 =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: $0 N PROGRAM [ARGS...]   (N: number of GPUs, at least 1)" >&2
  exit 2
fi
world=$1
shift

export WORLD_SIZE=$world
export MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
# A free port unless one is given.
export MASTER_PORT=${MASTER_PORT:-$(python3 -c 'import socket; s=socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])' 2>/dev/null || echo 29500)}

pids=()
for ((rank = 0; rank < world; rank++)); do
  RANK=$rank LOCAL_RANK=$rank "$@" > >(sed "s/^/[rank $rank] /") 2>&1 &
  pids+=($!)
done

# A rank that fails leaves the others blocked in a collective: as soon as any rank exits
# non-zero (whichever it is), stop the rest.
status=0
running=("${pids[@]}")
while ((${#running[@]} > 0)); do
  code=0
  finished=
  wait -n -p finished "${running[@]}" || code=$?
  still=()
  for pid in "${running[@]}"; do [[ $pid == "$finished" ]] || still+=("$pid"); done
  running=("${still[@]}")
  if [[ $code -ne 0 && $status -eq 0 ]]; then
    status=$code
    for other in "${running[@]}"; do kill "$other" 2>/dev/null || true; done
  fi
done
exit "$status"
