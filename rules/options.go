package rules

import (
	"fmt"
	"regexp"
	"slices"
	"time"
)

// Options are the [rules] section of agent.conf: how the engine paces
// itself and every rule's thresholds. Each rule's options type carries its
// own TOML keys, bounds (the `range` tag, checked by the agent's config
// loader for every key) and defaults (its Default...Options function), so
// a setting is declared once, next to the code that reads it, and reaches
// the rule as it is.
type Options struct {
	// Interval between evaluations when no eBPF event wakes the engine.
	Interval time.Duration `toml:"interval" range:"[10ms,1m]"`
	// MinGap is the least time between two evaluations, however many
	// events arrive.
	MinGap time.Duration `toml:"min_gap" range:"[0s,10s]"`
	// ResolveAfter: a finding resolves only after its evidence has been
	// gone this long.
	ResolveAfter time.Duration `toml:"resolve_after" range:"[100ms,1h]"`
	// MinUpdateInterval spaces out updates that change only numbers.
	MinUpdateInterval time.Duration `toml:"min_update_interval" range:"[0s,1h]"`
	// UpdateThreshold: an evidence value must leave the range already
	// sent for the finding by this share to be worth an UPDATED event;
	// other moves update the finding in place.
	UpdateThreshold float64 `toml:"update_threshold" range:"[0,10]"`
	// MaxOpenFindings bounds the open findings.
	MaxOpenFindings int `toml:"max_open_findings" range:"[1,100000]"`
	// Scope: "target" (findings about the sockets the target and its
	// children hold) or "namespace" (other processes' too, titled with
	// their owner; never the agent's own).
	Scope string `toml:"scope"`

	Workers           WorkersOptions           `toml:"workers"`
	AcceptOverflow    AcceptOverflowOptions    `toml:"accept_overflow"`
	FDExhaustion      FDExhaustionOptions      `toml:"fd_exhaustion"`
	RSSWithoutHeap    RSSWithoutHeapOptions    `toml:"rss_without_heap"`
	HeapLeak          HeapLeakOptions          `toml:"heap_leak"`
	OOMAhead          OOMAheadOptions          `toml:"oom_ahead"`
	BlockingWorker    BlockingWorkerOptions    `toml:"blocking_worker"`
	BusyWorker        BusyWorkerOptions        `toml:"busy_worker"`
	WorkerImbalance   WorkerImbalanceOptions   `toml:"worker_imbalance"`
	ThroughputPlateau ThroughputPlateauOptions `toml:"throughput_plateau"`
	CloseWait         CloseWaitOptions         `toml:"close_wait"`
	PortExhaustion    PortExhaustionOptions    `toml:"port_exhaustion"`
	RSTStorm          RSTStormOptions          `toml:"rst_storm"`
	PoolExhaustion    PoolExhaustionOptions    `toml:"pool_exhaustion"`
	StalledShutdown   StalledShutdownOptions   `toml:"stalled_shutdown"`
	LatencySpike      LatencySpikeOptions      `toml:"latency_spike"`
	SYNBacklog        SYNBacklogOptions        `toml:"syn_backlog"`
	IdleTimeout       IdleTimeoutOptions       `toml:"idle_timeout"`
	CPUThrottling     CPUThrottlingOptions     `toml:"cpu_throttling"`
}

// WorkersOptions ([rules.workers]) say which threads are an async
// runtime's workers and where they wait for work.
type WorkersOptions struct {
	// Threads is a regular expression over thread names.
	Threads string `toml:"threads" maxlen:"4096"`
	// IdleSyscalls are the waits of an idle event loop or a parked worker.
	IdleSyscalls []string `toml:"idle_syscalls" maxlen:"64"`
}

// DefaultOptions are the defaults agent.conf documents.
func DefaultOptions() Options {
	return Options{
		Interval:          200 * time.Millisecond,
		MinGap:            50 * time.Millisecond,
		ResolveAfter:      3 * time.Second,
		MinUpdateInterval: time.Second,
		UpdateThreshold:   0.2,
		MaxOpenFindings:   256,
		Scope:             ScopeTarget,
		Workers:           WorkersOptions{Threads: DefaultWorkerThreads, IdleSyscalls: slices.Clone(DefaultIdleSyscalls)},
		AcceptOverflow:    DefaultAcceptOverflowOptions(),
		FDExhaustion:      DefaultFDExhaustionOptions(),
		RSSWithoutHeap:    DefaultRSSWithoutHeapOptions(),
		HeapLeak:          DefaultHeapLeakOptions(),
		OOMAhead:          DefaultOOMAheadOptions(),
		BlockingWorker:    DefaultBlockingWorkerOptions(),
		BusyWorker:        DefaultBusyWorkerOptions(),
		WorkerImbalance:   DefaultWorkerImbalanceOptions(),
		ThroughputPlateau: DefaultThroughputPlateauOptions(),
		CloseWait:         DefaultCloseWaitOptions(),
		PortExhaustion:    DefaultPortExhaustionOptions(),
		RSTStorm:          DefaultRSTStormOptions(),
		PoolExhaustion:    DefaultPoolExhaustionOptions(),
		StalledShutdown:   DefaultStalledShutdownOptions(),
		LatencySpike:      DefaultLatencySpikeOptions(),
		SYNBacklog:        DefaultSYNBacklogOptions(),
		IdleTimeout:       DefaultIdleTimeoutOptions(),
		CPUThrottling:     DefaultCPUThrottlingOptions(),
	}
}

// Validate checks what the `range` tags cannot: values that must agree
// with each other, and the worker regular expression. Errors name the key
// relative to [rules] (accept_overflow.window).
func (o Options) Validate() error {
	if o.Scope != ScopeTarget && o.Scope != ScopeNamespace {
		return &KeyError{Key: "scope", Err: fmt.Errorf("must be %q or %q, got %q", ScopeTarget, ScopeNamespace, o.Scope)}
	}
	if _, err := o.Pools(); err != nil {
		return &KeyError{Key: "workers.threads", Err: err}
	}
	if o.LatencySpike.Window <= o.LatencySpike.Recent {
		return &KeyError{Key: "latency_spike.window", Err: fmt.Errorf("must be longer than rules.latency_spike.recent")}
	}
	if o.FDExhaustion.MinDuration >= o.FDExhaustion.Window {
		return &KeyError{Key: "fd_exhaustion.min_duration", Err: fmt.Errorf("must be shorter than rules.fd_exhaustion.window, or no leak could ever be seen")}
	}
	if o.HeapLeak.MinDuration >= o.HeapLeak.Window {
		return &KeyError{Key: "heap_leak.min_duration", Err: fmt.Errorf("must be shorter than rules.heap_leak.window, or no leak could ever be seen")}
	}
	if o.AcceptOverflow.Window < o.AcceptOverflow.Recent {
		return &KeyError{Key: "accept_overflow.window", Err: fmt.Errorf("must not be shorter than rules.accept_overflow.recent")}
	}
	return nil
}

// KeyError is a bad value of one key under [rules].
type KeyError struct {
	Key string
	Err error
}

func (e *KeyError) Error() string { return e.Key + ": " + e.Err.Error() }
func (e *KeyError) Unwrap() error { return e.Err }

// Pools compiles [rules.workers].
func (o Options) Pools() (WorkerPools, error) {
	re, err := regexp.Compile(o.Workers.Threads)
	if err != nil {
		return WorkerPools{}, fmt.Errorf("not a regular expression: %w", err)
	}
	return WorkerPools{Match: re, IdleSyscalls: slices.Clone(o.Workers.IdleSyscalls)}, nil
}

// Engine is the engine's part of the options.
func (o Options) Engine() EngineOptions {
	return EngineOptions{
		Interval:          o.Interval,
		MinGap:            o.MinGap,
		ResolveAfter:      o.ResolveAfter,
		MinUpdateInterval: o.MinUpdateInterval,
		UpdateThreshold:   o.UpdateThreshold,
		MaxOpen:           o.MaxOpenFindings,
		Scope:             o.Scope,
	}
}

// New builds every rule from its options: the one place rules are
// registered. heapInterval is how often the app's heap profile is pulled
// (pprof.interval): a heap sample older than three of those is not "now".
func New(o Options, heapInterval time.Duration) []Rule {
	heapFresh := 3 * heapInterval
	o.RSSWithoutHeap.HeapFresh = heapFresh
	o.HeapLeak.HeapFresh = heapFresh
	o.OOMAhead.HeapFresh = heapFresh
	return []Rule{
		NewAcceptOverflow(o.AcceptOverflow),
		NewFDExhaustion(o.FDExhaustion),
		NewRSSWithoutHeap(o.RSSWithoutHeap),
		NewHeapLeak(o.HeapLeak),
		NewOOMAhead(o.OOMAhead),
		NewBlockingWorker(o.BlockingWorker),
		NewBusyWorker(o.BusyWorker),
		NewWorkerImbalance(o.WorkerImbalance),
		NewThroughputPlateau(o.ThroughputPlateau),
		NewCloseWait(o.CloseWait),
		NewPortExhaustion(o.PortExhaustion),
		NewRSTStorm(o.RSTStorm),
		NewPoolExhaustion(o.PoolExhaustion),
		NewStalledShutdown(o.StalledShutdown),
		NewLatencySpike(o.LatencySpike),
		NewSYNBacklog(o.SYNBacklog),
		NewIdleTimeout(o.IdleTimeout),
		NewCPUThrottling(o.CPUThrottling),
	}
}
