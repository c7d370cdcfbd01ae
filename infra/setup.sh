#!/usr/bin/env bash
# Brings this machine (Debian 12) to what `npm run demo` and `npm test` need, and builds the repo.
# Idempotent and quick when everything is already there: Debian packages are installed only when
# missing, `npm ci` runs only when node_modules is older than package-lock.json, and the build goes
# through turbo's cache.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# libnbd-bin holds nbdinfo, nbdcopy and, on Debian 12, nbdfuse; e2fsprogs and mount (mkfs.ext4,
# e2fsck, debugfs, losetup) are for the node-attach test (packages/cli/test/node-attach.test.ts).
DEBIAN_PACKAGES=(qemu-utils nbdkit libnbd-bin nbd-server fio nats-server rsync e2fsprogs mount)
NPM_STAMP=node_modules/.ferry-npm-ci.stamp

say() { printf 'setup: %s\n' "$*" >&2; }
die() { say "$*"; exit 1; }
# shellcheck source=infra/debian.sh
. infra/debian.sh

ensure_rust() {
  # shellcheck source=infra/env.sh
  . infra/env.sh
  command -v cargo >/dev/null 2>&1 ||
    die "cargo not found (nor ~/.cargo/env): install a Rust toolchain (rustup, stable >= 1.87)"
}

ensure_node_modules() {
  if [[ ! -f $NPM_STAMP || package-lock.json -nt $NPM_STAMP ]]; then
    say "installing npm dependencies (npm ci)"
    # Native addons (zstd-napi) compile here: prebuilt binaries would be fetched from outside the registries.
    npm_config_build_from_source=true npm ci --no-audit --no-fund
    touch "$NPM_STAMP"
  fi
}

ensure_debian_packages "${DEBIAN_PACKAGES[@]}"
bash infra/setup-libvirt.sh
ensure_rust
ensure_node_modules
bash infra/setup-k8s.sh >/dev/null # etcd, and kube-apiserver/kubectl/helm built once into ~/.cache/ferry/k8s
say "building (turbo, cached)"
npx --no-install turbo run build --output-logs=errors-only
