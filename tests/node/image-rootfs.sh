#!/usr/bin/env bash
# Assembles the root filesystem of Kiln's image: the stripped binary, the
# shared libraries it links (from ldd, with the dynamic loader), the CA
# bundle, and passwd/group entries for the unprivileged user 65532. Nothing
# else: no shell, no package manager. Used by the Containerfile's build stage
# and by build-images.sh, so both produce the same image.
# Usage: image-rootfs.sh KILN_BINARY OUT_DIR
set -euo pipefail
binary=${1:?kiln binary}; out=${2:?output directory}
rm -rf "$out"
mkdir -p "$out/usr/local/bin" "$out/etc/ssl/certs" "$out/tmp" "$out/var/lib/kiln"
chmod 1777 "$out/tmp"
strip -o "$out/usr/local/bin/kiln" "$binary"
for lib in $(ldd "$binary" | grep -o '/[^ ]*\.so[^ ]*'); do
  mkdir -p "$out$(dirname "$lib")"
  cp -L "$lib" "$out$lib"
done
cp -L /etc/ssl/certs/ca-certificates.crt "$out/etc/ssl/certs/"
printf 'root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/var/lib/kiln:/sbin/nologin\n' > "$out/etc/passwd"
printf 'root:x:0:\nnonroot:x:65532:\n' > "$out/etc/group"
chown 65532:65532 "$out/var/lib/kiln"
