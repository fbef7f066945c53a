#!/usr/bin/env bash
# Builds the cargo-fuzz targets of fuzz/ (the .pth reader, the safetensors header, the MP4
# reader) and runs each for a bounded time, seeded from the repository's fixtures.
#
#   scripts/fuzz.sh            # 60 s per target
#   scripts/fuzz.sh 600        # 10 minutes per target
#   scripts/fuzz.sh 30 mp4_reader
#
# Needs a nightly toolchain and cargo-fuzz (`cargo install cargo-fuzz`); without them it says
# which is missing and exits with status 2. A crash leaves its input in
# fuzz/artifacts/<target>/ and makes the script exit non-zero; reproduce it with
# `cargo +nightly fuzz run --fuzz-dir fuzz <target> <file>`.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds="${1:-60}"
shift || true

if ! rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
    echo "fuzz.sh: no nightly toolchain: cargo fuzz builds with the sanitizer flags only" \
        "nightly has (rustup toolchain install nightly)" >&2
    exit 2
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
    echo "fuzz.sh: cargo-fuzz is not installed (cargo install cargo-fuzz)" >&2
    exit 2
fi

targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    mapfile -t targets < <(cargo +nightly fuzz list --fuzz-dir fuzz)
fi

# Seeds: the real files of each kind the repository has.
seed() {
    local target="$1"
    shift
    mkdir -p "fuzz/corpus/$target"
    for file in "$@"; do
        [ -f "$file" ] && cp -n "$file" "fuzz/corpus/$target/" || true
    done
}
seed pth_reader fixtures/pth/*.pth
seed safetensors_header fixtures/golden/flow_solvers.safetensors fixtures/golden/umt5.safetensors
seed mp4_reader fuzz/seeds/*.mp4

status=0
for target in "${targets[@]}"; do
    echo "== $target: building"
    cargo +nightly fuzz build --fuzz-dir fuzz "$target"
    echo "== $target: fuzzing for ${seconds} s"
    # An allocation past 2 GiB counts as a crash: a header must not make the reader allocate
    # what the file does not hold.
    if ! cargo +nightly fuzz run --fuzz-dir fuzz "$target" "fuzz/corpus/$target" -- \
        -max_total_time="$seconds" -rss_limit_mb=4096 -malloc_limit_mb=2048 -max_len=65536 \
        -timeout=30; then
        echo "== $target: FAILED (input in fuzz/artifacts/$target/)" >&2
        status=1
    fi
done
exit "$status"
