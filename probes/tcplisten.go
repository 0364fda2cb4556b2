package probes

//go:generate go tool bpf2go -tags linux -target bpfel -type port_key -type port_stats tcpListen ../bpf/tcp_listen.c -- -I../bpf/headers -I/usr/include -Wall -Werror -O2

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"sync"
	"time"

	"github.com/cilium/ebpf/link"
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

	mu      sync.Mutex
	objs    *tcpListenObjects
	links   []link.Link
	rd      *ringbuf.Reader
	wg      sync.WaitGroup
	cancel  context.CancelFunc
	events  uint64
	started bool
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
	if p.started {
		return errors.New("tcplisten: already started")
	}
	spec, err := loadTcpListen()
	if err != nil {
		return fmt.Errorf("tcplisten: load spec: %w", err)
	}
	if p.o.MaxEntries > 0 {
		spec.Maps["port_stats_map"].MaxEntries = p.o.MaxEntries
	}
	if p.o.RingBufferBytes > 0 {
		spec.Maps["events"].MaxEntries = p.o.RingBufferBytes
	}
	objs := &tcpListenObjects{}
	if err := load("tcplisten", spec, objs); err != nil {
		return err
	}
	p.objs = objs
	p.links, err = attachTracing("tcplisten",
		tracingProg{"tp_btf/kfree_skb", objs.CulpritKfreeSkb},
		tracingProg{"tp_btf/tcp_retransmit_synack", objs.CulpritRetransmitSynack},
		tracingProg{"tp_btf/inet_sock_set_state", objs.CulpritInetSockSetState},
	)
	if err != nil {
		p.closeLocked()
		return err
	}
	rd, err := ringbuf.NewReader(objs.Events)
	if err != nil {
		p.closeLocked()
		return fmt.Errorf("tcplisten: ring buffer reader: %w", err)
	}
	p.rd = rd
	p.started = true
	ctx, p.cancel = context.WithCancel(ctx)
	p.wg.Add(2)
	go func() { defer p.wg.Done(); p.readEvents(rd, store) }()
	go func() { defer p.wg.Done(); p.poll(ctx, objs, tracker, store) }()
	return nil
}

// readEvents turns each ring buffer record into a wake-up of the rule
// engine; the counts themselves are read from the map by poll.
func (p *TCPListen) readEvents(rd *ringbuf.Reader, store *signals.Store) {
	var rec ringbuf.Record
	for {
		if err := rd.ReadInto(&rec); err != nil {
			if errors.Is(err, ringbuf.ErrClosed) {
				return
			}
			p.o.Log.Warn("tcplisten: read ring buffer", "err", err)
			continue
		}
		p.mu.Lock()
		p.events++
		p.mu.Unlock()
		store.Notify()
	}
}

func (p *TCPListen) poll(ctx context.Context, objs *tcpListenObjects, tracker *target.Tracker, store *signals.Store) {
	interval := p.o.PollInterval
	if interval <= 0 {
		interval = 100 * time.Millisecond
	}
	tick := time.NewTicker(interval)
	defer tick.Stop()
	self := signals.L("probe", p.Name())
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		now := time.Now()
		p.mu.Lock()
		events := p.events
		p.mu.Unlock()
		store.Put(sigProbeEvents, self, float64(events), now)
		var zero uint32
		var lost uint64
		if err := objs.Lost.Lookup(&zero, &lost); err == nil {
			store.Put(sigProbeLost, self, float64(lost), now)
		}
		tgt, ok := tracker.Current()
		if !ok {
			continue
		}
		if err := p.readPorts(objs, uint32(tgt.NetnsIno), store, now); err != nil {
			p.o.Log.Warn("tcplisten: read port stats", "err", err)
		}
	}
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
func (p *TCPListen) Close() error {
	// Stop the goroutines before the maps they read go away: cancel the
	// poller, unblock the reader, wait, then free the kernel objects.
	p.mu.Lock()
	if p.cancel != nil {
		p.cancel()
	}
	var errs []error
	if p.rd != nil {
		errs = append(errs, p.rd.Close())
		p.rd = nil
	}
	p.mu.Unlock()
	p.wg.Wait()
	p.mu.Lock()
	defer p.mu.Unlock()
	return errors.Join(append(errs, p.closeLocked())...)
}

func (p *TCPListen) closeLocked() error {
	var errs []error
	if p.rd != nil {
		errs = append(errs, p.rd.Close())
		p.rd = nil
	}
	errs = append(errs, closeLinks(p.links))
	p.links = nil
	if p.objs != nil {
		errs = append(errs, p.objs.Close())
		p.objs = nil
	}
	return errors.Join(errs...)
}
