package main

import (
	"cmp"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"os"
	"regexp"
	"runtime/debug"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"
	"google.golang.org/grpc"

	"github.com/culprit-dev/culprit/collectors"
	"github.com/culprit-dev/culprit/exporters"
	"github.com/culprit-dev/culprit/probes"
	"github.com/culprit-dev/culprit/profiles"
	"github.com/culprit-dev/culprit/rules"
	"github.com/culprit-dev/culprit/signals"
	"github.com/culprit-dev/culprit/symbolize"
	"github.com/culprit-dev/culprit/target"
	"github.com/culprit-dev/culprit/traces"
)

// stringList is a repeatable flag.
type stringList []string

func (s *stringList) String() string     { return strings.Join(*s, ",") }
func (s *stringList) Set(v string) error { *s = append(*s, v); return nil }

// agentConfig turns flags, environment and file into one Config: defaults,
// then the file, then CULPRIT_* variables, then flags.
func agentConfig(args []string, environ []string, stderr io.Writer) (Config, error) {
	fs := flag.NewFlagSet("culprit agent", flag.ContinueOnError)
	fs.SetOutput(stderr)
	path := fs.String("config", "", "agent.conf to read (default: built-in defaults, which agent.conf documents)")
	pid := fs.Int("pid", 0, "watch this PID (target.pid)")
	port := fs.Int("port", 0, "watch the process listening on this port (target.port)")
	cmd := fs.String("cmd", "", "watch the oldest process whose command line matches this regexp (target.cmd)")
	httpAddr := fs.String("http-addr", "", "metrics/health listener (agent.http_addr)")
	grpcAddr := fs.String("grpc-addr", "", "gRPC listener (agent.grpc_addr)")
	logLevel := fs.String("log-level", "", "debug, info, warn, error (agent.log_level)")
	var sets stringList
	fs.Var(&sets, "set", "set any agent.conf key: --set rules.accept_overflow.window=20s (repeatable)")
	if err := fs.Parse(args); err != nil {
		return Config{}, err
	}
	if fs.NArg() > 0 {
		return Config{}, fmt.Errorf("unexpected arguments: %v", fs.Args())
	}
	cfg, err := LoadConfig(*path)
	if err != nil {
		return cfg, err
	}
	if err := cfg.ApplyEnv(environ); err != nil {
		return cfg, err
	}
	flagSets := []struct{ key, value string }{}
	fs.Visit(func(f *flag.Flag) {
		switch f.Name {
		case "pid":
			flagSets = append(flagSets, struct{ key, value string }{"target.pid", fmt.Sprint(*pid)})
		case "port":
			flagSets = append(flagSets, struct{ key, value string }{"target.port", fmt.Sprint(*port)})
		case "cmd":
			flagSets = append(flagSets, struct{ key, value string }{"target.cmd", *cmd})
		case "http-addr":
			flagSets = append(flagSets, struct{ key, value string }{"agent.http_addr", *httpAddr})
		case "grpc-addr":
			flagSets = append(flagSets, struct{ key, value string }{"agent.grpc_addr", *grpcAddr})
		case "log-level":
			flagSets = append(flagSets, struct{ key, value string }{"agent.log_level", *logLevel})
		}
	})
	for _, s := range sets {
		k, v, ok := strings.Cut(s, "=")
		if !ok {
			return cfg, fmt.Errorf("--set %q: want key=value", s)
		}
		flagSets = append(flagSets, struct{ key, value string }{strings.TrimSpace(k), v})
	}
	for _, s := range flagSets {
		if err := cfg.Set(s.key, s.value); err != nil {
			var ce *ConfigError
			if errors.As(err, &ce) {
				ce.File = "flag"
			}
			return cfg, err
		}
	}
	if err := cfg.Validate(); err != nil {
		return cfg, err
	}
	return cfg, nil
}

func newLogger(cfg Config, w io.Writer) *slog.Logger {
	var lvl slog.Level
	_ = lvl.UnmarshalText([]byte(cfg.Agent.LogLevel))
	o := &slog.HandlerOptions{Level: lvl}
	if cfg.Agent.LogFormat == "json" {
		return slog.New(slog.NewJSONHandler(w, o))
	}
	return slog.New(slog.NewTextHandler(w, o))
}

func cmdAgent(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	cfg, err := agentConfig(args, os.Environ(), stderr)
	if err != nil {
		return err
	}
	log := newLogger(cfg, stderr)
	var demo *demoChild // the built-in demo, when no target is given
	if cfg.Target.PID == 0 && cfg.Target.Port == 0 && cfg.Target.Cmd == "" {
		demo, err = startDemoChild(ctx, log, stderr)
		if err != nil {
			return fmt.Errorf("no target given and the built-in demo did not start: %w", err)
		}
		defer demo.stop()
		cfg.Target.PID = demo.pid
		if cfg.Pprof.HeapURL == "" {
			// gc=1: Go's heap profile is as of the last collection; without
			// it a fast leak reads at a fraction of its rate.
			cfg.Pprof.HeapURL = "http://" + demoControl + "/debug/pprof/heap?gc=1"
		}
		fmt.Fprintf(stdout, "No target given: watching the built-in demo (pid %d) on http://%s.\n"+
			"Make it stop accepting and load it:  curl -s -XPOST 'http://%s/fault/stop-accepting?seconds=15&load=64'\n"+
			"Or overflow its small backlog in bursts:  curl -s -XPOST 'http://%s/fault/burst?conns=300&rounds=5'\n",
			demo.pid, demoAddr, demoControl, demoControl)
	}
	a, err := StartAgent(ctx, cfg, log)
	if err != nil {
		return err
	}
	fmt.Fprintf(stdout, "culprit %s: metrics on http://%s/metrics, findings on %s (culprit findings --follow --addr %s)\n",
		version, a.HTTPAddr, a.GRPCAddr, a.GRPCAddr)
	// A demo that dies leaves nothing to watch: say so and fail, rather
	// than wait for a target that will not come back.
	select {
	case <-ctx.Done():
	case <-demo.exited():
	}
	log.Info("shutting down")
	stopErr := a.Stop(cfg.Agent.ShutdownTimeout)
	if err := demo.unexpectedExit(ctx); err != nil {
		return errors.Join(err, stopErr)
	}
	return stopErr
}

// Agent is one running agent: every goroutine it started stops with Stop.
type Agent struct {
	HTTPAddr, GRPCAddr string
	Store              *signals.Store
	Journal            *rules.Journal
	Tracker            *target.Tracker
	Profiles           *signals.Profiles
	Episodes           *signals.Episodes   // block and busy episodes of the target's threads
	Samples            *signals.CPUSamples // recent CPU samples of the target
	Conns              *signals.ConnEvents // how the target's connections ended
	Spans              *signals.Spans      // spans the app exported to the OTLP receiver
	OTLPGRPCAddr       string              // bound OTLP addresses, "" when off
	OTLPHTTPAddr       string
	Symbols            *symbolize.Symbolizer
	// Owners tells whose a socket is, shared by the collectors and probes
	// that label sockets with their owner.
	Owners *target.SocketOwners

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
}

// StartAgent wires collectors, probes, rules and exporters and starts them.
// It returns once both listeners are bound, so a caller may connect at once.
func StartAgent(parent context.Context, cfg Config, log *slog.Logger) (*Agent, error) {
	if err := checkLocal(cfg); err != nil {
		return nil, err
	}
	sel := target.Selector{PID: cfg.Target.PID, Port: cfg.Target.Port}
	if cfg.Target.Cmd != "" {
		sel.Cmd = regexp.MustCompile(cfg.Target.Cmd) // validated in Config.Validate
	}
	res, err := target.NewResolver(cfg.Collect.ProcRoot)
	if err != nil {
		return nil, err
	}
	setMemoryLimit(cfg, log)
	// The shared clock of the agent's periodic work idles at this while
	// nothing is going on (signals.Ticker).
	signals.SetIdle(cfg.Probes.IdlePoll)
	ctx, cancel := context.WithCancel(parent)
	a := &Agent{
		Store:    signals.New(cfg.Signals.RingSize, cfg.Signals.MaxSeries),
		Journal:  rules.NewJournal(cfg.Findings.History),
		Profiles: signals.NewProfiles(cfg.Pprof.Keep),
		Episodes: signals.NewEpisodes(cfg.Sched.MaxEpisodes),
		Conns:    signals.NewConnEvents(cfg.Probes.MaxConnEvents),
		Spans:    signals.NewSpansBounded(cfg.Traces.MaxSpans, cfg.Traces.MaxSpanBytes),
		Samples:  signals.NewCPUSamples(cfg.Profiling.MaxSamples),
		Symbols: symbolize.New(symbolize.Options{ProcRoot: cfg.Collect.ProcRoot, Log: log.With("component", "symbolize"),
			MaxPerfMapBytes: perfMapBytes(cfg.Profiling.MaxPerfMapBytes)}),
		Owners: target.NewSocketOwners(cfg.Collect.ProcRoot, target.SocketOwnersOptions{}),
		log:    log,
		cancel: cancel,
	}
	a.Tracker = target.NewTracker(res, sel, cfg.Target.RefindInterval, log)
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
	a.engine = rules.NewEngine(rules.New(cfg.Rules, cfg.Pprof.Interval), a.Store, a.Journal, a.Tracker, eo)
	a.goRun(func() { a.engine.Run(ctx) })

	if err := a.startServers(cfg); err != nil {
		a.Stop(time.Second)
		return nil, err
	}
	if err := a.startFindingsLogs(ctx, cfg); err != nil {
		a.Stop(time.Second)
		return nil, err
	}
	return a, nil
}

// startFindingsLogs exports finding events as OTLP log records when
// findings.otlp_endpoint is set. It reads the journal as a watcher does:
// the rules never wait for it.
func (a *Agent) startFindingsLogs(ctx context.Context, cfg Config) error {
	f := cfg.Findings
	if f.OTLPEndpoint == "" {
		a.Store.SetStatus(signals.Status{Component: "otlp_logs", Kind: "exporter", State: signals.StateDisabled, Detail: "findings.otlp_endpoint is empty"})
		return nil
	}
	fl, err := exporters.NewFindingsLogs(exporters.FindingsLogsOptions{
		Journal: a.Journal, Store: a.Store, Resource: a.resource, InstanceID: a.grpcSvc.InstanceID(), Version: version,
		Log: a.log.With("component", "otlp_logs"), Endpoint: f.OTLPEndpoint, Protocol: f.OTLPProtocol, Environ: os.Environ(),
		Queue: f.OTLPQueue, QueueBytes: f.OTLPQueueBytes, Batch: f.OTLPBatch, Interval: f.OTLPInterval, Timeout: f.OTLPTimeout,
	})
	if err != nil {
		return &ConfigError{Key: "findings.otlp_endpoint", Err: fmt.Errorf("export findings as OTLP log records: %w", err)}
	}
	a.logs = fl
	a.Store.SetStatus(signals.Status{Component: "otlp_logs", Kind: "exporter", State: signals.StateRunning, Detail: fl.Protocol() + " " + fl.Endpoint()})
	a.goRun(func() { fl.Run(ctx) })
	return nil
}

func (a *Agent) goRun(f func()) {
	a.wg.Add(1)
	go func() { defer a.wg.Done(); f() }()
}

func (a *Agent) startCollectors(ctx context.Context, cfg Config) error {
	disabled := map[string]bool{}
	for _, n := range cfg.Collect.Disabled {
		disabled[n] = true
	}
	for _, name := range collectors.Names() {
		if disabled[name] {
			a.Store.SetStatus(signals.Status{Component: name, Kind: "collector", State: signals.StateDisabled, Detail: "disabled in collect.disabled"})
			continue
		}
		interval := cfg.Collect.Interval
		if collectors.Fast(name) {
			interval = cfg.Collect.FastInterval
		}
		c, err := collectors.New(name, collectors.Options{
			ProcRoot:   cfg.Collect.ProcRoot,
			SysRoot:    cfg.Collect.SysRoot,
			Log:        a.log.With("collector", name),
			Interval:   interval,
			MaxThreads: cfg.Collect.MaxThreads,
			Owners:     a.Owners,
			// Dumps of an unchanged namespace are skipped up to this long.
			SocketsIdleInterval: cfg.Collect.SocketsIdleInterval,
			SocketsBusyInterval: cfg.Collect.SocketsBusyInterval,
		})
		if err != nil {
			return err
		}
		if cl, ok := c.(collectors.Closer); ok {
			a.closers = append(a.closers, cl)
		}
		a.goRun(func() { a.runCollector(ctx, c, interval) })
	}
	// The heap puller needs the profile store, so it is wired here rather
	// than through the registry.
	if cfg.Pprof.HeapURL == "" {
		a.Store.SetStatus(signals.Status{Component: "pprof_heap", Kind: "collector", State: signals.StateDisabled,
			Detail: "pprof.heap_url is empty: no heap source",
			Lost:   []string{"heap_leak: allocation sites (RSS growth is reported with the heap unknown)", "rss_without_heap", "oom_ahead: heap vs allocator split"}})
		return nil
	}
	ph := collectors.NewPprofHeap(collectors.Options{ProcRoot: cfg.Collect.ProcRoot, Log: a.log.With("collector", "pprof_heap")},
		collectors.PprofOptions{URL: cfg.Pprof.HeapURL, Timeout: cfg.Pprof.Timeout, MaxBytes: cfg.Pprof.MaxBytes, Interval: cfg.Pprof.Interval}, a.Profiles)
	a.closers = append(a.closers, ph)
	a.goRun(func() { a.runCollector(ctx, ph, cfg.Collect.Interval) })
	return nil
}

// runCollector polls one collector. A failing collector marks itself
// degraded and keeps trying: the source may come back (the target restarts).
func (a *Agent) runCollector(ctx context.Context, c collectors.Collector, interval time.Duration) {
	name := c.Name()
	log := a.log.With("collector", name)
	ls := signals.L("collector", name)
	// The shared clock (signals.NewTicker): every collector of a period
	// wakes the process at once with the probes' polls and the rules.
	tick := signals.NewTicker(interval)
	defer tick.Stop()
	var lastErr string
	for {
		if tgt, ok := a.Tracker.Current(); ok {
			start := time.Now()
			err := c.Collect(ctx, tgt, a.Store)
			now := time.Now()
			a.Store.Put(signals.CollectorDurationSeconds, ls, now.Sub(start).Seconds(), now)
			switch {
			case err == nil || errors.Is(err, collectors.ErrNoData):
				if err != nil {
					log.Debug("no data", "err", err)
				}
				a.Store.Put(signals.CollectorSuccess, ls, 1, now)
				a.Store.SetStatus(signals.Status{Component: name, Kind: "collector", State: signals.StateRunning})
				lastErr = ""
			default:
				a.Store.Put(signals.CollectorSuccess, ls, 0, now)
				a.Store.SetStatus(signals.Status{Component: name, Kind: "collector", State: signals.StateDegraded, Detail: err.Error()})
				if err.Error() != lastErr && ctx.Err() == nil {
					log.Warn("collector failed", "err", err)
					lastErr = err.Error()
				}
			}
		}
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
	}
}

func (a *Agent) startProbes(ctx context.Context, cfg Config) {
	opts := func(name string) probes.Options {
		return probes.Options{
			Log:          a.log.With("probe", name),
			PollInterval: cfg.Probes.PollInterval,
			// Paced probes slow down to this while their maps do not change.
			IdlePollInterval: cfg.Probes.IdlePoll,
			MaxEntries:       uint32(cfg.Probes.MaxEntries),
			RingBufferBytes:  uint32(cfg.Probes.RingBufferBytes),
			Owners:           a.Owners,
		}
	}
	ps := []probes.Probe{
		probes.NewTCPListen(opts("tcplisten")),
		probes.NewTCPLife(opts("tcplife"), a.Conns),
		probes.NewProcSignals(opts("procsignals")),
		probes.NewSockCalls(probes.SockCallsOptions{
			Options:    opts("sockcalls"),
			MaxSockets: uint32(cfg.SockCalls.MaxSockets),
			MaxRemotes: cfg.SockCalls.MaxRemotes,
		}),
		probes.NewSched(probes.SchedOptions{
			Options:    opts("sched"),
			MinBlock:   cfg.Sched.MinBlock,
			BusyAfter:  cfg.Sched.BusyAfter,
			BusyGap:    cfg.Sched.BusyGap,
			MaxThreads: uint32(cfg.Sched.MaxThreads),
			MaxStacks:  uint32(cfg.Sched.MaxStacks),
			Episodes:   a.Episodes,
			Symbolizer: a.Symbols,
			// Episodes that reach the rules' thresholds wake the engine;
			// workers' idle waits do not.
			NotifyBlock: cfg.Rules.BlockingWorker.MinBlock,
			NotifyBusy:  cfg.Rules.BusyWorker.MinBusy,
			QuietCalls:  cfg.Rules.Workers.IdleSyscalls,
		}),
		probes.NewCPUProfile(probes.CPUProfileOptions{
			Options:   opts("cpu_profile"),
			Frequency: cfg.Profiling.Frequency,
			MaxStacks: uint32(cfg.Profiling.MaxStacks),
			Drain:     cfg.Profiling.DrainInterval,
			Samples:   a.Samples,
			// 0 in the config is no copy; the probe reads 0 as its default.
			StackBytes: cmp.Or(cfg.Profiling.StackBytes, -1),
			Symbolizer: a.Symbols,
		}),
	}
	for _, p := range ps {
		if p.Name() == "cpu_profile" && !cfg.Profiling.Enabled {
			a.Store.SetStatus(signals.Status{Component: p.Name(), Kind: "probe", State: signals.StateDisabled, Detail: "profiling.enabled = false", Lost: p.Lost()})
			continue
		}
		if p.Name() == "sockcalls" && !cfg.SockCalls.Enabled {
			a.Store.SetStatus(signals.Status{Component: p.Name(), Kind: "probe", State: signals.StateDisabled, Detail: "sockcalls.enabled = false", Lost: p.Lost()})
			continue
		}
		if !cfg.Probes.Enabled {
			a.Store.SetStatus(signals.Status{Component: p.Name(), Kind: "probe", State: signals.StateDisabled, Detail: "probes.enabled = false", Lost: p.Lost()})
			continue
		}
		if err := p.Start(ctx, a.Tracker, a.Store); err != nil {
			// Said once, loudly, with what it costs; the agent goes on
			// with procfs and netlink.
			a.log.Warn("eBPF probe unavailable; continuing without it", "probe", p.Name(), "err", err,
				"lost", strings.Join(p.Lost(), "; "), "hint", "grant CAP_BPF and CAP_PERFMON (or run as root)")
			a.Store.SetStatus(signals.Status{Component: p.Name(), Kind: "probe", State: signals.StateFailed, Detail: err.Error(), Lost: p.Lost()})
			p.Close()
			continue
		}
		a.Store.SetStatus(signals.Status{Component: p.Name(), Kind: "probe", State: signals.StateRunning})
		a.probes = append(a.probes, p)
	}
}

// startTraces runs the OTLP receiver. A port already taken (a collector
// sidecar on 4317) costs the trace findings, not the agent: said loudly,
// and in the snapshot.
func (a *Agent) startTraces(cfg Config) {
	lost := []string{"latency_spike: classifying spikes from spans", "trace ids on scheduler and pool findings"}
	if !cfg.Traces.Enabled {
		a.Store.SetStatus(signals.Status{Component: "otlp", Kind: "receiver", State: signals.StateDisabled, Detail: "traces.enabled = false", Lost: lost})
		return
	}
	log := a.log.With("component", "otlp")
	if cfg.Traces.ForwardEndpoint != "" {
		fw, err := traces.NewForwarderOptions(traces.ForwardOptions{
			Endpoint: cfg.Traces.ForwardEndpoint, Queue: cfg.Traces.ForwardQueue, QueueBytes: cfg.Traces.ForwardQueueBytes,
			Store: a.Store, Log: log,
		})
		if err != nil {
			log.Warn("cannot forward spans; receiving them only", "endpoint", cfg.Traces.ForwardEndpoint, "err", err)
		} else {
			a.forward = fw
		}
	}
	t := cfg.Traces
	r := traces.NewReceiver(traces.Options{
		GRPCAddr: t.GRPCAddr, HTTPAddr: t.HTTPAddr,
		MaxRequestBytes: t.MaxRequestBytes, MaxInflightBytes: t.MaxInflightBytes, InflightWait: t.InflightWait,
		MaxConnections: t.MaxConnections, GRPCMaxStreams: t.GRPCMaxStreams, MaxHeaderBytes: t.MaxHeaderBytes,
		HeaderTimeout: t.HeaderTimeout, ReadTimeout: t.ReadTimeout, WriteTimeout: t.WriteTimeout, IdleTimeout: t.IdleTimeout,
		MaxStringBytes: t.MaxStringBytes,
		Spans:          a.Spans, Store: a.Store, Forward: a.forward, Log: log,
	})
	if err := r.Start(); err != nil {
		log.Warn("OTLP receiver unavailable; continuing without traces", "err", err, "lost", strings.Join(lost, "; "))
		a.Store.SetStatus(signals.Status{Component: "otlp", Kind: "receiver", State: signals.StateFailed, Detail: err.Error(), Lost: lost})
		return
	}
	a.otlp = r
	a.OTLPGRPCAddr, a.OTLPHTTPAddr = r.GRPCAddr, r.HTTPAddr
	a.Store.SetStatus(signals.Status{Component: "otlp", Kind: "receiver", State: signals.StateRunning, Detail: "grpc " + r.GRPCAddr + ", http " + r.HTTPAddr})
}

// profileSource serves CaptureProfile when the profiler runs.
func (a *Agent) profileSource(cfg Config) exporters.ProfileSource {
	for _, p := range a.probes {
		if p.Name() == "cpu_profile" {
			return profiles.NewCPU(a.Samples, a.Symbols, cfg.Profiling.DrainInterval)
		}
	}
	return nil
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

// setMemoryLimit gives the Go runtime a memory limit, so that the agent
// collects harder as its heap nears its container's limit rather than be
// OOM-killed beside the app: agent.memory_limit_bytes when set, else
// agent.memory_limit_ratio of its own cgroup's limit (v1 or v2, through
// /proc/self/cgroup). GOMEMLIMIT and GOGC in the environment are the
// operator's explicit choice and win over the derived limit and
// agent.gogc. The runtime counts its heap, stacks and metadata against the
// limit; eBPF maps (charged to the cgroup by the kernel) and the binary's
// pages are the share the ratio leaves out.
func setMemoryLimit(cfg Config, log *slog.Logger) {
	if n := cfg.Agent.GOGC; n > 0 && os.Getenv("GOGC") == "" {
		debug.SetGCPercent(n)
	}
	limit, from := int64(0), ""
	switch n := cfg.Agent.MemoryLimitBytes; {
	case n > 0:
		limit, from = n, "agent.memory_limit_bytes"
	case n < 0 || os.Getenv("GOMEMLIMIT") != "":
		return
	default:
		l, path, err := collectors.MemoryLimitOf(cfg.Collect.ProcRoot, cfg.Collect.SysRoot, os.Getpid())
		if err != nil || l <= 0 {
			log.Debug("no container memory limit found: the Go runtime runs without one", "err", err)
			return
		}
		limit, from = int64(float64(l)*cfg.Agent.MemoryLimitRatio), fmt.Sprintf("%.0f%% of cgroup %s's %d bytes", 100*cfg.Agent.MemoryLimitRatio, path, l)
	}
	debug.SetMemoryLimit(limit)
	log.Info("Go memory limit set", "bytes", limit, "from", from)
}

// trackTarget checks the target on the shared clock (signals.Ticker), on
// the same wake-ups as the collectors. While it is not found, every
// refind_interval, the clock kept hot; while it is found, its exit is seen
// at once through a pidfd, and the periodic check (for a PID namespace
// that hides it, a zombie) comes at the clock's pace. What was one wake-up
// of the process every refind_interval is then none.
func (a *Agent) trackTarget(ctx context.Context, res *target.Resolver, interval time.Duration) {
	tick := signals.NewTicker(interval)
	defer tick.Stop()
	exited := make(chan struct{}, 1)
	var watched target.Process
	var stopWatch func()
	defer func() {
		if stopWatch != nil {
			stopWatch()
		}
	}()
	var checked time.Time
	for {
		// A target whose exit a pidfd watches is checked again only now
		// and then (Refresh reads and parses its stat).
		if stopWatch == nil || time.Since(checked) >= watchedCheck {
			a.Tracker.Refresh()
			checked = time.Now()
		}
		cur, ok := a.Tracker.Current()
		switch {
		case !ok:
			signals.Hot(time.Now().Add(2 * interval)) // look again soon
		case cur.PID != watched.PID || cur.StartTime != watched.StartTime:
			if stopWatch != nil {
				stopWatch()
			}
			watched, stopWatch = cur, watchExit(cur.PID, exited)
			if stopWatch != nil && !res.Alive(cur) {
				// It ended between the check and the pidfd: look now.
				stopWatch, watched = nil, target.Process{}
				continue
			}
		}
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		case <-exited:
			watched = target.Process{}
			if stopWatch != nil {
				stopWatch()
				stopWatch = nil
			}
		}
	}
}

// watchedCheck is how often a target watched by a pidfd is checked anyway.
const watchedCheck = 30 * time.Second

// watchExit signals exited when process pid ends, through a pidfd polled by
// the runtime's network poller (no thread waits on it). It returns how to
// stop watching; nil when the kernel has no pidfd (the periodic check is
// then all there is).
func watchExit(pid int, exited chan<- struct{}) func() {
	fd, err := unix.PidfdOpen(pid, unix.PIDFD_NONBLOCK)
	if err != nil {
		return nil
	}
	f := os.NewFile(uintptr(fd), "pidfd")
	rc, err := f.SyscallConn()
	if err != nil {
		f.Close()
		return nil
	}
	done := make(chan struct{})
	go func() {
		// Read waits for readability in the poller; a pidfd is readable
		// once the process has exited.
		err := rc.Read(func(fd uintptr) bool {
			pfd := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
			n, _ := unix.Poll(pfd, 0)
			return n > 0
		})
		select {
		case <-done:
			return // stopped: the file was closed under the wait
		default:
		}
		if err == nil {
			select {
			case exited <- struct{}{}:
			default:
			}
		}
	}()
	return func() {
		close(done)
		f.Close()
	}
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

// detectRuntime tells the rules the target's runtime, once per target
// process: a few ms of reading its executable and maps. What it was found
// from is logged once, so a remedy in the wrong terms can be traced.
func (a *Agent) detectRuntime(cfg Config) func(target.Process) target.Runtime {
	return func(p target.Process) target.Runtime {
		rt, err := target.DetectRuntime(cfg.Collect.ProcRoot, p.PID)
		if err != nil {
			a.log.Warn("runtime of the target unknown; remedies stay runtime-neutral", "pid", p.PID, "err", err)
			return rt
		}
		a.log.Info("target runtime", "pid", p.PID, "runtime", rt.String(), "from", strings.Join(rt.Sources, "; "))
		return rt
	}
}
