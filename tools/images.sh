#!/usr/bin/env bash
# Builds nanorun's three images (the Dockerfile's targets trainer, serving and operator) with buildah
# (Debian's package), and pushes them. `make images` and `make images push` call it.
#
#   tools/images.sh [build] [push]
#
#   REGISTRY    the images' repository prefix (default ghcr.io/nanorun, the chart's default)
#   TAG         their tag (default: the version in pyproject.toml)
#   BASE_IMAGE  the Debian 12 image the Dockerfile starts from. Unset, it is built here from
#               Debian's packages with mmdebstrap (localhost/debian:<point release>-minbase, kept in
#               the builder's storage and reused; `buildah rmi` it to take newer Debian packages).
#   TLS_VERIFY  false to push to a registry over plain HTTP (default true)
#   IMAGES      which to build and push (default: operator trainer serving). The test cluster's
#               test images fake-stage, s3 and init (tests/kube/images/Dockerfile) are built when
#               named here; `make test` does.
#
# Layers are cached in buildah's storage: a rebuild with an unchanged lock reuses the dependency
# layers, and the trainer and serving images share theirs. Builds run with this machine's CA bundle
# and a pip and cargo configuration that point at it, mounted for the build only (so a build behind
# a TLS-inspecting proxy works); nothing of it is left in the images.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"

actions=("$@")
[ ${#actions[@]} -gt 0 ] || actions=(build)
for action in "${actions[@]}"; do
  case "$action" in build | push) ;; *) echo "usage: $0 [build] [push]" >&2; exit 2 ;; esac
done
REGISTRY="${REGISTRY:-ghcr.io/nanorun}"
TAG="${TAG:-$(sed -n 's/^version = "\(.*\)"$/\1/p' pyproject.toml)}"
TLS_VERIFY="${TLS_VERIFY:-true}"
read -r -a images <<<"${IMAGES:-operator trainer serving}"

need() {  # COMMAND DEBIAN-PACKAGE...
  command -v "$1" >/dev/null && return
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${@:2}" >/dev/null
  else
    echo "error: $1 is needed: install ${*:2} (Debian/Ubuntu: apt-get install ${*:2})" >&2
    exit 1
  fi
}
need buildah buildah runc

# buildah's default rlimits can exceed what a container host allows (runc then fails with "error
# setting rlimits"): open files up to this shell's hard limit, and a fixed number of processes.
ulimits=(--ulimit "nofile=$(ulimit -Hn):$(ulimit -Hn)" --ulimit "nproc=8192:8192")
log() { echo "[images] $*"; }

base_image() {
  if [ -n "${BASE_IMAGE:-}" ]; then
    echo "$BASE_IMAGE"
    return
  fi
  local existing
  existing="$(buildah images --noheading --format '{{.Name}}:{{.Tag}}' --filter reference='localhost/debian:*-minbase' |
    head -n1)"
  if [ -n "$existing" ]; then
    echo "$existing"
    return
  fi
  need mmdebstrap mmdebstrap
  local tmp version
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' RETURN
  log "building a Debian 12 base from Debian's packages (mmdebstrap)" >&2
  # The suites and components of Debian's own slim image: bookworm, its updates and security.
  mmdebstrap --quiet --variant=minbase --include=ca-certificates bookworm "$tmp/rootfs.tar" \
    "deb http://deb.debian.org/debian bookworm main" \
    "deb http://deb.debian.org/debian bookworm-updates main" \
    "deb http://deb.debian.org/debian-security bookworm-security main" >&2
  version="$(tar -xOf "$tmp/rootfs.tar" ./etc/debian_version)"
  local ctr
  ctr="$(buildah from scratch)"
  buildah add --quiet "$ctr" "$tmp/rootfs.tar" / >/dev/null
  buildah config --cmd '["/bin/bash"]' --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin "$ctr"
  buildah commit --quiet --rm "$ctr" "localhost/debian:$version-minbase" >/dev/null
  echo "localhost/debian:$version-minbase"
}

image_id() {  # REF: its image ID in the builder's storage, or nothing
  buildah images --noheading --no-trunc --format '{{.ID}}' --filter "reference=$1" 2>/dev/null | head -n1
}

build() {
  local base conf
  base="$(base_image)"
  conf="$(mktemp -d)"
  trap 'rm -rf "$conf"' RETURN
  printf '[global]\ncert = /run/build-ca/ca-certificates.crt\n' >"$conf/pip.conf"
  printf '[http]\ncainfo = "/run/build-ca/ca-certificates.crt"\n' >"$conf/cargo.toml"
  local mounts=(
    -v /etc/ssl/certs/ca-certificates.crt:/run/build-ca/ca-certificates.crt:ro
    -v "$conf/pip.conf:/etc/pip.conf:ro"
    -v "$conf/cargo.toml:/root/.cargo/config.toml:ro"
  )
  for name in "${images[@]}"; do
    local ref="$REGISTRY/nanorun-$name:$TAG" started=$SECONDS
    local dockerfile=Dockerfile from="$base"
    case "$name" in
      fake-stage | s3) dockerfile=tests/kube/images/Dockerfile from="$REGISTRY/nanorun-operator:$TAG" ;;
      init) dockerfile=tests/kube/images/Dockerfile ;;
    esac
    log "building $ref (target $name of $dockerfile) on $from"
    local previous
    previous="$(image_id "$ref")"
    buildah build --layers --force-rm --quiet "${ulimits[@]}" "${mounts[@]}" --build-arg "BASE_IMAGE=$base" \
      --build-arg "OPERATOR_IMAGE=$from" -f "$dockerfile" --target "$name" -t "$ref" . >/dev/null
    # The image the tag named before, now untagged, goes (its layers stay while another image uses
    # them): rebuilds after each source change would otherwise pile up gigabytes.
    if [ -n "$previous" ] && [ "$previous" != "$(image_id "$ref")" ]; then
      buildah rmi "$previous" >/dev/null 2>&1 || true
    fi
    log "built $ref in $((SECONDS - started)) s"
  done
}

push() {
  for name in "${images[@]}"; do
    local ref="$REGISTRY/nanorun-$name:$TAG"
    log "pushing $ref"
    buildah push --quiet --tls-verify="$TLS_VERIFY" "$ref" "docker://$ref"
  done
}

for action in "${actions[@]}"; do "$action"; done
