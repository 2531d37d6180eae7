#!/bin/sh
# quorumctl attach inside the guest with the frontend $FRONTEND (ublk or
# fuse-loop): three file replicas on the scratch disk /dev/vda; a
# filesystem and checksums across a remount; fio with verify at QD32; a
# corrupted replica outvoted; SIGTERM leaves no device behind.
set -e
. /lib.sh
start_attach
mkfs.ext4 -q -F $DEV
mount $DEV /mnt/q
dd if=/dev/urandom of=/mnt/q/file bs=1M count=16 2>/dev/null
SUM=$(md5sum /mnt/q/file | cut -d' ' -f1)
umount /mnt/q
mount $DEV /mnt/q
[ "$(md5sum /mnt/q/file | cut -d' ' -f1)" = "$SUM" ] || { echo "checksum changed across a remount"; exit 3; }
umount /mnt/q
fio --name=verify --filename=$DEV --offset=128M --size=64M --rw=randwrite --bs=4k --iodepth=32 --ioengine=libaio \
	--direct=1 --verify=crc32c --do_verify=1 --verify_fatal=1 --output-format=terse --terse-version=3 >/tmp/fio
ERR=$(awk -F';' '{print $5}' /tmp/fio)
[ "$ERR" = 0 ] || { echo "fio errors: $ERR"; cat /tmp/fio; exit 4; }
stop_attach
echo "$FRONTEND: filesystem, remount checksum and fio verify passed"
# Corrupt replica c where the file's data is, then read through a quorum
# attach: the vote hides it and the checksum holds.
dd if=/dev/urandom of=c bs=1M count=200 seek=1 conv=notrunc 2>/dev/null
start_attach --read-pattern quorum --rewrite-corrupted
mount $DEV /mnt/q
[ "$(md5sum /mnt/q/file | cut -d' ' -f1)" = "$SUM" ] || { echo "corrupted replica not outvoted"; exit 5; }
umount /mnt/q
grep -q REPORT_BAD /tmp/attach.log || { echo "no REPORT_BAD for the corrupted replica"; exit 6; }
stop_attach
echo "$FRONTEND: corrupted replica outvoted"
