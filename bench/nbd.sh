#!/usr/bin/env bash
# Replicas over NBD against local replicas: the same three replica images
# attached as three local files, then with two of them behind
# `quorumctl serve` on loopback (one local, two NBD), with fio on the
# device, read pattern fifo and quorum. Prints a table of ratios; asserts
# nothing. See bench/README.md.
set -Eeuo pipefail

# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
fio_bench nbd 1G "size of the volume and of each replica (default 1G)" "$@"
need_space $((SIZE_BYTES * 3 + (64 << 20)))
PATTERNS=(
	"4k randread QD32|randread|4k|32"
	"4k randwrite QD32|randwrite|4k|32"
	"1M seq read QD8|read|1M|8"
	"1M seq write QD8|write|1M|8"
)

A=$WORK/a.img
B=$WORK/b.img
C=$WORK/c.img
"$QUORUMCTL" create --size "$SIZE_BYTES" "$A" "$B" "$C" >&2

EPOCH=0
for pattern in fifo quorum; do
	attach_start DEV --read-pattern "$pattern" "$A" "$B" "$C"
	PID=${ATTACH_PIDS[-1]}
	[[ $pattern == quorum ]] || fill_device "$DEV"
	run_patterns "local $pattern" "$DEV"
	attach_stop_checked "$PID" || FAILED=1

	serve_start ADDR_B --listen 127.0.0.1:0 --export b="$B"
	serve_start ADDR_C --listen 127.0.0.1:0 --export c="$C"
	EPOCH=$((EPOCH + 1))
	attach_start DEV --read-pattern "$pattern" --epoch "$EPOCH" "$A" "nbd://$ADDR_B/b" "nbd://$ADDR_C/c"
	PID=${ATTACH_PIDS[-1]}
	run_patterns "nbd $pattern" "$DEV"
	attach_stop_checked "$PID" || FAILED=1
	serve_stop_all
done
"$QUORUMCTL" check "$A" "$B" "$C" >&2 || {
	log "replicas differ after the runs"
	FAILED=1
}

ELAPSED=$((SECONDS - START))
HEADER1="quorumctl NBD benchmark: 3 replicas, all local files vs a local file + 2 quorumctl serve on 127.0.0.1; fio libaio direct=1, runtime ${RUNTIME}s (+${RAMP}s ramp), size $SIZE"
HEADER2="replica files in $(work_host)"
python3 - "$RESULTS" "$HEADER1" "$HEADER2" "$ELAPSED" <<'PY'
import sys
res, rows = {}, []
for line in open(sys.argv[1]):
    t, p, v, u, lat = line.rstrip("\n").split("\t")
    if p not in rows:
        rows.append(p)
    res[t, p] = (None if v == "ERR" else float(v), lat)

def cell(x):
    return "ERR" if x[0] is None else "%.0f (%s us)" % x

print()
print(sys.argv[2])
print(sys.argv[3])
print("values: IOPS for 4k, MiB/s for 1M, with the mean completion latency")
print()
hdr = "%-19s %-7s %18s %18s %6s %7s  %s" % ("pattern", "reads", "local", "nbd", "ratio", "target", "meets")
print(hdr)
print("-" * len(hdr))
for pattern in ("fifo", "quorum"):
    for p in rows:
        l, n = res.get(("local " + pattern, p)), res.get(("nbd " + pattern, p))
        if not l or not n:
            continue
        target = 0.7 if p.startswith("4k") else 0.8
        r = None if l[0] is None or n[0] is None or not l[0] else n[0] / l[0]
        print("%-19s %-7s %18s %18s %6s %7s  %s" % (p, pattern, cell(l), cell(n),
              "-" if r is None else "%.2f" % r, ">= %.1f" % target,
              "-" if r is None else ("yes" if r >= target else "NO")))
print()
print("elapsed: %ss" % sys.argv[4])
PY

leftovers_report
exit "$FAILED"
