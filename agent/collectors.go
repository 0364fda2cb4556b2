package main

import (
	"context"
	"errors"
	"time"

	"github.com/culprit-dev/culprit/collectors"
	"github.com/culprit-dev/culprit/probes"
	"github.com/culprit-dev/culprit/signals"
)

// This file wires the collectors (procfs, sock_diag, cgroup files, the
// heap puller) and polls each on the shared clock, recording how each
// run went.

// Every collector's own health, as signals: a collector that fails or
// slows down is seen beside what it measures.
// startCollectors starts every registered collector not disabled in
// collect.disabled, each polled at its pace (collect.fast_interval for
// the fast ones), and the heap puller when pprof.heap_url is set. What is
// off is said in the snapshot's statuses.
func (a *Agent) startCollectors(ctx context.Context, cfg Config) error {
	disabled := map[string]bool{}
	for _, n := range cfg.Collect.Disabled {
		disabled[n] = true
	}
	// The accept-queue collector asks the listeners how many connections
	// are half-open before it walks the established hash for them.
	var halfOpen collectors.HalfOpenCounter
	if cfg.Probes.Enabled && !disabled[signals.CollectorAcceptQueue] {
		if q, err := probes.NewListenQueues(); err != nil {
			a.log.Info("half-open connections are counted by walking the established hash: the listenqueue iterator did not load", "err", err)
		} else {
			a.closers = append(a.closers, q)
			halfOpen = q
		}
	}
	for _, name := range collectors.Names() {
		if disabled[name] {
			a.Store.SetStatus(signals.Status{Component: name, Kind: signals.KindCollector, State: signals.StateDisabled, Detail: "disabled in collect.disabled", Lost: a.lost(name)})
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
			SideStores:          a.SideStores,
			HalfOpen:            halfOpen,
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
		a.Store.SetStatus(signals.Status{Component: signals.CollectorPprofHeap, Kind: signals.KindCollector, State: signals.StateDisabled,
			Detail: "pprof.heap_url is empty: no heap source",
			Lost:   a.lost(signals.CollectorPprofHeap)})
		return nil
	}
	ph := collectors.NewPprofHeap(collectors.Options{ProcRoot: cfg.Collect.ProcRoot, Log: a.log.With("collector", signals.CollectorPprofHeap), SideStores: a.SideStores},
		collectors.PprofOptions{URL: cfg.Pprof.HeapURL, Timeout: cfg.Pprof.Timeout, MaxBytes: cfg.Pprof.MaxBytes, Interval: cfg.Pprof.Interval})
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
				a.Store.SetStatus(signals.Status{Component: name, Kind: signals.KindCollector, State: signals.StateRunning})
				lastErr = ""
			default:
				a.Store.Put(signals.CollectorSuccess, ls, 0, now)
				a.Store.SetStatus(signals.Status{Component: name, Kind: signals.KindCollector, State: signals.StateDegraded, Detail: err.Error(), Lost: a.lost(name)})
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
