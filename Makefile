# culprit — make targets. `make run` and `make test` are the two commands
# of the README; everything else is for developers.
GO       ?= go
BIN      := bin/culprit
VERSION  ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
LDFLAGS  := -s -w -X main.version=$(VERSION)
PKGS     := ./...

.PHONY: build run test test-short generate check-generate bench lint clean

build:
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags '$(LDFLAGS)' -o $(BIN) ./agent

# Starts the agent on its built-in demo target and follows its findings.
run: build
	@./scripts/run-demo.sh $(BIN)

# The whole suite, race detector on. Needs root (eBPF, network namespaces).
test:
	$(GO) vet $(PKGS)
	$(GO) test -race -count=1 -timeout 20m $(PKGS)

generate:
	$(GO) generate ./probes/ ./proto/...

# CI: the committed bpf2go and protoc outputs must match their sources.
check-generate: generate
	git diff --exit-code -- probes/ proto/

bench: build
	$(GO) test -run '^$$' -bench . -benchtime 5x -count 1 ./agent/ ./signals/ ./collectors/
	$(GO) test -run '^$$' -bench . -benchtime 50000x -count 1 ./probes/
	$(GO) test -run '^$$' -bench . -benchtime 200x -count 1 ./symbolize/

lint:
	@test -z "$$(gofmt -l $$(git ls-files '*.go'))" || { gofmt -l $$(git ls-files '*.go'); echo "gofmt needed"; exit 1; }
	$(GO) vet $(PKGS)
	$(GO) tool staticcheck $(PKGS)

clean:
	rm -rf bin
