#!/usr/bin/env bash
# Per-kernel GPU time of a window of a bench run, with Nsight Compute (the GPU machine has ncu;
# it has no nsys). Prints the kernels of the window grouped by name, most time first.
#   scripts/gpu-profile.sh <launch-skip> <launch-count> <bench arguments...>
# e.g. one DiT forward's blocks:  scripts/gpu-profile.sh 3000 700 --sections dit \
#        --dit-attention sla:0.1 --dit-linears bf16 --slow-iters 1 --warmup 0
# ncu serialises kernels and flushes caches between them: the times are per kernel, not the
# wall time of the run. Results in $OUT (default /tmp/gpu-out).
set -euo pipefail
OUT="${OUT:-/tmp/gpu-out}"
mkdir -p "$OUT" /tmp/gpu-profile
export LD_LIBRARY_PATH="/opt/torch/.venv/lib/python3.12/site-packages/nvidia/cu13/lib:/usr/local/cuda-13.0/targets/x86_64-linux/lib"
if [ -f gpu-bin/bench.xz ]; then
  xz -dc gpu-bin/bench.xz > /tmp/gpu-profile/bench
else
  gunzip -c gpu-bin/bench.gz > /tmp/gpu-profile/bench
fi
chmod +x /tmp/gpu-profile/bench
skip="$1" count="$2"; shift 2
NCU="$(command -v ncu || echo /usr/local/cuda/bin/ncu)"
timeout 480 "$NCU" --metrics gpu__time_duration.sum --launch-skip "$skip" --launch-count "$count" \
  --csv /tmp/gpu-profile/bench "$@" > "$OUT/ncu.csv" 2> "$OUT/ncu.err"
python3 - "$OUT/ncu.csv" <<'PY'
import collections, csv, sys
header, totals = None, collections.defaultdict(lambda: [0, 0.0])
scale = {"nsecond": 1e-6, "ns": 1e-6, "usecond": 1e-3, "us": 1e-3, "msecond": 1.0, "ms": 1.0}
for row in csv.reader(open(sys.argv[1])):
    if "Kernel Name" in row:
        header = row
        continue
    if header is None or len(row) != len(header):
        continue
    cell = dict(zip(header, row))
    if cell.get("Metric Name") != "gpu__time_duration.sum":
        continue
    ms = float(cell["Metric Value"].replace(",", "")) * scale.get(cell.get("Metric Unit", "ns"), 1e-6)
    entry = totals[cell["Kernel Name"][:80]]
    entry[0] += 1
    entry[1] += ms
total = sum(ms for _, ms in totals.values())
print(f"{total:.2f} ms in {sum(n for n, _ in totals.values())} kernels")
for name, (n, ms) in sorted(totals.items(), key=lambda kv: -kv[1][1])[:40]:
    print(f"{ms:10.3f} ms {n:5d}x  {name}")
PY
