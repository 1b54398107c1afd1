#!/usr/bin/env bash
# Builds the test node's images offline, without a registry or a Docker
# daemon: buildah from scratch (vfs storage under OUT_DIR), written as
# docker-archive tars for `ctr images import`. Prints the tars' paths.
#   Kiln      ghcr.io/kiln-dev/kiln:<crate version>, the chart's default
#             image, from the Containerfile, its build stage replaced by the
#             locally built binary (assembled by image-rootfs.sh, as the
#             build stage does)
#   pause     the pod sandbox: a static C program that waits for a signal
#   redis     Debian's redis-server and its libraries, for Queue tables
#   coredns   cluster DNS (tests/node/build-coredns.sh)
# Usage: build-images.sh OUT_DIR KILN_BINARY COREDNS_BINARY
set -euo pipefail
out=${1:?output directory}; kiln=${2:?kiln binary}; coredns=${3:?coredns binary}
here="$(cd "$(dirname "$0")" && pwd)"
version=$(sed -n 's/^version = "\(.*\)"/\1/p' "$here/../../Cargo.toml" | head -n 1)
mkdir -p "$out"; out=$(cd "$out" && pwd)
buildah() { command buildah --root "$out/storage" --runroot "$out/run" --storage-driver vfs "$@"; }
image() { # image NAME ROOTFS ENTRYPOINT_JSON [buildah config flags...]
  local name=$1 rootfs=$2 entrypoint=$3; shift 3
  local container tar
  container=$(buildah from scratch)
  buildah copy "$container" "$rootfs/" / > /dev/null
  buildah config --entrypoint "$entrypoint" "$@" "$container"
  buildah commit -q --format oci "$container" "$name" > /dev/null
  buildah rm "$container" > /dev/null
  tar="$out/$(echo "$name" | tr '/:' '__').tar"
  rm -f "$tar"
  buildah push -q "$name" "docker-archive:$tar:$name" > /dev/null
  echo "$tar"
}
with_libraries() { # with_libraries BINARY ROOTFS: copies what BINARY links
  for lib in $(ldd "$1" | grep -o '/[^ ]*\.so[^ ]*'); do
    mkdir -p "$2$(dirname "$lib")"; cp -L "$lib" "$2$lib"
  done
}

repo="$here/../.."
kiln_image="ghcr.io/kiln-dev/kiln:$version"
bash "$here/image-rootfs.sh" "$kiln" "$out/kiln-build/rootfs"
buildah build -q --build-context "build=$out/kiln-build" -f "$repo/Containerfile" -t "$kiln_image" "$repo" > /dev/null
rm -f "$out/kiln.tar"
buildah push -q "$kiln_image" "docker-archive:$out/kiln.tar:$kiln_image" > /dev/null
echo "$out/kiln.tar"

rm -rf "$out/rootfs-pause"; mkdir -p "$out/rootfs-pause"
cat > "$out/pause.c" <<'C'
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>
static void stop(int signal) { (void)signal; _exit(0); }
static void reap(int signal) { (void)signal; while (waitpid(-1, 0, WNOHANG) > 0) {} }
int main(void) {
  struct sigaction action = {0};
  action.sa_handler = stop;
  sigaction(SIGINT, &action, 0);
  sigaction(SIGTERM, &action, 0);
  action.sa_handler = reap;
  action.sa_flags = SA_NOCLDSTOP;
  sigaction(SIGCHLD, &action, 0);
  for (;;) pause();
}
C
gcc -Os -static -o "$out/rootfs-pause/pause" "$out/pause.c"
image localhost/kiln/pause:local "$out/rootfs-pause" '["/pause"]'

rm -rf "$out/rootfs-redis"; mkdir -p "$out/rootfs-redis/usr/bin" "$out/rootfs-redis/data"
cp -L "$(command -v redis-server)" "$out/rootfs-redis/usr/bin/redis-server"
with_libraries "$(command -v redis-server)" "$out/rootfs-redis"
image localhost/kiln/redis:local "$out/rootfs-redis" '["/usr/bin/redis-server"]'

rm -rf "$out/rootfs-coredns"; mkdir -p "$out/rootfs-coredns"
cp "$coredns" "$out/rootfs-coredns/coredns"
image localhost/kiln/coredns:local "$out/rootfs-coredns" '["/coredns"]'
