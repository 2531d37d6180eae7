#!/usr/bin/env bash
# Builds the command-line tools the checks use from the Go module proxy
# into a cache folder (default /var/cache/quorum-csi/tools, or
# $QUORUM_TOOLS_BIN), once: helm (chart lint and template).
set -euo pipefail
BIN=${QUORUM_TOOLS_BIN:-/var/cache/quorum-csi/tools}
HELM_VERSION=v3.22.0
mkdir -p "$BIN"
# go install stamps no full version into helm, so a file beside it says
# which one was built.
if [[ ! -x $BIN/helm || $(cat "$BIN/helm.version" 2>/dev/null) != "$HELM_VERSION" ]]; then
	echo "tools: building helm $HELM_VERSION into $BIN (about a minute)" >&2
	GOBIN=$BIN go install "helm.sh/helm/v3/cmd/helm@$HELM_VERSION"
	echo "$HELM_VERSION" >"$BIN/helm.version"
fi
echo "tools: ready in $BIN: helm" >&2
