package probes

//go:generate go tool bpf2go -tags linux -target bpfel -type owned_sock -type connect_key -type accept_key sockCalls ../bpf/sock_calls.c -- -I../bpf/headers -I/usr/include -Wall -Werror -O2 -mcpu=v3

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"runtime"
	"slices"
	"strconv"
	"syscall"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"golang.org/x/sys/unix"

	"github.com/culprit-dev/culprit/signals"
	"github.com/culprit-dev/culprit/workload"
)

// SockCallsOptions configure the sockcalls probe. Options.MaxEntries
// bounds the per-port accept and per-remote connect maps.
type SockCallsOptions struct {
	Options
	// MaxSockets bounds the map of the target's sockets (LRU: the least
	// recently active are forgotten first).
	MaxSockets uint32
	// MaxRemotes bounds the remote label: the first MaxRemotes remotes get
	// their own series, later ones count as remote="other".
	MaxRemotes int
	// AcceptsAlways keeps the sys_exit program that counts accepts
	// attached all the time (sockcalls.accepts = "always"); otherwise it
	// is attached while a listener of the target fills up
	// (Store.QueueFilling) and AcceptsLinger after.
	AcceptsAlways bool
	// AcceptsLinger is how long accepts are still counted after the last
	// poll that wanted them (sockcalls.accepts_linger).
	AcceptsLinger time.Duration
	// UnreadAlways keeps the socket hooks that watch for unread data
	// attached all the time (sockcalls.unread = "always"); otherwise they
	// are attached while a thread of the target sleeps where work may wait
	// for it (Store.WorkerBlocked) and UnreadLinger after.
	UnreadAlways bool
	// UnreadLinger is how long unread data is still watched after the
	// last poll that wanted it (sockcalls.unread_linger).
	UnreadLinger time.Duration
}

// UnreadSocket is a socket of the target with data waiting unread.
type UnreadSocket struct {
	Pid       int // the process that accepted, connected or first read it
	LocalPort int
	Remote    string // ip:port
	Age       time.Duration
}

// maxUnreadListed bounds what Unread returns.
const maxUnreadListed = 16

// SockCalls watches the target's own accepts, connects and unread data:
// see bpf/sock_calls.c.
type SockCalls struct {
	o SockCallsOptions
	running
	group group

	// The kernel counts per (tgid, key) in LRU maps that may evict and
	// restart a count; these turn them into totals that only grow.
	accepts  deltas[sockCallsAcceptKey]
	connects deltas[sockCallsConnectKey]
	acceptN  map[int]float64
	connN    map[string]float64
	errN     map[[2]string]float64
	remotes  map[netip.AddrPort]string // remotes with a series of their own

	unread []UnreadSocket // at the last poll, oldest first; under mu

	// Series, through handles: written when they change (and
	// refreshEvery otherwise).
	acceptS  *seriesSet[int]
	connS    *seriesSet[string]
	errS     *seriesSet[[2]string]
	oldestS  cachedSeries
	waitingS cachedSeries
	sinceS   cachedSeries
	watchedS cachedSeries

	// The sys_exit program, attached only while accepts are evidence
	// (countAccepts); touched by the poll goroutine alone, and by Close
	// after it ended.
	sysExitProg *ebpf.Program
	sysExit     link.Link
	countedFrom time.Time // since when every accept is counted; zero: not counted
	wantedAt    time.Time // the last poll that wanted accepts counted
	attachErr   bool      // an attach failed (said once)

	// The two socket hooks, attached only while unread data is evidence
	// (watchUnread), and the program that marks the data queued then;
	// touched by the poll goroutine alone, and by Close after it ended.
	unreadProgs    []tracingProg
	seedProg       *ebpf.Program
	unreadLinks    []link.Link
	watchedFrom    time.Time // since when unread data is watched; zero: not watched
	unreadWantedAt time.Time // the last poll that wanted it watched
	unreadErr      bool      // an attach failed (said once)

	// changes says which maps moved since their last walk; waiting are
	// the group's sockets with data unread at the last walk of the
	// waiting map (their ages grow while it stands still); groupGen is the
	// group membership the walks were filtered with.
	changes  *changes
	waiting  []waitingSock
	groupGen uint64

	// Batch buffers, reused every poll.
	waitKeys []uint64
	waitVals []uint64
	accKeys  []sockCallsAcceptKey
	accVals  []uint64
	connKeys []sockCallsConnectKey
	connVals []uint64
}

// writeTo makes the series the probe's polls write into store.
func (p *SockCalls) writeTo(store *signals.Store) {
	p.acceptS = newSeriesSet[int](store, signals.ProcessAcceptsTotal)
	p.connS = newSeriesSet[string](store, signals.ProcessConnectsTotal)
	p.errS = newSeriesSet[[2]string](store, signals.ProcessConnectErrorsTotal)
	p.oldestS = cachedSeries{h: store.Handle(signals.ProcessUnreadOldestSeconds, nil)}
	p.waitingS = cachedSeries{h: store.Handle(signals.ProcessUnreadSockets, nil)}
	p.sinceS = cachedSeries{h: store.Handle(signals.ProcessAcceptsCountedSince, nil)}
	p.watchedS = cachedSeries{h: store.Handle(signals.ProcessUnreadWatchedSince, nil)}
}

// NewSockCalls returns the probe, not yet loaded.
func NewSockCalls(o SockCallsOptions) *SockCalls {
	if o.MaxRemotes <= 0 {
		o.MaxRemotes = 64
	}
	if o.AcceptsLinger <= 0 {
		o.AcceptsLinger = defaultAcceptsLinger
	}
	if o.UnreadLinger <= 0 {
		o.UnreadLinger = defaultUnreadLinger
	}
	const batch = 256
	return &SockCalls{
		o:        o,
		accepts:  newDeltas[sockCallsAcceptKey](),
		connects: newDeltas[sockCallsConnectKey](),
		acceptN:  map[int]float64{},
		connN:    map[string]float64{},
		errN:     map[[2]string]float64{},
		remotes:  map[netip.AddrPort]string{},
		waitKeys: make([]uint64, batch), waitVals: make([]uint64, batch),
		accKeys: make([]sockCallsAcceptKey, batch), accVals: make([]uint64, batch),
		connKeys: make([]sockCallsConnectKey, batch), connVals: make([]uint64, batch),
	}
}

func (*SockCalls) Name() string { return signals.ProbeSockCalls }

// Start loads and attaches the programs.
func (p *SockCalls) Start(ctx context.Context, tracker *workload.Tracker, store *signals.Store) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if runtime.GOARCH != "amd64" {
		// bpf/sock_calls.c tests x86-64 system call numbers and registers.
		return fmt.Errorf("sockcalls: supported on amd64 only, not %s", runtime.GOARCH)
	}
	spec, err := loadSockCalls()
	if err != nil {
		return fmt.Errorf("sockcalls: load spec: %w", err)
	}
	resize(spec, map[string]uint32{"accepts": p.o.MaxEntries, "connects": p.o.MaxEntries, "owned": p.o.MaxSockets, "waiting": p.o.MaxSockets})
	objs := &sockCallsObjects{}
	ctx, err = p.start(ctx, "sockcalls", spec, objs, func() []tracingProg {
		// The state changes; sys_exit and the socket hooks come later,
		// and only while they are wanted (countAccepts, watchUnread).
		return []tracingProg{
			{"tp_btf/inet_sock_set_state", objs.CulpritSockSetState},
		}
	}, nil)
	if err != nil {
		return err
	}
	p.sysExitProg = objs.CulpritSockSysExit
	p.unreadProgs = []tracingProg{
		{"tp_btf/sk_data_ready", objs.CulpritSockDataReady},
		{"tp_btf/sock_recv_length", objs.CulpritSockRecvLength},
	}
	p.seedProg = objs.CulpritSockSeed
	p.writeTo(store)
	p.changes = newChanges(objs.Changes, 4)
	// Polled every probes.poll_interval, not paced: accept_overflow tells
	// a stalled app from a slow one by the accepts made while a queue was
	// full, and an accept read a second late would be dated inside the
	// stall; blocking_worker measures how long data waited unread from the
	// same samples. A cycle is three batch reads (the accepts and connects
	// maps, a few µs each; the socket map, ~11 µs for 16384 buckets) and
	// ring writes of what changed: no allocation unless data waits unread.
	// A map whose change counter stood still is not walked at all: its
	// series are written again from what was read (every refreshEvery).
	// An accept, a connect or data arriving on the target's sockets wakes
	// the clock while it idles, so they are read at the fast cadence.
	if err := p.startWakes("sockcalls", objs.Wakes, p.o.Log, nil); err != nil {
		p.release()
		return err
	}
	p.spawn(func() {
		every(ctx, p.o.PollInterval, func(now time.Time) { p.poll(objs, tracker, store, now) })
	})
	return nil
}

// Unread returns the target's sockets whose data had waited unread for
// longer than a poll interval at the last poll, oldest first (at most 16).
// Rules use it to name the connections an event loop left waiting.
func (p *SockCalls) Unread() []UnreadSocket {
	p.mu.Lock()
	defer p.mu.Unlock()
	return slices.Clone(p.unread)
}

func (p *SockCalls) poll(objs *sockCallsObjects, tracker *workload.Tracker, store *signals.Store, now time.Time) {
	tgt, ok := tracker.Current()
	if !ok {
		return
	}
	changed, err := p.group.update(objs.TargetTgids, tgt.PID, now)
	if err != nil {
		p.o.Log.Warn("sockcalls: set target", "err", err)
		return
	}
	if changed {
		p.reset(store)
		if !p.countedFrom.IsZero() {
			// The new target's accepts count from its arrival.
			p.countedFrom = time.Now()
		}
	}
	p.countAccepts(store, now)
	p.watchUnread(objs, store, now)
	p.changes.arm(changedArmed)
	if p.group.gen != p.groupGen {
		// Other processes count now: every map is read again.
		p.groupGen = p.group.gen
		for i := range 3 {
			p.changes.forget(i)
		}
	}
	if err := p.readAccepts(objs, store, now); err != nil {
		p.o.Log.Warn("sockcalls: read accepts", "err", err)
	}
	if err := p.readConnects(objs, store, now); err != nil {
		p.o.Log.Warn("sockcalls: read connects", "err", err)
	}
	if err := p.readUnread(objs, store, now); err != nil {
		p.o.Log.Warn("sockcalls: read sockets", "err", err)
	}
}

// defaultAcceptsLinger is sockcalls.accepts_linger's default: longer than
// the accept_overflow rule's window (10 s), so a finding judged over its
// window read accepts counted all through it.
const defaultAcceptsLinger = 30 * time.Second

// countAccepts attaches the sys_exit program while accepts are evidence,
// and detaches it after. Attached, it runs at the exit of every system
// call of the host and moves them all to the kernel's slower traced path:
// beside nginx flat out (1.4 million system calls a second) that cost 4 %
// of its requests. Accepts matter to the rules only while a listener's
// queue fills up (an app that accepts nothing then is stalled; one that
// accepts is draining a burst), which the accept-queue collector tells the
// store (FillingQueue: half full, full, or dropping); they are counted
// from then until AcceptsLinger after the last such poll. The time since
// when is in process_accepts_counted_since_seconds, which the rules read
// before they take a count of 0 for "no accept".
func (p *SockCalls) countAccepts(store *signals.Store, now time.Time) {
	if p.o.AcceptsAlways || store.QueueFilling(now) {
		p.wantedAt = now
	}
	wanted := !p.wantedAt.IsZero() && now.Sub(p.wantedAt) < p.o.AcceptsLinger
	switch {
	case wanted && p.sysExit == nil:
		l, err := link.AttachTracing(link.TracingOptions{Program: p.sysExitProg})
		if err != nil {
			if !p.attachErr {
				p.o.Log.Warn("sockcalls: attach tp_btf/sys_exit: accepts are not counted", "err", err)
				p.attachErr = true
			}
			break
		}
		p.sysExit, p.countedFrom = l, time.Now()
	case !wanted && p.sysExit != nil:
		if err := p.sysExit.Close(); err != nil {
			p.o.Log.Warn("sockcalls: detach tp_btf/sys_exit", "err", err)
		}
		p.sysExit, p.countedFrom = nil, time.Time{}
	}
	p.sinceS.put(unixSeconds(p.countedFrom), now)
}

// unixSeconds is t as a Unix time in seconds, 0 for the zero time (not
// counted, not watched).
func unixSeconds(t time.Time) float64 {
	if t.IsZero() {
		return 0
	}
	return float64(t.UnixNano()) / 1e9
}

// reset starts the counts over for a new target, whose series must not
// continue the old one's.
func (p *SockCalls) reset(store *signals.Store) {
	p.accepts.reset()
	p.connects.reset()
	clear(p.acceptN)
	clear(p.connN)
	clear(p.errN)
	clear(p.remotes)
	p.acceptS.reset()
	p.connS.reset()
	p.errS.reset()
	p.mu.Lock()
	p.unread = nil
	p.mu.Unlock()
}

// Change counters of bpf/sock_calls.c, and its HOOKED flag.
const (
	changedAccepts = iota
	changedConnects
	changedWaiting
	changedArmed
	hookedFlag
)

func (p *SockCalls) readAccepts(objs *sockCallsObjects, store *signals.Store, now time.Time) error {
	if !p.changes.moved(changedAccepts) {
		p.acceptS.touch(now)
		return nil
	}
	p.accepts.begin()
	err := batchEach(objs.Accepts, p.accKeys, p.accVals, func(k *sockCallsAcceptKey, n *uint64) {
		if p.group.has(k.Tgid) {
			p.acceptN[int(k.Port)] += float64(p.accepts.add(*k, *n))
		}
	})
	p.accepts.end()
	if err != nil {
		p.changes.forget(changedAccepts)
		return err
	}
	for port, n := range p.acceptN {
		p.acceptS.put(port, func() signals.Labels { return signals.L("port", strconv.Itoa(port)) }, n, now)
	}
	return nil
}

func (p *SockCalls) readConnects(objs *sockCallsObjects, store *signals.Store, now time.Time) error {
	if !p.changes.moved(changedConnects) {
		p.connS.touch(now)
		p.errS.touch(now)
		return nil
	}
	p.connects.begin()
	err := batchEach(objs.Connects, p.connKeys, p.connVals, func(k *sockCallsConnectKey, n *uint64) {
		if !p.group.has(k.Tgid) {
			return
		}
		ap, ok := addrPort(k.Family, k.Addr, k.Port)
		if !ok {
			return
		}
		d := float64(p.connects.add(*k, *n))
		remote := p.remoteLabel(ap)
		if k.Err == 0 {
			p.connN[remote] += d
		} else {
			p.errN[[2]string{errnoName(k.Err), remote}] += d
		}
	})
	p.connects.end()
	if err != nil {
		p.changes.forget(changedConnects)
		return err
	}
	for remote, n := range p.connN {
		p.connS.put(remote, func() signals.Labels { return signals.L("remote", remote) }, n, now)
	}
	for k, n := range p.errN {
		p.errS.put(k, func() signals.Labels { return signals.L("errno", k[0], "remote", k[1]) }, n, now)
	}
	return nil
}

// remoteLabel names a remote, or "other" once MaxRemotes are named: the
// first remotes seen keep their series for as long as the target does.
func (p *SockCalls) remoteLabel(ap netip.AddrPort) string {
	if s, ok := p.remotes[ap]; ok {
		return s
	}
	if len(p.remotes) >= p.o.MaxRemotes {
		return "other"
	}
	s := ap.String()
	p.remotes[ap] = s
	return s
}

// waitingSock is a socket of the group with data unread, from the
// waiting map and its entry in owned.
type waitingSock struct {
	since uint64 // bpf_ktime_get_ns
	sockCallsOwnedSock
}

// defaultUnreadLinger is sockcalls.unread_linger's default: the rules
// judge a sleep when it ends, from the samples taken during it; a few
// seconds keep the hooks from flapping between the sleeps of a thread that
// blocks again and again.
const defaultUnreadLinger = 10 * time.Second

// watchUnread attaches the socket hooks (bpf/sock_calls.c sk_data_ready
// and sock_recv_length) while data left unread is evidence, and detaches
// them after. Attached, they run for every packet and every read of every
// socket of the host, ~100 ns each: beside nginx flat out, ~6 % of a core
// and ~3 % of its requests. Unread data matters to the rules only while a
// thread of the target sleeps where work may wait for it (a blocking call,
// or an event loop's sleep outside its idle wait: the sched probe says so
// in Store.WorkerBlocked); it is watched from then until UnreadLinger
// after the last such poll. Data already queued when the hooks attach is
// marked as waiting since then (culprit_sock_seed): its age is a lower
// bound. process_unread_watched_since_seconds says since when.
func (p *SockCalls) watchUnread(objs *sockCallsObjects, store *signals.Store, now time.Time) {
	if p.o.UnreadAlways || store.WorkerBlocked(now) {
		p.unreadWantedAt = now
	}
	wanted := !p.unreadWantedAt.IsZero() && now.Sub(p.unreadWantedAt) < p.o.UnreadLinger
	switch {
	case wanted && p.unreadLinks == nil:
		if err := p.attachUnread(objs); err != nil {
			if !p.unreadErr {
				p.o.Log.Warn("sockcalls: unread data is not watched", "err", err)
				p.unreadErr = true
			}
			break
		}
		p.watchedFrom = time.Now()
	case !wanted && p.unreadLinks != nil:
		if err := setFlag(objs.Changes, hookedFlag, 0); err != nil {
			p.o.Log.Warn("sockcalls: clear the hooked flag", "err", err)
		}
		for _, l := range p.unreadLinks {
			if err := l.Close(); err != nil {
				p.o.Log.Warn("sockcalls: detach a socket hook", "err", err)
			}
		}
		p.unreadLinks, p.watchedFrom = nil, time.Time{}
	}
	p.watchedS.put(unixSeconds(p.watchedFrom), now)
}

// attachUnread empties the waiting map, whose entries are stale from the
// last time the hooks were attached (reads since went unseen), attaches
// the hooks, says so in the HOOKED flag, and marks the data queued now as
// waiting since now (the seed iterator over owned).
func (p *SockCalls) attachUnread(objs *sockCallsObjects) error {
	emptyMap[uint64](objs.Waiting)
	p.waiting = p.waiting[:0]
	p.changes.forget(changedWaiting)
	links, err := attachTracing("sockcalls", p.unreadProgs...)
	if err != nil {
		return err
	}
	if err := setFlag(objs.Changes, hookedFlag, 1); err != nil {
		for _, l := range links {
			_ = l.Close()
		}
		return fmt.Errorf("set the hooked flag: %w", err)
	}
	p.unreadLinks = links
	seed, err := link.AttachIter(link.IterOptions{Program: p.seedProg})
	if err != nil {
		// Watched all the same: data queued now counts from its
		// next arrival or read.
		p.o.Log.Warn("sockcalls: seed the waiting map", "err", err)
		return nil
	}
	defer seed.Close()
	start := time.Now()
	defer func() { p.o.Log.Debug("sockcalls: unread data watched", "seed", time.Since(start)) }()
	rd, err := seed.Open()
	if err != nil {
		p.o.Log.Warn("sockcalls: seed the waiting map", "err", err)
		return nil
	}
	defer rd.Close()
	if _, err := io.Copy(io.Discard, rd); err != nil {
		p.o.Log.Warn("sockcalls: seed the waiting map", "err", err)
	}
	return nil
}

// readUnread reads the waiting map, while it is watched, and the owners
// of its sockets (a lookup each: only while a thread sleeps with data
// waiting do they add up).
func (p *SockCalls) readUnread(objs *sockCallsObjects, store *signals.Store, now time.Time) error {
	if p.watchedFrom.IsZero() {
		p.waiting = p.waiting[:0]
	} else if p.changes.moved(changedWaiting) {
		p.waiting = p.waiting[:0]
		err := batchEach(objs.Waiting, p.waitKeys, p.waitVals, func(k *uint64, since *uint64) {
			if len(p.waiting) >= int(p.o.MaxSockets) {
				return
			}
			var o sockCallsOwnedSock
			if objs.Owned.Lookup(*k, &o) == nil && p.group.has(o.Tgid) {
				p.waiting = append(p.waiting, waitingSock{*since, o})
			}
		})
		if err != nil {
			p.changes.forget(changedWaiting)
			return err
		}
	}
	// The ages grow with the time even while the map stands still.
	nowMono := uint64(monotonicNow())
	var (
		oldest  time.Duration
		waiting int
		list    []UnreadSocket
	)
	for i := range p.waiting {
		v := &p.waiting[i]
		if nowMono <= v.since {
			continue
		}
		age := time.Duration(nowMono - v.since)
		oldest = max(oldest, age)
		if age <= p.o.PollInterval {
			continue
		}
		waiting++
		ap, _ := addrPort(v.Family, v.Raddr, v.Rport)
		list = append(list, UnreadSocket{Pid: int(v.Tgid), LocalPort: int(v.Lport), Remote: ap.String(), Age: age})
	}
	slices.SortFunc(list, func(a, b UnreadSocket) int { return int(b.Age - a.Age) })
	if len(list) > maxUnreadListed {
		list = list[:maxUnreadListed]
	}
	p.mu.Lock()
	p.unread = list
	p.mu.Unlock()
	p.oldestS.put(oldest.Seconds(), now)
	p.waitingS.put(float64(waiting), now)
	return nil
}

// addrPort reads a kernel address (AF_INET: the first 4 bytes).
func addrPort(family uint8, addr [16]uint8, port uint16) (netip.AddrPort, bool) {
	switch family {
	case unix.AF_INET:
		return netip.AddrPortFrom(netip.AddrFrom4([4]byte(addr[:4])), port), true
	case unix.AF_INET6:
		return netip.AddrPortFrom(netip.AddrFrom16(addr).Unmap(), port), true
	}
	return netip.AddrPort{}, false
}

func errnoName(e uint16) string {
	if n := unix.ErrnoName(syscall.Errno(e)); n != "" {
		return n
	}
	return "errno_" + strconv.Itoa(int(e))
}

// deltas remembers the last count read for each key of a BPF map, so a
// poll adds only the increase. A key the LRU evicted and the kernel
// started again counts from zero.
type deltas[K comparable] struct {
	last map[K]seenCount
	gen  uint32
}

type seenCount struct {
	n   uint64
	gen uint32
}

func newDeltas[K comparable]() deltas[K] { return deltas[K]{last: map[K]seenCount{}} }

func (d *deltas[K]) begin() { d.gen++ }

// add records count n for k and returns its increase since the last poll.
func (d *deltas[K]) add(k K, n uint64) uint64 {
	prev, ok := d.last[k]
	d.last[k] = seenCount{n, d.gen}
	if !ok || n < prev.n {
		return n
	}
	return n - prev.n
}

// end forgets keys the map no longer holds, which bounds last by the
// map's size.
func (d *deltas[K]) end() {
	for k, s := range d.last {
		if s.gen != d.gen {
			delete(d.last, k)
		}
	}
}

func (d *deltas[K]) reset() { clear(d.last) }

// batchEach calls f with every entry of hash map m, read len(keys) at a
// time into the caller's buffers (one system call per batch, where
// iterating costs two per entry). Kernels without batch operations are
// iterated.
func batchEach[K, V any](m *ebpf.Map, keys []K, vals []V, f func(*K, *V)) error {
	var cursor ebpf.MapBatchCursor
	for {
		n, err := m.BatchLookup(&cursor, keys, vals, nil)
		for i := range n {
			f(&keys[i], &vals[i])
		}
		switch {
		case errors.Is(err, ebpf.ErrKeyNotExist):
			return nil
		case errors.Is(err, ebpf.ErrNotSupported):
			return iterateEach(m, f)
		case err != nil:
			return fmt.Errorf("batch lookup %s: %w", m, err)
		}
	}
}

func iterateEach[K, V any](m *ebpf.Map, f func(*K, *V)) error {
	var (
		k K
		v V
	)
	it := m.Iterate()
	for it.Next(&k, &v) {
		f(&k, &v)
	}
	if err := it.Err(); err != nil {
		return fmt.Errorf("iterate %s: %w", m, err)
	}
	return nil
}

// Close detaches the programs and frees their maps.
func (p *SockCalls) Close() error {
	err := p.stop() // the poll goroutine has ended: nothing attaches any more
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.sysExit != nil {
		err = errors.Join(err, p.sysExit.Close())
		p.sysExit, p.countedFrom = nil, time.Time{}
	}
	for _, l := range p.unreadLinks {
		err = errors.Join(err, l.Close())
	}
	p.unreadLinks, p.watchedFrom = nil, time.Time{}
	return err
}
