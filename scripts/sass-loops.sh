#!/usr/bin/env bash
# The k-tile loop of tensor-core kernels as ptxas compiled them: for each kernel named, the
# shortest loop of its SASS that holds wgmmas (HGMMA / IGMMA), its length in instructions and
# its wgmma count, with ptxas's registers and spills. Runs here, without a GPU.
#   . ~/.cache/turbodiffusion-rs/cuda-13.0/env.sh   # nvcc (scripts/cuda-toolchain.sh)
#   scripts/sass-loops.sh turbo-kernels/kernels/w8a8_sm90a.cu w8a8_gemm_wgmma_persistent_cvt_bf16
# cuobjdump is in no wheel that cuda-toolchain.sh installs: set CUOBJDUMP, or put it on PATH
# (`pip download --no-deps nvidia-cuda-cuobjdump`, then unzip the wheel).
set -euo pipefail
[ $# -ge 2 ] || { echo "usage: $0 <file.cu> <kernel>..." >&2; exit 2; }
source_file="$1"; shift
cuobjdump="${CUOBJDUMP:-$(command -v cuobjdump || true)}"
[ -n "$cuobjdump" ] || { echo "no cuobjdump: set CUOBJDUMP (see this script's header)" >&2; exit 1; }
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
nvcc --cubin -O3 -std=c++17 --expt-relaxed-constexpr -arch=sm_90a \
  -I "$(dirname "$0")/../turbo-kernels/kernels" "$source_file" -o "$work/k.cubin" \
  -Xptxas -v 2> "$work/ptxas.txt"
for kernel in "$@"; do
  ptxas=$(grep -A4 "entry function '$kernel'" "$work/ptxas.txt" \
    | grep -oE "[0-9]+ bytes spill stores|Used [0-9]+ registers" | paste -sd, -)
  "$cuobjdump" -sass -fun "$kernel" "$work/k.cubin" | python3 -c '
import re, sys
kernel, ptxas = sys.argv[1:]
code = [(int(a, 16), text) for a, text in re.findall(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sys.stdin.read())]
loops = []
for address, text in code:
    branch = re.search(r"BRA (0x[0-9a-f]+)", text)
    if branch and int(branch.group(1), 16) < address:
        body = [t for a, t in code if int(branch.group(1), 16) <= a <= address]
        wgmmas = sum("GMMA" in t for t in body)
        if wgmmas:
            loops.append((len(body), wgmmas))
if loops:
    length, wgmmas = min(loops)
    print(f"{kernel}: k-tile loop {length} instructions, {wgmmas} wgmmas; ptxas: {ptxas}")
else:
    print(f"{kernel}: no loop holds a wgmma; ptxas: {ptxas}")
' "$kernel" "$ptxas"
done
