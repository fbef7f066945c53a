#!/usr/bin/env bash
# The turbo-serve page in headless Chromium (Debian package `chromium`; CHROMIUM=path for another
# binary): loads the page, submits a demo job, waits for the video, and keeps the screenshot in
# docs/turbo-serve.png. Without Chromium the test says it is skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
export TURBO_SERVE_SCREENSHOT="$PWD/docs/turbo-serve.png"
cargo test -p turbo-serve --release --test browser -- --nocapture
