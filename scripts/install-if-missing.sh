#!/usr/bin/env bash
# Installs a Debian package when its program is missing; says so when it cannot (never fails:
# what it installs is optional). Used by .ci/run and scripts/cuda-toolchain.sh.
# Usage: scripts/install-if-missing.sh <program path> <package> <what happens without it>
set -uo pipefail
program="$1" package="$2" without="$3"
[ -x "$program" ] && exit 0
command -v apt-get >/dev/null || { echo "no apt-get: $package not installed; $without"; exit 0; }
sudo_if_needed=$([ "$(id -u)" -eq 0 ] || echo sudo)
{ $sudo_if_needed apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
    $sudo_if_needed apt-get install -y -qq "$package"; } >/dev/null 2>&1 \
  || echo "$package could not be installed here: $without"
exit 0
