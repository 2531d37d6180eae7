# quorum-csi developer targets. `make check` is what CI runs.
GO ?= go

.PHONY: build test check vet fmt-check bin

build:
	$(GO) build ./...

bin:
	$(GO) build -o bin/quorumctl ./cmd/quorumctl

vet:
	$(GO) vet ./...

fmt-check:
	@out=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi

# Real-kernel tests need root (loop, FUSE); with QUORUM_CI=1 they fail
# instead of skipping when something is missing.
test:
	$(GO) test -race -count=1 -timeout 30m ./...

check: fmt-check vet test
