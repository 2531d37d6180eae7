#!/usr/bin/env bash
# Controller scale benchmark (not a test): a real etcd and kube-apiserver
# (as internal/kubetest starts them), the controller binary built from this
# tree, and simulated node agents in one process (bench/scale: Nodes,
# Leases renewed, replicas reported by server-side apply as the agent
# does). It creates VOLUMES QuorumVolumes at once, lets LOST nodes stop
# renewing their Lease, then idles; bench/README.md says what is measured.
# The last line of its output is
#   scale: N volumes Ready in S s; reconcile p99 MS ms; controller RSS M MiB; idle requests per volume per minute R
# Usage: bench/scale.sh [--volumes 1000] [--nodes 100] [--lost 10] [--idle 120] [--workdir /tmp]
set -euo pipefail

VOLUMES=1000
NODES=100
LOST=10
IDLE=120
WORKDIR=/tmp
usage() {
	cat <<EOF
usage: $0 [--volumes N] [--nodes N] [--lost N] [--idle SECS] [--workdir DIR]

  --volumes N    QuorumVolumes (3 replicas each) created at once (default 1000)
  --nodes N      simulated nodes (default 100)
  --lost N       nodes that stop renewing their Lease at once (default 10)
  --idle SECS    how long the idle volumes' API requests are counted (default 120)
  --workdir DIR  where etcd's data and the logs go (default /tmp);
                 a fresh subfolder is made there and removed afterwards
EOF
}

# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
bench_options usage --volumes VOLUMES --nodes NODES --lost LOST --idle IDLE --workdir WORKDIR -- "$@"
want_count --volumes "$VOLUMES"
want_count --nodes "$NODES" 3
want_count --lost "$LOST"
((LOST <= NODES - 2)) || die "--lost $LOST: at least two of the $NODES nodes must stay"
want_count --idle "$IDLE"
need_tools go
bench_dirs scale "$WORKDIR"
START=$SECONDS

log "building the controller and the simulated agents from $REPO"
run_fg go -C "$REPO" build -o "$BINDIR/controller" ./cmd/controller || die "go build ./cmd/controller failed"
run_fg go -C "$REPO" test -c -o "$BINDIR/scale.test" ./bench/scale || die "go test -c ./bench/scale failed"

# QUORUM_CI=1: missing etcd or kube-apiserver binaries fail the run
# instead of skipping it. TMPDIR: everything of the run is under $WORK.
log "running in $WORK"
if ! QUORUM_CI=1 TMPDIR=$WORK run_fg "$BINDIR/scale.test" -test.run '^TestScale$' -test.timeout 60m \
	-controller "$BINDIR/controller" -volumes "$VOLUMES" -nodes "$NODES" -lost "$LOST" -idle "${IDLE}s" \
	-out "$WORK/report.txt" >&2; then
	die "the benchmark failed (its output is above)"
fi
cat "$WORK/report.txt"
log "elapsed: $((SECONDS - START))s"
