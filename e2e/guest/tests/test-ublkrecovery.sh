#!/bin/sh
# ublk handover, as issue 12 puts it: ext4 on a 3-replica ublk device,
# fio randwrite with verify on a file in it, and the attach goes away in
# the middle: first killed with SIGKILL (a crash), then releasing the
# device on SIGUSR1 (a planned handover). Each time the same attach
# command runs again and takes the device back: fio sees no error, the
# filesystem stays writable, the kernel logs no ext4 error, I/O error or
# warning, and after the detach the replicas are identical. Each round
# prints the longest I/O stall it caused ("stall: max X ms").
set -e
FRONTEND=ublk
. /lib.sh
start_attach
FIRST=$DEV
mkfs.ext4 -q -F $DEV
mount $DEV /mnt/q
dmesg -c >/dev/null

# round NAME SIGNAL WANT-EXIT: fio on /mnt/q/NAME, SIGNAL to the attach
# 4 s in, the attach exits with WANT-EXIT, the same attach again.
round() {
	rm -f /tmp/lat_*.log
	fio --name=$1 --filename=/mnt/q/$1 --size=48M --rw=randwrite --bs=4k --iodepth=16 --ioengine=libaio --direct=1 \
		--verify=crc32c --do_verify=1 --verify_fatal=1 --write_lat_log=/tmp/lat \
		--output-format=terse --terse-version=3 >/tmp/fio 2>/tmp/fio.err &
	FIO=$!
	sleep 4
	kill -$2 $ATTACH
	rc=0
	wait $ATTACH || rc=$?
	[ $rc = $3 ] || { echo "attach exited $rc on SIG$2, want $3"; cat /tmp/attach.log; exit 3; }
	if [ "$2" = USR1 ]; then
		grep "released ublk device" /tmp/attach.log || { echo "no release logged"; cat /tmp/attach.log; exit 3; }
	fi
	kill -0 $FIO 2>/dev/null || { echo "fio finished before SIG$2; make its job longer"; exit 2; }
	echo "SIG$2 sent to the attach serving $FIRST"
	start_attach
	[ "$DEV" = "$FIRST" ] || { echo "new device $DEV, want $FIRST taken back"; exit 4; }
	grep "took back ublk device" /tmp/attach.log || { echo "no recovery logged"; cat /tmp/attach.log; exit 4; }
	wait $FIO || { echo "fio failed"; cat /tmp/fio /tmp/fio.err; exit 5; }
	ERR=$(awk -F';' '{print $5}' /tmp/fio)
	[ "$ERR" = 0 ] || { echo "fio errors: $ERR"; cat /tmp/fio; exit 6; }
	# Still read-write: a write and its sync go through.
	echo "written after SIG$2" >/mnt/q/after-$1
	sync
	grep -q "^$DEV /mnt/q ext4 rw" /proc/mounts || { echo "filesystem not read-write:"; grep /mnt/q /proc/mounts; exit 7; }
	if dmesg | grep -E "EXT4-fs (error|warning)|I/O error|WARNING|blocked for more than"; then
		echo "kernel complaints after SIG$2"
		exit 8
	fi
	# The stall: the longest write latency (fio logs nanoseconds) and the
	# longest time without any completion (milliseconds since fio began).
	awk -F', ' -v sig=SIG$2 '$3 == 1 && $2 > lat { lat = $2 }
		{ if (NR > 1 && $1 - t > gap) gap = $1 - t; t = $1 }
		END { printf "stall: max %d ms (%s; longest write latency), %d ms without a completion\n", lat / 1000000, sig, gap }' /tmp/lat_lat.1.log
	echo "ublk: taken back after SIG$2 with no error in fio"
}

round crash KILL 137
round handover USR1 0
umount /mnt/q
stop_attach
[ ! -e /run/q/ublk-* ] || { echo "state file left"; exit 9; }
quorumctl check a b c
echo "ublk: replicas identical after the detach"
