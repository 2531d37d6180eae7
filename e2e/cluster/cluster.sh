#!/usr/bin/env bash
# A three-node Kubernetes v1.37.2 cluster on one machine, for the e2e
# scenarios: etcd, kube-apiserver, kube-scheduler and
# kube-controller-manager run on the host; each node is a network
# namespace (its own address, so one node can be cut off) plus a mount
# namespace in which its own folders are bound over the standard paths
# (/var/lib/kubelet, /var/lib/containerd, /run/containerd,
# /var/lib/quorum-csi, /run/quorum-csi, /etc/cni/net.d, ...), so one
# DaemonSet with the chart's default paths serves all three nodes. Each
# node runs its own containerd and kubelet there.
#
#   cluster.sh up       start it (after build.sh); prints the kubeconfig
#   cluster.sh down     stop everything and remove its state, even half
#                       started; safe to repeat
#   cluster.sh leaks    list what a run left behind (processes, mounts,
#                       loop devices, namespaces, links, cgroups);
#                       exit 1 if anything
#   cluster.sh cut N    cut node N off the network; mend N brings it back
#
# Addresses: the host is 10.203.0.1 on bridge qe-br0 (the API server
# listens there), node N is 10.203.0.1N in netns qe-nodeN. Pods reach the
# API server at the kubernetes Service address 10.0.0.1:443 through a
# DNAT rule in every node (there is no kube-proxy).
#
#   QUORUM_E2E_ROOT  state, logs, PKI and kubeconfigs
#                    (default /var/lib/quorum-e2e)
#   QUORUM_E2E_IMAGES, QUORUM_K8S_BIN  as in build.sh
set -euo pipefail
ROOT=${QUORUM_E2E_ROOT:-/var/lib/quorum-e2e}
IMAGES=${QUORUM_E2E_IMAGES:-/var/cache/quorum-csi/e2e/images}
BIN=${QUORUM_K8S_BIN:-/var/cache/quorum-csi/k8s/v1.37.2/bin}
NODES=(node1 node2 node3)
HOST_IP=10.203.0.1
API=https://$HOST_IP:6443
PKI=$ROOT/pki RUN=$ROOT/run
log() { printf '%s cluster: %s\n' "$(date +%T)" "$*" >&2; }
node_ip() { echo "10.203.0.1${1#node}"; }
node_dir() { echo "$ROOT/nodes/$1"; }

# Each node's folders, bound over these paths in its mount namespace.
BINDS=(var/lib/kubelet var/lib/containerd run/containerd var/lib/quorum-csi run/quorum-csi
	etc/cni/net.d var/lib/cni var/log/pods run/netns)

# wait_for SECONDS WHAT CMD... polls CMD until it succeeds.
wait_for() {
	local secs=$1 what=$2 end=$((SECONDS + $1))
	shift 2
	until "$@" >/dev/null 2>&1; do
		((SECONDS < end)) || { log "timed out after ${secs}s waiting for $what"; return 1; }
		sleep 0.2
	done
}

# start NAME CMD... runs CMD in the background, logging to $RUN/NAME.log,
# and records its pid in $RUN/NAME.pid.
start() {
	local name=$1
	shift
	setsid "$@" >"$RUN/$name.log" 2>&1 </dev/null &
	echo $! >"$RUN/$name.pid"
}

pki() {
	[[ -f $PKI/done ]] && return 0
	rm -rf "$PKI"
	mkdir -p "$PKI"
	(
		cd "$PKI"
		openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.crt -days 30 -subj /CN=quorum-e2e-ca 2>/dev/null
		cert() { # NAME SUBJ EXT
			openssl req -newkey rsa:2048 -nodes -keyout "$1.key" -out "$1.csr" -subj "$2" 2>/dev/null
			openssl x509 -req -in "$1.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -out "$1.crt" -days 30 \
				-extfile <(printf '%s\n' "$3") 2>/dev/null
			rm "$1.csr"
		}
		cert apiserver /CN=kube-apiserver "subjectAltName=IP:$HOST_IP,IP:10.0.0.1,IP:127.0.0.1,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc
extendedKeyUsage=serverAuth"
		cert admin "/O=system:masters/CN=admin" "extendedKeyUsage=clientAuth"
		openssl genrsa -out sa.key 2048 2>/dev/null
		openssl rsa -in sa.key -pubout -out sa.pub 2>/dev/null
		{
			echo "$(openssl rand -hex 16),admin,admin,system:masters"
			echo "$(openssl rand -hex 16),system:kube-controller-manager,kcm"
			echo "$(openssl rand -hex 16),system:kube-scheduler,scheduler"
			for n in "${NODES[@]}"; do echo "$(openssl rand -hex 16),system:node:$n,$n,system:nodes"; done
		} >tokens.csv
		touch done
	)
}

# kubeconfig FILE USER writes a kubeconfig that logs in with USER's token.
kubeconfig() {
	local token
	token=$(awk -F, -v u="$2" '$2 == u {print $1}' "$PKI/tokens.csv")
	cat >"$1" <<EOF
apiVersion: v1
kind: Config
clusters: [{name: e2e, cluster: {server: "$API", certificate-authority: "$PKI/ca.crt"}}]
users: [{name: u, user: {token: "$token"}}]
contexts: [{name: e2e, context: {cluster: e2e, user: u}}]
current-context: e2e
EOF
}

control_plane() {
	mkdir -p "$ROOT/etcd" "$RUN"
	if ! ip link show qe-br0 >/dev/null 2>&1; then
		ip link add qe-br0 type bridge
		ip addr add $HOST_IP/24 dev qe-br0
		ip link set qe-br0 up
	fi
	start etcd "$BIN/etcd" --name e2e --data-dir "$ROOT/etcd" \
		--listen-client-urls http://127.0.0.1:2479 --advertise-client-urls http://127.0.0.1:2479 \
		--listen-peer-urls http://127.0.0.1:2480 --initial-advertise-peer-urls http://127.0.0.1:2480 \
		--initial-cluster e2e=http://127.0.0.1:2480
	wait_for 30 etcd curl -sf http://127.0.0.1:2479/health
	start kube-apiserver "$BIN/kube-apiserver" --etcd-servers=http://127.0.0.1:2479 \
		--bind-address=$HOST_IP --advertise-address=$HOST_IP --secure-port=6443 \
		--tls-cert-file="$PKI/apiserver.crt" --tls-private-key-file="$PKI/apiserver.key" \
		--client-ca-file="$PKI/ca.crt" --token-auth-file="$PKI/tokens.csv" \
		--service-account-issuer=https://kubernetes.default.svc \
		--service-account-key-file="$PKI/sa.pub" --service-account-signing-key-file="$PKI/sa.key" \
		--service-cluster-ip-range=10.0.0.0/24 --authorization-mode=Node,RBAC \
		--kubelet-client-certificate="$PKI/admin.crt" --kubelet-client-key="$PKI/admin.key" \
		--allow-privileged=true --endpoint-reconciler-type=none \
		--kubelet-preferred-address-types=InternalIP,Hostname --cert-dir="$ROOT/apiserver-certs"
	kubeconfig "$RUN/kubeconfig" admin
	kubeconfig "$RUN/kubeconfig-kcm" system:kube-controller-manager
	kubeconfig "$RUN/kubeconfig-scheduler" system:kube-scheduler
	wait_for 60 kube-apiserver "$BIN/kubectl" --kubeconfig "$RUN/kubeconfig" get --raw /readyz
	# Without --use-service-account-credentials the controller manager
	# acts as itself, and needs more than its default role to clear the
	# nodes' not-ready taints and bind volumes.
	"$BIN/kubectl" --kubeconfig "$RUN/kubeconfig" create clusterrolebinding e2e-kcm-admin \
		--clusterrole=cluster-admin --user=system:kube-controller-manager >/dev/null
	start kube-scheduler "$BIN/kube-scheduler" --kubeconfig="$RUN/kubeconfig-scheduler" \
		--authentication-kubeconfig="$RUN/kubeconfig-scheduler" --authorization-kubeconfig="$RUN/kubeconfig-scheduler" \
		--leader-elect=false --bind-address=127.0.0.1 --secure-port=10259
	start kube-controller-manager "$BIN/kube-controller-manager" --kubeconfig="$RUN/kubeconfig-kcm" \
		--authentication-kubeconfig="$RUN/kubeconfig-kcm" --authorization-kubeconfig="$RUN/kubeconfig-kcm" \
		--leader-elect=false --bind-address=127.0.0.1 --secure-port=10257 \
		--service-account-private-key-file="$PKI/sa.key" --root-ca-file="$PKI/ca.crt" \
		--use-service-account-credentials=false --controllers='*'
}

node_up() {
	local n=$1 i=${1#node} ip dir holder
	ip=$(node_ip "$n")
	dir=$(node_dir "$n")
	for b in "${BINDS[@]}"; do mkdir -p "$dir/${b//\//-}" "/$b"; done

	ip netns add "qe-$n"
	ip link add "qe-$n" type veth peer name eth0 netns "qe-$n"
	ip link set "qe-$n" master qe-br0 up
	ip -n "qe-$n" addr add "$ip/24" dev eth0
	ip -n "qe-$n" link set eth0 up
	ip -n "qe-$n" link set lo up
	ip -n "qe-$n" route add default via $HOST_IP
	ip netns exec "qe-$n" sysctl -qw net.ipv4.ip_forward=1
	for chain in OUTPUT PREROUTING; do
		ip netns exec "qe-$n" iptables -t nat -A $chain -d 10.0.0.1/32 -p tcp --dport 443 \
			-j DNAT --to-destination $HOST_IP:6443
	done

	cat >"$dir/etc-cni-net.d/10-qe.conflist" <<EOF
{"cniVersion": "1.0.0", "name": "qe", "plugins": [
  {"type": "bridge", "bridge": "cni0", "isGateway": true, "ipMasq": true,
   "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.88.$i.0/24"}]], "routes": [{"dst": "0.0.0.0/0"}]}},
  {"type": "portmap", "capabilities": {"portMappings": true}}]}
EOF
	# The sandbox lacks CAP_SYS_RESOURCE: without restrict_oom_score_adj
	# runc fails with "can't get final child's PID from pipe".
	cat >"$dir/containerd.toml" <<EOF
version = 2
root = "/var/lib/containerd"
state = "/run/containerd"
[grpc]
  address = "/run/containerd/containerd.sock"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "registry.k8s.io/pause:3.10"
  enable_cdi = false
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "/etc/cni/net.d"
EOF
	# The host runs cgroup v1: kubelet must be told to accept it.
	cat >"$dir/kubelet.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: $PKI/ca.crt}
authorization: {mode: Webhook}
cgroupDriver: cgroupfs
cgroupRoot: /qe-$n
containerRuntimeEndpoint: unix:///run/containerd/containerd.sock
failCgroupV1: false
failSwapOn: false
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard: {"memory.available": "100Mi", "nodefs.available": "1%", "imagefs.available": "1%"}
resolvConf: /etc/resolv.conf
serializeImagePulls: false
EOF
	kubeconfig "$dir/kubeconfig" "system:node:$n"
	for c in /sys/fs/cgroup/*/; do
		[[ -L ${c%/} ]] && continue
		mkdir -p "$c/qe-$n"
	done
	cat /sys/fs/cgroup/cpuset/cpuset.cpus >/sys/fs/cgroup/cpuset/qe-$n/cpuset.cpus
	cat /sys/fs/cgroup/cpuset/cpuset.mems >/sys/fs/cgroup/cpuset/qe-$n/cpuset.mems

	# The holder keeps the node's mount namespace; private, so nothing
	# mounted in a node shows on the host, and the node's mounts go when
	# its last process does.
	local script="set -e"
	for b in "${BINDS[@]}"; do script+="; mount --bind $dir/${b//\//-} /$b"; done
	# Shared again, as on a host (a peer group of the node's own), so the
	# node plugin's Bidirectional mounts reach the kubelet.
	script+="; mount --make-rshared /; touch $dir/holder.ready; exec sleep infinity"
	rm -f "$dir/holder.ready"
	start "holder-$n" nsenter --net=/run/netns/qe-$n unshare --mount --propagation private -- sh -c "$script"
	wait_for 10 "$n's mount namespace" test -f "$dir/holder.ready"
	holder=$(cat "$RUN/holder-$n.pid")
	start "containerd-$n" nsenter --target "$holder" --mount --net -- containerd --config "$dir/containerd.toml"
	local sock=$dir/run-containerd/containerd.sock
	wait_for 30 "$n's containerd" ctr -a "$sock" version
	for img in "$IMAGES"/*.tar; do
		ctr -a "$sock" -n k8s.io images import "$img" >/dev/null
	done
	start "kubelet-$n" nsenter --target "$holder" --mount --net -- "$BIN/kubelet" --config="$dir/kubelet.yaml" \
		--kubeconfig="$dir/kubeconfig" --hostname-override="$n" --node-ip="$ip"
}

up() {
	local t0=$SECONDS
	if [[ -e $RUN ]]; then
		log "$ROOT holds an earlier run: cleaning it up first"
		down
	fi
	pki
	control_plane
	log "control plane up in $((SECONDS - t0)) s"
	for n in "${NODES[@]}"; do node_up "$n"; done
	local K=("$BIN/kubectl" --kubeconfig "$RUN/kubeconfig")
	for n in "${NODES[@]}"; do
		wait_for 120 "node $n to register" "${K[@]}" get node "$n"
	done
	"${K[@]}" wait --for=condition=Ready node --all --timeout=120s >/dev/null
	wait_for 60 "the not-ready taints to clear" sh -c \
		"[ -z \"\$($BIN/kubectl --kubeconfig $RUN/kubeconfig get nodes -o jsonpath='{.items[*].spec.taints}')\" ]"
	log "3 nodes Ready in $((SECONDS - t0)) s; KUBECONFIG=$RUN/kubeconfig"
	echo "$RUN/kubeconfig"
}

# stop_pids PID... sends TERM, waits up to 10 s, then KILLs what is left.
stop_pids() {
	local p alive
	(($#)) || return 0
	kill "$@" 2>/dev/null || true
	for _ in $(seq 50); do
		alive=0
		for p in "$@"; do kill -0 "$p" 2>/dev/null && alive=1; done
		((alive)) || return 0
		sleep 0.2
	done
	kill -9 "$@" 2>/dev/null || true
}

pidfile() { [[ -f $RUN/$1.pid ]] && cat "$RUN/$1.pid" || true; }

# cgroup_pids N lists every process in node N's cgroups (its pods).
cgroup_pids() {
	local c
	for c in /sys/fs/cgroup/pids/qe-$1 /sys/fs/cgroup/cpu/qe-$1; do
		[[ -d $c ]] && find "$c" -name cgroup.procs -exec cat {} + 2>/dev/null
	done | sort -u
}

down() {
	local n sock
	for n in "${NODES[@]}"; do stop_pids $(pidfile "kubelet-$n"); done
	# Containers first, through containerd, so their shims exit; what is
	# left of a node (shims, pods, containerd, the holder) is found by its
	# network namespace and cgroups.
	for n in "${NODES[@]}"; do
		sock=$(node_dir "$n")/run-containerd/containerd.sock
		[[ -S $sock ]] || continue
		for t in $(ctr -a "$sock" -n k8s.io tasks ls -q 2>/dev/null); do
			ctr -a "$sock" -n k8s.io tasks kill -s SIGKILL "$t" >/dev/null 2>&1 || true
		done
	done
	for n in "${NODES[@]}"; do stop_pids $(pidfile "containerd-$n"); done
	for _ in 1 2 3; do
		for n in "${NODES[@]}"; do
			kill -9 $(cgroup_pids "$n") $( (ip netns pids "qe-$n" 2>/dev/null || true) | grep -vx "$$") 2>/dev/null || true
		done
		sleep 0.3
	done
	stop_pids $(pidfile kube-controller-manager) $(pidfile kube-scheduler) $(pidfile kube-apiserver)
	stop_pids $(pidfile etcd)
	for n in "${NODES[@]}"; do
		ip netns del "qe-$n" 2>/dev/null || true
		ip link del "qe-$n" 2>/dev/null || true
		for c in /sys/fs/cgroup/*/qe-$n; do
			[[ -d $c ]] && find "$c" -depth -type d -exec rmdir {} + 2>/dev/null || true
		done
	done
	ip link del qe-br0 2>/dev/null || true
	# The nodes' mounts lived in their namespaces, gone with their last
	# process; anything still mounted under the state folder would be
	# removed below through the mount, so refuse instead.
	if findmnt -rn -o TARGET | grep -q "^$ROOT"; then
		log "mounts left under $ROOT, not removing it:"
		findmnt -rn -o TARGET | grep "^$ROOT" >&2
		return 1
	fi
	rm -rf "$ROOT/nodes" "$ROOT/etcd" "$ROOT/apiserver-certs" "$RUN"
	log "down"
}

leaks() {
	local found=0 n out
	report() { [[ -n ${2// /} ]] && { log "left behind: $1:"; sed 's/^ */  /' <<<"$2" >&2; found=1; }; return 0; }
	for n in "${NODES[@]}"; do
		report "processes of $n" "$(cgroup_pids "$n")"
		report "netns qe-$n" "$(ip netns list | awk -v n="qe-$n" '$1 == n {print $1}')"
		report "link qe-$n" "$(ip -o link show "qe-$n" 2>/dev/null | cut -d: -f2)"
		report "cgroups of $n" "$(ls -d /sys/fs/cgroup/*/qe-$n 2>/dev/null)"
	done
	report "bridge" "$(ip -o link show qe-br0 2>/dev/null | cut -d: -f2)"
	# Ours name the state folder on their command line; a node's shims
	# do not, but live in a network namespace other than the host's.
	out=$(pgrep -f -- "$ROOT/" || true)
	for p in $(pgrep -f containerd-shim || true); do
		[[ $(readlink "/proc/$p/ns/net") != $(readlink /proc/1/ns/net) ]] && out+=" $p"
	done
	report "control-plane or node processes" "$out"
	report "mounts under $ROOT" "$(findmnt -rn -o TARGET | grep "^$ROOT" || true)"
	report "loop devices of quorum-csi" "$(losetup -l -n -O NAME,BACK-FILE | awk '/quorum-csi/ {print $1}')"
	((found == 0))
}

case ${1:-} in
up) up ;;
down) down ;;
leaks) leaks ;;
cut) ip link set "qe-${2:?node}" down ;;
mend) ip link set "qe-${2:?node}" up ;;
*)
	echo "usage: $0 up|down|leaks|cut NODE|mend NODE" >&2
	exit 2
	;;
esac
