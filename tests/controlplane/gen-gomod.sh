#!/usr/bin/env bash
# Regenerates go.mod for the control-plane wrapper from k8s.io/kubernetes's own
# go.mod: that module replaces every staging module with a local path, which
# only works for the main module, so we pin each staging module to its
# published v0.X.Y instead. Run when bumping K8S_VERSION, then commit go.mod/go.sum.
set -euo pipefail
cd "$(dirname "$0")"
K8S_VERSION=${1:-$(cat K8S_VERSION)}
minor=${K8S_VERSION#v1.}
staging_version="v0.${minor}"
modfile=$(go mod download -json "k8s.io/kubernetes@${K8S_VERSION}" | sed -n 's/.*"GoMod": "\(.*\)".*/\1/p')
{
  echo "module kiln.dev/controlplane"
  echo
  echo "go 1.24.0"
  echo
  echo "require k8s.io/kubernetes ${K8S_VERSION}"
  echo
  echo "replace ("
  sed -n 's#^\s*\(k8s.io/[a-z0-9-]*\) => ./staging/.*#\1#p' "$modfile" | sort -u |
    while read -r m; do echo "	$m => $m ${staging_version}"; done
  echo ")"
} > go.mod
echo "${K8S_VERSION}" > K8S_VERSION
GOFLAGS=-mod=mod go get go.etcd.io/etcd/server/v3@"$(sed -n 's#^\s*go.etcd.io/etcd/server/v3 \(v[^ ]*\).*#\1#p' "$modfile")"
GOFLAGS=-mod=mod go mod tidy
