#!/usr/bin/env bash
# Builds a Go command from the Go module proxy (no release download) into a
# cache outside the clone, keyed by name and version, and prints the
# binary's path. A cached build costs milliseconds.
# Usage: go-tool.sh NAME PACKAGE@VERSION
set -euo pipefail
name=${1:?name}; package=${2:?package@version}
cache_root=${KILN_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/kiln}
out="$cache_root/tools/$name-${package##*@}"
if [ ! -x "$out/$name" ]; then
  echo "building $name ${package##*@} into $out (first time only)" >&2
  mkdir -p "$out"
  GOTOOLCHAIN=local CGO_ENABLED=0 GOBIN="$out" go install -trimpath -ldflags "-s -w" "$package" >&2
fi
echo "$out/$name"
