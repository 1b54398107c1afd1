#!/usr/bin/env bash
# Builds the control-plane multi-call binary (etcd, kube-apiserver,
# kube-controller-manager, kube-scheduler) from Go modules and caches it
# outside the clone, keyed by Kubernetes version and a hash of go.mod/go.sum/main.go.
# Prints the path of the binary. A cached build costs milliseconds.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
version=$(cat "$here/K8S_VERSION")
key=$(cat "$here/go.mod" "$here/go.sum" "$here/main.go" | sha256sum | cut -c1-12)
cache_root=${KILN_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/kiln}
out="$cache_root/controlplane/${version}-${key}"
if [ -x "$out/kcp" ]; then
  echo "$out/kcp"
  exit 0
fi
mkdir -p "$out"
echo "building control plane ${version} into $out (first time only: about 5-10 min on 2 cores, after ~1 GB of Go module downloads)" >&2
# Progress while the Go build runs silently.
started=$(date +%s)
( while sleep 30; do echo "  ... still building the control plane ($(( $(date +%s) - started ))s so far)" >&2; done ) &
ticker=$!
trap 'kill $ticker 2>/dev/null || true' EXIT
cd "$here"
pkg=k8s.io/component-base/version
minor=${version#v1.}; minor=${minor%%.*}
ldflags="-s -w -X ${pkg}.gitVersion=${version} -X ${pkg}.gitMajor=1 -X ${pkg}.gitMinor=${minor} \
  -X ${pkg}.gitTreeState=clean -X ${pkg}.buildDate=1970-01-01T00:00:00Z"
CGO_ENABLED=0 GOTOOLCHAIN=local GOFLAGS=-mod=mod go build -trimpath -ldflags "$ldflags" -o "$out/kcp.tmp" .
mv "$out/kcp.tmp" "$out/kcp"
echo "$out/kcp"
