# Shared helpers of the bench scripts (device.sh, durability.sh, engine.sh,
# guest.sh, memory.sh, nbd.sh, scale.sh): option parsing, the work folder
# and its cleanup, and for those that attach volumes on this machine
# quorumctl, attaches, loop devices and fio.
# Sourced, not run.
#
# Everything a benchmark makes lives under $WORK (backing files, FUSE mount
# points, logs) and $BINDIR (the builds). bench_cleanup, installed as the
# EXIT trap by bench_dirs (which bench_init calls), stops the command
# run_fg waits for, every attach and server this script started and any
# FUSE descriptor holder of theirs, detaches every loop device it set up
# or that still points into $WORK, unmounts anything left mounted under
# $WORK and then removes both folders.

# shellcheck shell=bash

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$BENCH_DIR/.." && pwd)

WORK=""
BINDIR=""
QUORUMCTL=""
ATTACH_PIDS=()  # quorumctl attach processes still running
LOOP_DEVS=()    # loop devices set up with losetup by this script
ATTACH_SEQ=0
SERVE_PIDS=()   # quorumctl serve processes still running
declare -A ATTACH_LOG=() # attach pid -> its stderr log
FG_PID=""                # the command run_fg is waiting for

log() { printf '%s %s\n' "$(date +%T)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

# run_fg CMD...: runs CMD and waits for it. CMD runs as a background job
# waited for with the wait builtin, which a trapped signal interrupts at
# once: a plain foreground fio catches Ctrl-C and exits "normally", and
# bash then ignores the SIGINT (it assumes the program handled it), so the
# script would carry on. bench_cleanup stops the job.
run_fg() {
	local rc=0
	"$@" &
	FG_PID=$!
	wait "$FG_PID" || rc=$?
	FG_PID=""
	return "$rc"
}

# size_bytes SIZE: prints SIZE (4096, 512K, 10M, 2G, 1T, 2GiB) in bytes.
size_bytes() {
	local s=${1^^} m=1
	s=${s%B}
	s=${s%I}
	case $s in
	*K) m=$((1 << 10)) ;;
	*M) m=$((1 << 20)) ;;
	*G) m=$((1 << 30)) ;;
	*T) m=$((1 << 40)) ;;
	esac
	((m > 1)) && s=${s%?}
	[[ $s =~ ^[0-9]+$ ]] && ((10#$s > 0)) || return 1
	echo $((10#$s * m))
}

# bench_options USAGE SPEC... -- ARGS...: sets the scripts' option
# variables from ARGS. Each SPEC pair is an option and what it does:
# "--runtime RUNTIME" takes a value into RUNTIME, "--no-check CHECK=0"
# is a flag that sets CHECK to 0. A variable keeps its value (the
# default) when its option is absent. -h or --help runs the function
# USAGE and exits 0; anything else runs USAGE on stderr and exits 2.
bench_options() {
	local usage=$1 opt
	shift
	local -A takes=() sets=()
	while (($#)) && [[ $1 != -- ]]; do
		if [[ $2 == *=* ]]; then
			sets[$1]=$2
		else
			takes[$1]=$2
		fi
		shift 2
	done
	shift
	while (($#)); do
		opt=$1
		if [[ -n ${takes[$opt]:-} ]]; then
			(($# >= 2)) || { echo "$opt: a value is missing" >&2; "$usage" >&2; exit 2; }
			printf -v "${takes[$opt]}" '%s' "$2"
			shift 2
		elif [[ -n ${sets[$opt]:-} ]]; then
			printf -v "${sets[$opt]%%=*}" '%s' "${sets[$opt]#*=}"
			shift
		elif [[ $opt == -h || $opt == --help ]]; then
			"$usage"
			exit 0
		else
			"$usage" >&2
			exit 2
		fi
	done
}

# want_count OPT VALUE [MIN]: dies unless VALUE is a whole number of at
# least MIN (default 1).
want_count() {
	[[ $2 =~ ^[0-9]+$ ]] && ((10#$2 >= ${3:-1})) || die "$1 $2: want a whole number from ${3:-1}"
}

# want_size VAR OPT SIZE [ALIGN]: sets VAR to SIZE in bytes (see
# size_bytes); dies unless it is one and a multiple of ALIGN bytes
# (default 1).
want_size() {
	local -n _bytes=$1
	_bytes=$(size_bytes "$3") || die "$2 $3: want a size such as 2G or 512M"
	((_bytes % ${4:-1} == 0)) || die "$2 $3: want a multiple of $((${4:-1} >> 20)) MiB"
}

need_tools() {
	local t
	for t in "$@"; do
		command -v "$t" >/dev/null || die "$t not found in PATH"
	done
}

# fio_bench NAME SIZE SIZE_HELP ARGS...: the start of the fio device
# benchmarks (device.sh, nbd.sh), which take the same command line:
# parses ARGS into RUNTIME, RAMP, SIZE (default SIZE, described in the
# usage as SIZE_HELP; in bytes SIZE_BYTES) and WORKDIR, checks the tools
# and makes the work folder (bench_init). Then START is the time the
# runs start, RESULTS an empty file for run_patterns, and FAILED 0.
fio_bench() {
	local name=$1
	SIZE=$2
	FIO_SIZE_HELP=$3
	shift 3
	RUNTIME=10
	RAMP=2
	WORKDIR=/var/tmp
	bench_options fio_bench_usage --runtime RUNTIME --ramp RAMP --size SIZE --workdir WORKDIR -- "$@"
	want_count --runtime "$RUNTIME"
	want_count --ramp "$RAMP" 0
	want_size SIZE_BYTES --size "$SIZE" $((1 << 20))
	need_tools go fio losetup blockdev python3 setsid
	bench_init "$name" "$WORKDIR"
	START=$SECONDS
	RESULTS=$WORK/results.tsv
	: >"$RESULTS"
	FAILED=0
}

fio_bench_usage() {
	cat <<EOF
usage: $0 [--runtime SECS] [--ramp SECS] [--size SIZE] [--workdir DIR]

  --runtime SECS  measured seconds per fio pattern (default 10)
  --ramp SECS     fio ramp time before measuring (default 2)
  --size SIZE     $FIO_SIZE_HELP
  --workdir DIR   folder on the filesystem to measure (default /var/tmp);
                  a fresh subfolder is made there and removed afterwards
EOF
}

# work_host describes where the benchmark ran, for its table's header:
# the work folder's parent, its filesystem and device, the CPUs and the
# kernel.
work_host() {
	echo "${WORK%/*} ($(df --output=fstype "$WORK" | tail -n1 | tr -d ' ') on $(df --output=source "$WORK" | tail -n1 | tr -d ' ')), $(nproc) CPUs, kernel $(uname -r)"
}

# bench_dirs NAME WORKDIR_PARENT: installs the cleanup traps and makes
# $WORK (in WORKDIR_PARENT) and $BINDIR (in /tmp), which bench_cleanup
# removes.
bench_dirs() {
	local name=$1 parent=$2
	[[ -d $parent ]] || die "work folder $parent does not exist"
	[[ $parent != *[\"\\]* ]] || die "work folder $parent: quotes and backslashes are not supported"
	# The traps may fire inside a command whose output is redirected (to a
	# log file or /dev/null); the cleanup writes to the script's own.
	exec {BENCH_STDOUT}>&1 {BENCH_STDERR}>&2
	trap bench_cleanup EXIT
	trap 'exit 130' INT
	trap 'exit 143' TERM
	trap 'exit 129' HUP
	WORK=$(mktemp -d "$parent/quorum-bench-$name.XXXXXX") || die "cannot make a folder in $parent"
	WORK=$(cd "$WORK" && pwd -P)
	BINDIR=$(mktemp -d /tmp/quorum-bench-bin.XXXXXX) || die "cannot make a temporary folder"
}

# bench_init NAME WORKDIR_PARENT: checks we are root, makes $WORK and
# $BINDIR (bench_dirs) and builds quorumctl.
bench_init() {
	local name=$1 parent=$2
	((EUID == 0)) || die "run as root (loop devices and FUSE mounts need it)"
	bench_dirs "$name" "$parent"
	log "building quorumctl from $REPO"
	run_fg go -C "$REPO" build -o "$BINDIR/quorumctl" ./cmd/quorumctl || die "go build ./cmd/quorumctl failed"
	QUORUMCTL=$BINDIR/quorumctl
	log "work folder $WORK ($(df --output=fstype "$WORK" | tail -n1 | tr -d ' ') on $(df --output=source "$WORK" | tail -n1))"
}

# need_space BYTES: fails when $WORK's filesystem has less free space.
need_space() {
	local avail
	avail=$(df --output=avail -B1 "$WORK" | tail -n1 | tr -d ' ')
	((avail >= $1)) || die "$WORK has $((avail >> 20)) MiB free, need $(($1 >> 20)) MiB"
}

# running PID: true while PID exists and is not a zombie.
running() {
	local stat
	stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
	stat=${stat##*) }
	[[ ${stat:0:1} != Z ]]
}

# attach_start VAR ARGS...: runs quorumctl attach ARGS in the background, in
# its own session (so a Ctrl-C reaches only this script, which then stops
# the attach with exactly one SIGTERM), waits for the device path line and
# stores the device in VAR.
attach_start() {
	local -n _dev=$1
	shift
	ATTACH_SEQ=$((ATTACH_SEQ + 1))
	local out=$WORK/attach-$ATTACH_SEQ.out err=$WORK/attach-$ATTACH_SEQ.err pid i
	mkdir -p "$WORK/state"
	# Made here: the job's own redirection may come after the first look.
	: >"$out"
	# No background scrub: it would take disk time from the measurement.
	setsid "$QUORUMCTL" attach --state-dir "$WORK/state" --scrub-rate 0 "$@" >"$out" 2>"$err" </dev/null &
	pid=$!
	ATTACH_PIDS+=("$pid")
	ATTACH_LOG[$pid]=$err
	for ((i = 0; i < 600; i++)); do
		if [[ $(wc -l <"$out") -ge 1 ]]; then
			_dev=$(head -n1 "$out")
			[[ $_dev == /dev/* && -b $_dev ]] || die "quorumctl attach printed '$_dev', not a block device; its log: $(cat "$err")"
			# setsid runs the program in place (no fork) when the caller
			# is not a process group leader, as here; make sure, or our
			# SIGTERM would miss it.
			[[ $(readlink "/proc/$pid/exe") == "$QUORUMCTL" ]] || die "attach pid $pid is not quorumctl (setsid forked?)"
			log "attached $* -> $_dev (pid $pid, loop dio=$(cat "/sys/block/${_dev#/dev/}/loop/dio" 2>/dev/null))"
			return 0
		fi
		if ! running "$pid"; then
			local rc=0
			wait "$pid" || rc=$?
			attach_forget "$pid"
			die "quorumctl attach $* exited with status $rc before printing a device; its log:
$(cat "$err")"
		fi
		sleep 0.1
	done
	die "quorumctl attach $* printed no device within 60s"
}

# serve_start VAR ARGS...: runs quorumctl serve ARGS in the background, in
# its own session, waits for the address line and stores it in VAR.
serve_start() {
	local -n _addr=$1
	shift
	ATTACH_SEQ=$((ATTACH_SEQ + 1))
	local out=$WORK/serve-$ATTACH_SEQ.out err=$WORK/serve-$ATTACH_SEQ.err pid i
	: >"$out"
	setsid "$QUORUMCTL" serve "$@" >"$out" 2>"$err" </dev/null &
	pid=$!
	SERVE_PIDS+=("$pid")
	for ((i = 0; i < 300; i++)); do
		if [[ $(wc -l <"$out") -ge 1 ]]; then
			_addr=$(head -n1 "$out")
			log "serving $* on $_addr (pid $pid)"
			return 0
		fi
		running "$pid" || die "quorumctl serve $* exited before printing its address; its log:
$(cat "$err")"
		sleep 0.1
	done
	die "quorumctl serve $* printed no address within 30s"
}

# serve_stop_all: SIGTERM every server (SIGKILL after 30s) and wait.
serve_stop_all() {
	local pid
	for pid in "${SERVE_PIDS[@]}"; do
		kill -TERM "$pid" 2>/dev/null || true
		wait_exit "$pid" 30 || kill -KILL "$pid" 2>/dev/null || true
		wait "$pid" 2>/dev/null || log "warning: quorumctl serve pid $pid exited with status $?"
	done
	SERVE_PIDS=()
}

attach_forget() {
	local p keep=()
	for p in "${ATTACH_PIDS[@]}"; do
		[[ $p == "$1" ]] || keep+=("$p")
	done
	ATTACH_PIDS=("${keep[@]}")
}

# wait_exit PID SECS: waits up to SECS for PID to end.
wait_exit() {
	local i
	for ((i = 0; i < $2 * 10; i++)); do
		running "$1" || return 0
		sleep 0.1
	done
	! running "$1"
}

# attach_stop PID: SIGTERM, wait for the clean detach; a second SIGTERM
# after 60s makes quorumctl stop waiting for the device's users, SIGKILL
# after 20s more. Returns quorumctl's exit status.
attach_stop() {
	local pid=$1 rc=0
	if running "$pid"; then
		kill -TERM "$pid" 2>/dev/null || true
		if ! wait_exit "$pid" 60; then
			log "attach pid $pid still running 60s after SIGTERM; sending a second SIGTERM (forced detach)"
			kill -TERM "$pid" 2>/dev/null || true
			if ! wait_exit "$pid" 20; then
				log "attach pid $pid still running; SIGKILL"
				kill -KILL "$pid" 2>/dev/null || true
			fi
		fi
	fi
	wait "$pid" 2>/dev/null || rc=$?
	attach_forget "$pid"
	return "$rc"
}

# attach_stop_checked PID: attach_stop, then complains if quorumctl failed
# or left anything behind.
attach_stop_checked() {
	local rc=0
	attach_stop "$1" || rc=$?
	local alog=${ATTACH_LOG[$1]:-/dev/null} n
	# Anything but INFO lines: warnings, errors, engine events
	# (REPORT_BAD, QUORUM_FAILURE).
	n=$(grep -vc '"level":"INFO"' "$alog" 2>/dev/null) || true
	if ((${n:-0} > 0)); then
		log "warning: quorumctl attach (pid $1) logged $n warning/error/event line(s), first 3:
$(grep -v '"level":"INFO"' "$alog" | head -n 3)"
	fi
	if ((rc == 0)); then
		log "detached (quorumctl attach pid $1 exited 0)"
	else
		log "warning: quorumctl attach (pid $1) exited with status $rc; its log:
$(cat "${ATTACH_LOG[$1]:-/dev/null}" 2>/dev/null)"
	fi
	leftovers_report
	return "$rc"
}

# loop devices whose backing file is under $WORK.
work_loops() {
	local f b
	for f in /sys/block/loop*/loop/backing_file; do
		[[ -r $f ]] || continue
		b=$(cat "$f" 2>/dev/null) || continue
		if [[ $b == "$WORK"/* ]]; then
			f=${f#/sys/block/}
			echo "/dev/${f%%/*}"
		fi
	done
}

# mount points under $WORK, deepest first.
work_mounts() {
	python3 - "$WORK" <<'EOF'
import sys
work = sys.argv[1].rstrip("/") + "/"
def unescape(s):
    return s.encode().decode("unicode_escape") if "\\" in s else s
ms = []
for line in open("/proc/self/mounts"):
    mp = unescape(line.split()[1])
    if mp.startswith(work):
        ms.append(mp)
for mp in sorted(ms, key=len, reverse=True):
    print(mp)
EOF
}

# work_holders: the pids of FUSE descriptor holders (quorumctl
# fuse-holder, which an attach starts in a session of its own) whose
# socket is under $WORK.
work_holders() {
	local f pid args
	for f in /proc/[0-9]*/cmdline; do
		# A process may end between the glob and the read.
		{ args=$(tr '\0' '\n' <"$f"); } 2>/dev/null || continue
		if [[ $args == *$'\n'fuse-holder$'\n'* && $args == *$'\n'"$WORK"/* ]]; then
			pid=${f#/proc/}
			echo "${pid%/cmdline}"
		fi
	done
}

leftovers_report() {
	local l m
	l=$(work_loops)
	m=$(work_mounts)
	[[ -z $l ]] || log "warning: loop devices still backed by $WORK: $l"
	[[ -z $m ]] || log "warning: still mounted under $WORK: $m"
}

# loop_setup VAR FILE: losetup with direct I/O; insists that it is on.
loop_setup() {
	local -n _loop=$1
	_loop=$(losetup --direct-io=on --show -f "$2") || die "losetup $2 failed"
	LOOP_DEVS+=("$_loop")
	local dio
	dio=$(cat "/sys/block/${_loop#/dev/}/loop/dio")
	[[ $dio == 1 ]] || die "$_loop over $2 has dio=$dio: the filesystem refused direct I/O"
	log "losetup $2 -> $_loop (dio=$dio)"
}

loop_detach() {
	local d keep=()
	losetup -d "$1" || log "warning: losetup -d $1 failed"
	for d in "${LOOP_DEVS[@]}"; do
		[[ $d == "$1" ]] || keep+=("$d")
	done
	LOOP_DEVS=("${keep[@]}")
}

bench_cleanup() {
	local rc=$? pid d m
	# Finish cleaning up even if Ctrl-C is pressed again.
	trap '' INT TERM HUP
	trap - EXIT
	[[ -z ${BENCH_STDOUT:-} ]] || exec 1>&"$BENCH_STDOUT" 2>&"$BENCH_STDERR"
	if [[ -n $FG_PID ]] && running "$FG_PID"; then
		log "cleanup: stopping $(cat "/proc/$FG_PID/comm" 2>/dev/null) (pid $FG_PID)"
		kill -TERM "$FG_PID" 2>/dev/null || true
		wait_exit "$FG_PID" 15 || kill -KILL "$FG_PID" 2>/dev/null || true
		wait "$FG_PID" 2>/dev/null || true
	fi
	for pid in "${ATTACH_PIDS[@]}"; do
		log "cleanup: stopping quorumctl attach pid $pid"
		attach_stop "$pid" || log "cleanup: quorumctl attach pid $pid exited with status $?"
	done
	if ((${#SERVE_PIDS[@]})); then
		log "cleanup: stopping quorumctl serve pids ${SERVE_PIDS[*]}"
		serve_stop_all
	fi
	if [[ -n $WORK && -d $WORK ]]; then
		# A holder exits once it holds nothing; one that outlived the
		# attaches holds what a killed attach left.
		for pid in $(work_holders); do
			log "cleanup: stopping quorumctl fuse-holder pid $pid"
			kill -TERM "$pid" 2>/dev/null || true
			wait_exit "$pid" 10 || kill -KILL "$pid" 2>/dev/null || true
		done
	fi
	for d in "${LOOP_DEVS[@]}"; do
		log "cleanup: losetup -d $d"
		losetup -d "$d" || true
	done
	if [[ -n $WORK && -d $WORK ]]; then
		for d in $(work_loops); do
			log "cleanup: $d still backed by a file in $WORK; losetup -d"
			losetup -d "$d" || true
		done
		while read -r m; do
			[[ -n $m ]] || continue
			log "cleanup: unmounting $m"
			umount "$m" 2>/dev/null || umount -l "$m" || true
		done < <(work_mounts)
		if [[ -n $(work_mounts) ]]; then
			log "cleanup: mounts remain under $WORK; not removing it"
		else
			rm -rf "$WORK"
		fi
	fi
	[[ -z $BINDIR ]] || rm -rf "$BINDIR"
	exit "$rc"
}

# run_patterns TARGET DEV: every pattern of $PATTERNS ("name|rw|bs|iodepth")
# on DEV with fio, for $RUNTIME seconds after $RAMP; appends "target,
# pattern, value, unit, mean latency" lines to $RESULTS and sets FAILED=1
# when fio fails.
run_patterns() {
	local target=$1 dev=$2 p name rw bs qd out value
	for p in "${PATTERNS[@]}"; do
		IFS='|' read -r name rw bs qd <<<"$p"
		out=$WORK/fio-${target// /_}-${name// /_}.json
		if run_fg fio --name=bench --filename="$dev" --ioengine=libaio --direct=1 \
			--rw="$rw" --bs="$bs" --iodepth="$qd" --numjobs=1 \
			--time_based --runtime="$RUNTIME" --ramp_time="$RAMP" \
			--norandommap --randrepeat=0 \
			--output-format=json --output="$out" >/dev/null 2>"$out.err" &&
			value=$(python3 - "$out" "$rw" "$bs" <<'EOF'
import json, sys
path, rw, bs = sys.argv[1:]
j = json.load(open(path))["jobs"][0]
if j["error"]:
    sys.exit("fio job error %d" % j["error"])
d = j["read" if "read" in rw else "write"]
lat = d.get("clat_ns", {}).get("mean", 0) / 1000
if bs == "1M":
    print("%.1f\tMiB/s\t%.0f" % (d["bw_bytes"] / 2**20, lat))
else:
    print("%.0f\tIOPS\t%.0f" % (d["iops"], lat))
EOF
			); then
			printf '%s\t%s\t%s\n' "$target" "$name" "$value" >>"$RESULTS"
			log "[$target] $name: $(cut -f1,2 <<<"$value" | tr '\t' ' ') (mean clat $(cut -f3 <<<"$value") us)"
		else
			FAILED=1
			printf '%s\t%s\tERR\t-\t-\n' "$target" "$name" >>"$RESULTS"
			log "[$target] $name: fio FAILED ($(wc -l <"$out.err") lines on stderr, first 3 below)
$(head -n 3 "$out.err")"
		fi
	done
}

# fill_device DEV: writes the whole device once, sequentially with 1 MiB
# direct writes of fio's (non-zero) buffers, so that nothing read later
# is a hole.
fill_device() {
	local dev=$1 out
	out=$WORK/fill-$(basename "$dev")-$RANDOM.json
	log "filling $dev ($(($(blockdev --getsize64 "$dev") >> 20)) MiB)"
	run_fg fio --name=fill --filename="$dev" --ioengine=libaio --direct=1 --rw=write --bs=1M --iodepth=8 \
		--output-format=json --output="$out" >/dev/null 2>"$out.err" || die "filling $dev failed: $(cat "$out.err")"
	python3 - "$out" "$(blockdev --getsize64 "$dev")" <<'EOF' >&2 || die "filling $dev did not write all of it"
import json, sys
j = json.load(open(sys.argv[1]))["jobs"][0]
w = j["write"]
print("  wrote %d MiB at %.0f MiB/s, error=%d" % (w["io_bytes"] >> 20, w["bw_bytes"] / 2**20, j["error"]))
sys.exit(0 if j["error"] == 0 and w["io_bytes"] == int(sys.argv[2]) else 1)
EOF
}
