#!/usr/bin/env bash
# Durability benchmark (not a test), all measured in one run on one volume:
#  1. resync after changing 1% of the volume while one replica was faulty,
#     vs a full copy of the same volume to a replacement replica; once with
#     the 1% written as 64 KiB blocks (the dirty-map region), once as 4 KiB
#     blocks (each dirties a whole 64 KiB region);
#  2. the write path's cost of the journal (write intent): 4k writes at
#     QD32 through the engine in process (quorumctl bench), scattered over
#     the volume, with and without the journal, alternating runs, medians.
# Usage: sudo bench/durability.sh [--size 4G] [--workdir /var/tmp] [--runs 5]
set -euo pipefail

SIZE=4G
WORKDIR=/var/tmp
RUNS=5
usage() { echo "usage: $0 [--size 4G] [--workdir DIR] [--runs N]"; }

# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
bench_options usage --size SIZE --workdir WORKDIR --runs RUNS -- "$@"
want_count --runs "$RUNS"
want_size SIZE_BYTES --size "$SIZE"
need_tools go fio losetup blockdev python3 setsid
bench_init durability "$WORKDIR"
need_space $((SIZE_BYTES * 4 + (64 << 20)))
START=$SECONDS
A=$WORK/a.img B=$WORK/b.img C=$WORK/c.img D=$WORK/d.img
CTRL=$WORK/fail-c

"$QUORUMCTL" create --size "$SIZE_BYTES" "$A" "$B" "$C" >&2
attach_start DEV "$A" "$B" "$C"
PID=${ATTACH_PIDS[-1]}
fill_device "$DEV"
attach_stop_checked "$PID" || die "detach after the fill failed"

# status_wait: sets SECS to the seconds until every replica is healthy.
status_wait() {
	local t0=$EPOCHREALTIME
	while ! "$QUORUMCTL" status --json --state-dir "$WORK/state" "$A" |
		python3 -c 'import json,sys; sys.exit(0 if all(c["state"]=="healthy" for c in json.load(sys.stdin)["children"]) else 1)'; do
		sleep 0.05
	done
	SECS=$(python3 -c "print('%.2f' % ($EPOCHREALTIME - $t0))")
}

# resync_after BS: c fails while 1% of the volume is written in BS blocks
# at random; sets SECS to the time c's resync took once it answers again.
resync_after() {
	local bs=$1
	: >"$CTRL"
	attach_start DEV --fault-file "$C=$CTRL" --probe-interval 100ms "$A" "$B" "$C"
	PID=${ATTACH_PIDS[-1]}
	run_fg fio --name=change --filename="$DEV" --ioengine=libaio --direct=1 --rw=randwrite --bs="$bs" \
		--iodepth=32 --io_size=$((SIZE_BYTES / 100)) --randrepeat=0 >/dev/null 2>&1 || die "fio change failed"
	"$QUORUMCTL" status --state-dir "$WORK/state" "$A" >&2
	rm -f "$CTRL"
	status_wait
	attach_stop_checked "$PID" || die "detach failed"
}

log "resync after changing 1% in 64 KiB blocks"
resync_after 64k
R64=$SECS
log "resync after changing 1% in 4 KiB blocks"
resync_after 4k
R4=$SECS
log "full copy to a replacement"
"$QUORUMCTL" create --replace-for "$A" "$D" >&2
attach_start DEV "$A" "$B" "$D"
PID=${ATTACH_PIDS[-1]}
status_wait
FULL=$SECS
attach_stop_checked "$PID" || die "detach failed"
run_fg "$QUORUMCTL" check "$A" "$B" "$C" "$D" >&2 || die "replicas differ at the end"

log "journal cost: $RUNS alternating runs each"
COUNT=100000
declare -a WITH=() WITHOUT=()
for ((i = 0; i < RUNS; i++)); do
	for mode in with without; do
		flag=()
		[[ $mode == without ]] && flag=(--without-journal)
		out=$("$QUORUMCTL" bench -w -c "$COUNT" -d 32 -s 4k -S 1052672 "${flag[@]}" "$A" "$B" "$C")
		rps=$(sed -n 's/.*: \([0-9]*\) requests\/s/\1/p' <<<"$out")
		log "  $mode journal: $rps req/s"
		if [[ $mode == with ]]; then WITH+=("$rps"); else WITHOUT+=("$rps"); fi
	done
done

python3 - "$SIZE_BYTES" "$R64" "$R4" "$FULL" "${WITH[*]}" "${WITHOUT[*]}" <<'PY'
import statistics, sys
size, r64, r4, full = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
w = [int(x) for x in sys.argv[5].split()]
wo = [int(x) for x in sys.argv[6].split()]
print()
print("durability benchmark, %d GiB volume, 3 replicas" % (size >> 30))
print()
print("%-44s %10s %12s %8s" % ("resync", "seconds", "vs full copy", "target"))
print("%-44s %10.2f %12.3f %8s" % ("after 1% changed in 64 KiB blocks", r64, r64 / full, "< 0.05"))
print("%-44s %10.2f %12.3f %8s" % ("after 1% changed in 4 KiB blocks", r4, r4 / full, ""))
print("%-44s %10.2f %12s" % ("full copy to a replacement", full, "1"))
print()
mw, mwo = statistics.median(w), statistics.median(wo)
print("%-44s %10s" % ("4k scattered writes, QD32 (engine)", "req/s"))
print("%-44s %10.0f   runs %s" % ("with journal (median)", mw, w))
print("%-44s %10.0f   runs %s" % ("without journal (median)", mwo, wo))
print("%-44s %10.2f   target >= 0.9" % ("ratio", mw / mwo))
PY
echo "elapsed: $((SECONDS - START))s"
