#!/usr/bin/env bash
# Builds the test control plane into the cache folder printed by tests/kube/bin-dir.sh:
#   bin/kube-apiserver, bin/etcd, bin/kubectl  (this Go module, Kubernetes pinned in go.mod)
#   bin/helm                                   (go install helm.sh/helm/v3/cmd/helm@HELM_VERSION)
#   crds/*.yaml                                (PyTorchJob and RayService CRDs from their Go modules)
# Does nothing when that folder is already complete. The Go module and build caches live in
# <repo>/.cache/kube/{gomod,gocache}, so a rebuild after a pin change is incremental.
# Usage: tests/kube/build.sh   (or `make setup-kube`); needs Go >= 1.26 and the Go module proxy.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
# shellcheck source=versions.env
source "$here/versions.env"
bin="$("$here/bin-dir.sh")"
out="$(dirname "$bin")"
if [ -f "$out/complete" ]; then
  echo "kube test binaries up to date in $bin"
  exit 0
fi
if ! command -v go >/dev/null; then
  echo "error: building the test kube-apiserver needs Go >= 1.26 on PATH (https://go.dev/dl/)" >&2
  exit 1
fi

export GOMODCACHE="$repo/.cache/kube/gomod" GOCACHE="$repo/.cache/kube/gocache"
export GOFLAGS="-modcacherw -buildvcs=false" GOTOOLCHAIN="${GOTOOLCHAIN:-local}" CGO_ENABLED=0
export GOPROXY="${GOPROXY:-https://proxy.golang.org,direct}"
tmp="$out.partial"
rm -rf "$tmp"
mkdir -p "$tmp/bin" "$tmp/crds"
started=$(date +%s)

# CRDs first: quick, and an unavailable module fails before the long build. A module's zip holds
# the files of its folder, CRD YAML included; `go mod download` verifies it against the checksum
# database.
crd_from_module() {  # MODULE VERSION PATH-IN-MODULE
  local info dir
  info="$(go mod download -json "$1@$2")"
  dir="$(sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p' <<<"$info")"
  if [ -z "$dir" ] || [ ! -f "$dir/$3" ]; then
    echo "error: could not get $3 from Go module $1@$2:" >&2
    echo "$info" >&2
    exit 1
  fi
  cp "$dir/$3" "$tmp/crds/"
}
crd_from_module "$TRAINING_OPERATOR_MODULE" "$TRAINING_OPERATOR_VERSION" "$TRAINING_OPERATOR_CRD"
crd_from_module "$KUBERAY_MODULE" "$KUBERAY_VERSION" "$KUBERAY_CRD"
chmod -R u+w "$tmp/crds"

echo "building kube-apiserver, etcd, kubectl ($(go version | cut -d' ' -f3), cache $repo/.cache/kube)"
# Stamp the Kubernetes version (as Kubernetes' own build does), so /version reports the pinned
# release, not v0.0.0-master, and version checks such as a helm chart's kubeVersion see it.
kube_version="$(sed -n 's/^[[:space:]]*k8s.io\/kubernetes v\([0-9.]*\)$/\1/p' "$here/go.mod")"
version_pkg=k8s.io/component-base/version
version_flags="-X $version_pkg.gitVersion=v$kube_version -X $version_pkg.gitMajor=${kube_version%%.*}"
version_flags+=" -X $version_pkg.gitMinor=$(cut -d. -f2 <<<"$kube_version")"
(cd "$here" && go build -trimpath -ldflags="-s -w $version_flags" -o "$tmp/bin/" ./cmd/kube-apiserver ./cmd/etcd ./cmd/kubectl)
echo "building helm $HELM_VERSION"
GOBIN="$tmp/bin" go install -trimpath -ldflags="-s -w" "helm.sh/helm/v3/cmd/helm@$HELM_VERSION"

touch "$tmp/complete"
# Drop builds for older pins (the module and build caches stay), then publish this one.
find "$repo/.cache/kube" -mindepth 1 -maxdepth 1 -type d ! -name gomod ! -name gocache \
  ! -name "$(basename "$tmp")" -exec rm -rf {} +
mv "$tmp" "$out"
echo "kube test binaries built in $(( $(date +%s) - started )) s: $bin"
