#!/usr/bin/env bash
# Builds the real Kubernetes components that the API-server tests and the
# e2e harness start, from the Go module proxy, into a cache folder outside
# the repository. `go install pkg@version` cannot build them (their modules
# carry replace directives), so each gets a scratch module that requires it
# and repeats its replace block.
#
#   hack/k8s-bins.sh [COMPONENT...]   default: etcd kube-apiserver kubectl
#   COMPONENT: etcd kube-apiserver kubectl kube-scheduler
#              kube-controller-manager kubelet csi-provisioner csi-attacher
#
#   QUORUM_K8S_BIN    where the binaries go
#                     (default /var/cache/quorum-csi/k8s/$K8S_VERSION/bin)
#   QUORUM_K8S_CACHE  where the scratch modules live
#                     (default /var/cache/quorum-csi/k8s/$K8S_VERSION)
#
# Idempotent: a binary that already reports the wanted version is kept, so
# a second run takes a second. Cold, kube-apiserver takes ~10 min on 2
# cores; the Go module and build caches stay in their default places so
# later runs are warm.
set -euo pipefail

K8S_VERSION=v1.37.2
STAGING_VERSION=v0.37.2
ETCD_VERSION=v3.6.16
# The kubernetes-csi sidecars the e2e cluster runs: module@version of each.
declare -A SIDECARS=(
	[csi-provisioner]=github.com/kubernetes-csi/external-provisioner/v6@v6.4.0
	[csi-attacher]=github.com/kubernetes-csi/external-attacher/v4@v4.13.0
)

cache=${QUORUM_K8S_CACHE:-/var/cache/quorum-csi/k8s/$K8S_VERSION}
bin=${QUORUM_K8S_BIN:-$cache/bin}
comps=("$@")
((${#comps[@]})) || comps=(etcd kube-apiserver kubectl)

log() { printf '[k8s-bins %s] %s\n' "$(date +%T)" "$*" >&2; }

mkdir -p "$cache" "$bin"
# Two runs at once (CI and a developer's test) would race on the scratch
# modules and on the binaries.
exec 9>"$cache/.lock"
flock 9

# current NAME fails when $bin/NAME is absent or reports another version.
current() {
	local name=$1 out
	[ -x "$bin/$name" ] || return 1
	case $name in
	etcd) out=$("$bin/$name" --version 2>/dev/null) && grep -qx "etcd Version: ${ETCD_VERSION#v}" <<<"$out" ;;
	kubectl) out=$("$bin/$name" version --client 2>/dev/null) && grep -qx "Client Version: $K8S_VERSION" <<<"$out" ;;
	csi-*) out=$("$bin/$name" --version 2>/dev/null) && grep -q "${SIDECARS[$name]#*@}" <<<"$out" ;;
	*) out=$("$bin/$name" --version 2>/dev/null) && grep -qx "Kubernetes $K8S_VERSION" <<<"$out" ;;
	esac
}

# scratch_module DIR MODULE VERSION REPLACE_PREFIX REPLACE_VERSION IMPORT...
# writes a module that requires MODULE@VERSION, replaces every module of
# MODULE's own replace directives that starts with REPLACE_PREFIX by
# REPLACE_VERSION (or, when that is "=", by the version MODULE names), and
# imports the commands to build (so tidy keeps them).
scratch_module() {
	local dir=$1 mod=$2 ver=$3 prefix=$4 rver=$5
	shift 5
	[ -f "$dir/.tidy" ] && [ "$(cat "$dir/.tidy")" = "$mod@$ver" ] && return 0
	log "preparing scratch module for $mod@$ver in $dir"
	rm -rf "$dir"
	mkdir -p "$dir"
	(
		cd "$dir"
		go mod init example.com/quorum-csi-k8s-bins >/dev/null 2>&1
		go mod edit -go=1.26.0 -require="$mod@$ver"
		gomod=$(go mod download -json "$mod@$ver" | sed -n 's/^\t"GoMod": "\(.*\)",$/\1/p')
		[ -n "$gomod" ] || { echo "no go.mod downloaded for $mod@$ver" >&2; exit 1; }
		# Both forms: a replace ( ... ) block and single replace lines.
		{
			sed -n '/^replace (/,/^)/p' "$gomod"
			sed -n 's/^replace \([^(].*\)/\1/p' "$gomod"
		} | awk -v p="$prefix" '$2 == "=>" && index($1, p) == 1 {print $1, $4}' |
			while read -r r v; do
				[ "$rver" = "=" ] || v=$rver
				go mod edit -replace="$r=$r@$v"
			done
		{
			echo '//go:build tools'
			echo
			echo 'package tools'
			echo
			echo 'import ('
			printf '\t_ "%s"\n' "$@"
			echo ')'
		} >tools.go
		go mod tidy
	)
	echo "$mod@$ver" >"$dir/.tidy"
}

# build DIR LDFLAGS NAME=PKG... builds the named packages into $bin, each
# through a temporary name so an interrupted build leaves no half binary.
build() {
	local dir=$1 ldflags=$2 name pkg start
	shift 2
	for np in "$@"; do
		name=${np%%=*} pkg=${np#*=}
		start=$SECONDS
		log "building $name ($pkg)"
		(cd "$dir" && CGO_ENABLED=0 go build -ldflags "$ldflags" -o "$bin/.$name.tmp" "$pkg")
		mv -f "$bin/.$name.tmp" "$bin/$name"
		log "built $name in $((SECONDS - start)) s"
	done
}

etcd_todo=() k8s_todo=() sidecar_todo=()
for c in "${comps[@]}"; do
	case $c in
	etcd) current etcd && log "etcd $ETCD_VERSION present" || etcd_todo+=("etcd=go.etcd.io/etcd/server/v3") ;;
	kube-apiserver | kubectl | kube-scheduler | kube-controller-manager | kubelet)
		current "$c" && log "$c $K8S_VERSION present" || k8s_todo+=("$c=k8s.io/kubernetes/cmd/$c") ;;
	csi-provisioner | csi-attacher)
		current "$c" && log "$c ${SIDECARS[$c]#*@} present" || sidecar_todo+=("$c") ;;
	*)
		echo "unknown component $c" >&2
		exit 2
		;;
	esac
done

if ((${#etcd_todo[@]})); then
	scratch_module "$cache/src/etcd" go.etcd.io/etcd/server/v3 "$ETCD_VERSION" go.etcd.io/etcd/ "$ETCD_VERSION" \
		go.etcd.io/etcd/server/v3
	build "$cache/src/etcd" "" "${etcd_todo[@]}"
fi

if ((${#k8s_todo[@]})); then
	# Every command is imported whatever is built now, so the module graph,
	# and with it each binary, does not depend on which were asked for.
	scratch_module "$cache/src/kubernetes" k8s.io/kubernetes "$K8S_VERSION" k8s.io/ "$STAGING_VERSION" \
		k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kubectl k8s.io/kubernetes/cmd/kube-scheduler \
		k8s.io/kubernetes/cmd/kube-controller-manager k8s.io/kubernetes/cmd/kubelet
	# Without these stamps kubectl cannot parse the server version and nodes
	# report v0.0.0-master.
	minor=${K8S_VERSION#v1.}
	minor=${minor%%.*}
	ldflags=""
	for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
		ldflags+=" -X $p.gitVersion=$K8S_VERSION -X $p.gitMajor=1 -X $p.gitMinor=$minor"
		ldflags+=" -X $p.gitTreeState=clean -X $p.buildDate=1970-01-01T00:00:00Z"
	done
	build "$cache/src/kubernetes" "$ldflags" "${k8s_todo[@]}"
fi

for c in "${sidecar_todo[@]}"; do
	mod=${SIDECARS[$c]%@*} ver=${SIDECARS[$c]#*@}
	scratch_module "$cache/src/$c" "$mod" "$ver" "" "=" "$mod/cmd/$c"
	build "$cache/src/$c" "-X main.version=$ver" "$c=$mod/cmd/$c"
done

for c in "${comps[@]}"; do
	current "$c" || {
		echo "$bin/$c does not report the wanted version after the build" >&2
		exit 1
	}
done
log "ready in $bin: ${comps[*]}"
