#!/bin/sh
# ublk user recovery: quorumctl attach is killed with SIGKILL while fio
# writes and verifies through a filesystem on its device; a new attach of
# the same replicas takes the device back, and fio sees no error.
set -e
FRONTEND=ublk
. /lib.sh
start_attach
FIRST=$DEV
mkfs.ext4 -q -F $DEV
mount $DEV /mnt/q
fio --name=survive --filename=/mnt/q/f --size=48M --rw=randwrite --bs=4k --iodepth=16 --ioengine=libaio --direct=1 \
	--verify=crc32c --do_verify=1 --verify_fatal=1 --output-format=terse --terse-version=3 >/tmp/fio 2>/tmp/fio.err &
FIO=$!
sleep 4
kill -KILL $ATTACH
wait $ATTACH || true
echo "killed the attach serving $FIRST"
kill -0 $FIO 2>/dev/null || { echo "fio finished before the kill; make its job longer"; exit 2; }
start_attach
[ "$DEV" = "$FIRST" ] || { echo "new device $DEV, want $FIRST taken back"; exit 3; }
grep -q "took back ublk device" /tmp/attach.log || { echo "no recovery logged"; cat /tmp/attach.log; exit 4; }
wait $FIO || { echo "fio failed"; cat /tmp/fio /tmp/fio.err; exit 5; }
ERR=$(awk -F';' '{print $5}' /tmp/fio)
[ "$ERR" = 0 ] || { echo "fio errors: $ERR"; exit 6; }
umount /mnt/q
stop_attach
[ ! -e /run/q/ublk-* ] || { echo "state file left"; exit 8; }
quorumctl check a b c
echo "ublk: recovered after SIGKILL with no error in fio"
