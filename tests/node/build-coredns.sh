#!/usr/bin/env bash
# Builds CoreDNS from its Go module (no release download) into a cache outside
# the clone, keyed by version, and prints the binary's path. Kiln's pods reach
# the operator and Redis by Service name, so the test node needs cluster DNS.
set -euo pipefail
version=v1.11.3
cache_root=${KILN_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/kiln}
out="$cache_root/tools/coredns-$version"
if [ ! -x "$out/coredns" ]; then
  echo "building coredns $version into $out (first time only: several minutes)" >&2
  mkdir -p "$out"
  GOTOOLCHAIN=local CGO_ENABLED=0 GOBIN="$out" go install -trimpath -ldflags "-s -w" "github.com/coredns/coredns@$version" >&2
fi
echo "$out/coredns"
