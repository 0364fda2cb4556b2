package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"os"
	"regexp"
	"sync"
	"time"

	"google.golang.org/grpc"

	"github.com/culprit-dev/culprit/collectors"
	"github.com/culprit-dev/culprit/exporters"
	"github.com/culprit-dev/culprit/probes"
	"github.com/culprit-dev/culprit/profiles"
	"github.com/culprit-dev/culprit/rules"
	"github.com/culprit-dev/culprit/signals"
	"github.com/culprit-dev/culprit/symbolize"
	"github.com/culprit-dev/culprit/traces"
	"github.com/culprit-dev/culprit/workload"
)

// This file is the agent's lifecycle: what one running agent holds, the
// order StartAgent wires the parts in (each part's wiring is in the file
// named after it: collectors.go, probes.go, traces.go, servers.go,
// findings_logs.go, target.go, runtime_size.go), and Stop, which ends them
// so that watchers can resume, the last finding events are exported, and
// no collector is closed under its goroutine.

// Agent is one running agent: every goroutine it started stops with Stop.
type Agent struct {
	HTTPAddr, GRPCAddr string
	Store              *signals.Store
	Journal            *rules.Journal
	Tracker            *workload.Tracker
	// SideStores: episodes, connection events, CPU samples, heap
	// profiles and spans, one value handed to every writer and the rules.
	signals.SideStores
	OTLPGRPCAddr string // bound OTLP addresses, "" when off
	OTLPHTTPAddr string
	Symbols      *symbolize.Symbolizer
	// Owners tells whose a socket is, shared by the collectors and probes
	// that label sockets with their owner.
	Owners *workload.SocketOwners

	log     *slog.Logger
	cancel  context.CancelFunc
	wg      sync.WaitGroup
	grpcSrv *grpc.Server
	grpcSvc *exporters.GRPCServer
	httpSrv *http.Server
	probes  []probes.Probe
	closers []collectors.Closer
	otlp    *traces.Receiver
	forward *traces.Forwarder
	// Resource names the watched service and its pod (target_info, OTLP
	// log records); logs exports finding events, nil when off.
	resource *exporters.Resource
	logs     *exporters.FindingsLogs
	engine   *rules.Engine
	// ruleSet is what the engine runs; their needs say what a component
	// that does not run costs (lostBy, worked out once: a degraded
	// collector reports it every cycle).
	ruleSet []rules.Rule
	lostBy  map[string][]string
}

// StartAgent wires collectors, probes, rules and exporters and starts them.
// It returns once both listeners are bound, so a caller may connect at once.
func StartAgent(parent context.Context, cfg Config, log *slog.Logger) (*Agent, error) {
	if err := checkLocal(cfg); err != nil {
		return nil, err
	}
	sel := workload.Selector{PID: cfg.Target.PID, Port: cfg.Target.Port}
	if cfg.Target.Cmd != "" {
		sel.Cmd = regexp.MustCompile(cfg.Target.Cmd) // validated in Config.Validate
	}
	res, err := workload.NewResolver(cfg.Collect.ProcRoot)
	if err != nil {
		return nil, err
	}
	setMemoryLimit(cfg, log)
	// The shared clock of the agent's periodic work idles at this while
	// nothing is going on (signals.Ticker).
	signals.SetIdle(cfg.Probes.IdlePoll)
	ctx, cancel := context.WithCancel(parent)
	a := &Agent{
		Store:   signals.New(cfg.Signals.RingSize, cfg.Signals.MaxSeries),
		Journal: rules.NewJournal(cfg.Findings.History),
		SideStores: signals.SideStores{
			Profiles: signals.NewProfiles(cfg.Pprof.Keep),
			Episodes: signals.NewEpisodes(cfg.Sched.MaxEpisodes),
			Conns:    signals.NewConnEvents(cfg.Probes.MaxConnEvents),
			Spans:    signals.NewSpansBounded(cfg.Traces.MaxSpans, cfg.Traces.MaxSpanBytes),
			Samples:  signals.NewCPUSamples(cfg.Profiling.MaxSamples),
		},
		Symbols: symbolize.New(symbolize.Options{ProcRoot: cfg.Collect.ProcRoot, Log: log.With("component", "symbolize"),
			MaxPerfMapBytes: perfMapBytes(cfg.Profiling.MaxPerfMapBytes)}),
		Owners: workload.NewSocketOwners(cfg.Collect.ProcRoot, workload.SocketOwnersOptions{}),
		log:    log,
		cancel: cancel,
	}
	a.ruleSet = rules.New(cfg.Rules, cfg.Pprof.Interval)
	a.lostBy = lostByComponent(a.ruleSet)
	a.Tracker = workload.NewTracker(res, sel, cfg.Target.RefindInterval, log)
	// A (re)found target: every poller at its fast interval for a while,
	// so that the probes take the new process at once.
	a.Tracker.OnChange(signals.HotNow)
	if a.resource, err = exporters.NewResource(os.Environ(), a.Tracker); err != nil {
		cancel()
		return nil, fmt.Errorf("name the service and its pod: %w", err)
	}
	a.Tracker.Refresh()
	if _, ok := a.Tracker.Current(); !ok {
		log.Warn("target not found yet; the agent keeps looking", "selector", sel.String())
	}
	a.goRun(func() { a.trackTarget(ctx, res, cfg.Target.RefindInterval) })

	if err := a.startCollectors(ctx, cfg); err != nil {
		cancel()
		return nil, err
	}
	a.startProbes(ctx, cfg)
	a.startTraces(cfg)

	pools, err := cfg.Rules.Pools()
	if err != nil { // validated in Config.Validate
		cancel()
		return nil, &ConfigError{Key: "rules.workers.threads", Err: err}
	}
	eo := cfg.Rules.Engine()
	eo.Log = log.With("component", "rules")
	eo.DetectRuntime = a.detectRuntime(cfg)
	eo.Inputs = rules.Inputs{
		Episodes: a.Episodes,
		Spans:    a.Spans,
		Conns:    a.Conns,
		Hot:      profiles.NewCPU(a.Samples, a.Symbols, cfg.Profiling.DrainInterval),
		Heap:     profiles.NewHeap(a.Profiles),
		Pools:    pools,
	}
	a.engine = rules.NewEngine(a.ruleSet, a.Store, a.Journal, a.Tracker, eo)
	a.goRun(func() { a.engine.Run(ctx) })

	if err := a.startServers(cfg); err != nil {
		a.Stop(time.Second)
		return nil, err
	}
	if err := a.startFindingsLogs(ctx, cfg); err != nil {
		a.Stop(time.Second)
		return nil, err
	}
	a.goRun(func() { releaseBinaryPages(ctx, log) })
	return a, nil
}

// perfMapBytes turns profiling.max_perf_map_bytes into the symbolizer's
// option: 0 in the config turns perf maps off (the symbolizer reads 0 as
// its default and a negative value as off).
func perfMapBytes(n int) int64 {
	if n == 0 {
		return -1
	}
	return int64(n)
}

// goRun runs f on a goroutine Stop waits for.
func (a *Agent) goRun(f func()) {
	a.wg.Add(1)
	go func() { defer a.wg.Done(); f() }()
}

// Stop ends every goroutine and closes the probes, waiting at most timeout
// for watchers to drain.
func (a *Agent) Stop(timeout time.Duration) error {
	a.cancel()
	if a.httpSrv != nil {
		sctx, cancel := context.WithTimeout(context.Background(), timeout)
		a.httpSrv.Shutdown(sctx)
		cancel()
	}
	if a.grpcSrv != nil {
		// Watch streams never end on their own: end them (clients see
		// Unavailable and resume by sequence) so GracefulStop can finish.
		a.grpcSvc.Shutdown()
		done := make(chan struct{})
		go func() { a.grpcSrv.GracefulStop(); close(done) }()
		select {
		case <-done:
		case <-time.After(timeout):
			a.grpcSrv.Stop()
		}
	}
	if a.otlp != nil {
		sctx, cancel := context.WithTimeout(context.Background(), timeout)
		a.otlp.Stop(sctx)
		cancel()
	}
	var errs []error
	if a.forward != nil {
		if err := a.forward.Close(); err != nil {
			errs = append(errs, fmt.Errorf("close span forwarder: %w", err))
		}
	}
	for _, p := range a.probes {
		if err := p.Close(); err != nil {
			errs = append(errs, fmt.Errorf("close probe %s: %w", p.Name(), err))
		}
	}
	a.wg.Wait()
	// The exporter's last batch goes out (within timeout) after its reader
	// ended.
	if a.logs != nil {
		a.logs.Close(timeout)
	}
	// Collectors are closed after their goroutines ended, never under them.
	for _, c := range a.closers {
		if err := c.Close(); err != nil {
			errs = append(errs, fmt.Errorf("close collector: %w", err))
		}
	}
	return errors.Join(errs...)
}
