#!/usr/bin/env bash
# Resolves the Kafka broker's jars from Maven Central into
# ${KILN_CACHE_DIR:-~/.cache/kiln}/kafka/<hash of pom.xml>/libs (once; later
# runs reuse them) and prints that directory.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
hash="$(sha256sum "$here/pom.xml" | cut -c1-12)"
dest="${KILN_CACHE_DIR:-$HOME/.cache/kiln}/kafka/$hash"
if [ ! -f "$dest/.complete" ]; then
  rm -rf "$dest"
  mkdir -p "$dest"
  mvn -q -B -f "$here/pom.xml" dependency:copy-dependencies \
    -DincludeScope=runtime -DoutputDirectory="$dest/libs" >&2
  touch "$dest/.complete"
fi
echo "$dest/libs"
