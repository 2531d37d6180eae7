#!/usr/bin/env bash
# Builds what a guest test boots: a Debian bookworm-backports cloud kernel
# (it has ublk, FUSE and virtio; fetched with a private APT configuration,
# never installed on the host) and an initramfs with busybox, the kernel's
# modules, mke2fs, fio, a static quorumctl built from this repository and
# the in-guest test scripts of e2e/guest/tests.
#
# Usage: e2e/guest/build.sh OUTDIR
# Writes OUTDIR/vmlinuz and OUTDIR/initramfs.cpio.gz. The kernel package is
# cached in $QUORUM_GUEST_CACHE (default /var/cache/quorum-csi/guest).
set -euo pipefail

OUT=${1:?usage: $0 OUTDIR}
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
CACHE=${QUORUM_GUEST_CACHE:-/var/cache/quorum-csi/guest}
log() { printf '%s guest-build: %s\n' "$(date +%T)" "$*" >&2; }

for t in busybox cpio gzip xz dpkg-deb apt-get go mke2fs; do
	command -v "$t" >/dev/null || { log "$t not found (apt-get install busybox-static cpio xz-utils e2fsprogs)"; exit 1; }
done
[[ -x /bin/busybox ]] && busybox --list | grep -x insmod >/dev/null || { log "/bin/busybox is not busybox-static"; exit 1; }

mkdir -p "$OUT" "$CACHE"
exec 9>"$CACHE/.lock"
flock 9

# The kernel: the package linux-image-cloud-amd64 of bookworm-backports
# points at, through an APT configuration of our own, so the host's
# sources, lists and packages stay as they are.
APT=$CACHE/apt
mkdir -p "$APT/lists/partial" "$APT/cache/archives/partial" "$APT/etc"
echo "deb http://deb.debian.org/debian bookworm-backports main" >"$APT/etc/sources.list"
cat >"$APT/apt.conf" <<EOF
Dir::State "$APT";
Dir::State::Lists "$APT/lists";
Dir::Cache "$APT/cache";
Dir::Etc::SourceList "$APT/etc/sources.list";
Dir::Etc::SourceParts "-";
Dir::State::status "/dev/null";
EOF
export APT_CONFIG=$APT/apt.conf
if [[ ! -f $CACHE/kernel-package ]]; then
	log "looking up the bookworm-backports cloud kernel"
	apt-get update -qq
	apt-cache depends linux-image-cloud-amd64 | awk '/Depends: linux-image-6/ {print $2; exit}' >"$CACHE/kernel-package.tmp"
	[[ -s $CACHE/kernel-package.tmp ]] || { log "no linux-image-6.* behind linux-image-cloud-amd64"; exit 1; }
	mv "$CACHE/kernel-package.tmp" "$CACHE/kernel-package"
fi
KPKG=$(cat "$CACHE/kernel-package")
KDIR=$CACHE/$KPKG
if [[ ! -d $KDIR/boot ]]; then
	log "downloading $KPKG"
	(cd "$CACHE" && apt-get download -q "$KPKG" >/dev/null)
	rm -rf "$KDIR.tmp"
	dpkg-deb -x "$CACHE/${KPKG}"_*.deb "$KDIR.tmp"
	mv "$KDIR.tmp" "$KDIR"
fi
flock -u 9
CONFIG=$(ls "$KDIR"/boot/config-*)
grep -q '^CONFIG_BLK_DEV_UBLK=[ym]' "$CONFIG" || { log "$KPKG has no ublk"; exit 1; }
cp "$(ls "$KDIR"/boot/vmlinuz-*)" "$OUT/vmlinuz"
MODROOT=$KDIR/lib/modules
[[ -d $MODROOT ]] || MODROOT=$KDIR/usr/lib/modules
MODDIR=$MODROOT/$(ls "$MODROOT")

R=$(mktemp -d "$OUT/rootfs.XXXXXX")
trap 'rm -rf "$R"' EXIT
mkdir -p "$R"/{bin,sbin,lib,lib64,dev,proc,sys,tmp,mnt,run,etc,modules}
cp /bin/busybox "$R/bin/busybox"
for a in $("$R/bin/busybox" --list); do [[ -e $R/bin/$a ]] || ln -s busybox "$R/bin/$a"; done
# busybox's insmod cannot read compressed modules: unpack them here. The
# list is in load order (dependencies first); ones built in are absent.
for m in crc16 mbcache jbd2 ext4 virtio_blk loop fuse ublk_drv; do
	f=$(find "$MODDIR" -name "$m.ko*" | head -n1)
	[[ -z $f ]] && continue
	case $f in
	*.xz) xz -dc "$f" >"$R/modules/$m.ko" ;;
	*.zst) zstd -qdc "$f" >"$R/modules/$m.ko" ;;
	*) cp "$f" "$R/modules/$m.ko" ;;
	esac
done
echo "crc16 mbcache jbd2 ext4 virtio_blk loop fuse ublk_drv" >"$R/modules/order"
copybin() {
	local b l
	b=$(command -v "$1")
	rm -f "$R/bin/$(basename "$b")"
	cp -L "$b" "$R/bin/"
	for l in $(ldd "$b" | awk '/=>/ {print $3} /ld-linux/ {print $1}' | grep '^/'); do
		mkdir -p "$R$(dirname "$l")"
		cp -Ln "$l" "$R$l" 2>/dev/null || true
	done
}
copybin mke2fs
ln -sf mke2fs "$R/bin/mkfs.ext4"
copybin fio
copybin losetup
log "building a static quorumctl"
CGO_ENABLED=0 go -C "$REPO" build -o "$R/bin/quorumctl" ./cmd/quorumctl
cp "$HERE/init" "$R/init"
cp "$HERE"/tests/*.sh "$R/"
chmod +x "$R/init" "$R"/*.sh
(cd "$R" && find . | cpio -o -H newc --quiet | gzip -1) >"$OUT/initramfs.cpio.gz"
log "kernel $KPKG, initramfs $(du -h "$OUT/initramfs.cpio.gz" | cut -f1)"
