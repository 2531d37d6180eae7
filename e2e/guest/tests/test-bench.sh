#!/bin/sh
# In-guest benchmark for bench/guest.sh (not a test): the same three file
# replicas on the scratch disk /dev/vda, attached with each frontend in
# turn, and the fio patterns of the device benchmark. Prints
# "BENCH <frontend> <pattern> <value> <unit>" lines.
set -e
RUNTIME=$(sed -n 's/.*bench_runtime=\([0-9]*\).*/\1/p' /proc/cmdline)
RUNTIME=${RUNTIME:-5}
mkfs.ext4 -q -F /dev/vda
mkdir -p /data
mount /dev/vda /data
cd /data
quorumctl create --size 1G a b c >/dev/null
for fe in fuse-loop ublk; do
	rm -f /tmp/dev
	quorumctl attach --frontend $fe --state-dir /run/q --scrub-rate 0 --read-pattern fifo a b c >/tmp/dev 2>/tmp/attach.log &
	ATTACH=$!
	while [ ! -s /tmp/dev ]; do
		kill -0 $ATTACH 2>/dev/null || { cat /tmp/attach.log; exit 1; }
		sleep 0.1
	done
	DEV=$(head -n1 /tmp/dev)
	# Fill once so that reads do not hit holes.
	[ $fe = fuse-loop ] && fio --name=fill --filename=$DEV --rw=write --bs=1M --iodepth=8 --ioengine=libaio --direct=1 >/dev/null
	for p in "4k-randread-QD32 randread 4k 32" "4k-randwrite-QD32 randwrite 4k 32" "1M-read-QD8 read 1M 8" "1M-write-QD8 write 1M 8"; do
		set -- $p
		fio --name=b --filename=$DEV --rw=$2 --bs=$3 --iodepth=$4 --ioengine=libaio --direct=1 --time_based \
			--runtime=$RUNTIME --ramp_time=1 --norandommap --randrepeat=0 --output-format=terse --terse-version=3 >/tmp/fio
		awk -F';' -v fe=$fe -v name=$1 -v bs=$3 '{
			r = ($8 > 0) ? 8 : 49; bw = ($8 > 0) ? 7 : 48
			if (bs == "1M") printf "BENCH %s %s %.1f MiB/s\n", fe, name, $bw / 1024
			else printf "BENCH %s %s %d IOPS\n", fe, name, $r
		}' /tmp/fio
	done
	kill -TERM $ATTACH
	wait $ATTACH
done
