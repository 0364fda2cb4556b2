package probes

//go:generate go tool bpf2go -tags linux -target bpfel -type conn_event -type rst_key tcpLife ../bpf/tcp_life.c -- -I../bpf/headers -I/usr/include -Wall -Werror -O2

import (
	"bufio"
	"bytes"
	"compress/gzip"
	"context"
	"encoding/binary"
	"fmt"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/btf"
	"github.com/cilium/ebpf/ringbuf"

	"github.com/culprit-dev/culprit/signals"
	"github.com/culprit-dev/culprit/target"
)

var (
	sigConnCloses = &signals.Desc{Name: "tcp_connection_ends_total", Kind: signals.Counter,
		Help: "Established connections of the target's namespace that ended, by how: peer_close (the peer's FIN came first), local_close, reset_received (eBPF inet_sock_set_state, tcp_receive_reset)."}
	sigConnOpens = &signals.Desc{Name: "tcp_active_opens_seen_total", Kind: signals.Counter,
		Help: "Outbound connections of the target's namespace whose handshake completed (eBPF)."}
	sigConnHandshake = &signals.Desc{Name: "tcp_connect_seconds_total", Kind: signals.Counter,
		Help: "Time outbound handshakes took, summed (with tcp_active_opens_seen_total: the mean connect latency)."}
	sigResetsSent = &signals.Desc{Name: "tcp_resets_sent_total", Kind: signals.Counter,
		Help: "Resets sent by the target's namespace, by the kernel's reason (eBPF tcp_send_reset, enum sk_rst_reason): no_socket is a closed port, tcp_abort_on_* the application."}
)

// TCPLife watches how the target namespace's connections end and why it
// sends resets: see bpf/tcp_life.c.
type TCPLife struct {
	o      Options
	events *signals.ConnEvents
	running
	netns   uint32
	hz      float64
	counts  map[string]float64 // ends by kind, opens, handshake seconds
	reasons map[uint32]string
}

// NewTCPLife returns the probe, not yet loaded; events receives the
// connection events (bounded by its own size).
func NewTCPLife(o Options, events *signals.ConnEvents) *TCPLife {
	if events == nil {
		events = signals.NewConnEvents(1024)
	}
	return &TCPLife{o: o, events: events, counts: map[string]float64{}}
}

func (*TCPLife) Name() string { return "tcplife" }

func (*TCPLife) Lost() []string {
	return []string{
		"idle_timeout: the idle age at which peers close connections",
		"rst_storm: the kernel's reason for each reset sent (falls back to counters)",
	}
}

// Start loads and attaches the programs.
func (p *TCPLife) Start(ctx context.Context, tracker *target.Tracker, store *signals.Store) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	spec, err := loadTcpLife()
	if err != nil {
		return fmt.Errorf("tcplife: load spec: %w", err)
	}
	resize(spec, map[string]uint32{"conn_start": p.o.MaxEntries, "conn_events": p.o.RingBufferBytes})
	objs := &tcpLifeObjects{}
	ctx, err = p.start(ctx, "tcplife", spec, objs, func() []tracingProg {
		return []tracingProg{
			{"tp_btf/inet_sock_set_state", objs.CulpritLifeSetState},
			{"tp_btf/tcp_receive_reset", objs.CulpritLifeReceiveReset},
			{"tp_btf/tcp_send_reset", objs.CulpritLifeSendReset},
		}
	}, func() *ebpf.Map { return objs.ConnEvents })
	if err != nil {
		return err
	}
	p.hz = kernelHZ(p.o.Log)
	p.reasons = resetReasons()
	rd := p.rd
	p.spawn(func() { p.readEvents(rd) })
	p.spawn(func() { p.poll(ctx, objs, tracker, store) })
	return nil
}

func (p *TCPLife) readEvents(rd *ringbuf.Reader) {
	var ev tcpLifeConnEvent
	readRing("tcplife", rd, p.o.Log, func(raw []byte) {
		if err := binary.Read(bytes.NewReader(raw), binary.LittleEndian, &ev); err != nil {
			p.o.Log.Warn("tcplife: malformed event", "len", len(raw), "err", err)
			return
		}
		p.mu.Lock()
		ce, ok := p.convert(ev)
		if ok {
			if ce.Kind == signals.ConnOpened {
				p.counts["opened"]++
				p.counts["handshake"] += ce.Lifetime.Seconds()
			} else {
				p.counts[ce.Kind]++
			}
		}
		p.mu.Unlock()
		if ok {
			p.events.Add(ce)
		}
	})
}

func (p *TCPLife) convert(ev tcpLifeConnEvent) (signals.ConnEvent, bool) {
	var addr netip.Addr
	switch ev.Family {
	case 2: // AF_INET
		addr = netip.AddrFrom4([4]byte(ev.Raddr[:4]))
	case 10: // AF_INET6
		addr = netip.AddrFrom16(ev.Raddr).Unmap()
	default:
		return signals.ConnEvent{}, false
	}
	kind := map[uint8]string{1: signals.ConnPeerClose, 2: signals.ConnLocalClose, 3: signals.ConnResetReceived, 4: signals.ConnOpened}[ev.Kind]
	if kind == "" {
		return signals.ConnEvent{}, false
	}
	return signals.ConnEvent{
		T: time.Now(), Kind: kind, Remote: netip.AddrPortFrom(addr, ev.Rport).String(), LocalPort: int(ev.Lport),
		Idle:     time.Duration(float64(ev.IdleJiffies) / p.hz * float64(time.Second)),
		Lifetime: time.Duration(ev.LifetimeNs),
		Inode:    ev.Inode, Pid: int(ev.Pid),
	}, true
}

func (p *TCPLife) poll(ctx context.Context, objs *tcpLifeObjects, tracker *target.Tracker, store *signals.Store) {
	every(ctx, p.o.PollInterval, func(now time.Time) {
		tgt, ok := tracker.Current()
		if !ok {
			return
		}
		if ns := uint32(tgt.NetnsIno); ns != p.netns {
			if err := objs.TargetNetns.Put(uint32(0), ns); err != nil {
				p.o.Log.Warn("tcplife: set target netns", "err", err)
				return
			}
			p.mu.Lock()
			p.netns = ns
			clear(p.counts)
			p.mu.Unlock()
		}
		p.mu.Lock()
		for _, k := range []string{signals.ConnPeerClose, signals.ConnLocalClose, signals.ConnResetReceived} {
			store.Put(sigConnCloses, signals.L("how", k), p.counts[k], now)
		}
		store.Put(sigConnOpens, nil, p.counts["opened"], now)
		store.Put(sigConnHandshake, nil, p.counts["handshake"], now)
		events := p.counts["opened"] + p.counts[signals.ConnPeerClose] + p.counts[signals.ConnLocalClose] + p.counts[signals.ConnResetReceived]
		p.mu.Unlock()
		putProbeCounters(store, p.Name(), events, objs.Lost, now)
		var key tcpLifeRstKey
		var n uint64
		it := objs.RstSent.Iterate()
		for it.Next(&key, &n) {
			if key.Netns == p.netns {
				store.Put(sigResetsSent, signals.L("reason", p.reasonName(key.Reason)), float64(n), now)
			}
		}
		if err := it.Err(); err != nil {
			p.o.Log.Warn("tcplife: read resets", "err", err)
		}
	})
}

func (p *TCPLife) reasonName(r uint32) string {
	if n, ok := p.reasons[r]; ok {
		return n
	}
	return "reason_" + strconv.Itoa(int(r))
}

// resetReasons names enum sk_rst_reason's values from the running kernel's
// BTF, since their numbers may change between kernels.
func resetReasons() map[uint32]string {
	out := map[uint32]string{}
	spec, err := btf.LoadKernelSpec()
	if err != nil {
		return out
	}
	var e *btf.Enum
	if err := spec.TypeByName("sk_rst_reason", &e); err != nil {
		return out
	}
	for _, v := range e.Values {
		out[uint32(v.Value)] = strings.ToLower(strings.TrimPrefix(v.Name, "SK_RST_REASON_"))
	}
	return out
}

// kernelHZ is the jiffies rate, for converting idle ages: measured from
// /proc/timer_list over 200 ms, else CONFIG_HZ from /proc/config.gz, else
// 250 (the most common).
func kernelHZ(log interface{ Warn(string, ...any) }) float64 {
	if hz, ok := measureHZ(); ok {
		return hz
	}
	if hz, ok := configHZ(); ok {
		return hz
	}
	log.Warn("tcplife: kernel HZ unknown (no /proc/timer_list or /proc/config.gz); assuming 250: idle ages may be off")
	return 250
}

func readJiffies() (uint64, bool) {
	f, err := os.Open("/proc/timer_list")
	if err != nil {
		return 0, false
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), "jiffies: "); ok {
			n, err := strconv.ParseUint(strings.TrimSpace(v), 10, 64)
			return n, err == nil
		}
	}
	return 0, false
}

func measureHZ() (float64, bool) {
	j0, ok := readJiffies()
	t0 := time.Now()
	if !ok {
		return 0, false
	}
	time.Sleep(200 * time.Millisecond)
	j1, ok := readJiffies()
	if !ok || j1 <= j0 {
		return 0, false
	}
	raw := float64(j1-j0) / time.Since(t0).Seconds()
	// Round to the nearest CONFIG_HZ choice.
	best := 0.0
	for _, hz := range []float64{100, 250, 300, 1000} {
		if best == 0 || abs(raw-hz) < abs(raw-best) {
			best = hz
		}
	}
	return best, true
}

func abs(f float64) float64 {
	if f < 0 {
		return -f
	}
	return f
}

func configHZ() (float64, bool) {
	f, err := os.Open("/proc/config.gz")
	if err != nil {
		return 0, false
	}
	defer f.Close()
	zr, err := gzip.NewReader(f)
	if err != nil {
		return 0, false
	}
	sc := bufio.NewScanner(zr)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), "CONFIG_HZ="); ok {
			hz, err := strconv.ParseFloat(v, 64)
			return hz, err == nil && hz > 0
		}
	}
	return 0, false
}

// Close detaches the programs and frees their maps.
func (p *TCPLife) Close() error { return p.stop() }
