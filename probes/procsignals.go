package probes

//go:generate go tool bpf2go -tags linux -target bpfel -type sig_key -type sig_stats procSignals ../bpf/procsignals.c -- -I../bpf/headers -I/usr/include -Wall -Werror -O2

import (
	"context"
	"fmt"
	"strconv"
	"time"

	"github.com/culprit-dev/culprit/signals"
	"github.com/culprit-dev/culprit/workload"
)

// ProcSignals counts termination signals sent to the target: see bpf/procsignals.c.
type ProcSignals struct {
	o Options
	running
	target     uint32
	monoToWall time.Duration
	count      *seriesSet[uint32]           // by signal
	last       *seriesSet[[2]uint32]        // by signal and sender
	seen       map[procSignalsSigKey]uint64 // counts at the last poll
	changes    *changes
}

// NewProcSignals returns the probe, not yet loaded.
func NewProcSignals(o Options) *ProcSignals { return &ProcSignals{o: o} }

func (*ProcSignals) Name() string { return signals.ProbeProcSignals }

// Start loads and attaches the program.
func (p *ProcSignals) Start(ctx context.Context, tracker *workload.Tracker, store *signals.Store) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	spec, err := loadProcSignals()
	if err != nil {
		return fmt.Errorf("signals: load spec: %w", err)
	}
	objs := &procSignalsObjects{}
	ctx, err = p.start(ctx, "procsignals", spec, objs, func() []tracingProg {
		return []tracingProg{{"tp_btf/signal_generate", objs.CulpritSignalGenerate}}
	}, nil)
	if err != nil {
		return err
	}
	p.monoToWall = time.Duration(time.Now().UnixNano() - monotonicNow())
	p.count = newSeriesSet[uint32](store, signals.ProcessSignalsTotal)
	p.last = newSeriesSet[[2]uint32](store, signals.ProcessLastSignalTimestampSeconds)
	p.seen = map[procSignalsSigKey]uint64{}
	p.changes = newChanges(objs.Changes, 1)
	// A (re)found target is polled at once: a SIGTERM right after a
	// restart must find the new process in target_tgids.
	retargetNow := newKicker()
	tracker.OnChange(retargetNow.Kick)
	// A termination signal matters over a grace period of seconds: the
	// poll slows to probes.idle_poll_interval while none arrives. A cycle
	// is a memory read of the change counter and, when a signal came, a
	// walk of the sigs map; ring writes of the counts (each refreshEvery).
	p.spawn(func() {
		paced(ctx, p.o, nil, retargetNow, func(now time.Time) bool { return p.poll(objs, tracker, now) })
	})
	return nil
}

var signalNames = map[uint32]string{2: "SIGINT", 3: "SIGQUIT", 15: "SIGTERM"}

// poll reports whether a signal arrived since the last one.
func (p *ProcSignals) poll(objs *procSignalsObjects, tracker *workload.Tracker, now time.Time) bool {
	tgt, ok := tracker.Current()
	if !ok {
		return false
	}
	if moved, err := retarget(objs.TargetTgids, &p.target, uint32(tgt.PID)); err != nil {
		p.o.Log.Warn("signals: set target", "err", err)
		return false
	} else if moved {
		p.changes.forget(0) // another process's counts: walk
	}
	if !p.changes.moved(0) {
		// No signal since the last walk: the same counts again.
		p.count.touch(now)
		p.last.touch(now)
		return false
	}
	var key procSignalsSigKey
	var st procSignalsSigStats
	changed := false
	it := objs.Sigs.Iterate()
	for it.Next(&key, &st) {
		if key.Tgid != p.target {
			continue
		}
		if p.seen[key] != st.Count {
			changed = true
			if len(p.seen) < 64 {
				p.seen[key] = st.Count
			}
		}
		name := signalNames[key.Sig]
		p.count.put(key.Sig, func() signals.Labels { return signals.L("signal", name) }, float64(st.Count), now)
		at := time.Unix(0, int64(st.LastNs)+int64(p.monoToWall))
		sender := st.Sender
		p.last.put([2]uint32{key.Sig, sender}, func() signals.Labels {
			return signals.L("signal", name, "sender", strconv.Itoa(int(sender)))
		}, float64(at.UnixNano())/1e9, now)
	}
	if err := it.Err(); err != nil {
		p.o.Log.Warn("signals: read", "err", err)
	}
	return changed
}

// Close detaches the program.
func (p *ProcSignals) Close() error { return p.stop() }
