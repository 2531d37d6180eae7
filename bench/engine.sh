#!/usr/bin/env bash
# Engine-level comparison against QEMU's own quorum driver: qemu-img bench
# on a json:{"driver":"quorum",...} of 3 raw images, and quorumctl bench
# with the same request pattern on the same 3 images. Prints a table;
# asserts nothing. See bench/README.md.
set -Eeuo pipefail

usage() {
	cat <<EOF
usage: $0 [--count N] [--count64 N] [--depth N] [--size SIZE] [--workdir DIR] [--no-check]

  --count N     requests per 4k run (default 100000)
  --count64 N   requests per 64k run (default: --count / 4)
  --depth N     requests in flight (default 32)
  --size SIZE   size of each replica (default 2G)
  --workdir DIR folder on the filesystem to measure (default /var/tmp); a
                fresh subfolder is made there and removed afterwards
  --no-check    skip quorumctl check of the replicas after the fill and at the end
EOF
}

COUNT=100000
COUNT64=""
DEPTH=32
SIZE=2G
WORKDIR=/var/tmp
CHECK=1
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
bench_options usage --count COUNT --count64 COUNT64 --depth DEPTH --size SIZE --workdir WORKDIR --no-check CHECK=0 -- "$@"
want_count --count "$COUNT"
COUNT64=${COUNT64:-$((COUNT / 4 > 0 ? COUNT / 4 : 1))}
want_count --count64 "$COUNT64"
want_count --depth "$DEPTH"
want_size SIZE_BYTES --size "$SIZE" $((1 << 20))
# The scattered step: 1 MiB + 4 KiB = 257 * 4 KiB. 257 is prime, so unless
# the image has a multiple of 257 blocks of 4 KiB, offsets visit every 4k
# block of the image before repeating.
SCATTER=1052672
(((SIZE_BYTES / 4096) % 257 != 0)) || log "warning: $SIZE is a multiple of the scattered step's 257 blocks; scattered runs revisit few offsets"
need_tools go fio qemu-img losetup blockdev python3 setsid

bench_init engine "$WORKDIR"
need_space $((SIZE_BYTES * 3 + (64 << 20)))

START=$SECONDS
A=$WORK/a.img
B=$WORK/b.img
C=$WORK/c.img
RESULTS=$WORK/results.tsv
: >"$RESULTS"
FAILED=0

# Replicas with metadata, filled with identical data through one attach.
"$QUORUMCTL" create --size "$SIZE_BYTES" "$A" "$B" "$C" >&2
attach_start DEV "$A" "$B" "$C"
PID=${ATTACH_PIDS[-1]}
fill_device "$DEV"
attach_stop_checked "$PID" || die "detach after the fill failed"
if ((CHECK)); then
	log "quorumctl check after the fill"
	run_fg "$QUORUMCTL" check "$A" "$B" "$C" >&2 || die "replicas differ after the fill"
fi

qemu_json() { # read-pattern
	local c='' f
	for f in "$A" "$B" "$C"; do
		c+="${c:+,}{\"driver\":\"raw\",\"file\":{\"driver\":\"file\",\"filename\":\"$f\"}}"
	done
	echo "json:{\"driver\":\"quorum\",\"vote-threshold\":2,\"read-pattern\":\"$1\",\"children\":[$c]}"
}

# native AIO needs O_DIRECT (-t none) and libaio support; fall back to
# threads.
AIO=native
if ! run_fg qemu-img bench -t none -i native -c 1 -d 1 "$(qemu_json quorum)" >"$WORK/probe.out" 2>&1; then
	log "qemu-img bench -i native failed ($(cat "$WORK/probe.out")); using -i threads"
	AIO=threads
fi
log "qemu-img: $(qemu-img --version | head -n1), -t none -i $AIO"

# run_row NAME READ_PATTERN RW SIZE STEP COUNT
run_row() {
	local name=$1 rp=$2 rw=$3 bs=$4 step=$5 count=$6 w=() out q o qs os
	[[ $rw == write ]] && w=(-w)
	out=$WORK/row-${name// /_}
	q=ERR o=ERR
	if run_fg qemu-img bench -t none -i "$AIO" -d "$DEPTH" -s "$bs" -S "$step" -c "$count" "${w[@]}" \
		"$(qemu_json "$rp")" >"$out.qemu" 2>&1 &&
		qs=$(sed -n 's/^Run completed in \([0-9.]*\) seconds.*/\1/p' "$out.qemu") && [[ -n $qs ]]; then
		q=$(python3 -c "print('%.0f' % ($count / $qs))")
	else
		FAILED=1
		log "[$name] qemu-img bench FAILED: $(tail -n 3 "$out.qemu")"
	fi
	if run_fg "$QUORUMCTL" bench --vote-threshold 2 --read-pattern "$rp" -d "$DEPTH" -s "$bs" -S "$step" -c "$count" "${w[@]}" \
		"$A" "$B" "$C" >"$out.ours" 2>"$out.ours.err" &&
		os=$(sed -n 's/^Run completed in \([0-9.]*\) seconds.*/\1/p' "$out.ours") && [[ -n $os ]]; then
		o=$(python3 -c "print('%.0f' % ($count / $os))")
	else
		FAILED=1
		log "[$name] quorumctl bench FAILED: $(cat "$out.ours"; tail -n 3 "$out.ours.err")"
	fi
	if [[ -s $out.ours.err ]]; then
		log "[$name] quorumctl bench logged $(wc -l <"$out.ours.err") event line(s), first: $(head -n1 "$out.ours.err")"
	fi
	printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$count" "$step" "$q" "$o" >>"$RESULTS"
	log "[$name] QEMU $q req/s (${qs:-?}s), ours $o req/s (${os:-?}s)"
}

run_row "4k seq read quorum" quorum read 4096 4096 "$COUNT"
run_row "4k seq read fifo" fifo read 4096 4096 "$COUNT"
run_row "4k seq write" quorum write 4096 4096 "$COUNT"
run_row "4k scattered read quorum" quorum read 4096 "$SCATTER" "$COUNT"
run_row "4k scattered read fifo" fifo read 4096 "$SCATTER" "$COUNT"
run_row "4k scattered write" quorum write 4096 "$SCATTER" "$COUNT"
run_row "64k seq read quorum" quorum read 65536 65536 "$COUNT64"
run_row "64k seq read fifo" fifo read 65536 65536 "$COUNT64"
run_row "64k seq write" quorum write 65536 65536 "$COUNT64"

if ((CHECK)); then
	# Both engines wrote the same pattern (zero bytes) to all three.
	log "quorumctl check at the end"
	run_fg "$QUORUMCTL" check "$A" "$B" "$C" >&2 || { log "warning: replicas differ at the end"; FAILED=1; }
fi

ELAPSED=$((SECONDS - START))
HEADER1="engine benchmark: qemu-img bench (QEMU quorum driver, -t none -i $AIO) vs quorumctl bench, 3 replicas of $SIZE, vote-threshold 2, depth $DEPTH"
HEADER2="images in $(work_host), $(qemu-img --version | head -n1)"
python3 - "$RESULTS" "$HEADER1" "$HEADER2" "$ELAPSED" <<'EOF'
import sys
print()
print(sys.argv[2])
print(sys.argv[3])
print()
hdr = "%-26s %8s %9s %12s %12s %10s" % ("pattern", "count", "step", "QEMU req/s", "ours req/s", "ours/QEMU")
print(hdr)
print("-" * len(hdr))
for line in open(sys.argv[1]):
    name, count, step, q, o = line.rstrip("\n").split("\t")
    r = "-" if "ERR" in (q, o) or float(q) == 0 else "%.2f" % (float(o) / float(q))
    print("%-26s %8s %9s %12s %12s %10s" % (name, count, step, q, o, r))
print()
print("elapsed: %ss" % sys.argv[4])
EOF

leftovers_report
exit "$FAILED"
