package probes

//go:generate go tool bpf2go -tags linux -target bpfel -type conn_event -type rst_key tcpLife ../bpf/tcp_life.c -- -I../bpf/headers -I/usr/include -Wall -Werror -O2

import (
	"bufio"
	"compress/gzip"
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"sort"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/btf"
	"github.com/cilium/ebpf/ringbuf"

	"github.com/culprit-dev/culprit/signals"
	"github.com/culprit-dev/culprit/workload"
)

// TCPLife watches how the target namespace's connections end and why it
// sends resets: see bpf/tcp_life.c.
type TCPLife struct {
	o      Options
	events *signals.ConnEvents
	running
	netns   uint32
	seen    atomic.Uint64    // connection events read: signals.ConnActivity
	ev      tcpLifeConnEvent // handleEvent's, under the ring reader's turn
	store   *signals.Store
	hz      float64
	counts  map[string]float64 // ends by kind, opens, handshake seconds
	reasons map[uint32]string
	owners  *workload.SocketOwners
	selfPID int
	// comms caches /proc/PID/comm of the processes events name, for
	// commTTL (a pid reused within it keeps the old name that long):
	// beside nginx flat out, reading it for each event of the load
	// generator's connections was a third of this probe's CPU. Only the
	// goroutine reading events uses it.
	comms map[int]commSeen
	// batched is batch_events as last set: events come in batches at
	// each poll, which needs no kick.
	batched atomic.Bool
	// Resets by reason and port, as read from the kernel (absolute), and
	// the ports that have series (ports are many when a neighbour is
	// port-scanned; only the busiest get their own).
	resets      map[resetKey]float64
	resetSeries map[resetKey]bool

	// Series through handles, and the reset map as last read (its
	// entries are only sorted and summed again when they changed).
	closeS             [3]cachedSeries // by how: peer_close, local_close, reset_received
	opensS, handshakeS cachedSeries
	counters           *probeCounters
	resetS             *seriesSet[resetKey]
	rstKeys            []tcpLifeRstKey
	rstVals            []uint64
	rstLast            map[tcpLifeRstKey]uint64
	rstSeen            int
	kick               kicker
	// The namespace's OutRsts (the netstat collector's) when the reset map
	// was last walked: every reset the probe counts is one of those, so
	// while it stands still the map cannot have changed.
	outRsts    float64
	rstWalkAt  time.Time
	haveOutRst bool
}

type resetKey struct {
	reason string
	port   string
}

// maxResetPorts bounds the ports of tcp_resets_sent_total.
const maxResetPorts = 32

// NewTCPLife returns the probe, not yet loaded; o.Conns receives the
// connection events (bounded by its own size).
func NewTCPLife(o Options) *TCPLife {
	events := o.Conns
	if events == nil {
		events = signals.NewConnEvents(1024)
	}
	owners := o.Owners
	if owners == nil {
		owners = workload.NewSocketOwners("/proc", workload.SocketOwnersOptions{})
	}
	return &TCPLife{o: o, events: events, counts: map[string]float64{}, owners: owners, selfPID: os.Getpid(),
		resets: map[resetKey]float64{}, resetSeries: map[resetKey]bool{},
		rstKeys: make([]tcpLifeRstKey, 256), rstVals: make([]uint64, 256), rstLast: map[tcpLifeRstKey]uint64{}, kick: newKicker()}
}

func (*TCPLife) Name() string { return signals.ProbeTCPLife }

// Start loads and attaches the programs.
func (p *TCPLife) Start(ctx context.Context, tracker *workload.Tracker, store *signals.Store) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.store = store
	spec, err := loadTcpLife()
	if err != nil {
		return fmt.Errorf("tcplife: load spec: %w", err)
	}
	resize(spec, map[string]uint32{"conn_start": p.o.MaxEntries, "rst_sent": p.o.MaxEntries, "conn_events": p.o.RingBufferBytes})
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
	p.spawn(func() { p.poll(ctx, objs, tracker, store, rd) })
	return nil
}

func (p *TCPLife) readEvents(rd *ringReader) {
	readRing("tcplife", rd, p.o.Log, p.handleEvent)
}

// drainEvents reads the events waiting in the ring (batched without a
// wake-up) in the poll's own goroutine, so that the poll that follows
// counts them. Left to the reading goroutine, which runs only once the
// poll yields, they were counted after it: a poll saw no new events while
// connections churned, stopped batching, and the next event woke the
// reader and the poll again, three wake-ups a tenth of a second where one
// would do.
func (p *TCPLife) drainEvents(rd *ringReader) {
	if err := rd.drain(p.handleEvent); err != nil && !errors.Is(err, ringbuf.ErrClosed) {
		p.o.Log.Warn("tcplife: read ring buffer", "err", err)
	}
}

// handleEvent counts one connection event and keeps it for the rules.
// Drains take turns (ringReader.drain), so ev is never shared. It runs
// outside the reader's lock, so it may take p.mu.
func (p *TCPLife) handleEvent(raw []byte) {
	ev := &p.ev
	if !copyRecord(ev, raw) {
		p.o.Log.Warn("tcplife: malformed event", "len", len(raw))
		return
	}
	p.mu.Lock()
	ce, ok := p.convert(*ev)
	p.mu.Unlock()
	if ok {
		ce.Owner = p.ownerOf(ce)
	}
	p.mu.Lock()
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
		p.seen.Add(1)
		if !p.batched.Load() {
			p.kick.Kick() // the counts go to the store at once
		}
	}
}

// lookFor says how far an event's unknown inode is worth reading fd
// tables for. A peer's close or a reset reaches a socket its holder still
// has, and is what the idle-timeout finding reads the owner of: when the
// connection carried data and findings may be about other processes
// (others), every process's tables are read (a rescan of the target's,
// and at most every OthersRescan of every other process's: one readlink
// per descriptor in the namespace); otherwise (target scope, a neighbour's
// health checks, connection churn) the target's only, whose cost follows
// the target's descriptors. In target scope the full scans bought only
// the label of a client's socket that no finding may be about: beside
// nginx under wrk (150 reconnects a second) and a neighbour's 10,000
// descriptors they were a quarter of the agent's CPU. An open is labelled by the
// process that connected; a local close comes after close() took the
// descriptor away, so no fd table holds it any more (the rescans cost a
// full scan per second of a neighbour's connection churn and found
// nothing).
func lookFor(e signals.ConnEvent, others bool) (look, everyone bool) {
	if e.Kind != signals.ConnPeerClose && e.Kind != signals.ConnResetReceived {
		return false, false
	}
	return true, others && e.Bytes > 2
}

// clientOfTarget reports whether an event is about the client side of a
// connection to one of the target's listening ports over loopback: a
// socket of a local client (a load generator, a health check, a sidecar
// proxy) whose server side is the target's. No finding reads the owner of
// such a close: idle_timeout leaves out every connection to a server of
// the namespace reached over loopback (rules/idle_timeout.go localServer),
// whoever the client is. So its fd tables are not read for it: beside
// nginx under wrk, each of wrk's reconnects (~150 a second, closed by
// nginx after keepalive_requests) cost a rescan of nginx's tables every
// TargetRescan, 260 readlinkat calls a second and a twentieth of the
// agent's CPU, for a label nothing used. Its owner is then what the index
// already knows, else "unknown": never another process's name.
func (p *TCPLife) clientOfTarget(e signals.ConnEvent) bool {
	if p.serverSide(e) {
		return false
	}
	ap, err := netip.ParseAddrPort(e.Remote)
	if err != nil || !ap.Addr().Unmap().IsLoopback() {
		return false
	}
	return p.owners.IsTargetPort(ap.Port())
}

// serverSide reports whether an event is about the server side of a
// connection to one of the target's listening ports.
func (p *TCPLife) serverSide(e signals.ConnEvent) bool {
	return e.LocalPort > 0 && e.LocalPort < 1<<16 && p.owners.IsTargetPort(uint16(e.LocalPort))
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
	var kind string
	switch ev.Kind {
	case 1:
		kind = signals.ConnPeerClose
	case 2:
		kind = signals.ConnLocalClose
	case 3:
		kind = signals.ConnResetReceived
	case 4:
		kind = signals.ConnOpened
	default:
		return signals.ConnEvent{}, false
	}
	return signals.ConnEvent{
		T: time.Now(), Kind: kind, Remote: netip.AddrPortFrom(addr, ev.Rport).String(), LocalPort: int(ev.Lport),
		Idle:     time.Duration(float64(ev.IdleJiffies) / p.hz * float64(time.Second)),
		Lifetime: time.Duration(ev.LifetimeNs),
		Inode:    ev.Inode, Pid: int(ev.Pid), Bytes: ev.DataBytes,
	}, true
}

// ownerOf says whose connection an event is about: the process that
// held its socket (by inode, reading fd tables again when the inode is new
// and the event is one a finding reads the owner of: see lookFor), else
// the process that connected it. The server side of a connection to one of
// the target's listening ports is the target's without a look at any fd
// table, as the sockets collector counts it (a connection belongs to its
// listener's owner): beside nginx under wrk, whose clients often close
// first, reading the target's tables again for each new socket of theirs
// was 3 % of the agent's CPU (a rescan a second, ~150 readlinks).
func (p *TCPLife) ownerOf(e signals.ConnEvent) string {
	server := p.serverSide(e)
	if e.Inode != 0 && e.Inode < 1<<32 {
		ino := uint32(e.Inode)
		o, ok := p.owners.Owner(ino)
		if look, everyone := lookFor(e, p.o.OthersOwners); !ok && look && !server && !p.clientOfTarget(e) {
			if everyone {
				p.owners.Refresh(time.Now(), []uint32{ino})
			} else {
				p.owners.RefreshTarget(time.Now(), []uint32{ino})
			}
			o, ok = p.owners.Owner(ino)
		}
		if ok && o.Role != workload.RoleUnknown {
			return o.Label()
		}
	}
	// Not in the index (a new socket, or one gone before a scan): one on a
	// port the target listens on is its server side. The pid of such an
	// event is whoever ran when it ended (often a softirq's), not the
	// owner.
	if server {
		return "target"
	}
	// The pid of a peer's close or a reset is whoever ran when the packet
	// came (a softirq's, on loopback the sender's), not the socket's
	// holder: it names no owner.
	if e.Pid != 0 && e.Kind != signals.ConnPeerClose && e.Kind != signals.ConnResetReceived {
		switch {
		case p.owners.IsTarget(e.Pid):
			return "target"
		case e.Pid == p.selfPID:
			return "agent"
		}
		if c, ok := p.comms[e.Pid]; ok && time.Since(c.at) < commTTL {
			return c.comm
		}
		if b, err := os.ReadFile("/proc/" + strconv.Itoa(e.Pid) + "/comm"); err == nil {
			if p.comms == nil || len(p.comms) >= maxComms {
				p.comms = make(map[int]commSeen)
			}
			c := commSeen{comm: strings.TrimSpace(string(b)), at: time.Now()}
			p.comms[e.Pid] = c
			return c.comm
		}
	}
	return "unknown"
}

// commSeen is a process's name as read at.
type commSeen struct {
	comm string
	at   time.Time
}

const (
	commTTL  = 10 * time.Second
	maxComms = 1024 // then the cache starts over
)

// poll is paced: every probes.poll_interval while connections end or
// resets are sent, slowing to probes.idle_poll_interval while nothing
// happens; a connection event wakes it at once. A cycle is one batch read
// of the reset map (a few µs hot, ~100 µs cold) when the namespace's
// OutRsts moved since the last one (or rstWalkEvery passed), and ring
// writes of what changed; the resets are ranked by port again only when
// the map changed.
func (p *TCPLife) poll(ctx context.Context, objs *tcpLifeObjects, tracker *workload.Tracker, store *signals.Store, rd *ringReader) {
	for i, how := range []string{signals.ConnPeerClose, signals.ConnLocalClose, signals.ConnResetReceived} {
		p.closeS[i] = cachedSeries{h: store.Handle(signals.TCPConnectionEndsTotal, signals.L("how", how))}
	}
	p.opensS = cachedSeries{h: store.Handle(signals.TCPActiveOpensSeenTotal, nil)}
	p.handshakeS = cachedSeries{h: store.Handle(signals.TCPConnectSecondsTotal, nil)}
	p.counters = newProbeCounters(store, p.Name())
	p.resetS = newSeriesSet[resetKey](store, signals.TCPResetsSentTotal)
	var lastEvents float64
	once := func(now time.Time) bool {
		tgt, ok := tracker.Current()
		if !ok {
			return false
		}
		p.owners.SetTarget(tgt)
		if ns := uint32(tgt.NetnsIno); ns != p.netns {
			if err := objs.TargetNetns.Put(uint32(0), ns); err != nil {
				p.o.Log.Warn("tcplife: set target netns", "err", err)
				return false
			}
			// Another namespace's resets are not a continuation.
			emptyMap[tcpLifeRstKey](objs.RstSent)
			store.SetActivity(signals.ConnActivity(uint64(p.netns)), nil)
			store.SetActivity(signals.ConnActivity(uint64(ns)), p.seen.Load)
			p.mu.Lock()
			p.netns = ns
			clear(p.counts)
			clear(p.resets)
			p.mu.Unlock()
			p.resetS.reset()
			clear(p.resetSeries)
			clear(p.rstLast)
			p.haveOutRst = false
		}
		p.mu.Lock()
		for i, k := range []string{signals.ConnPeerClose, signals.ConnLocalClose, signals.ConnResetReceived} {
			p.closeS[i].put(p.counts[k], now)
		}
		p.opensS.put(p.counts["opened"], now)
		p.handshakeS.put(p.counts["handshake"], now)
		events := p.counts["opened"] + p.counts[signals.ConnPeerClose] + p.counts[signals.ConnLocalClose] + p.counts[signals.ConnResetReceived]
		p.mu.Unlock()
		p.counters.put(events, objs.Lost, now)
		changed := events != lastEvents
		lastEvents = events
		if out, ok := store.Latest(signals.TCPOutRstsTotal, nil); ok && p.haveOutRst && out.V == p.outRsts && now.Sub(p.rstWalkAt) < rstWalkEvery {
			// No reset sent in the namespace since the last walk.
			p.resetS.begin()
			p.resetS.touch(now)
			p.resetS.end()
			return changed
		} else if ok {
			p.outRsts, p.haveOutRst = out.V, true
		}
		p.rstWalkAt = now
		return p.readResets(objs, now) || changed
	}
	paced(ctx, p.o, store, p.kick, func(now time.Time) bool {
		p.drainEvents(rd) // the events batched since the last poll
		active := once(now)
		p.batch(objs, rd, active)
		return active
	})
}

// batch tells the programs whether to send events without waking the
// reader (batch_events): yes while the next poll comes after
// probes.poll_interval, since it flushes them; no while polls idle, so
// that an event wakes the reader and the poller at once. Cleared before
// the flush that follows, so an event sent without a wake-up just before
// waits at most until the next poll.
func (p *TCPLife) batch(objs *tcpLifeObjects, rd *ringReader, on bool) {
	if on == p.batched.Load() {
		return
	}
	v := uint32(0)
	if on {
		v = 1
	}
	if err := objs.BatchEvents.Set(v); err != nil {
		p.o.Log.Debug("tcplife: set batch_events", "err", err)
		return
	}
	p.batched.Store(on)
	if !on {
		p.drainEvents(rd)
	}
}

// rstWalkEvery is how often the reset map is walked even while the
// namespace's OutRsts stands still.
const rstWalkEvery = 10 * time.Second

// readResets writes tcp_resets_sent_total by reason and port: the busiest
// maxResetPorts ports by name, the rest summed as "other". Counts are
// absolute in the kernel; a key the LRU map evicted and that comes back
// starts again from 1, which readers take as a counter reset. It reports
// whether the map changed since the last read.
func (p *TCPLife) readResets(objs *tcpLifeObjects, now time.Time) bool {
	type entry struct {
		reason string
		port   uint16
		n      uint64
	}
	changed := false
	n := 0
	err := batchEach(objs.RstSent, p.rstKeys, p.rstVals, func(k *tcpLifeRstKey, v *uint64) {
		n++
		if last, ok := p.rstLast[*k]; !ok || last != *v {
			changed = true
		}
	})
	if err != nil {
		p.o.Log.Warn("tcplife: read resets", "err", err)
		return false
	}
	if n != p.rstSeen {
		changed = true
	}
	if !changed {
		// The same counts: write them again only when refreshEvery says.
		p.resetS.begin()
		for k, v := range p.resets {
			p.resetS.put(k, nil, v, now)
		}
		p.resetS.end()
		return false
	}
	// Read again, keeping what was read for the next poll's comparison.
	clear(p.rstLast)
	var all []entry
	err = batchEach(objs.RstSent, p.rstKeys, p.rstVals, func(k *tcpLifeRstKey, v *uint64) {
		if len(p.rstLast) < 1<<16 {
			p.rstLast[*k] = *v
		}
		all = append(all, entry{p.reasonName(k.Reason), k.Lport, *v})
	})
	if err != nil {
		p.o.Log.Warn("tcplife: read resets", "err", err)
		return false
	}
	p.rstSeen = len(all)
	byPort := map[uint16]uint64{}
	for _, e := range all {
		byPort[e.port] += e.n
	}
	ports := make([]uint16, 0, len(byPort))
	for port := range byPort {
		ports = append(ports, port)
	}
	sort.Slice(ports, func(i, j int) bool {
		if byPort[ports[i]] != byPort[ports[j]] {
			return byPort[ports[i]] > byPort[ports[j]]
		}
		return ports[i] < ports[j]
	})
	top := map[uint16]bool{}
	for i, port := range ports {
		if i < maxResetPorts {
			top[port] = true
		}
	}
	cur := map[resetKey]float64{}
	for _, e := range all {
		port := "other"
		if top[e.port] {
			port = strconv.Itoa(int(e.port))
		}
		cur[resetKey{e.reason, port}] += float64(e.n)
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	p.resetS.begin()
	for k, v := range cur {
		p.resetS.put(k, func() signals.Labels { return signals.L("reason", k.reason, "port", k.port) }, v, now)
		p.resetSeries[k] = true
	}
	p.resetS.end()
	for k := range p.resetSeries {
		if _, ok := cur[k]; !ok {
			delete(p.resetSeries, k)
		}
	}
	p.resets = cur
	return true
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
func (p *TCPLife) Close() error {
	err := p.stop()
	p.mu.Lock()
	store, ns := p.store, p.netns
	p.mu.Unlock()
	if store != nil {
		// Readers then assume anything may have happened.
		store.SetActivity(signals.ConnActivity(uint64(ns)), nil)
	}
	return err
}
