#!/usr/bin/env bash
# Builds the project's container images without a container engine, as
# docker-archive tarballs that `ctr images import` (containerd) and
# `docker load` read:
#   OUTDIR/quorum-csi-controller.tar  quorum-csi/controller:TAG  the controller (static binary alone)
#   OUTDIR/quorum-csi-node.tar        quorum-csi/node:TAG        the node plugin, the data path and quorumctl on a Debian bookworm
#                                                                minbase with the tools it calls
#                                                                (mkfs.ext4, mkfs.xfs, blkid, losetup, mount)
# The node image's Debian root filesystem is made once with debootstrap and
# cached in $QUORUM_IMAGES_CACHE (default /var/cache/quorum-csi/images).
# images/Dockerfile.* build the same images with a container engine.
#
# Usage: hack/images.sh OUTDIR [TAG]   (TAG default: dev)
set -euo pipefail
OUT=${1:?usage: $0 OUTDIR [TAG]}
TAG=${2:-dev}
REPO=$(cd "$(dirname "$0")/.." && pwd)
CACHE=${QUORUM_IMAGES_CACHE:-/var/cache/quorum-csi/images}
log() { printf '%s images: %s\n' "$(date +%T)" "$*" >&2; }
command -v debootstrap >/dev/null || { log "debootstrap not found (apt-get install debootstrap)"; exit 1; }
mkdir -p "$OUT" "$CACHE"
OUT=$(cd "$OUT" && pwd)
exec 9>"$CACHE/.lock"
flock 9

BASE=$CACHE/node-base.tar
if [[ ! -f $BASE ]]; then
	log "debootstrap bookworm minbase with e2fsprogs, xfsprogs, util-linux, mount, kmod (about a minute)"
	rm -rf "$CACHE/rootfs.tmp"
	debootstrap --variant=minbase --include=e2fsprogs,xfsprogs,util-linux,mount,kmod \
		bookworm "$CACHE/rootfs.tmp" http://deb.debian.org/debian >"$CACHE/debootstrap.log" 2>&1 ||
		{ tail -n 20 "$CACHE/debootstrap.log" >&2; exit 1; }
	rm -rf "$CACHE/rootfs.tmp"/var/cache/apt/* "$CACHE/rootfs.tmp"/var/lib/apt/lists/* \
		"$CACHE/rootfs.tmp"/usr/share/doc "$CACHE/rootfs.tmp"/usr/share/man "$CACHE/rootfs.tmp"/usr/share/locale
	tar --numeric-owner -C "$CACHE/rootfs.tmp" -cf "$BASE.tmp" .
	mv "$BASE.tmp" "$BASE"
	rm -rf "$CACHE/rootfs.tmp"
fi
flock -u 9

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$WORK/controller/usr/local/bin" "$WORK/node/usr/local/bin" "$WORK/controller/tmp"
chmod 1777 "$WORK/controller/tmp"
log "building static binaries"
for c in controller node datapath quorumctl; do
	CGO_ENABLED=0 go -C "$REPO" build -trimpath -o "$WORK/bin/$c" "./cmd/$c"
done
cp "$WORK/bin/controller" "$WORK/controller/usr/local/bin/quorum-controller"
cp "$WORK/bin/node" "$WORK/node/usr/local/bin/quorum-node"
cp "$WORK/bin/datapath" "$WORK/node/usr/local/bin/quorum-datapath"
cp "$WORK/bin/quorumctl" "$WORK/node/usr/local/bin/quorumctl"
tar --numeric-owner --owner=0 --group=0 -C "$WORK/controller" -cf "$WORK/controller.tar" .
tar --numeric-owner --owner=0 --group=0 -C "$WORK/node" -cf "$WORK/node.tar" .
go -C "$REPO" build -o "$WORK/ociimage" ./hack/ociimage
"$WORK/ociimage" --tag "quorum-csi/controller:$TAG" --entrypoint /usr/local/bin/quorum-controller \
	--out "$OUT/quorum-csi-controller.tar" "$WORK/controller.tar"
"$WORK/ociimage" --tag "quorum-csi/node:$TAG" --entrypoint /usr/local/bin/quorum-node \
	--out "$OUT/quorum-csi-node.tar" "$BASE" "$WORK/node.tar"
log "wrote $OUT/quorum-csi-controller.tar ($(du -h "$OUT/quorum-csi-controller.tar" | cut -f1)) and $OUT/quorum-csi-node.tar ($(du -h "$OUT/quorum-csi-node.tar" | cut -f1))"
