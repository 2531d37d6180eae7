#!/bin/sh
# The guest's /dev/vda is a quorumctl device on the host, given to QEMU as
# KubeVirt gives a Block volume to a VM. Make a filesystem, write a file,
# and print its checksum for the host to find in the replicas.
set -e
[ -b /dev/vda ] || { echo "no /dev/vda"; exit 2; }
echo "vda: $(cat /sys/block/vda/size) sectors"
mkfs.ext4 -q -F /dev/vda
mkdir -p /mnt/vda
mount /dev/vda /mnt/vda
dd if=/dev/urandom of=/mnt/vda/data bs=1M count=32 2>/dev/null
sync
echo "GUEST-MD5 $(md5sum /mnt/vda/data | cut -d' ' -f1)"
umount /mnt/vda
# And direct I/O on the raw device, past the filesystem's first blocks.
fio --name=raw --filename=/dev/vda --offset=256M --size=64M --rw=randwrite --bs=4k --iodepth=16 \
	--ioengine=libaio --direct=1 --verify=crc32c --do_verify=1 --verify_fatal=1 --output-format=terse --terse-version=3 \
	| awk -F';' '{print "GUEST-FIO errors=" $5}'
