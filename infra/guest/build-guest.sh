#!/usr/bin/env bash
# Builds Ferry's test guest: a Debian kernel and a busybox initramfs whose /init (infra/guest/init)
# writes a deterministic workload on the virtio disks and prints checksums on the serial console,
# and can run a guest agent (qemu-ga, with infra/guest/fsfreeze-hook) on a virtio-serial port.
# Everything comes from Debian's apt: the kernel package is fetched with `apt-get download` and
# unpacked into the cache (never installed on the host); busybox comes from busybox-static; qemu-ga
# and the shared libraries `ldd` lists for it (with the dynamic loader) are copied from the host's
# qemu-guest-agent package, which infra/setup-libvirt.sh installs (the host need not run it).
#
# Usage: build-guest.sh  -> prints the directory holding `vmlinuz` and `initrd.img`.
# Cached under $FERRY_GUEST_CACHE (default: .cache/ferry-guest in the repository), keyed by the
# kernel, busybox and qemu-guest-agent package versions and this script's inputs, so only the first
# run pays.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
cache=${FERRY_GUEST_CACHE:-$repo/.cache/ferry-guest}

say() { printf 'build-guest: %s\n' "$*" >&2; }
die() { say "$*"; exit 1; }

busybox=/bin/busybox
bbver=$(dpkg-query -W -f='${Version}' busybox-static 2>/dev/null) && [[ -x $busybox ]] ||
  die "busybox-static is not installed: run infra/setup-libvirt.sh"
qemuga=/usr/sbin/qemu-ga
gaver=$(dpkg-query -W -f='${Version}' qemu-guest-agent 2>/dev/null) && [[ -x $qemuga ]] ||
  die "qemu-guest-agent is not installed: run infra/setup-libvirt.sh"
inputs=$(cat "$here/init" "$here/fsfreeze-hook" "${BASH_SOURCE[0]}" | sha256sum | cut -c1-12)

# Quick path: asking apt which kernel is current costs seconds, so the last build is reused as
# long as apt's package lists, busybox, qemu-guest-agent and this script's inputs have not changed since.
current=$cache/current
if [[ -f $current/vmlinuz && -f $current/initrd.img && -f $current/inputs ]] &&
  [[ $(cat "$current/inputs") == "$inputs $bbver $gaver" ]] &&
  [[ -z $(find /var/lib/apt/lists -maxdepth 1 -newer "$current/inputs" -print -quit) ]]; then
  readlink -f "$current"
  exit 0
fi

# The kernel the linux-image-amd64 metapackage points at, e.g. linux-image-6.1.0-56-amd64.
# A fresh machine (or image) may have no package lists yet: fetch them once.
meta=$(apt-cache show --no-all-versions linux-image-amd64 2>/dev/null) || {
  say "apt knows no linux-image-amd64 yet: apt-get update"
  sudo=()
  [[ $(id -u) -eq 0 ]] || sudo=(sudo -n)
  "${sudo[@]}" apt-get update -qq >&2
  meta=$(apt-cache show --no-all-versions linux-image-amd64 2>/dev/null)
} || die "apt knows no linux-image-amd64 even after apt-get update"
kpkg=$(sed -n 's/^Depends: \(linux-image-[0-9][^ ]*-amd64\) (= .*$/\1/p' <<<"$meta" | head -n1)
kver=$(sed -n 's/^Depends: linux-image-[0-9][^ ]*-amd64 (= \(.*\))$/\1/p' <<<"$meta" | head -n1)
[[ -n $kpkg && -n $kver ]] || die "cannot tell which kernel linux-image-amd64 depends on"
key="${kpkg}_${kver}_busybox-${bbver}_qemu-ga-${gaver}_${inputs}"
key=${key//[^A-Za-z0-9._-]/_}
out=$cache/$key
build() {
  say "building the guest ($kpkg $kver, busybox $bbver, qemu-ga $gaver) into $out"
  mkdir -p "$cache"
  work=$(mktemp -d "$cache/.build.XXXXXX")
  trap 'rm -rf "$work"' EXIT
  (cd "$work" && apt-get download -qq "$kpkg=$kver" 2>/dev/null) ||
    die "apt-get download $kpkg=$kver failed"
  dpkg-deb -x "$work"/"$kpkg"_*.deb "$work/pkg"
  release=${kpkg#linux-image-}

  root=$work/root
  mkdir -p "$root/bin" "$root/lib/modules" "$root/dev" "$root/proc" "$root/sys"
  cp "$busybox" "$root/bin/busybox"
  install -m 0755 "$here/init" "$root/init"
  # qemu-ga at the path it has on the host, with every library ldd lists (and the loader) at theirs.
  mkdir -p "$root/usr/sbin" "$root/etc/qemu"
  cp "$qemuga" "$root/usr/sbin/qemu-ga"
  install -m 0755 "$here/fsfreeze-hook" "$root/etc/qemu/fsfreeze-hook"
  libs=$(ldd "$qemuga" | sed -n 's/^[^/]*\(\/[^ ]*\) (0x.*$/\1/p')
  [[ $libs == */ld-linux* ]] || die "ldd $qemuga names no dynamic loader"
  for lib in $libs; do
    mkdir -p "$root$(dirname "$lib")"
    cp -L "$lib" "$root$lib"
  done
  # virtio_console (the agent's virtio-serial port) needs only virtio and virtio_ring.
  for m in virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk virtio_console; do
    ko=$(find "$work/pkg/lib/modules/$release" -name "$m.ko*" | head -n1)
    [[ -n $ko ]] || die "module $m not found in $kpkg"
    case $ko in
    *.ko) cp "$ko" "$root/lib/modules/$m.ko" ;;
    *.ko.xz) xz -dc "$ko" >"$root/lib/modules/$m.ko" ;;
    *) die "unexpected module file $ko" ;;
    esac
  done

  mkdir -p "$work/out"
  (cd "$root" && find . | LC_ALL=C sort | cpio -o -H newc --quiet | gzip -9 >"$work/out/initrd.img")
  cp "$work/pkg/boot/vmlinuz-$release" "$work/out/vmlinuz"
  chmod 0644 "$work/out/vmlinuz" "$work/out/initrd.img"
  chmod 0755 "$work/out"
  rm -rf "$out"
  mv "$work/out" "$out"
}

if [[ ! -f $out/vmlinuz || ! -f $out/initrd.img ]]; then
  build
  # Older builds (another kernel, an older init) are not used any more.
  find "$cache" -mindepth 1 -maxdepth 1 -type d ! -name "$key" ! -name '.build.*' -exec rm -rf {} +
fi
echo "$inputs $bbver $gaver" >"$out/inputs"
ln -sfn "$key" "$current"
echo "$out"

