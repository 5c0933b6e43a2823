#!/usr/bin/env bash
# Prints the folder that holds (or will hold) the test control-plane binaries for the pinned
# versions: <repo>/.cache/kube/<key>/bin, where <key> hashes every file that decides what is built
# (go.mod, go.sum, versions.env, cmd/*/main.go, build.sh). Usage: tests/kube/bin-dir.sh
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
key="$(cd "$here" && cat go.mod go.sum versions.env cmd/*/main.go build.sh | sha256sum | cut -c1-16)"
echo "$repo/.cache/kube/$key/bin"
