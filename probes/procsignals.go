package probes

//go:generate go tool bpf2go -tags linux -target bpfel -type sig_key -type sig_stats procSignals ../bpf/procsignals.c -- -I../bpf/headers -I/usr/include -Wall -Werror -O2

import (
	"context"
	"fmt"
	"strconv"
	"time"

	"github.com/culprit-dev/culprit/signals"
	"github.com/culprit-dev/culprit/target"
)

var (
	sigSignals = &signals.Desc{Name: "process_signals_total", Kind: signals.Counter,
		Help: "Termination signals (SIGTERM, SIGINT, SIGQUIT) sent to the target (eBPF signal_generate)."}
	sigLastSignal = &signals.Desc{Name: "process_last_signal_timestamp_seconds", Kind: signals.Gauge,
		Help: "When the target last received the signal (Unix time), and from which process (sender)."}
)

// ProcSignals counts termination signals sent to the target: see bpf/procsignals.c.
type ProcSignals struct {
	o Options
	running
	target     uint32
	monoToWall time.Duration
}

// NewProcSignals returns the probe, not yet loaded.
func NewProcSignals(o Options) *ProcSignals { return &ProcSignals{o: o} }

func (*ProcSignals) Name() string { return "procsignals" }

func (*ProcSignals) Lost() []string {
	return []string{"stalled_shutdown: when SIGTERM reached the target"}
}

// Start loads and attaches the program.
func (p *ProcSignals) Start(ctx context.Context, tracker *target.Tracker, store *signals.Store) error {
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
	p.spawn(func() {
		every(ctx, p.o.PollInterval, func(now time.Time) { p.poll(objs, tracker, store, now) })
	})
	return nil
}

var signalNames = map[uint32]string{2: "SIGINT", 3: "SIGQUIT", 15: "SIGTERM"}

func (p *ProcSignals) poll(objs *procSignalsObjects, tracker *target.Tracker, store *signals.Store, now time.Time) {
	tgt, ok := tracker.Current()
	if !ok {
		return
	}
	if _, err := retarget(objs.Targets, &p.target, uint32(tgt.PID)); err != nil {
		p.o.Log.Warn("signals: set target", "err", err)
		return
	}
	var key procSignalsSigKey
	var st procSignalsSigStats
	it := objs.Sigs.Iterate()
	for it.Next(&key, &st) {
		if key.Tgid != p.target {
			continue
		}
		name := signalNames[key.Sig]
		store.Put(sigSignals, signals.L("signal", name), float64(st.Count), now)
		at := time.Unix(0, int64(st.LastNs)+int64(p.monoToWall))
		store.Put(sigLastSignal, signals.L("signal", name, "sender", strconv.Itoa(int(st.Sender))), float64(at.UnixNano())/1e9, now)
	}
	if err := it.Err(); err != nil {
		p.o.Log.Warn("signals: read", "err", err)
	}
}

// Close detaches the program.
func (p *ProcSignals) Close() error { return p.stop() }
