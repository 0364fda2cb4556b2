package main

import (
	"cmp"
	"context"
	"strings"

	"github.com/culprit-dev/culprit/exporters"
	"github.com/culprit-dev/culprit/probes"
	"github.com/culprit-dev/culprit/profiles"
	"github.com/culprit-dev/culprit/rules"
	"github.com/culprit-dev/culprit/signals"
)

// This file wires the eBPF probes from the [probes], [sockcalls], [sched]
// and [profiling] keys, and the CPU profiles CaptureProfile serves while
// the profiler runs.

// startProbes loads the eBPF probes. One that cannot load (no BPF rights,
// an old kernel) costs what its status's Lost says, never the agent.
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
			OthersOwners:     cfg.Rules.Scope == rules.ScopeNamespace,
			SideStores:       a.SideStores,
		}
	}
	ps := []probes.Probe{
		probes.NewTCPListen(opts(signals.ProbeTCPListen)),
		probes.NewTCPLife(opts(signals.ProbeTCPLife)),
		probes.NewProcSignals(opts("procsignals")),
		probes.NewSockCalls(probes.SockCallsOptions{
			Options:    opts(signals.ProbeSockCalls),
			MaxSockets: uint32(cfg.SockCalls.MaxSockets),
			MaxRemotes: cfg.SockCalls.MaxRemotes,
			// Accepts are evidence while a listener's queue holds
			// connections: sys_exit is attached then (or always).
			AcceptsAlways: cfg.SockCalls.Accepts == AcceptsAlways,
			AcceptsLinger: cfg.SockCalls.AcceptsLinger,
			// Unread data is evidence while a thread sleeps where work
			// may wait for it: the socket hooks are attached then.
			UnreadAlways: cfg.SockCalls.Unread == UnreadAlways,
			UnreadLinger: cfg.SockCalls.UnreadLinger,
		}),
		probes.NewSched(probes.SchedOptions{
			Options:    opts(signals.ProbeSched),
			MinBlock:   cfg.Sched.MinBlock,
			BusyAfter:  cfg.Sched.BusyAfter,
			BusyGap:    cfg.Sched.BusyGap,
			MaxThreads: uint32(cfg.Sched.MaxThreads),
			MaxStacks:  uint32(cfg.Sched.MaxStacks),
			Symbolizer: a.Symbols,
			// Episodes that reach the rules' thresholds wake the engine;
			// workers' idle waits do not.
			NotifyBlock: cfg.Rules.BlockingWorker.MinBlock,
			NotifyBusy:  cfg.Rules.BusyWorker.MinBusy,
			QuietCalls:  cfg.Rules.Workers.IdleSyscalls,
		}),
		probes.NewCPUProfile(probes.CPUProfileOptions{
			Options:   opts(signals.ProbeCPUProfile),
			Frequency: cfg.Profiling.Frequency,
			MaxStacks: uint32(cfg.Profiling.MaxStacks),
			Drain:     cfg.Profiling.DrainInterval,
			// 0 in the config is no copy; the probe reads 0 as its default.
			StackBytes: cmp.Or(cfg.Profiling.StackBytes, -1),
			Symbolizer: a.Symbols,
		}),
	}
	for _, p := range ps {
		if p.Name() == signals.ProbeCPUProfile && !cfg.Profiling.Enabled {
			a.Store.SetStatus(signals.Status{Component: p.Name(), Kind: signals.KindProbe, State: signals.StateDisabled, Detail: "profiling.enabled = false", Lost: a.lost(p.Name())})
			continue
		}
		if p.Name() == signals.ProbeSockCalls && !cfg.SockCalls.Enabled {
			a.Store.SetStatus(signals.Status{Component: p.Name(), Kind: signals.KindProbe, State: signals.StateDisabled, Detail: "sockcalls.enabled = false", Lost: a.lost(p.Name())})
			continue
		}
		if !cfg.Probes.Enabled {
			a.Store.SetStatus(signals.Status{Component: p.Name(), Kind: signals.KindProbe, State: signals.StateDisabled, Detail: "probes.enabled = false", Lost: a.lost(p.Name())})
			continue
		}
		if err := p.Start(ctx, a.Tracker, a.Store); err != nil {
			// Said once, loudly, with what it costs; the agent goes on
			// with procfs and netlink.
			a.log.Warn("eBPF probe unavailable; continuing without it", "probe", p.Name(), "err", err,
				"lost", strings.Join(a.lost(p.Name()), "; "), "hint", "grant CAP_BPF and CAP_PERFMON (or run as root)")
			a.Store.SetStatus(signals.Status{Component: p.Name(), Kind: signals.KindProbe, State: signals.StateFailed, Detail: err.Error(), Lost: a.lost(p.Name())})
			p.Close()
			continue
		}
		a.Store.SetStatus(signals.Status{Component: p.Name(), Kind: signals.KindProbe, State: signals.StateRunning})
		a.probes = append(a.probes, p)
	}
}

// profileSource serves CaptureProfile when the profiler runs.
func (a *Agent) profileSource(cfg Config) exporters.ProfileSource {
	for _, p := range a.probes {
		if p.Name() == signals.ProbeCPUProfile {
			return profiles.NewCPU(a.Samples, a.Symbols, cfg.Profiling.DrainInterval)
		}
	}
	return nil
}
