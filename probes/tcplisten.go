package probes

//go:generate go tool bpf2go -tags linux -target bpfel -type port_key -type port_stats tcpListen ../bpf/tcp_listen.c -- -I../bpf/headers -I/usr/include -Wall -Werror -O2

import (
	"context"
	"fmt"
	"strconv"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/ringbuf"

	"github.com/culprit-dev/culprit/signals"
	"github.com/culprit-dev/culprit/target"
)

// Signals written by the tcplisten probe, labelled with the local port.
var (
	sigOverflowDrops = &signals.Desc{Name: "tcp_listen_overflow_drops_total", Kind: signals.Counter,
		Help: "Completed handshakes dropped because the listener's accept queue was full (kfree_skb TCP_LISTEN_OVERFLOW)."}
	sigSynackRetrans = &signals.Desc{Name: "tcp_synack_retransmits_total", Kind: signals.Counter,
		Help: "SYN-ACKs the listener retransmitted; they keep coming while its accept queue stays full."}
	sigListenOpens = &signals.Desc{Name: "tcp_listen_handshakes_total", Kind: signals.Counter,
		Help: "Handshakes completed on the listener (SYN_RECV to ESTABLISHED); while its queue is full, each one needed an accept."}
	sigProbeEvents = &signals.Desc{Name: "probe_events_total", Kind: signals.Counter,
		Help: "Events read from the probe's ring buffer."}
	sigProbeLost = &signals.Desc{Name: "probe_events_lost_total", Kind: signals.Counter,
		Help: "Events the probe's ring buffer had no room for."}
)

// TCPListen counts, per listening port, what the kernel does when an accept
// queue is full. See bpf/tcp_listen.c for why these three tracepoints.
type TCPListen struct {
	o Options
	running
	events uint64
}

// NewTCPListen returns the probe, not yet loaded.
func NewTCPListen(o Options) *TCPListen { return &TCPListen{o: o} }

func (*TCPListen) Name() string { return "tcplisten" }

func (*TCPListen) Lost() []string {
	return []string{
		"accept_overflow: per-listener attribution of drops in bursts that sampling misses",
		"accept_overflow: accepts counted while the queue stays full (stall vs slow accept; lower confidence)",
	}
}

// Start loads and attaches the programs. A kernel or privilege problem comes
// back as an error naming the program; nothing is left loaded then.
func (p *TCPListen) Start(ctx context.Context, tracker *target.Tracker, store *signals.Store) error {
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
	rd := p.rd
	p.spawn(func() { p.readEvents(rd, store) })
	p.spawn(func() { p.poll(ctx, objs, tracker, store) })
	return nil
}

// readEvents turns each ring buffer record into a wake-up of the rule
// engine; the counts themselves are read from the map by poll.
func (p *TCPListen) readEvents(rd *ringbuf.Reader, store *signals.Store) {
	readRing("tcplisten", rd, p.o.Log, func([]byte) {
		p.mu.Lock()
		p.events++
		p.mu.Unlock()
		store.Notify()
	})
}

func (p *TCPListen) poll(ctx context.Context, objs *tcpListenObjects, tracker *target.Tracker, store *signals.Store) {
	every(ctx, p.o.PollInterval, func(now time.Time) {
		p.mu.Lock()
		events := p.events
		p.mu.Unlock()
		putProbeCounters(store, p.Name(), float64(events), objs.Lost, now)
		tgt, ok := tracker.Current()
		if !ok {
			return
		}
		if err := p.readPorts(objs, uint32(tgt.NetnsIno), store, now); err != nil {
			p.o.Log.Warn("tcplisten: read port stats", "err", err)
		}
	})
}

// readPorts copies the target namespace's entries into the store. Entries
// of other namespaces stay in the (LRU, bounded) map.
func (p *TCPListen) readPorts(objs *tcpListenObjects, netns uint32, store *signals.Store, now time.Time) error {
	var (
		key tcpListenPortKey
		val tcpListenPortStats
	)
	it := objs.PortStatsMap.Iterate()
	for it.Next(&key, &val) {
		if key.Netns != netns {
			continue
		}
		ls := signals.L("port", strconv.Itoa(int(key.Port)))
		store.Put(sigOverflowDrops, ls, float64(val.OverflowDrops), now)
		store.Put(sigSynackRetrans, ls, float64(val.SynackRetrans), now)
		store.Put(sigListenOpens, ls, float64(val.PassiveOpens), now)
	}
	if err := it.Err(); err != nil {
		return fmt.Errorf("iterate port_stats_map: %w", err)
	}
	return nil
}

// Close detaches the programs and frees their maps. It is safe to call
// before Start and more than once.
func (p *TCPListen) Close() error { return p.stop() }
