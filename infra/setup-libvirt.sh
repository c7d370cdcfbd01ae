#!/usr/bin/env bash
# Installs what the VM adapter and its tests need on Debian 12: libvirtd and virtlogd (the test
# harness starts its own, not systemd), virsh for tests, libvirt's C headers and pkg-config for the
# `virt` crate, QEMU for x86 guests, busybox and cpio for the test guest (infra/guest). Debian
# packages only, installed only when missing, so a second run is quick. Called by infra/setup.sh.
set -euo pipefail

DEBIAN_PACKAGES=(libvirt-daemon-system libvirt-clients libvirt-dev qemu-system-x86 busybox-static cpio pkg-config)

say() { printf 'setup-libvirt: %s\n' "$*" >&2; }
die() { say "$*"; exit 1; }

ensure_debian_packages() {
  local missing=() pkg
  for pkg in "${DEBIAN_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q '^install ok installed$' || missing+=("$pkg")
  done
  ((${#missing[@]} == 0)) && return 0

  local sudo=()
  if [[ $(id -u) -ne 0 ]]; then
    command -v sudo >/dev/null 2>&1 || die "need root or sudo to install: ${missing[*]}"
    sudo=(sudo -n)
  fi
  say "installing Debian packages: ${missing[*]}"
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

ensure_debian_packages
