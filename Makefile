# quorum-csi developer targets. `make check` is what CI runs.
GO ?= go

# controller-gen is pinned here and run from the module proxy, so every
# machine generates byte-identical files.
CONTROLLER_GEN ?= $(GO) run sigs.k8s.io/controller-tools/cmd/controller-gen@v0.23.0
# What `generate` writes; `verify-generated` compares exactly these.
GENERATED := ':(glob)pkg/apis/**/zz_generated.*.go' config/crd charts/quorum-csi/crds
TOOLS_BIN ?= $(or $(QUORUM_TOOLS_BIN),/var/cache/quorum-csi/tools)

.PHONY: build test check vet fmt-check bin generate verify-generated k8s-bins tools chart-check e2e-cluster

build:
	$(GO) build ./...

bin:
	$(GO) build -o bin/quorumctl ./cmd/quorumctl

vet:
	$(GO) vet ./...

fmt-check:
	@out=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi

# Deepcopy functions beside the API types, and the CRD in config/crd/.
generate:
	$(CONTROLLER_GEN) object paths=./pkg/apis/...
	$(CONTROLLER_GEN) crd paths=./pkg/apis/... output:crd:artifacts:config=config/crd
	cp config/crd/*.yaml charts/quorum-csi/crds/

verify-generated: generate
	@if ! git diff --exit-code -- $(GENERATED) || [ -n "$$(git ls-files --others --exclude-standard -- $(GENERATED))" ]; then \
		git ls-files --others --exclude-standard -- $(GENERATED); \
		echo "generated files are stale: run 'make generate' and commit the result"; exit 1; fi

# helm, built from the Go module proxy (hack/tools.sh).
tools:
	hack/tools.sh

# The chart lints and renders; e2e/chart applies it to a real API server.
chart-check: tools
	$(TOOLS_BIN)/helm lint --strict charts/quorum-csi --set tls.secretName=quorum-tls
	$(TOOLS_BIN)/helm template quorum-csi charts/quorum-csi --namespace quorum-csi --kube-version v1.37.2 --set tls.secretName=quorum-tls >/dev/null
	$(TOOLS_BIN)/helm template quorum-csi charts/quorum-csi --namespace quorum-csi --kube-version v1.37.2 --set tls.secretName=quorum-tls \
		--set monitoring.dashboard.enabled=true --set monitoring.rules.enabled=true >/dev/null

# etcd, kube-apiserver and kubectl for the API-server tests (internal/kubetest).
k8s-bins:
	hack/k8s-bins.sh

# Real-kernel tests need root (loop, FUSE); with QUORUM_CI=1 they fail
# instead of skipping when something is missing.
# The guest tests (e2e/guest) run QEMU under software emulation, which
# takes both CPUs for minutes, and e2e/cluster runs a whole cluster: the
# e2e packages run after the rest and one at a time, so that no test's
# timing depends on another's load.
test:
	$(GO) test -race -count=1 -timeout 30m $$($(GO) list ./... | grep -v /e2e/)
	$(GO) test -race -count=1 -timeout 40m -p 1 ./e2e/...

# The cluster end to end alone: builds what is missing, brings up three
# nodes, installs the chart, runs the scenarios, tears everything down.
e2e-cluster:
	$(GO) test -count=1 -timeout 40m -v ./e2e/cluster

check: fmt-check vet verify-generated chart-check test
