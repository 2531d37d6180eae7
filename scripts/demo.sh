#!/usr/bin/env bash
# The CSI driver as Kubernetes users meet it: a local three-node cluster
# (e2e/cluster's: real kubelets, containerd, the Helm chart) with a demo
# PVC that a pod writes to. Run as root.
#
#   scripts/demo.sh [up]   build what is missing (about 16 minutes the first
#                          time, cached in /var/cache/quorum-csi), start the
#                          cluster, install the chart, run the demo pod
#   scripts/demo.sh down   remove the cluster and everything it made
#
# It uses the cluster tests' addresses and state folder: run it while
# they do not run.
set -euo pipefail
cd "$(dirname "$0")/.."
K8S_BIN=${QUORUM_K8S_BIN:-/var/cache/quorum-csi/k8s/v1.37.2/bin}
TOOLS=${QUORUM_TOOLS_BIN:-/var/cache/quorum-csi/tools}
ROOT=${QUORUM_E2E_ROOT:-/var/lib/quorum-e2e}
KUBECONFIG=$ROOT/run/kubeconfig
DEMO=$ROOT/demo
log() { printf '%s demo: %s\n' "$(date +%T)" "$*" >&2; }
kubectl() { "$K8S_BIN/kubectl" --kubeconfig "$KUBECONFIG" "$@"; }

down() {
	bash e2e/cluster/cluster.sh down
	# Lists and fails on anything left behind.
	bash e2e/cluster/cluster.sh leaks
	log "the cluster is gone and left nothing behind"
}

up() {
	if [ -e "$KUBECONFIG" ]; then
		echo "demo: a cluster is up already ($KUBECONFIG): remove it first with $0 down" >&2
		exit 1
	fi
	bash scripts/apt-need.sh debootstrap containerd runc containernetworking-plugins iptables iproute2 \
		curl openssl util-linux e2fsprogs xz-utils zstd
	e2e/cluster/build.sh
	bash e2e/cluster/cluster.sh up >/dev/null
	mkdir -p "$DEMO"
	go build -o "$DEMO/quorumctl" ./cmd/quorumctl
	rm -rf "$DEMO/tls"
	# The replica servers are reached at the nodes' addresses over TLS.
	"$DEMO/quorumctl" gen-certs --host 10.203.0.11 --host 10.203.0.12 --host 10.203.0.13 "$DEMO/tls" >/dev/null
	kubectl create namespace quorum-csi
	kubectl -n quorum-csi create secret generic quorum-tls --from-file="$DEMO/tls"
	log "installing the chart"
	"$TOOLS/helm" --kubeconfig "$KUBECONFIG" --namespace quorum-csi install quorum-csi charts/quorum-csi \
		--set tls.secretName=quorum-tls --set image.pullPolicy=Never --wait --timeout 5m
	log "a PVC of the default StorageClass (3 replicas, fifo) and a pod that writes to it"
	kubectl apply -f - <<'YAML'
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: demo}
spec:
  accessModes: [ReadWriteOnce]
  resources: {requests: {storage: 256Mi}}
---
apiVersion: v1
kind: Pod
metadata: {name: demo}
spec:
  containers:
    - name: app
      image: quorum-csi/e2e-app:dev
      imagePullPolicy: Never
      command: ["sh", "-c", "date > /data/hello && dd if=/dev/urandom of=/data/random bs=1M count=16 conv=fsync status=none && sha256sum /data/hello /data/random && df -h /data && echo DEMO-WRITTEN && exec sleep infinity"]
      volumeMounts: [{name: data, mountPath: /data}]
  volumes:
    - name: data
      persistentVolumeClaim: {claimName: demo}
YAML
	kubectl wait --for=condition=Ready pod/demo --timeout=5m >/dev/null
	for i in $(seq 60); do
		kubectl logs demo 2>/dev/null | grep -q DEMO-WRITTEN && break
		if ((i == 60)); then
			kubectl describe pod demo >&2
			log "the demo pod did not write its files; see above (remove it all with: $0 down)"
			exit 1
		fi
		sleep 1
	done
	kubectl logs demo
	kubectl get qv,pvc,pod -o wide
	cat <<MSG

The demo pod wrote to a volume with three replicas on three nodes.
Look around with:
  export KUBECONFIG=$KUBECONFIG
  alias kubectl=$K8S_BIN/kubectl
  kubectl get qv -o wide; kubectl describe qv; kubectl exec demo -- ls -l /data
Remove it all with: sudo bash scripts/demo.sh down
MSG
}

case ${1:-up} in
up) up ;;
down) down ;;
*)
	echo "usage: $0 [up|down]" >&2
	exit 2
	;;
esac
