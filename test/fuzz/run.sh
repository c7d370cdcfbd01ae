#!/usr/bin/env bash
# Bounded fuzz runs of everything that parses bytes from the network: the NBD server's parsers
# (nbd_server) and the replication frame decoder (decode_frame).
#
#   FUZZ_SECONDS=60 test/fuzz/run.sh [TARGET] [extra libFuzzer flags]
#
# Without TARGET every target runs, each for FUZZ_SECONDS. Findings land in
# packages/dataplane-native/core/fuzz/artifacts/TARGET/; the run exits non-zero at the first
# target that has one. Reproduce with:
#   RUSTC_BOOTSTRAP=1 cargo fuzz run TARGET ARTIFACT   (from packages/dataplane-native/core)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"

if ! cargo fuzz --version >/dev/null 2>&1; then
  cargo install --locked cargo-fuzz
fi

cd "$root/packages/dataplane-native/core"
if [[ $# -gt 0 && $1 != -* ]]; then
  targets=("$1")
  shift
else
  mapfile -t targets < <(cargo fuzz list)
fi
for target in "${targets[@]}"; do
  dict=()
  if [[ -f fuzz/$target.dict ]]; then dict=(-dict="fuzz/$target.dict"); fi
  echo "== fuzzing $target for ${FUZZ_SECONDS:-60}s"
  # cargo-fuzz passes nightly-only -Z flags; RUSTC_BOOTSTRAP lets the stable toolchain take them.
  RUSTC_BOOTSTRAP=1 cargo fuzz run "$target" -- \
    -max_total_time="${FUZZ_SECONDS:-60}" -timeout=30 -rss_limit_mb=4096 \
    "${dict[@]}" "$@"
done
