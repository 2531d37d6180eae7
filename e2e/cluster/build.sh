#!/usr/bin/env bash
# Builds everything the e2e cluster runs, from the Go module proxy and
# Debian's archive, into caches outside the repository, so a second run
# only rebuilds the project's own images:
#   - etcd, kube-apiserver, kube-scheduler, kube-controller-manager,
#     kubelet, kubectl, csi-provisioner, csi-attacher (hack/k8s-bins.sh)
#   - helm (hack/tools.sh)
#   - image tarballs in $QUORUM_E2E_IMAGES (default
#     /var/cache/quorum-csi/e2e/images) that every node's containerd
#     imports: the project's images (hack/images.sh), the sidecars and the
#     pod sandbox (registry.k8s.io/pause:3.10) made from static binaries,
#     and quorum-csi/e2e-app:dev, a Debian minbase with fio for the
#     scenarios' pods.
#
# Usage: e2e/cluster/build.sh
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../.." && pwd)
IMAGES=${QUORUM_E2E_IMAGES:-/var/cache/quorum-csi/e2e/images}
CACHE=${QUORUM_IMAGES_CACHE:-/var/cache/quorum-csi/images}
K8S_BIN=${QUORUM_K8S_BIN:-/var/cache/quorum-csi/k8s/v1.37.2/bin}
log() { printf '%s e2e-build: %s\n' "$(date +%T)" "$*" >&2; }
start=$SECONDS

bash "$REPO/hack/k8s-bins.sh" etcd kube-apiserver kubectl kube-scheduler kube-controller-manager kubelet \
	csi-provisioner csi-attacher
bash "$REPO/hack/tools.sh" >/dev/null
mkdir -p "$IMAGES" "$CACHE"
bash "$REPO/hack/images.sh" "$IMAGES" dev

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
go -C "$REPO" build -o "$WORK/ociimage" ./hack/ociimage

# static_image TAG FILE BINARY makes a one-layer image holding BINARY as
# its entrypoint, unless FILE is newer than BINARY.
static_image() {
	local tag=$1 out=$2 bin=$3 name
	name=$(basename "$bin")
	[[ -f $out && $out -nt $bin ]] && return 0
	mkdir -p "$WORK/rootfs-$name/tmp"
	chmod 1777 "$WORK/rootfs-$name/tmp"
	cp "$bin" "$WORK/rootfs-$name/$name"
	tar --numeric-owner --owner=0 --group=0 -C "$WORK/rootfs-$name" -cf "$WORK/layer-$name.tar" .
	"$WORK/ociimage" --tag "$tag" --entrypoint "/$name" --out "$out.tmp" "$WORK/layer-$name.tar"
	mv "$out.tmp" "$out"
	log "wrote $out"
}
if [[ ! -f $IMAGES/pause.tar || $REPO/e2e/cluster/pause/main.go -nt $IMAGES/pause.tar ]]; then
	CGO_ENABLED=0 go -C "$REPO" build -trimpath -o "$WORK/pause" ./e2e/cluster/pause
	static_image registry.k8s.io/pause:3.10 "$IMAGES/pause.tar" "$WORK/pause"
fi
static_image registry.k8s.io/sig-storage/csi-provisioner:v6.4.0 "$IMAGES/csi-provisioner.tar" "$K8S_BIN/csi-provisioner"
static_image registry.k8s.io/sig-storage/csi-attacher:v4.13.0 "$IMAGES/csi-attacher.tar" "$K8S_BIN/csi-attacher"

if [[ ! -f $IMAGES/e2e-app.tar ]]; then
	exec 9>"$CACHE/.lock"
	flock 9
	log "debootstrap bookworm minbase with fio for the scenario pods (about a minute)"
	rm -rf "$CACHE/rootfs-app.tmp"
	debootstrap --variant=minbase --include=fio bookworm "$CACHE/rootfs-app.tmp" http://deb.debian.org/debian \
		>"$CACHE/debootstrap-app.log" 2>&1 || { tail -n 20 "$CACHE/debootstrap-app.log" >&2; exit 1; }
	rm -rf "$CACHE/rootfs-app.tmp"/var/cache/apt/* "$CACHE/rootfs-app.tmp"/var/lib/apt/lists/* \
		"$CACHE/rootfs-app.tmp"/usr/share/doc "$CACHE/rootfs-app.tmp"/usr/share/man "$CACHE/rootfs-app.tmp"/usr/share/locale
	tar --numeric-owner -C "$CACHE/rootfs-app.tmp" -cf "$WORK/app.tar" .
	rm -rf "$CACHE/rootfs-app.tmp"
	"$WORK/ociimage" --tag quorum-csi/e2e-app:dev --out "$IMAGES/e2e-app.tar.tmp" "$WORK/app.tar"
	mv "$IMAGES/e2e-app.tar.tmp" "$IMAGES/e2e-app.tar"
	log "wrote $IMAGES/e2e-app.tar"
fi
# The VM image, when something it is made of changed: QEMU, or what
# e2e/guest/build.sh puts in the initramfs.
vm_inputs=(/usr/bin/qemu-system-x86_64 "$REPO"/e2e/guest/build.sh "$REPO"/e2e/guest/init "$REPO"/e2e/guest/tests/*)
vm_stale=false
for f in "${vm_inputs[@]}"; do
	[[ -f $IMAGES/e2e-vm.tar && $IMAGES/e2e-vm.tar -nt $f ]] || vm_stale=true
done
if $vm_stale; then
	R=$WORK/rootfs-vm
	mkdir -p "$R/guest" "$R/tmp" "$R/usr/share" "$R/usr/lib/x86_64-linux-gnu/qemu"
	chmod 1777 "$R/tmp"
	bash "$REPO/e2e/guest/build.sh" "$WORK/guest"
	cp "$WORK/guest/vmlinuz" "$WORK/guest/initramfs.cpio.gz" "$R/guest/"
	# TCG is a module in Debian's QEMU; the firmware is SeaBIOS plus
	# QEMU's option ROMs (linuxboot_dma.bin for -kernel).
	bins=(/usr/bin/qemu-system-x86_64 /usr/lib/x86_64-linux-gnu/qemu/accel-tcg-x86_64.so)
	for b in "${bins[@]}"; do
		mkdir -p "$R$(dirname "$b")"
		cp -L "$b" "$R$b"
		for l in $(ldd "$b" | awk '/=>/ {print $3} /ld-linux/ {print $1}' | grep '^/'); do
			mkdir -p "$R$(dirname "$l")"
			cp -Ln "$l" "$R$l"
		done
	done
	cp -a /usr/share/qemu /usr/share/seabios "$R/usr/share/"
	tar --numeric-owner --owner=0 --group=0 -C "$R" -cf "$WORK/vm.tar" .
	"$WORK/ociimage" --tag quorum-csi/e2e-vm:dev --entrypoint /usr/bin/qemu-system-x86_64 \
		--out "$IMAGES/e2e-vm.tar.tmp" "$WORK/vm.tar"
	mv "$IMAGES/e2e-vm.tar.tmp" "$IMAGES/e2e-vm.tar"
	log "wrote $IMAGES/e2e-vm.tar ($(du -h "$IMAGES/e2e-vm.tar" | cut -f1))"
fi
log "ready in $((SECONDS - start)) s"
