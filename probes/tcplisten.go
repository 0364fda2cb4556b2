package probes

//go:generate go tool bpf2go -tags linux -target bpfel -type port_key -type port_stats tcpListen ../bpf/tcp_listen.c -- -I../bpf/headers -I/usr/include -Wall -Werror -O2

import (
	"context"
	"fmt"
	"strconv"
	"sync/atomic"
	"time"

	"github.com/cilium/ebpf"

	"github.com/culprit-dev/culprit/signals"
	"github.com/culprit-dev/culprit/workload"
)

// TCPListen counts, per listening port, what the kernel does when an accept
// queue is full. See bpf/tcp_listen.c for why these three tracepoints.
type TCPListen struct {
	o Options
	running
	events uint64

	// Per port of the target's namespace, through handles (written when
	// they change, and refreshEvery otherwise).
	drops, synacks, opens *seriesSet[uint16]
	counters              *probeCounters
	keys                  []tcpListenPortKey   // batch buffers, reused
	vals                  []tcpListenPortStats // every poll
	changes               *changes
	netns                 uint32 // target_netns as set in the program
	store                 *signals.Store
	wokeAt                *atomic.Int64 // when the last wake record came (Unix ns)
}

// NewTCPListen returns the probe, not yet loaded.
func NewTCPListen(o Options) *TCPListen { return &TCPListen{o: o} }

func (*TCPListen) Name() string { return signals.ProbeTCPListen }

// Start loads and attaches the programs. A kernel or privilege problem comes
// back as an error naming the program; nothing is left loaded then.
func (p *TCPListen) Start(ctx context.Context, tracker *workload.Tracker, store *signals.Store) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	spec, err := loadTcpListen()
	if err != nil {
		return fmt.Errorf("tcplisten: load spec: %w", err)
	}
	resize(spec, map[string]uint32{"port_stats_map": p.o.MaxEntries, "events": p.o.RingBufferBytes})
	objs := &tcpListenObjects{}
	ctx, err = p.start(ctx, "tcplisten", spec, objs, func() []tracingProg {
		return []tracingProg{
			{"tp_btf/kfree_skb", objs.CulpritKfreeSkb},
			{"tp_btf/tcp_retransmit_synack", objs.CulpritRetransmitSynack},
			{"tp_btf/inet_sock_set_state", objs.CulpritInetSockSetState},
		}
	}, func() *ebpf.Map { return objs.Events })
	if err != nil {
		return err
	}
	p.drops = newSeriesSet[uint16](store, signals.TCPListenOverflowDropsTotal)
	p.synacks = newSeriesSet[uint16](store, signals.TCPSynAckRetransmitsTotal)
	p.opens = newSeriesSet[uint16](store, signals.TCPListenHandshakesTotal)
	p.counters = newProbeCounters(store, p.Name())
	p.keys, p.vals = make([]tcpListenPortKey, 256), make([]tcpListenPortStats, 256)
	p.changes = newChanges(objs.Changes, 1)
	p.store = store
	// A connection arriving in the target's namespace wakes the clock
	// while it idles: the accept queue is then sampled every 100 ms.
	if err := p.startWakes("tcplisten", objs.Wakes, p.o.Log, nil); err != nil {
		p.release()
		return err
	}
	p.wokeAt = &p.running.wokeAt
	rd := p.rd
	p.spawn(func() { p.readEvents(rd, store) })
	p.spawn(func() { p.poll(ctx, objs, tracker) })
	return nil
}

// readEvents turns each ring buffer record into a wake-up of the rule
// engine; the counts themselves are read from the map by poll.
func (p *TCPListen) readEvents(rd *ringReader, store *signals.Store) {
	readRing("tcplisten", rd, p.o.Log, func([]byte) {
		p.mu.Lock()
		p.events++
		p.mu.Unlock()
		store.Notify()
	})
}

// poll reads the port counters every probes.poll_interval, not paced:
// they are the accept_queue collector's evidence of which listener a burst
// hit, read at its own 100 ms cadence, and a count read a second late
// would be a burst left unattributed. A cycle is a memory read of the
// change counter (which only the target namespace's ports move) and ring
// writes every refreshEvery; only when it moved, a batch walk of the port
// map.
func (p *TCPListen) poll(ctx context.Context, objs *tcpListenObjects, tracker *workload.Tracker) {
	every(ctx, p.o.PollInterval, func(now time.Time) {
		p.mu.Lock()
		events := p.events
		p.mu.Unlock()
		p.counters.put(float64(events), objs.Lost, now)
		tgt, ok := tracker.Current()
		if !ok {
			return
		}
		if ns := uint32(tgt.NetnsIno); ns != p.netns {
			p.store.SetActivity(signals.ListenActivity(uint64(p.netns)), nil)
			p.store.SetActivity(signals.ListenWake(uint64(p.netns)), nil)
			err := objs.TargetNetns.Set(ns)
			if err != nil {
				// Without the memory-mapped global every namespace's
				// ports move the counter: walks happen more often.
				p.o.Log.Debug("tcplisten: set target_netns", "err", err)
			}
			p.netns = ns
			p.changes.forget(0)
			if err == nil && p.changes.mm != nil {
				// The accept_queue collector skips its sample while this
				// stands still and every queue was empty: nothing could
				// have entered one. When it moved while the clock idled,
				// the wake record's time bounds how long nothing had.
				ch, woke := p.changes, p.wokeAt
				p.store.SetActivity(signals.ListenActivity(uint64(ns)), func() uint64 { return ch.value(0) })
				p.store.SetActivity(signals.ListenWake(uint64(ns)), func() uint64 { return uint64(woke.Load()) })
			}
		}
		p.changes.arm(1)
		if !p.changes.moved(0) {
			p.drops.touch(now)
			p.synacks.touch(now)
			p.opens.touch(now)
			return
		}
		if err := p.readPorts(objs, uint32(tgt.NetnsIno), now); err != nil {
			p.changes.forget(0)
			p.o.Log.Warn("tcplisten: read port stats", "err", err)
		}
	})
}

// readPorts copies the target namespace's entries into the store. Entries
// of other namespaces stay in the (LRU, bounded) map.
func (p *TCPListen) readPorts(objs *tcpListenObjects, netns uint32, now time.Time) error {
	return batchEach(objs.PortStatsMap, p.keys, p.vals, func(key *tcpListenPortKey, val *tcpListenPortStats) {
		if key.Netns != netns {
			return
		}
		port := key.Port
		ls := func() signals.Labels { return signals.L("port", strconv.Itoa(int(port))) }
		p.drops.put(port, ls, float64(val.OverflowDrops), now)
		p.synacks.put(port, ls, float64(val.SynackRetrans), now)
		p.opens.put(port, ls, float64(val.PassiveOpens), now)
	})
}

// Close detaches the programs and frees their maps. It is safe to call
// before Start and more than once.
func (p *TCPListen) Close() error {
	err := p.stop()
	if p.store != nil {
		p.store.SetActivity(signals.ListenActivity(uint64(p.netns)), nil)
		p.store.SetActivity(signals.ListenWake(uint64(p.netns)), nil)
	}
	return err
}
