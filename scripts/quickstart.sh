#!/usr/bin/env bash
# Builds quorumctl, makes a 3-replica volume (once), attaches it, puts an
# ext4 filesystem on it (once) and mounts it. Write to the mount point;
# Ctrl-C unmounts and detaches. Run as root (loop devices, FUSE, mount).
#   QUORUM_DEMO_DIR  where the replicas live   (default /var/tmp/quorum-demo)
#   QUORUM_DEMO_SIZE volume size               (default 1G)
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${QUORUM_DEMO_DIR:-/var/tmp/quorum-demo}
size=${QUORUM_DEMO_SIZE:-1G}
mnt=$dir/mnt

go build -o bin/quorumctl ./cmd/quorumctl
mkdir -p "$dir" "$mnt"
replicas=("$dir/replica-a.img" "$dir/replica-b.img" "$dir/replica-c.img")
if [ ! -e "${replicas[0]}" ]; then
	bin/quorumctl create --size "$size" "${replicas[@]}"
	fresh=1
fi

# Its own session: Ctrl-C reaches only this script, which unmounts first.
coproc ATTACH { exec setsid bin/quorumctl attach "${replicas[@]}"; }
attach_pid=$ATTACH_PID
cleanup() {
	trap - EXIT INT TERM
	mountpoint -q "$mnt" && umount "$mnt"
	kill -TERM "$attach_pid" 2>/dev/null && wait "$attach_pid" || true
	echo "detached; replicas: ${replicas[*]}"
	bin/quorumctl check "${replicas[@]}" || true
}
trap cleanup EXIT INT TERM
read -r dev <&"${ATTACH[0]}"
echo "quorum device: $dev (3 replicas, vote threshold 2, read pattern quorum)"
if [ -n "${fresh:-}" ]; then
	mkfs.ext4 -q "$dev"
fi
mount "$dev" "$mnt"
echo "hello from quorum-csi, $(date -u)" >> "$mnt/hello.txt"
sync
echo "mounted on $mnt; $(wc -l < "$mnt/hello.txt") line(s) in $mnt/hello.txt"
echo "write to $mnt; press Ctrl-C to unmount and detach"
while kill -0 "$attach_pid" 2>/dev/null; do sleep 1; done
