#!/usr/bin/env bash
# ublk against FUSE+loop, in the same run, inside a QEMU guest whose
# kernel has ublk (the test machines' kernel does not): three file
# replicas on a virtio scratch disk, the fio patterns of device.sh, read
# pattern fifo. A benchmark, not a test: it prints a table and asserts
# nothing. The guest runs under software emulation (TCG), so absolute
# numbers are far below a real machine's; the ratio is what to read.
#
# Usage: sudo bench/guest.sh [--runtime SECS]   (default 5 per pattern)
set -euo pipefail
RUNTIME=5
usage() { sed -n '2,9p' "$0"; }
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
bench_options usage --runtime RUNTIME -- "$@"
want_count --runtime "$RUNTIME"
((EUID == 0)) || die "run as root"
WORK=$(mktemp -d /var/tmp/quorum-bench-guest.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
bash "$REPO/e2e/guest/build.sh" "$WORK/boot" >&2
truncate -s 4G "$WORK/scratch.img"
GUEST_TIMEOUT=1800 GUEST_APPEND="bench_runtime=$RUNTIME" bash "$REPO/e2e/guest/run.sh" "$WORK/boot" bench \
	-drive "file=$WORK/scratch.img,format=raw,if=virtio,cache=none,aio=native" >"$WORK/console" 2>&1 || {
	cat "$WORK/console" >&2
	echo "the guest benchmark failed" >&2
	exit 1
}
python3 - "$WORK/console" "$RUNTIME" <<'PY'
import sys
res = {}
rows = []
for line in open(sys.argv[1], errors="replace"):
    f = line.split()
    if len(f) == 5 and f[0] == "BENCH":
        res[f[1], f[2]] = (float(f[3]), f[4])
        if f[2] not in rows:
            rows.append(f[2])
print("ublk vs FUSE+loop inside a TCG guest (bookworm-backports kernel), 3 file replicas, read pattern fifo, %ss per pattern" % sys.argv[2])
print()
print("%-20s %14s %14s %8s" % ("pattern", "fuse-loop", "ublk", "ratio"))
for p in rows:
    a, b = res.get(("fuse-loop", p)), res.get(("ublk", p))
    r = "-" if not a or not b or not a[0] else "%.2f" % (b[0] / a[0])
    fmt = lambda x: "-" if not x else "%.0f %s" % x
    print("%-20s %14s %14s %8s" % (p, fmt(a), fmt(b), r))
PY
