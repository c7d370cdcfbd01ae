#!/usr/bin/env bash
# Builds the Kubernetes control-plane tools Ferry's tests run against — kube-apiserver, kubectl and
# helm, pinned by infra/k8s/go.mod + go.sum — into a cache outside the repo, and makes sure etcd is
# there. Only missing binaries are built, so a second run returns at once. The cache key is the pinned
# versions plus a hash of go.mod/go.sum: changing a pin builds into a fresh directory.
#
#   infra/setup-k8s.sh            build what is missing, then print the bin directory on stdout
#   infra/setup-k8s.sh --bin-dir  only print the bin directory (builds nothing; tests use this)
#
# FERRY_K8S_CACHE overrides the cache root (default ${XDG_CACHE_HOME:-$HOME/.cache}/ferry/k8s).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/k8s"

KUBE_VERSION=v1.37.2
HELM_VERSION=v3.22.0
GO=${GO:-$(command -v go || echo /usr/local/go/bin/go)}

say() { printf 'setup-k8s: %s\n' "$*" >&2; }
die() { say "$*"; exit 1; }
# shellcheck source=infra/debian.sh
. ../debian.sh

pin_hash=$(cat go.mod go.sum | sha256sum | cut -c1-12)
BIN_DIR="${FERRY_K8S_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/ferry/k8s}/${KUBE_VERSION}-helm-${HELM_VERSION}-${pin_hash}/bin"

if [[ ${1:-} == --bin-dir ]]; then
  printf '%s\n' "$BIN_DIR"
  exit 0
fi

ensure_etcd() {
  # Debian 12's etcd 3.4 serves kube-apiserver v1.37 (checked: CRDs, watches, status updates).
  command -v etcd >/dev/null 2>&1 && return 0
  ensure_debian_packages etcd-server
}

build_missing() {
  local kube_minor=${KUBE_VERSION#v1.}
  kube_minor=${kube_minor%%.*}
  local -A packages=(
    [kube-apiserver]=k8s.io/kubernetes/cmd/kube-apiserver
    [kubectl]=k8s.io/kubernetes/cmd/kubectl
    [helm]=helm.sh/helm/v3/cmd/helm
  )
  local missing=() name
  for name in "${!packages[@]}"; do
    [[ -x $BIN_DIR/$name ]] || missing+=("$name")
  done
  ((${#missing[@]} == 0)) && return 0

  [[ -x $GO ]] || die "go not found (looked for 'go' on PATH and /usr/local/go/bin/go); need Go >= 1.26"
  # Version stamps the release builds carry: kubectl warns about skew and helm picks its default
  # Kubernetes version for `helm template` from these.
  local ldflags="-s -w"
  local v
  for v in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ldflags+=" -X $v.gitVersion=$KUBE_VERSION -X $v.gitMajor=1 -X $v.gitMinor=$kube_minor -X $v.gitTreeState=clean"
  done
  ldflags+=" -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION"
  ldflags+=" -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMajor=1 -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMinor=$kube_minor"
  ldflags+=" -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMajor=1 -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMinor=$kube_minor"

  mkdir -p "$BIN_DIR"
  STAGING=$(mktemp -d "$BIN_DIR/.build.XXXXXX")
  trap 'rm -rf "${STAGING:-}"' EXIT
  local targets=()
  for name in "${missing[@]}"; do targets+=("${packages[$name]}"); done
  say "building ${missing[*]} (Kubernetes $KUBE_VERSION, helm $HELM_VERSION); a cold build takes a while"
  local start=$SECONDS
  # CGO off: static binaries, as the release builds are; -mod=readonly: go.sum is the pin; GOFLAGS is
  # set whole so that a developer's own flags cannot change what is built.
  CGO_ENABLED=0 GOFLAGS="-mod=readonly -buildvcs=false" "$GO" build -trimpath -ldflags "$ldflags" -o "$STAGING/" "${targets[@]}"
  for name in "${missing[@]}"; do mv -f "$STAGING/$name" "$BIN_DIR/$name"; done
  say "built ${missing[*]} in $((SECONDS - start)) s into $BIN_DIR"
}

ensure_etcd
build_missing
printf '%s\n' "$BIN_DIR"
