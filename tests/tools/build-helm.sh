#!/usr/bin/env bash
# Builds helm from the Go module proxy (no release download) into a cache
# outside the clone, keyed by version, and prints the binary's path.
set -euo pipefail
version=v3.22.0
cache_root=${KILN_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/kiln}
out="$cache_root/tools/helm-$version"
if [ ! -x "$out/helm" ]; then
  echo "building helm $version into $out" >&2
  mkdir -p "$out"
  GOTOOLCHAIN=local CGO_ENABLED=0 GOBIN="$out" go install -trimpath "helm.sh/helm/v3/cmd/helm@$version" >&2
fi
echo "$out/helm"
