#!/usr/bin/env bash
# Prints the folder that holds (or will hold) the test cluster's binaries for the pinned versions:
# $NANORUN_KUBE_CACHE/<key>/bin (default ~/.cache/nanorun/kube/<key>/bin), where <key> hashes every
# file that decides what is built. The folder is outside the checkout, so a fresh clone on the same
# machine finds a build made for the same pins. Usage: tests/kube/bin-dir.sh
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cache="${NANORUN_KUBE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/nanorun/kube}"
key="$(cd "$here" && cat build.sh versions.env go.mod go.sum cmd/*/main.go \
  coredns/go.mod coredns/go.sum coredns/*.go | sha256sum | cut -c1-16)"
echo "$cache/$key/bin"
