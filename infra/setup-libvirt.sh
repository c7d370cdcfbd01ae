#!/usr/bin/env bash
# Installs what the VM adapter and its tests need on Debian 12: libvirtd and virtlogd (the test
# harness starts its own, not systemd), virsh for tests, libvirt's C headers and pkg-config for the
# `virt` crate, QEMU for x86 guests, busybox, cpio and qemu-guest-agent for the test guest
# (infra/guest: its `qemu-ga` is copied into the guest's initramfs; the host need not run it). Debian
# packages only, installed only when missing, so a second run is quick. Called by infra/setup.sh.
set -euo pipefail

DEBIAN_PACKAGES=(libvirt-daemon-system libvirt-clients libvirt-dev qemu-system-x86 busybox-static cpio pkg-config qemu-guest-agent)

say() { printf 'setup-libvirt: %s\n' "$*" >&2; }
die() { say "$*"; exit 1; }
# shellcheck source=infra/debian.sh
. "$(dirname "${BASH_SOURCE[0]}")/debian.sh"

ensure_debian_packages "${DEBIAN_PACKAGES[@]}"
