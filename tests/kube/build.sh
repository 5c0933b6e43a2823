#!/usr/bin/env bash
# Builds the test cluster into the cache folder printed by tests/kube/bin-dir.sh:
#   bin/kube-apiserver, kube-controller-manager, kube-scheduler, kube-proxy, kubectl, kubelet, etcd,
#       hollow-node      (this Go module: k8s.io/kubernetes and etcd pinned in go.mod; hollow-node is
#                         a kubemark hollow kubelet, tests/kube/cmd/hollow-node)
#   bin/kube-network-policies
#                        (SIG Network's NetworkPolicy implementation, from its module)
#   bin/containerd, containerd-shim-runc-v2, ctr, registry
#                        (containerd v2 and the distribution registry modules, for the kubelet node)
#   bin/pause            (the pod sandbox's process: Kubernetes' build/pause/linux/pause.c from the
#                         k8s.io/kubernetes module, linked statically with gcc)
#   bin/coredns          (tests/kube/coredns: CoreDNS pinned in its go.mod)
#   bin/helm             (go install helm.sh/helm/v3/cmd/helm@HELM_VERSION)
#   bin/training-operator.v1, bin/ray-operator, bin/kueue, bin/trainer-controller-manager, bin/jobset
#                        (the Kubeflow training-operator, KubeRay, Kueue, Kubeflow Trainer v2 and
#                         JobSet modules)
#   crds/*.yaml          (PyTorchJob and RayService CRDs from their Go modules)
#   manifests/*.yaml     (the training-operator's, KubeRay's, Kueue's, Trainer v2's and JobSet's install
#                         manifests from their modules, rendered with this kubectl's kustomize)
# Does nothing when that folder is already complete. Go's module and build caches are Go's own
# defaults (under $HOME), so a fresh clone on this machine, or a pin change, rebuilds incrementally.
# Usage: tests/kube/build.sh   (or `make setup-kube`); needs Go >= 1.26, the Go module proxy, and gcc
# with a static C library (Debian: gcc, libc6-dev).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=versions.env
source "$here/versions.env"
bin="$("$here/bin-dir.sh")"
out="$(dirname "$bin")"
if [ -f "$out/complete" ]; then
  echo "kube test binaries up to date in $bin"
  exit 0
fi
if ! command -v go >/dev/null; then
  echo "error: building the test cluster needs Go >= 1.26 on PATH (https://go.dev/dl/)" >&2
  exit 1
fi

export GOFLAGS="-modcacherw -buildvcs=false" GOTOOLCHAIN="${GOTOOLCHAIN:-local}" CGO_ENABLED=0
export GOPROXY="${GOPROXY:-https://proxy.golang.org,direct}"
tmp="$out.partial"
rm -rf "$tmp"
mkdir -p "$tmp/bin" "$tmp/crds"
started=$(date +%s)

# CRDs first: quick, and an unavailable module fails before the long build. A module's zip holds
# the files of its folder, CRD YAML included; `go mod download` verifies it against the checksum
# database.
module_dir() {  # MODULE VERSION
  go mod download -json "$1@$2" | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p'
}
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

step() { echo "[$(( $(date +%s) - started )) s] $*"; }
step "building kube-apiserver, kube-controller-manager, kube-scheduler, kube-proxy, kubectl, kubelet, etcd, hollow-node ($(go version | cut -d' ' -f3))"
# Stamp the Kubernetes version (as Kubernetes' own build does), so /version reports the pinned
# release, not v0.0.0-master, and version checks such as a helm chart's kubeVersion see it.
kube_version="$(sed -n 's/^[[:space:]]*k8s.io\/kubernetes v\([0-9.]*\)$/\1/p' "$here/go.mod")"
version_pkg=k8s.io/component-base/version
version_flags="-X $version_pkg.gitVersion=v$kube_version -X $version_pkg.gitMajor=${kube_version%%.*}"
version_flags+=" -X $version_pkg.gitMinor=$(cut -d. -f2 <<<"$kube_version")"
(cd "$here" && go build -trimpath -ldflags="-s -w $version_flags" -o "$tmp/bin/" ./cmd/...)
step "building coredns"
(cd "$here/coredns" && go build -trimpath -ldflags="-s -w" -o "$tmp/bin/coredns" .)
step "building helm $HELM_VERSION"
GOBIN="$tmp/bin" go install -trimpath -ldflags="-s -w" "helm.sh/helm/v3/cmd/helm@$HELM_VERSION"
step "building the Kubeflow training-operator $TRAINING_OPERATOR_VERSION"
GOBIN="$tmp/bin" go install -trimpath -ldflags="-s -w" \
  "$TRAINING_OPERATOR_MODULE/cmd/training-operator.v1@$TRAINING_OPERATOR_VERSION"
step "building the KubeRay operator $KUBERAY_VERSION"
GOBIN="$tmp/bin" go install -trimpath -ldflags="-s -w" "$KUBERAY_MODULE@$KUBERAY_VERSION"
step "building Kueue $KUEUE_VERSION"
GOBIN="$tmp/bin" go install -trimpath -ldflags="-s -w" "$KUEUE_MODULE/cmd/kueue@$KUEUE_VERSION"
step "building Kubeflow Trainer $TRAINER_VERSION"
GOBIN="$tmp/bin" go install -trimpath -ldflags="-s -w" \
  "$TRAINER_MODULE/cmd/trainer-controller-manager@$TRAINER_VERSION"
step "building JobSet $JOBSET_VERSION"
# Built inside its module (whose go.sum pins its dependencies): `go install sigs.k8s.io/jobset@v...`
# also asks the proxy for the module's version list, which the proxy refuses for this module.
jobset_dir="$(module_dir "$JOBSET_MODULE" "$JOBSET_VERSION")"
(cd "$jobset_dir" && go build -trimpath -ldflags="-s -w" -o "$tmp/bin/jobset" .)

step "building kube-network-policies $KUBE_NETWORK_POLICIES_VERSION"
# Its main package is the module's cmd/ folder: built inside the module to name the binary.
(cd "$(module_dir "$KUBE_NETWORK_POLICIES_MODULE" "$KUBE_NETWORK_POLICIES_VERSION")" && go build -trimpath \
  -ldflags="-s -w" -o "$tmp/bin/kube-network-policies" ./cmd)

step "building containerd $CONTAINERD_VERSION (containerd, containerd-shim-runc-v2, ctr)"
# Without the btrfs, devmapper and zfs snapshotters (cgo or unused here); overlayfs is the one used.
(cd "$(module_dir "$CONTAINERD_MODULE" "$CONTAINERD_VERSION")" && go build -trimpath \
  -tags "no_btrfs no_devmapper no_zfs urfave_cli_no_docs" \
  -ldflags="-s -w -X $CONTAINERD_MODULE/version.Version=$CONTAINERD_VERSION" \
  -o "$tmp/bin/" ./cmd/containerd ./cmd/containerd-shim-runc-v2 ./cmd/ctr)
step "building pause (static)"
pause_src="$(module_dir k8s.io/kubernetes "v$kube_version")/build/pause/linux/pause.c"
gcc -Os -Wall -Werror -static -DVERSION="v$kube_version" -o "$tmp/bin/pause" "$pause_src"
strip "$tmp/bin/pause"
step "building the distribution registry $REGISTRY_VERSION"
(cd "$(module_dir "$REGISTRY_MODULE" "$REGISTRY_VERSION")" && go build -trimpath -ldflags="-s -w" \
  -o "$tmp/bin/registry" ./cmd/registry)

step "rendering the controllers' install manifests"
mkdir -p "$tmp/manifests"
"$tmp/bin/kubectl" kustomize "$(module_dir "$TRAINING_OPERATOR_MODULE" "$TRAINING_OPERATOR_VERSION")/$TRAINING_OPERATOR_MANIFESTS" \
  > "$tmp/manifests/training-operator.yaml"
"$tmp/bin/kubectl" kustomize "$(module_dir "$KUBERAY_MODULE" "$KUBERAY_VERSION")/$KUBERAY_MANIFESTS" \
  > "$tmp/manifests/kuberay-operator.yaml"
"$tmp/bin/kubectl" kustomize "$(module_dir "$KUEUE_MODULE" "$KUEUE_VERSION")/$KUEUE_MANIFESTS" \
  > "$tmp/manifests/kueue.yaml"
"$tmp/bin/kubectl" kustomize "$jobset_dir/$JOBSET_MANIFESTS" > "$tmp/manifests/jobset.yaml"
# Trainer's overlay lists JobSet's release manifest by URL; render a copy without that line.
trainer_src="$tmp/trainer-manifests"
cp -r "$(module_dir "$TRAINER_MODULE" "$TRAINER_VERSION")/manifests" "$trainer_src"
chmod -R u+w "$trainer_src"
sed -i '/third-party\/jobset/d' "$trainer_src/${TRAINER_MANIFESTS#manifests/}/kustomization.yaml"
"$tmp/bin/kubectl" kustomize "$trainer_src/${TRAINER_MANIFESTS#manifests/}" > "$tmp/manifests/trainer.yaml"
rm -rf "$trainer_src"

touch "$tmp/complete"
# Drop builds for older pins not used for an hour (Go's caches stay; a cluster started a moment
# ago from an older build may still be running its binaries), then publish this one.
find "$(dirname "$out")" -mindepth 1 -maxdepth 1 -type d ! -name "$(basename "$out")" \
  ! -name "$(basename "$tmp")" ! -newermt "-60 minutes" -exec rm -rf {} +
rm -rf "$out"
mv "$tmp" "$out"
step "kube test binaries built: $bin"
