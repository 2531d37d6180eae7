#!/usr/bin/env bash
# Node memory benchmark (not a test): VOLUMES volumes attached on this
# machine with quorumctl attach --frontend fuse-loop, each of three
# replicas: one local file and two over NBD from two quorumctl serve
# processes on 127.0.0.1 (each exporting one replica of every volume, as
# two other nodes' agents would), metrics endpoints on. fio writes a
# little to each device (4k random at QD32, then 1M sequential at QD8),
# every metrics endpoint is read once, and then the RSS (and PSS) of every
# process that serves the volumes is printed, with their sum per attached
# volume against the target of 64 MiB. See bench/README.md.
# Usage: sudo bench/memory.sh [--volumes 20] [--size 256M] [--write 32M] [--workdir /var/tmp]
set -Eeuo pipefail

VOLUMES=20
SIZE=256M
WRITE=32M
WORKDIR=/var/tmp
TARGET_MIB=64
usage() {
	cat <<EOF
usage: $0 [--volumes N] [--size SIZE] [--write SIZE] [--workdir DIR]

  --volumes N    volumes attached at once (default 20)
  --size SIZE    size of each volume and replica (default 256M; sparse)
  --write SIZE   bytes fio writes to each device per pattern (default 32M)
  --workdir DIR  folder for the replica files and FUSE mounts (default
                 /var/tmp); a fresh subfolder is made there and removed
                 afterwards
EOF
}

# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
bench_options usage --volumes VOLUMES --size SIZE --write WRITE --workdir WORKDIR -- "$@"
want_count --volumes "$VOLUMES"
want_size SIZE_BYTES --size "$SIZE" $((1 << 20))
want_size WRITE_BYTES --write "$WRITE" 4096
((WRITE_BYTES <= SIZE_BYTES)) || die "--write $WRITE is more than --size $SIZE"
need_tools go fio losetup python3 setsid
bench_init memory "$WORKDIR"
# Sparse replicas: what fio writes lands three times.
need_space $((WRITE_BYTES * 2 * 3 * VOLUMES + (64 << 20)))
START=$SECONDS
FAILED=0

log "creating $VOLUMES volumes of $SIZE"
SERVE_B=() SERVE_C=()
for ((i = 0; i < VOLUMES; i++)); do
	"$QUORUMCTL" create --size "$SIZE_BYTES" "$WORK/a$i.img" "$WORK/b$i.img" "$WORK/c$i.img" >/dev/null
	SERVE_B+=(--export "v$i=$WORK/b$i.img")
	SERVE_C+=(--export "v$i=$WORK/c$i.img")
done
serve_start ADDR_B --listen 127.0.0.1:0 "${SERVE_B[@]}"
serve_start ADDR_C --listen 127.0.0.1:0 "${SERVE_C[@]}"

DEVS=()
for ((i = 0; i < VOLUMES; i++)); do
	attach_start DEV --frontend fuse-loop --epoch 1 --metrics-address 127.0.0.1:0 \
		"$WORK/a$i.img" "nbd://$ADDR_B/v$i" "nbd://$ADDR_C/v$i"
	DEVS+=("$DEV")
done

for DEV in "${DEVS[@]}"; do
	for job in "randwrite 4k 32" "write 1M 8"; do
		read -r rw bs qd <<<"$job"
		run_fg fio --name=memory --filename="$DEV" --ioengine=libaio --direct=1 --rw="$rw" --bs="$bs" \
			--iodepth="$qd" --io_size="$WRITE_BYTES" --randrepeat=0 >/dev/null 2>"$WORK/fio.err" ||
			die "fio $rw $bs on $DEV failed: $(cat "$WORK/fio.err")"
	done
	log "wrote $WRITE 4k random and $WRITE 1M sequential to $DEV"
done

# Every attach's metrics endpoint answers once, so its memory is counted.
for pid in "${ATTACH_PIDS[@]}"; do
	addr=$(python3 -c 'import json, sys
for line in open(sys.argv[1]):
    try:
        j = json.loads(line)
    except ValueError:
        continue
    if j.get("msg") == "serving metrics":
        print(j["address"])
        break' "${ATTACH_LOG[$pid]}")
	[[ -n $addr ]] || die "attach pid $pid logged no metrics address"
	python3 -c 'import sys, urllib.request; urllib.request.urlopen("http://%s/metrics" % sys.argv[1], timeout=10).read()' "$addr" ||
		die "metrics of attach pid $pid at $addr do not answer"
done

# The FUSE descriptor holder the first attach started (bench_cleanup
# stops it if it outlives the attaches).
mapfile -t HOLDERS < <(work_holders)

# mem_row ROLE PID...: one line per process, "ROLE RSS HWM PSS" in KiB.
mem_row() {
	local role=$1 pid
	shift
	for pid in "$@"; do
		printf '%s %s %s %s\n' "$role" \
			"$(awk '/^VmRSS:/ {print $2}' "/proc/$pid/status")" \
			"$(awk '/^VmHWM:/ {print $2}' "/proc/$pid/status")" \
			"$(awk '/^Pss:/ {print $2}' "/proc/$pid/smaps_rollup")"
	done
}
{
	mem_row attach "${ATTACH_PIDS[@]}"
	mem_row serve "${SERVE_PIDS[@]}"
	mem_row holder "${HOLDERS[@]}"
} >"$WORK/memory.txt" || die "reading /proc of the serving processes failed"

for pid in "${ATTACH_PIDS[@]}"; do
	attach_stop_checked "$pid" || FAILED=1
done
serve_stop_all
leftovers_report

ELAPSED=$((SECONDS - START))
python3 - "$WORK/memory.txt" "$VOLUMES" "$TARGET_MIB" \
	"node memory benchmark: $VOLUMES volumes of $SIZE attached with --frontend fuse-loop and metrics on, 3 replicas each (a local file, two over NBD from 2 quorumctl serve on 127.0.0.1, each exporting one replica of every volume); fio wrote $WRITE 4k random (QD32) and $WRITE 1M sequential (QD8) to each" \
	"replica files in $(work_host); elapsed ${ELAPSED}s" <<'PY'
import sys
path, vols, target, h1, h2 = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4], sys.argv[5]
rows = {}
for line in open(path):
    role, rss, hwm, pss = line.split()
    rows.setdefault(role, []).append((int(rss) / 1024, int(hwm) / 1024, int(pss) / 1024))
names = {"attach": "quorumctl attach", "serve": "quorumctl serve", "holder": "fuse-holder"}
print(h1)
print(h2)
print()
hdr = "%-18s %5s %22s %22s %16s" % ("process", "count", "RSS MiB avg / max", "peak RSS MiB max", "PSS MiB avg")
print(hdr)
print("-" * len(hdr))
total_rss = total_pss = 0.0
for role in ("attach", "serve", "holder"):
    r = rows.get(role, [])
    if not r:
        continue
    rss = [x[0] for x in r]
    hwm = [x[1] for x in r]
    pss = [x[2] for x in r]
    total_rss += sum(rss)
    total_pss += sum(pss)
    print("%-18s %5d %22s %22.1f %16.1f" % (names[role], len(r), "%.1f / %.1f" % (sum(rss) / len(r), max(rss)), max(hwm), sum(pss) / len(r)))
print()
per_rss, per_pss = total_rss / vols, total_pss / vols
print("%-44s %8s %10s  %s" % ("per attached volume (all of them / volumes)", "MiB", "target", "meets"))
print("%-44s %8.1f %10s  %s" % ("RSS", per_rss, "<= %.0f" % target, "yes" if per_rss <= target else "NO"))
print("%-44s %8.1f %10s  %s" % ("PSS (shared pages split)", per_pss, "<= %.0f" % target, "yes" if per_pss <= target else "NO"))
print()
print("memory: %d volumes, %.1f MiB RSS per volume (PSS %.1f MiB)" % (vols, per_rss, per_pss))
PY
exit "$FAILED"
