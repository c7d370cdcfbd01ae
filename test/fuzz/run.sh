#!/usr/bin/env bash
# Bounded fuzz run of the NBD server's parsers (greeting, option haggling, requests).
#
#   FUZZ_SECONDS=60 test/fuzz/run.sh [extra libFuzzer flags]
#
# Findings land in packages/dataplane-native/core/fuzz/artifacts/nbd_server/; the run exits
# non-zero when there is one. Reproduce with:
#   RUSTC_BOOTSTRAP=1 cargo fuzz run nbd_server ARTIFACT   (from packages/dataplane-native/core)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"

if ! cargo fuzz --version >/dev/null 2>&1; then
  cargo install --locked cargo-fuzz
fi

cd "$root/packages/dataplane-native/core"
# cargo-fuzz passes nightly-only -Z flags; RUSTC_BOOTSTRAP lets the stable toolchain take them.
RUSTC_BOOTSTRAP=1 cargo fuzz run nbd_server -- \
  -max_total_time="${FUZZ_SECONDS:-60}" -timeout=30 -rss_limit_mb=4096 \
  -dict=fuzz/nbd_server.dict "$@"
