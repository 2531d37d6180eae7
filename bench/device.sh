#!/usr/bin/env bash
# Device-level fio comparison: a plain direct-I/O loop device over one raw
# file against quorumctl attach with 1 replica, 3 replicas read fifo and 3
# replicas read quorum. Prints a table; asserts nothing. See bench/README.md.
set -Eeuo pipefail

# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
fio_bench device 2G "size of every backing file and volume (default 2G)" "$@"
# raw + 1 replica + 3 replicas
need_space $((SIZE_BYTES * 5 + (64 << 20)))

# name rw bs iodepth
PATTERNS=(
	"4k randread QD32|randread|4k|32"
	"4k randwrite QD32|randwrite|4k|32"
	"4k randread QD1|randread|4k|1"
	"4k randwrite QD1|randwrite|4k|1"
	"1M seq read QD8|read|1M|8"
	"1M seq write QD8|write|1M|8"
)

# (a) raw: plain loop device with direct I/O over one raw file.
truncate -s "$SIZE_BYTES" "$WORK/raw.img"
loop_setup RAWDEV "$WORK/raw.img"
fill_device "$RAWDEV"
run_patterns "raw" "$RAWDEV"
loop_detach "$RAWDEV"
rm -f "$WORK/raw.img"

# (b) 1 replica.
"$QUORUMCTL" create --size "$SIZE_BYTES" "$WORK/r1.img" >&2
attach_start DEV "$WORK/r1.img"
PID=${ATTACH_PIDS[-1]}
fill_device "$DEV"
run_patterns "1 replica" "$DEV"
attach_stop_checked "$PID" || FAILED=1
rm -f "$WORK/r1.img" "$WORK/r1.img.qmeta"

# (c) 3 replicas, read pattern fifo; the fill through this attach writes
# all three images identically.
"$QUORUMCTL" create --size "$SIZE_BYTES" "$WORK/a.img" "$WORK/b.img" "$WORK/c.img" >&2
attach_start DEV --read-pattern fifo "$WORK/a.img" "$WORK/b.img" "$WORK/c.img"
PID=${ATTACH_PIDS[-1]}
fill_device "$DEV"
run_patterns "3 fifo" "$DEV"
attach_stop_checked "$PID" || FAILED=1

# (d) 3 replicas, read pattern quorum (the default).
attach_start DEV "$WORK/a.img" "$WORK/b.img" "$WORK/c.img"
PID=${ATTACH_PIDS[-1]}
run_patterns "3 quorum" "$DEV"
attach_stop_checked "$PID" || FAILED=1

ELAPSED=$((SECONDS - START))

HEADER1="quorumctl device benchmark: fio libaio direct=1, runtime ${RUNTIME}s (+${RAMP}s ramp), size $SIZE ($SIZE_BYTES bytes)"
HEADER2="backing files in $(work_host)"
python3 - "$RESULTS" "$HEADER1" "$HEADER2" "$ELAPSED" <<'EOF'
import sys

TARGETS = ["raw", "1 replica", "3 fifo", "3 quorum"]
rows, unit, res = [], {}, {}
for line in open(sys.argv[1]):
    t, p, v, u, lat = line.rstrip("\n").split("\t")
    if p not in rows:
        rows.append(p)
    if u != "-":
        unit[p] = u
    res[t, p] = None if v == "ERR" else float(v)

def fmt(v):
    return "ERR" if v is None else ("%.1f" % v if v < 100 else "%.0f" % v)

def ratio(a, b):
    return None if a is None or not b else a / b

print()
print(sys.argv[2])
print(sys.argv[3])
print("values: IOPS for 4k, MiB/s for 1M; (x.xx) = ratio to raw")
print()
hdr = "%-19s %-6s" % ("pattern", "unit") + "".join("%18s" % t for t in TARGETS)
print(hdr)
print("-" * len(hdr))
for p in rows:
    raw = res.get(("raw", p))
    cells = []
    for t in TARGETS:
        v = res.get((t, p))
        if t == "raw":
            cells.append("%18s" % fmt(v))
        else:
            r = ratio(v, raw)
            cells.append("%18s" % ("%s (%s)" % (fmt(v), "-" if r is None else "%.2f" % r)))
    print("%-19s %-6s" % (p, unit.get(p, "?")) + "".join(cells))

print()
print("%-48s %8s %8s  %s" % ("check", "ratio", "target", "meets"))
def check(label, v, ref):
    r = ratio(v, ref)
    print("%-48s %8s %8s  %s" % (label, "-" if r is None else "%.2f" % r, ">= 0.9",
          "-" if r is None else ("yes" if r >= 0.9 else "NO")))
for p in rows:
    if "randread" in p:
        check("3 fifo randread / raw  [%s]" % p, res.get(("3 fifo", p)), res.get(("raw", p)))
for p in rows:
    if "write" in p:
        raw = res.get(("raw", p))
        for t in ("3 fifo", "3 quorum"):
            check("%s writes / (raw/3)  [%s]" % (t, p), res.get((t, p)), None if raw is None else raw / 3)
print()
print("elapsed: %ss" % sys.argv[4])
EOF

leftovers_report
exit "$FAILED"
