# culprit — make targets. `make run` and `make test` are the two commands
# of the README; everything else is for developers.
GO       ?= go
BIN      := bin/culprit
VERSION  ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
LDFLAGS  := -s -w -X main.version=$(VERSION)
PKGS     := ./...
# bash with pipefail: a recipe that filters a test's output through grep
# still fails when the test does.
SHELL       := /bin/bash
.SHELLFLAGS := -o pipefail -c

.PHONY: build run test test-short generate check-generate bench reliability lint clean

# make reliability: how long each fuzz target runs, and the soak.
FUZZTIME ?= 30s
SOAK     ?= 10m

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

# make bench: every figure beside a baseline measured in the same run, then
# one table of the footprint goals (scripts/bench-table.sh). The outputs are
# kept in BENCHOUT.
BENCHOUT ?= bin/bench
bench: build
	@mkdir -p $(BENCHOUT)
	$(GO) test -run '^$$' -bench 'BenchmarkFaultToFinding|BenchmarkAgentIdle' -benchtime 5x -count 1 ./agent/ | tee $(BENCHOUT)/agent.txt
	$(GO) test -run '^$$' -bench . -benchtime 5x -count 1 ./signals/ ./collectors/ | tee $(BENCHOUT)/store.txt
	$(GO) test -run '^$$' -bench 'BenchmarkFootprint' -benchtime 1x -count 1 -timeout 30m ./agent/ | tee $(BENCHOUT)/footprint.txt
	$(GO) test -run '^$$' -bench . -benchtime 50000x -count 1 ./probes/ | tee $(BENCHOUT)/probes.txt
	$(GO) test -run '^$$' -bench . -benchtime 200x -count 1 ./symbolize/ | tee $(BENCHOUT)/symbolize.txt
	@if command -v nginx >/dev/null && command -v wrk >/dev/null; then scripts/bench-nginx.sh $(BIN) | tee $(BENCHOUT)/nginx.txt; \
	else echo "bench: nginx or wrk missing (apt-get install -y nginx wrk): skipping the nginx under wrk comparison"; fi
	@scripts/bench-table.sh $(BENCHOUT)

# The reliability suite: the agent without BPF rights, a restarted target
# re-found within 1 s, a clean SIGTERM, 100 stalled watchers, the fuzz
# targets for a bounded time each, and a soak under load (SOAK) that fails
# on goroutine or heap growth.
reliability:
	$(GO) test -count=1 -run 'TestAgentWithoutBPFRights|TestTargetRefoundWithinOneSecond|TestAgentShutsDownCleanlyOnSIGTERM|TestHardeningHugeAuthorizationHeader|TestHardeningUnauthenticatedLargeProfileRequests|TestHardeningIdleConnectionFlood|TestHardeningResumeAcrossAgentRestart|TestHardeningTLSWithoutClientAuthIsNotProtection|TestHardeningTargetUnreadableSaysWhy|TestHardeningBadConfigInput|TestHardeningOTLPAttacks' ./agent/
	$(GO) test -count=1 -run 'TestHundredSlowWatchers|TestHugeHeaderRefusedWhileDecoding|TestTokenCheckedBeforeTheMessageIsRead|TestGRPCConnectionCap|TestHTTPServerBounded|TestHTTPStuckConnectionsGiveWay|TestFindingsLogsCollectorRestart|TestFindingsLogsCollectorDown' ./exporters/
	$(GO) test -count=1 -run 'TestSlowUploadsAreBounded|TestSlowConnectionsAreCut|TestSlowGRPCStreamIsCut|TestHugeSpanNamesAreCut|TestDecodeBombRefused' ./traces/
	$(GO) test -run '^$$' -fuzz FuzzParseConfig -fuzztime $(FUZZTIME) ./agent/
	$(GO) test -run '^$$' -fuzz FuzzParseHeap -fuzztime $(FUZZTIME) ./collectors/
	$(GO) test -run '^$$' -fuzz FuzzOTLPHTTP -fuzztime $(FUZZTIME) ./traces/
	$(GO) test -run '^$$' -fuzz FuzzParseMaps -fuzztime $(FUZZTIME) ./symbolize/
	$(GO) test -run '^$$' -fuzz FuzzParseEHFrame -fuzztime $(FUZZTIME) ./symbolize/
	CULPRIT_SOAK=$(SOAK) $(GO) test -count=1 -timeout 30m -run 'TestSoak' -v ./agent/ 2>&1 | grep -E '^(=== RUN|--- |\s+reliability_test|PASS|FAIL|ok )'

lint:
	@test -z "$$(gofmt -l $$(git ls-files '*.go'))" || { gofmt -l $$(git ls-files '*.go'); echo "gofmt needed"; exit 1; }
	$(GO) vet $(PKGS)
	$(GO) tool staticcheck $(PKGS)

clean:
	rm -rf bin
