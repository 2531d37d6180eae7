#!/bin/sh
# The workload of the live-migration scenarios (e2e/cluster): the VM's
# /dev/vda is a Block PVC; rounds of fio write and verify it without end
# while the VM moves between nodes. The host reads the console: a line
# "MIGRATE round N ok" per round, "MIGRATE-FAILED" on any error.
[ -b /dev/vda ] || { echo "MIGRATE-FAILED: no /dev/vda"; exit 2; }
echo "MIGRATE vda $(cat /sys/block/vda/size) sectors"
i=0
while :; do
	i=$((i + 1))
	# Each round its own seed: other offsets and other data than the
	# round before, which a stale block would not match.
	if ! fio --name=vm --filename=/dev/vda --size=16M --rw=randwrite --bs=4k --iodepth=8 --ioengine=libaio \
		--direct=1 --verify=crc32c --do_verify=1 --verify_fatal=1 --randseed=$i \
		--output-format=terse --terse-version=3 >/tmp/fio.out 2>&1; then
		echo "MIGRATE-FAILED in round $i"
		cat /tmp/fio.out
		exit 1
	fi
	errs=$(awk -F';' '{print $5}' /tmp/fio.out)
	[ "$errs" = 0 ] || { echo "MIGRATE-FAILED in round $i: $errs errors"; cat /tmp/fio.out; exit 1; }
	echo "MIGRATE round $i ok"
done
