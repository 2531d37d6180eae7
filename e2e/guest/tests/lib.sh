#!/bin/sh
# Sourced by the in-guest tests: the scratch disk /dev/vda as ext4 on
# /data holding three 256 MiB replicas a, b, c, and start_attach /
# stop_attach for quorumctl attach with frontend $FRONTEND (ublk or
# fuse-loop), which set ATTACH (the pid) and DEV (the device).
: "${FRONTEND:?}"
mkfs.ext4 -q -F /dev/vda
mkdir -p /data /mnt/q
mount /dev/vda /data
cd /data
quorumctl create --size 256M a b c
# start_attach [ATTACH FLAGS]: waits up to 90 s for the device (a ublk
# recovery waits for the kernel to let the dead server's device go).
start_attach() {
	rm -f /tmp/dev
	quorumctl attach --frontend "$FRONTEND" --state-dir /run/q --scrub-rate 0 "$@" a b c >/tmp/dev 2>/tmp/attach.log &
	ATTACH=$!
	i=0
	while [ ! -s /tmp/dev ]; do
		i=$((i + 1))
		[ $i -lt 900 ] || { cat /tmp/attach.log; return 1; }
		kill -0 $ATTACH 2>/dev/null || { cat /tmp/attach.log; return 1; }
		sleep 0.1
	done
	DEV=$(head -n1 /tmp/dev)
	echo "attached $DEV"
	if [ "$FRONTEND" = fuse-loop ]; then
		[ "$(cat /sys/block/${DEV#/dev/}/loop/dio)" = 1 ] || { echo "$DEV without direct I/O"; return 1; }
	fi
}
# stop_attach: SIGTERM, a clean exit, and no device left.
stop_attach() {
	kill -TERM $ATTACH
	wait $ATTACH || { echo "attach exited $?"; cat /tmp/attach.log; return 1; }
	[ ! -e /sys/block/${DEV#/dev/}/loop/backing_file ] || { echo "$DEV still bound"; return 1; }
	[ "$FRONTEND" != ublk ] || [ ! -e "$DEV" ] || { echo "$DEV still there"; return 1; }
}
