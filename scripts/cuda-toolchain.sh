#!/usr/bin/env bash
# Sets up what `cargo build --features cuda` needs on a machine without a GPU or a system CUDA:
# the CUDA 13.0 toolkit from pinned PyPI wheels, unversioned .so links for the linker, and a
# stub libcuda.so.1 (the driver is in no wheel; candle links cudarc dynamically), and nasm for
# OpenH264's assembly when apt can install it. Idempotent:
# run it again and it only checks. It writes `$PREFIX/env.sh`; source that before building:
#
#   scripts/cuda-toolchain.sh && . ~/.cache/turbodiffusion-rs/cuda-13.0/env.sh
#   cargo build --release --features cuda
#
# TURBO_CUDA_PREFIX moves the install (default ~/.cache/turbodiffusion-rs/cuda-13.0);
# CUDA_COMPUTE_CAP picks the target GPU (default 90: H100/H200).
set -euo pipefail

PREFIX="${TURBO_CUDA_PREFIX:-$HOME/.cache/turbodiffusion-rs/cuda-13.0}"
VENV="$PREFIX/venv"
COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"

# Every wheel pinned to the 13.0 release in one pip call: an unpinned nvidia-nvvm emits a PTX ISA
# that driver 580 rejects, and a mismatched cuda-crt breaks nvcc (`__cudaLaunch` macro error).
WHEELS=(
  nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88
  nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85
  nvidia-cublas==13.0.2.14 nvidia-curand==10.4.0.35 nvidia-cuda-nvrtc==13.0.88
)

install_wheels() {
  if [ -f "$PREFIX/.wheels-installed" ]; then return; fi
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check "${WHEELS[@]}"
  touch "$PREFIX/.wheels-installed"
}

toolkit_root() {
  "$VENV/bin/python" -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13"))'
}

# The linker looks for unversioned names; the wheels ship only the versioned ones.
link_libraries() {
  local lib="$1/lib"
  ln -sf libcudart.so.13 "$lib/libcudart.so"
  ln -sf libcublas.so.13 "$lib/libcublas.so"
  ln -sf libcublasLt.so.13 "$lib/libcublasLt.so"
  ln -sf libnvrtc.so.13 "$lib/libnvrtc.so"
  ln -sf libcurand.so.10 "$lib/libcurand.so"
}

# A libcuda.so.1 defining every driver entry point cudarc declares, each returning
# CUDA_ERROR_UNKNOWN (999), so that linking succeeds and `Device::new_cuda` fails cleanly here.
build_driver_stub() {
  local stub="$PREFIX/driver-stub"
  if [ -f "$stub/libcuda.so.1" ]; then return; fi
  local version sys
  version=$(awk '/^name = "cudarc"/ { getline; gsub(/[^0-9.]/, ""); print; exit }' "$ROOT/Cargo.lock")
  (cd "$ROOT" && cargo fetch --quiet)
  sys=$(ls -d "$HOME"/.cargo/registry/src/*/cudarc-"$version"/src/driver/sys/mod.rs | head -n 1)
  mkdir -p "$stub"
  grep -o 'pub unsafe fn cu[A-Za-z0-9_]*' "$sys" | awk '{ print $4 }' | sort -u |
    awk '{ printf "int %s(void) { return 999; }\n", $1 }' > "$stub/stub.c"
  gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$stub/libcuda.so.1" "$stub/stub.c"
  ln -sf libcuda.so.1 "$stub/libcuda.so"
}

write_env() {
  local cu="$1" stub="$PREFIX/driver-stub"
  cat > "$PREFIX/env.sh" <<ENV
export CUDA_HOME="$cu" CUDA_ROOT="$cu" CUDA_PATH="$cu"
export PATH="$cu/bin:\$PATH"
export CUDA_COMPUTE_CAP=$COMPUTE_CAP CUDARC_CUDA_VERSION=13000
export LIBRARY_PATH="$cu/lib:$stub\${LIBRARY_PATH:+:\$LIBRARY_PATH}"
export LD_LIBRARY_PATH="$cu/lib:$stub\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
export RUSTFLAGS="-L $cu/lib -L $stub\${RUSTFLAGS:+ \$RUSTFLAGS}"
ENV
}

mkdir -p "$PREFIX"
install_wheels
CU=$(toolkit_root)
link_libraries "$CU"
build_driver_stub
# The CUDA build is the one that is timed: without nasm, OpenH264 is compiled without its SIMD
# assembly and every MP4 row measures the slow encoder (a fresh machine here had none).
"$ROOT/scripts/install-if-missing.sh" /usr/bin/nasm nasm "OpenH264 is built without its assembly"
write_env "$CU"
"$CU/bin/nvcc" --version | tail -n 2
echo "CUDA toolchain ready: . $PREFIX/env.sh"
