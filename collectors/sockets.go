package collectors

import (
	"bytes"
	"cmp"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strconv"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/culprit-dev/culprit/signals"
	"github.com/culprit-dev/culprit/sockdiag"
	"github.com/culprit-dev/culprit/workload"
)

func init() {
	register(signals.CollectorSockets, false, func(o Options) (Collector, error) {
		return newSocketsCollector(o, SocketsOptions{IdleInterval: o.SocketsIdleInterval, BusyInterval: o.SocketsBusyInterval}), nil
	})
}

// socketsDescs are every signal the sockets collector writes.
var socketsDescs = []*signals.Desc{signals.TCPSockets, signals.TCPSocketsByRemote, signals.TCPCloseWaitOldestSeconds,
	signals.TCPEstablishedIdleSeconds, signals.TCPRetransmitsCurrent, signals.ProcessTCPSockets, signals.TCPSocketsDumped,
	signals.SocketsDumpSeconds, signals.SocketsDumpTruncatedTotal, signals.SocketOwnerFDsReadTotal}

// SocketsOptions bound what the sockets collector keeps and writes. Zero
// fields take the defaults.
type SocketsOptions struct {
	// MaxRemotes is how many remotes get series of their own in
	// tcp_sockets_by_remote; the others are summed under "other". Default 32.
	MaxRemotes int
	// MaxPorts is how many listening ports get series of their own in
	// tcp_sockets; the others are summed under "other". Default 32.
	MaxPorts int
	// MaxSockets stops a dump after that many sockets (one cycle's CPU
	// and time bound); sockets_dump_truncated_total counts it. Default 1,000,000.
	MaxSockets int
	// MaxTrackedRemotes bounds the distinct remotes counted in one cycle
	// before the top MaxRemotes are chosen (the memory bound); sockets to
	// remotes first seen past it go to "other". At least 2*MaxRemotes;
	// default 16384.
	MaxTrackedRemotes int
	// MaxOwners bounds the other processes that get an owner label of
	// their own; the rest are labelled "other". Default 8.
	MaxOwners int
	// MaxTrackedConns bounds the target's outbound connections remembered
	// by their addresses, so that their time-wait sockets (which no
	// process holds) are still known to be the target's. Default 65536.
	MaxTrackedConns int
	// IdleInterval is the longest the collector goes without a dump while
	// the namespace's TCP counters say no socket changed (netnsActivity);
	// meanwhile each cycle writes the last dump's counts again, with the
	// idle ages grown by the time that passed. Default 30s; negative:
	// dump every cycle.
	IdleInterval time.Duration
	// BusyInterval is the longest the collector goes without a dump while
	// only segments moved in the namespace (its sockets sent or received,
	// none opened, closed, reset or retransmitted: counts by state cannot
	// have changed). Meanwhile each cycle writes the last dump's counts and
	// idle ages again (not grown: data may have reset them); then it dumps
	// the outbound ESTABLISHED sockets alone, for their idle ages
	// (refreshIdle). A dump whose sockets included CLOSE_WAIT ones or
	// unacknowledged retransmits is followed by a full one each cycle all
	// the same (an ACK resets the first's age, clears the second). A dear
	// dump stretches it (busyCostGap). Default 5s; negative: a full dump
	// whenever a segment moved.
	BusyInterval time.Duration
}

const (
	defaultSocketsMaxRemotes        = 32
	defaultSocketsMaxPorts          = 32
	defaultSocketsMaxSockets        = 1_000_000
	defaultSocketsMaxTrackedRemotes = 16384
	defaultSocketsMaxOwners         = 8
	defaultSocketsMaxTrackedConns   = 65536
)

func (o SocketsOptions) withDefaults() SocketsOptions {
	def := func(v *int, d int) {
		if *v <= 0 {
			*v = d
		}
	}
	def(&o.MaxRemotes, defaultSocketsMaxRemotes)
	def(&o.MaxPorts, defaultSocketsMaxPorts)
	def(&o.MaxSockets, defaultSocketsMaxSockets)
	def(&o.MaxTrackedRemotes, defaultSocketsMaxTrackedRemotes)
	def(&o.MaxOwners, defaultSocketsMaxOwners)
	def(&o.MaxTrackedConns, defaultSocketsMaxTrackedConns)
	if o.IdleInterval == 0 {
		o.IdleInterval = 30 * time.Second
	}
	if o.BusyInterval == 0 {
		o.BusyInterval = 5 * time.Second
	}
	// Room beyond last cycle's top, which is tracked first (socketAgg.reset).
	o.MaxTrackedRemotes = max(o.MaxTrackedRemotes, 2*o.MaxRemotes)
	o.MaxOwners = min(o.MaxOwners, int(maxOwnerSlots-firstOtherSlot-1))
	return o
}

// TCP states (include/net/tcp_states.h) by their short names here.
const (
	tcpStEstablished = sockdiag.Established
	tcpStSynSent     = sockdiag.SynSent
	tcpStFinWait1    = sockdiag.FinWait1
	tcpStFinWait2    = sockdiag.FinWait2
	tcpStTimeWait    = sockdiag.TimeWait
	tcpStCloseWait   = sockdiag.CloseWait
	tcpStCount       = sockdiag.NumStates // states are 1..tcpStCount-1
)

// remoteStates are the states counted per remote, in series order.
var remoteStates = [...]uint8{tcpStEstablished, tcpStSynSent, tcpStFinWait1, tcpStFinWait2, tcpStTimeWait, tcpStCloseWait}

// remoteStateIdx maps a TCP state to its index in remoteStates, or -1.
var remoteStateIdx = func() (idx [tcpStCount]int8) {
	for i := range idx {
		idx[i] = -1
	}
	for i, st := range remoteStates {
		idx[st] = int8(i)
	}
	return idx
}()

const (
	portEphemeral = "ephemeral"
	labelOther    = "other"
)

// ownerSlot numbers the owners of one collector: fixed slots for the
// unknown, the target and the agent, then other processes by command
// name as they are met (bounded by MaxOwners), then "other".
type ownerSlot uint8

const (
	slotUnknown ownerSlot = iota
	slotTarget
	slotAgent
	firstOtherSlot
	maxOwnerSlots = 32
)

// remoteKey is one owner's remote endpoint, without pointers (a map of
// them is not scanned by the GC). IPv4 addresses are stored v4-mapped.
type remoteKey struct {
	addr  [16]byte
	port  uint16
	owner ownerSlot
}

func (k remoteKey) endpoint() string {
	return netip.AddrPortFrom(netip.AddrFrom16(k.addr).Unmap(), k.port).String()
}

func (k remoteKey) compare(o remoteKey) int {
	if c := bytes.Compare(k.addr[:], o.addr[:]); c != 0 {
		return c
	}
	if c := cmp.Compare(k.port, o.port); c != 0 {
		return c
	}
	return cmp.Compare(k.owner, o.owner)
}

// connKey names one connection by its local port and remote endpoint: how
// a time-wait socket of the target's (which no process holds) is
// recognised from the connection it was.
type connKey struct {
	lport uint16
	rport uint16
	raddr [16]byte
}

// portAgg is what one cycle saw on one local port (or class of ports).
type portAgg struct {
	port           uint16
	owner          ownerSlot
	states         [tcpStCount]uint32
	total          uint32
	closeWaitMaxMs uint32
	retrans        uint32
	top            bool   // has series of its own this cycle
	label          string // port as a label value, once formatted
}

func (p *portAgg) merge(o *portAgg) {
	for i, n := range o.states {
		p.states[i] += n
	}
	p.total += o.total
	p.closeWaitMaxMs = max(p.closeWaitMaxMs, o.closeWaitMaxMs)
	p.retrans += o.retrans
}

// remoteAgg is what one cycle saw toward one remote, of one owner.
type remoteAgg struct {
	key       remoteKey
	states    [len(remoteStates)]uint32
	sum       uint32
	idleMaxMs uint32
	top       bool // has series of its own this cycle
}

func (r *remoteAgg) merge(o *remoteAgg) {
	for i, n := range o.states {
		r.states[i] += n
	}
	r.sum += o.sum
	r.idleMaxMs = max(r.idleMaxMs, o.idleMaxMs)
}

// socketAgg aggregates one dump as its sockets arrive, in memory bounded
// by the number of listening ports, owners and MaxTrackedRemotes, reused
// from cycle to cycle: after the first cycles it does not allocate.
type socketAgg struct {
	maxSockets, maxTracked int

	portSlot  []int32 // by local port: 1 + index in ports for a listening port, else 0
	ports     []portAgg
	ephemeral [maxOwnerSlots]portAgg

	remoteIdx map[remoteKey]int32 // index in remotes
	remotes   []remoteAgg
	untracked [maxOwnerSlots]remoteAgg // sockets to remotes past maxTracked, by owner

	// missing are socket inodes whose owner was not known (bounded).
	missing []uint32

	total     int
	truncated bool
}

const maxMissing = 4096

func newSocketAgg(maxSockets, maxTracked int) *socketAgg {
	return &socketAgg{
		maxSockets: maxSockets,
		maxTracked: maxTracked,
		portSlot:   make([]int32, 1<<16),
		remoteIdx:  make(map[remoteKey]int32),
	}
}

// reset starts a cycle. The sticky remotes (last cycle's top) are tracked
// first, so a busy remote keeps its place even when the table fills with
// others before its sockets come up in the dump.
func (a *socketAgg) reset(sticky []remoteKey) {
	for _, p := range a.ports {
		a.portSlot[p.port] = 0
	}
	a.ports = a.ports[:0]
	clear(a.ephemeral[:])
	clear(a.remoteIdx)
	a.remotes = a.remotes[:0]
	clear(a.untracked[:])
	a.missing = a.missing[:0]
	a.total, a.truncated = 0, false
	for _, k := range sticky {
		a.remote(k)
	}
}

func (a *socketAgg) remote(k remoteKey) *remoteAgg {
	if i, ok := a.remoteIdx[k]; ok {
		return &a.remotes[i]
	}
	if len(a.remotes) >= a.maxTracked {
		return &a.untracked[k.owner]
	}
	a.remoteIdx[k] = int32(len(a.remotes))
	a.remotes = append(a.remotes, remoteAgg{key: k})
	return &a.remotes[len(a.remotes)-1]
}

// socketsCollector counts every TCP socket of the target's network
// namespace, by owner, state and local port and by remote, from one
// sock_diag dump per cycle (sockdiag: parsed in place, no allocation per
// socket). Over 100k TIME_WAIT sockets a cycle takes about 30 ms, ~90% of
// it in the kernel (BenchmarkSockets100kTimeWait).
//
// Whose a socket is: a connection to a listening port belongs to the
// listener's owner (no fd table is read for it); any other socket a
// process holds is looked up by inode in workload.SocketOwners, which reads
// fd tables only when an inode is new to it; a time-wait socket (no
// process holds one) is the target's when the connection it ended was
// seen held by the target (MaxTrackedConns remembered), else unknown.
//
// It keeps the netlink socket open in the target's namespace between
// cycles; Close releases it.
type socketsCollector struct {
	mu       sync.Mutex
	o        SocketsOptions
	procRoot string
	owners   *workload.SocketOwners

	conn *sockdiag.Conn

	agg        *socketAgg
	sticky     []remoteKey // last cycle's top remotes
	topPorts   []int32     // indices in agg.ports, reused
	topRemotes []int32     // indices in agg.remotes, reused
	otherPort  [maxOwnerSlots]portAgg
	otherRem   [maxOwnerSlots]remoteAgg

	// Owners: labels by slot, and slots of other processes by name.
	slotLabels []string
	slotOf     map[string]ownerSlot
	// conns remembers the target's outbound connections (the cycle they
	// were last seen held), for their time-wait sockets.
	conns map[connKey]uint32
	cycle uint32
	tgt   workload.Process
	// listened holds the target's listening ports of the last cycle that
	// had sockets on them. After SIGTERM a server closes its listener and
	// keeps serving: its accepted connections are still inbound, and
	// without this they would look like outbound ones, one remote per
	// client. A port leaves it with its last socket; at most MaxPorts.
	listened map[uint16]bool
	portList []uint16 // listened's keys, reused

	// Series written, by label key (owner and port, or owner and remote),
	// with the states written for it: a state seen once is written, 0 if
	// need be, as long as the key has series; a key that goes away has
	// its series forgotten.
	portSeries   map[seriesKey]uint16
	remoteSeries map[seriesKey]uint16
	present      map[seriesKey]bool
	remoteLabels map[remoteKey]string // formatted endpoints of the current top

	truncated uint64

	// Skipping dumps while nothing changed: the namespace's counters, the
	// time and cost of the last dump, and how much the idle ages written
	// this cycle are past it (ms).
	activity netnsActivity
	dumpedAt time.Time
	took     time.Duration
	ageShift uint32
	skipped  uint64 // cycles without a dump, ever (tests)
	// cycleAt is when the last cycle began.
	cycleAt time.Time
	// owed: the last cycle saw a change of state and deferred its dear
	// dump (stateCostGap); deferred counts those cycles, ever (tests).
	// stateGap is stateCostGap (0: never defer; tests that collect every
	// 100 ms, where a 2 ms dump is dear, set it so).
	owed     bool
	deferred uint64
	stateGap time.Duration
	// idleRefreshes are cycles that dumped only the outbound ESTABLISHED
	// sockets (refreshIdle), ever (tests); listenPorts is their filter.
	idleRefreshes uint64
	listenPorts   []uint16
	savedIdle     []uint32 // refreshIdle's copy of the ages, reused
	noIdleRefresh bool     // the kernel refused its filter
	// sensitive: the last dump met CLOSE_WAIT sockets or unacknowledged
	// retransmits, which segments alone change.
	sensitive bool
	// The tcplife probe's connection events in the namespace (connName)
	// as last read.
	connNs   uint64
	connName string
	connSeen uint64
	connHave bool

	// Handles of the series written, by label key.
	portH, remoteH map[seriesKey]*famHandles
	targetH        [tcpStCount]*signals.Handle
	nsH            [4]*signals.Handle // dumped, dump seconds, truncated, owner fds read
}

// famHandles are the series of one owner and port (or remote): counts by
// state, and the two per-key gauges (close-wait age and retransmits, or
// the idle age).
type famHandles struct {
	byState [tcpStCount]*signals.Handle
	a, b    *signals.Handle
}

// seriesKey is the labels of a series family member besides state.
type seriesKey struct{ owner, key string }

func newSocketsCollector(o Options, so SocketsOptions) *socketsCollector {
	so = so.withDefaults()
	owners := o.Owners
	if owners == nil {
		owners = workload.NewSocketOwners(procRootOf(o), workload.SocketOwnersOptions{})
	}
	return &socketsCollector{
		o:            so,
		procRoot:     procRootOf(o),
		owners:       owners,
		agg:          newSocketAgg(so.MaxSockets, so.MaxTrackedRemotes),
		slotLabels:   []string{slotUnknown: "unknown", slotTarget: "target", slotAgent: "agent"},
		slotOf:       map[string]ownerSlot{},
		conns:        map[connKey]uint32{},
		portSeries:   map[seriesKey]uint16{},
		remoteSeries: map[seriesKey]uint16{},
		present:      map[seriesKey]bool{},
		remoteLabels: map[remoteKey]string{},
		portH:        map[seriesKey]*famHandles{},
		remoteH:      map[seriesKey]*famHandles{},
		stateGap:     stateCostGap,
	}
}

func (c *socketsCollector) Name() string { return signals.CollectorSockets }

// Close releases the sock_diag socket.
func (c *socketsCollector) Close() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.closeConn()
	c.activity.close()
	return nil
}

func (c *socketsCollector) closeConn() {
	if c.conn != nil {
		c.conn.Close()
		c.conn = nil
	}
}

// Collect dumps the namespace, or, while its TCP counters stand still
// (netnsActivity: ~30 us), writes the last dump's counts again with the
// idle ages grown, for up to IdleInterval. A dump costs a walk of the
// kernel's established hash (1-2 ms whatever the namespace holds) plus
// about 0.3 us per socket (100k TIME_WAIT sockets: ~30 ms).
func (c *socketsCollector) Collect(ctx context.Context, tgt workload.Process, store *signals.Store) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	start := time.Now()
	// The collect interval as lived: how far the next cycle is.
	step := start.Sub(c.cycleAt)
	c.cycleAt = start
	same := c.tgt.PID == tgt.PID && c.tgt.StartTime == tgt.StartTime && c.conn != nil && c.conn.Netns() == tgt.NetnsIno
	state, data := c.activity.changes(c.procRoot, tgt.PID)
	if c.connNs != tgt.NetnsIno || c.connName == "" {
		c.connNs, c.connName, c.connHave = tgt.NetnsIno, signals.ConnActivity(tgt.NetnsIno), false
	}
	// A peer's close (ESTABLISHED to CLOSE_WAIT) moves segments only: the
	// tcplife probe's connection events tell it from data. Without the
	// probe, data counts as a change of state.
	if n, ok := store.Activity(c.connName); ok {
		state = state || !c.connHave || n != c.connSeen
		c.connSeen, c.connHave = n, true
	} else {
		state, c.connHave = state || data, false
	}
	// A change deferred last cycle is still to be counted, whatever the
	// counters say now (they were read then).
	state = state || c.owed
	// A dump that met sockets of owners not yet known is done again once
	// the owner index has an answer for one of them.
	if same && !state && !c.ownersAnswered(start) {
		since := start.Sub(c.dumpedAt)
		switch {
		case !data && c.o.IdleInterval > 0 && since < c.o.IdleInterval:
			c.skipped++
			c.ageShift = uint32(min(since.Milliseconds(), 1<<31))
			c.write(store, start, c.took)
			return nil
		case data && !c.sensitive && c.o.BusyInterval > 0 && since < max(c.o.BusyInterval, busyCostGap*c.took):
			// The ages stay as they were: data may have reset them.
			c.skipped++
			c.write(store, start, c.took)
			return nil
		case data && !c.sensitive && c.o.BusyInterval > 0 && c.refreshIdle(ctx):
			// Only the idle ages can have changed, and only outbound
			// connections have any: those were dumped alone.
			c.idleRefreshes++
			c.took = time.Since(start)
			c.dumpedAt, c.ageShift = start, 0
			c.write(store, start, c.took)
			return nil
		}
	}
	if since := start.Sub(c.dumpedAt); same && state && c.stateGap*c.took > since && since+step <= maxDeferredAge {
		// A dear dump after a change of state waits, cycle after cycle,
		// while the dumps would cost more than their budget, and as long
		// as the last one's samples stay fresh at the next cycle (step
		// ahead). Nothing is written meanwhile: the last dump's samples
		// stand at their own time and no count is restamped as new.
		c.owed = true
		c.deferred++
		return nil
	}
	c.owed = false
	if err := c.collectCycle(ctx, tgt); err != nil {
		c.activity.close() // dump at the next cycle, whatever the counters say
		return fmt.Errorf("pid %d: %w", tgt.PID, err)
	}
	c.took = time.Since(start)
	c.dumpedAt, c.ageShift = start, 0
	c.write(store, start, c.took)
	return nil
}

// collectCycle is one dump with its ownership: a cycle, then, when it met
// sockets of unknown owners, a refresh of the owner index (rate-limited
// there) whose answers the next cycle uses.
func (c *socketsCollector) collectCycle(ctx context.Context, tgt workload.Process) error {
	if c.tgt.PID != tgt.PID || c.tgt.StartTime != tgt.StartTime {
		c.tgt = tgt
		clear(c.conns)
		clear(c.listened)
		c.owners.SetTarget(tgt)
	}
	if err := c.cycleOnce(ctx, tgt); err != nil {
		return err
	}
	if len(c.agg.missing) > 0 || c.cycle == 1 {
		if c.owners.Refresh(time.Now(), c.agg.missing) > 0 && c.cycle == 1 {
			// The first cycle ran with an empty index: run it again now
			// that it knows the namespace, rather than report every
			// socket as unknown for a cycle.
			return c.cycleOnce(ctx, tgt)
		}
	}
	return nil
}

// cycleOnce dumps and aggregates; the result is in c.agg, c.top*, c.other*.
func (c *socketsCollector) cycleOnce(ctx context.Context, tgt workload.Process) error {
	if c.conn != nil && c.conn.Netns() != tgt.NetnsIno {
		c.closeConn()
		c.sticky = c.sticky[:0]
	}
	if c.conn == nil {
		conn, err := sockdiag.Open(c.procRoot, tgt.PID, tgt.NetnsIno)
		if err != nil {
			return err
		}
		c.conn = conn
	}
	c.cycle++
	c.agg.reset(c.sticky)
	err := c.conn.Dump(ctx, sockdiag.AllStates, true, c.add)
	switch {
	case errors.Is(err, sockdiag.ErrStopped):
		// MaxSockets: the Conn closed itself (the rest of the answer was
		// queued on it); it is reopened next cycle.
		c.conn = nil
		c.truncated++
	case errors.Is(err, sockdiag.ErrInterrupted):
		// Counts of a table that changed under the walk are still the
		// best this cycle has.
	case err != nil:
		c.conn = nil // closed by Dump
		return err
	}
	c.pruneConns()
	c.noteListened()
	c.rank()
	c.sensitive = c.agg.sensitive()
	return nil
}

// refreshIdle brings the idle ages of the last dump's outbound
// connections up to date by dumping only the namespace's ESTABLISHED
// sockets whose local port is not one it listens on, and reports whether
// it could (false: a full dump is needed). It runs when only segments
// moved since the last dump (no socket opened, closed, changed state or
// retransmitted, and none is in CLOSE_WAIT or retransmitting): counts by
// owner, port, state and remote are what that dump found, and the idle
// ages (tcp_established_idle_seconds), which data resets, are all a dump
// would change. Beside 40,000 established sockets of a neighbour, half of
// them connections to its listeners, the dump takes 23 ms against 44 ms
// for every socket with its tcp_info: the kernel still walks them all, but
// fills in and copies out only half. What it meets must be what the last
// dump counted (as many outbound ESTABLISHED sockets, each toward a remote
// known then, of a known owner); otherwise it gives up and the cycle dumps
// everything.
func (c *socketsCollector) refreshIdle(ctx context.Context) bool {
	a := c.agg
	c.listenPorts = c.listenPorts[:0]
	for i := range a.ports {
		if a.ports[i].states[sockdiag.Listen] > 0 {
			if len(c.listenPorts) == sockdiag.MaxExcludedPorts {
				return false // a filter that long costs what it saves
			}
			c.listenPorts = append(c.listenPorts, a.ports[i].port)
		}
	}
	if c.conn == nil || c.noIdleRefresh {
		return false
	}
	want := uint32(0) // outbound ESTABLISHED sockets of the last dump
	for o := range a.ephemeral {
		want += a.ephemeral[o].states[tcpStEstablished]
	}
	// The ages are recomputed from zero; a dump that fails leaves the
	// aggregate as it was.
	var seen uint32
	ok := true
	saved := c.savedIdle[:0]
	for i := range a.remotes {
		saved = append(saved, a.remotes[i].idleMaxMs)
		a.remotes[i].idleMaxMs = 0
	}
	c.savedIdle = saved
	var untracked [maxOwnerSlots]uint32
	for o := range a.untracked {
		untracked[o] = a.untracked[o].idleMaxMs
		a.untracked[o].idleMaxMs = 0
	}
	missing := len(a.missing)
	err := c.conn.DumpExcluding(ctx, sockdiag.Of(sockdiag.Established), true, c.listenPorts, func(s *sockdiag.Socket) bool {
		if s.State != tcpStEstablished || a.portSlot[s.LocalPort] != 0 {
			return true // not outbound (a port the target listened on lately)
		}
		seen++
		o := slotUnknown
		if s.Inode != 0 {
			o = c.ownerOf(s.Inode)
		} else if _, held := c.conns[connKey{lport: s.LocalPort, rport: s.RemotePort, raddr: s.Remote}]; held {
			o = slotTarget
		}
		k := remoteKey{addr: s.Remote, port: s.RemotePort, owner: o}
		var r *remoteAgg
		if i, known := a.remoteIdx[k]; known {
			r = &a.remotes[i]
		} else if len(a.remotes) >= a.maxTracked {
			r = &a.untracked[o]
		}
		if r == nil || r.states[remoteStateIdx[tcpStEstablished]] == 0 {
			ok = false // a connection the last dump did not count
			return true
		}
		if s.Info != nil {
			idle := min(binary.NativeEndian.Uint32(s.Info[sockdiag.TCPInfoLastDataSent:]), binary.NativeEndian.Uint32(s.Info[sockdiag.TCPInfoLastDataRecv:]))
			r.idleMaxMs = max(r.idleMaxMs, idle)
		}
		return true
	})
	switch {
	case errors.Is(err, unix.EINVAL):
		// A kernel that refuses the filter refuses it every time.
		c.noIdleRefresh = true
		c.conn = nil // closed by the dump: reopened by the next one
	case err != nil && !errors.Is(err, sockdiag.ErrInterrupted):
		c.conn = nil
	}
	if err != nil || !ok || seen != want || len(a.missing) != missing {
		for i := range a.remotes {
			a.remotes[i].idleMaxMs = c.savedIdle[i]
		}
		for o := range a.untracked {
			a.untracked[o].idleMaxMs = untracked[o]
		}
		a.missing = a.missing[:missing]
		return false
	}
	// The "other" remotes' ages, as rank sums them.
	for o := range c.otherRem {
		c.otherRem[o].idleMaxMs = a.untracked[o].idleMaxMs
	}
	for i := range a.remotes {
		if r := &a.remotes[i]; !r.top {
			c.otherRem[r.key.owner].idleMaxMs = max(c.otherRem[r.key.owner].idleMaxMs, r.idleMaxMs)
		}
	}
	return true
}

// busyCostGap stretches BusyInterval when a dump is dear: the gap is at
// least this many times the last dump's duration, which keeps the dumps
// of a namespace where only segments move under 0.25 % of a core whatever
// it holds. Beside 40,000 established sockets of a neighbour the
// outbound-only dump takes ~27 ms, so it runs every ~11 s instead of 5;
// with a few thousand sockets (a few ms) BusyInterval rules. Idle ages
// then lag by up to the gap, which idle timeouts of minutes can afford.
const busyCostGap = 400

// stateCostGap paces full dumps while states change (connections open and
// close): a dump waits until the time since the one before is at least
// stateCostGap times its duration (1 % of a core), or until
// maxDeferredAge would pass. About half of a dump's CPU is the
// kernel's walk, which no filter shortens: every bucket of the
// established hash (262,144 on a 24 GiB machine) and every socket in it.
// Beside nginx flat out (150
// connections closed a second, 17,000 sockets in the namespace: 10,000 of
// a neighbour, 6,000 in TIME_WAIT) a dump costs 20-30 ms of CPU (30-60
// ms of wall time, which is what took measures); dumped every other
// second (one deferral at most) it was a third of the agent's CPU; now
// every fourth (maxDeferredAge). In a namespace of a few thousand
// sockets (a dump of 1-5 ms) every cycle dumps as before: a gap of 300
// spaced a 5 ms dump under -race 1.5 s apart, and a 4 s close_wait
// window then held too few samples (TestPrecisionNoisyNeighbour).
const stateCostGap time.Duration = 100

// maxDeferredAge bounds how old the last dump's samples may grow while
// dumps are spaced: one collect interval (1 s) under the time in which
// rules take the sockets collector's samples as standing for now. With
// collect.interval above 2 s nothing is deferred.
const maxDeferredAge = signals.SocketsFreshFor - time.Second

// ownersAnswered reports whether the owner index, refreshed if its rate
// limits allow, now knows who holds (or that nobody visible holds) a
// socket the last dump met without an owner: only then would a dump count
// them differently. Redoing the dump at every cycle instead was most of
// this collector's cost beside 40,000 sockets of a neighbour: the index
// reads other processes' descriptors only every othersScanGap times its
// last scan (~30 s there), and a socket held from outside the namespace
// (a scraper's, dialled into it) is never anyone's the agent can see.
// Without sockets in question it costs nothing; with them, a pass over
// at most maxMissing inodes.
func (c *socketsCollector) ownersAnswered(now time.Time) bool {
	if len(c.agg.missing) == 0 {
		return false
	}
	c.owners.Refresh(now, c.agg.missing)
	for _, ino := range c.agg.missing {
		if _, ok := c.owners.Owner(ino); ok {
			return true
		}
	}
	return false
}

// noteListened keeps the target's ports of this cycle that have sockets:
// the ones it listens on, and those it listened on whose connections
// remain.
func (c *socketsCollector) noteListened() {
	if c.listened == nil {
		c.listened = map[uint16]bool{}
	}
	clear(c.listened)
	c.portList = c.portList[:0]
	for i := range c.agg.ports {
		if p := &c.agg.ports[i]; p.owner == slotTarget && p.total > 0 && len(c.listened) < c.o.MaxPorts {
			c.listened[p.port] = true
			c.portList = append(c.portList, p.port)
		}
	}
	c.owners.SetTargetPorts(c.portList)
}

// sensitive says whether the cycle met sockets whose figures segments
// alone change: CLOSE_WAIT ones (an ACK resets their age) and
// unacknowledged retransmits (an ACK clears them).
func (a *socketAgg) sensitive() bool {
	for i := range a.ports {
		if a.ports[i].states[tcpStCloseWait] > 0 || a.ports[i].retrans > 0 {
			return true
		}
	}
	for i := range a.ephemeral {
		if a.ephemeral[i].states[tcpStCloseWait] > 0 || a.ephemeral[i].retrans > 0 {
			return true
		}
	}
	return false
}

// add accounts one socket. It returns false, and marks the cycle
// truncated, when MaxSockets were already seen.
//
// A socket's local port is "listening" when a LISTEN socket on that port
// came earlier in the dump. The kernel dumps a family's listening hash
// before its established hash, and an accepted socket has the family of its
// listener (a v4 client of a dual-stack [::] listener is a v4-mapped
// AF_INET6 socket), so the listener always comes first.
func (c *socketsCollector) add(s *sockdiag.Socket) bool {
	a := c.agg
	if a.total >= a.maxSockets {
		a.truncated = true
		return false
	}
	a.total++
	st := s.State
	if int(st) >= tcpStCount || st == 0 {
		return true // unknown state: in the total only
	}
	var p *portAgg
	outbound := false
	o := slotUnknown // the owner of an outbound socket
	switch i := a.portSlot[s.LocalPort]; {
	case i != 0:
		p = &a.ports[i-1]
		if st == sockdiag.Listen && p.owner != slotTarget {
			// Another LISTEN socket of the same port (SO_REUSEPORT, or
			// v4 and v6): the target's claim wins.
			if lo := c.ownerOf(s.Inode); lo != slotUnknown {
				p.owner = lo
			}
		}
	case st == sockdiag.Listen:
		a.ports = append(a.ports, portAgg{port: s.LocalPort, owner: c.ownerOf(s.Inode)})
		a.portSlot[s.LocalPort] = int32(len(a.ports))
		p = &a.ports[len(a.ports)-1]
	case c.listened[s.LocalPort] && (s.Inode == 0 || c.ownerOf(s.Inode) == slotTarget):
		// A connection on a port the target listened on until lately (a
		// time-wait socket, which no process holds, or one the target
		// holds): still the server side of an inbound connection.
		a.ports = append(a.ports, portAgg{port: s.LocalPort, owner: slotTarget})
		a.portSlot[s.LocalPort] = int32(len(a.ports))
		p = &a.ports[len(a.ports)-1]
	default:
		outbound = true
		k := connKey{lport: s.LocalPort, rport: s.RemotePort, raddr: s.Remote}
		if s.Inode != 0 {
			o = c.ownerOf(s.Inode)
			if o == slotTarget && (len(c.conns) < c.o.MaxTrackedConns || c.conns[k] != 0) {
				c.conns[k] = c.cycle
			}
		} else if _, ok := c.conns[k]; ok {
			o = slotTarget // a connection the target held, closed since
		}
		p = &a.ephemeral[o]
	}
	p.states[st]++
	p.total++
	if info := s.Info; info != nil {
		p.retrans += uint32(info[sockdiag.TCPInfoRetransmits])
		if st == tcpStCloseWait {
			age := min(binary.NativeEndian.Uint32(info[sockdiag.TCPInfoLastDataRecv:]), binary.NativeEndian.Uint32(info[sockdiag.TCPInfoLastAckRecv:]))
			p.closeWaitMaxMs = max(p.closeWaitMaxMs, age)
		}
	}
	ri := remoteStateIdx[st]
	if !outbound || ri < 0 {
		return true
	}
	r := a.remote(remoteKey{addr: s.Remote, port: s.RemotePort, owner: o})
	r.states[ri]++
	r.sum++
	if st == tcpStEstablished && s.Info != nil {
		idle := min(binary.NativeEndian.Uint32(s.Info[sockdiag.TCPInfoLastDataSent:]), binary.NativeEndian.Uint32(s.Info[sockdiag.TCPInfoLastDataRecv:]))
		r.idleMaxMs = max(r.idleMaxMs, idle)
	}
	return true
}

// ownerOf is the owner slot of a socket inode; an inode not in the index
// is unknown this cycle and noted for a refresh.
func (c *socketsCollector) ownerOf(ino uint32) ownerSlot {
	if ino == 0 {
		return slotUnknown
	}
	o, ok := c.owners.Owner(ino)
	if !ok {
		if len(c.agg.missing) < maxMissing {
			c.agg.missing = append(c.agg.missing, ino)
		}
		return slotUnknown
	}
	switch o.Role {
	case workload.RoleTarget:
		return slotTarget
	case workload.RoleAgent:
		return slotAgent
	case workload.RoleOther:
		if s, ok := c.slotOf[o.Comm]; ok {
			return s
		}
		if len(c.slotOf) >= c.o.MaxOwners {
			return c.otherSlot()
		}
		s := ownerSlot(len(c.slotLabels))
		c.slotLabels = append(c.slotLabels, o.Label())
		c.slotOf[o.Comm] = s
		return s
	}
	return slotUnknown
}

// otherSlot is the slot of processes past MaxOwners, labelled "other".
func (c *socketsCollector) otherSlot() ownerSlot {
	if s, ok := c.slotOf["\x00other"]; ok {
		return s
	}
	s := ownerSlot(len(c.slotLabels))
	c.slotLabels = append(c.slotLabels, labelOther)
	c.slotOf["\x00other"] = s
	return s
}

// pruneConns forgets connections of the target not seen for two minutes:
// a time-wait socket lasts one (TCP_TIMEWAIT_LEN).
func (c *socketsCollector) pruneConns() {
	const keepCycles = 120
	if c.cycle%16 != 0 {
		return // pruning walks the map: not every cycle
	}
	for k, seen := range c.conns {
		if c.cycle-seen > keepCycles {
			delete(c.conns, k)
		}
	}
}

// rank picks the listening ports and remotes that get series of their
// own, the target's first, then the busiest, and sums the others into
// otherPort, otherRem by owner.
func (c *socketsCollector) rank() {
	a := c.agg
	first := func(o ownerSlot) int {
		if o == slotTarget {
			return 0
		}
		return 1
	}
	c.topPorts = topIndices(c.topPorts[:0], len(a.ports), c.o.MaxPorts, func(i, j int32) int {
		if d := cmp.Compare(first(a.ports[i].owner), first(a.ports[j].owner)); d != 0 {
			return d
		}
		if d := cmp.Compare(a.ports[j].total, a.ports[i].total); d != 0 {
			return d
		}
		return cmp.Compare(a.ports[i].port, a.ports[j].port)
	}, func(int32) bool { return true })
	for _, i := range c.topPorts {
		a.ports[i].top = true
	}
	clear(c.otherPort[:])
	for i := range a.ports {
		if !a.ports[i].top {
			c.otherPort[a.ports[i].owner].merge(&a.ports[i])
		}
	}

	c.topRemotes = topIndices(c.topRemotes[:0], len(a.remotes), c.o.MaxRemotes, func(i, j int32) int {
		if d := cmp.Compare(first(a.remotes[i].key.owner), first(a.remotes[j].key.owner)); d != 0 {
			return d
		}
		if d := cmp.Compare(a.remotes[j].sum, a.remotes[i].sum); d != 0 {
			return d
		}
		return a.remotes[i].key.compare(a.remotes[j].key)
	}, func(i int32) bool { return a.remotes[i].sum > 0 })
	c.sticky = c.sticky[:0]
	for _, i := range c.topRemotes {
		a.remotes[i].top = true
		c.sticky = append(c.sticky, a.remotes[i].key)
	}
	c.otherRem = a.untracked
	for i := range a.remotes {
		if !a.remotes[i].top {
			c.otherRem[a.remotes[i].key.owner].merge(&a.remotes[i])
		}
	}
}

// topIndices appends to dst the indices in [0,n) of the (at most) k best
// elements that pass ok, best first by cmp. It keeps dst sorted while it
// goes, so it costs O(n log k) compares and no allocation once dst has
// room.
func topIndices(dst []int32, n, k int, cmpf func(i, j int32) int, ok func(int32) bool) []int32 {
	for i := int32(0); int(i) < n; i++ {
		if !ok(i) {
			continue
		}
		if len(dst) == k && cmpf(i, dst[k-1]) >= 0 {
			continue
		}
		at, _ := slices.BinarySearchFunc(dst, i, cmpf)
		if len(dst) == k {
			dst = dst[:k-1]
		}
		dst = slices.Insert(dst, at, i)
	}
	return dst
}

// write puts this cycle's series and forgets those of ports and remotes
// that no longer have any. Series are written through handles: a cycle
// that met no new port or remote allocates nothing.
func (c *socketsCollector) write(store *signals.Store, now time.Time, took time.Duration) {
	a := c.agg
	clear(c.present)
	var target [tcpStCount]uint32
	for _, i := range c.topPorts {
		p := &a.ports[i]
		c.writePort(store, now, c.slotLabels[p.owner], p.portLabel(), p)
	}
	for i := range a.ports {
		if a.ports[i].owner == slotTarget {
			for st, n := range a.ports[i].states {
				target[st] += n
			}
		}
	}
	for o := range c.slotLabels {
		if e := &a.ephemeral[o]; e.total > 0 || c.portSeries[seriesKey{c.slotLabels[o], portEphemeral}] != 0 {
			c.writePort(store, now, c.slotLabels[o], portEphemeral, e)
		}
		if c.otherPort[o].total > 0 {
			c.writePort(store, now, c.slotLabels[o], labelOther, &c.otherPort[o])
		}
	}
	for st, n := range a.ephemeral[slotTarget].states {
		target[st] += n
	}
	c.forget(store, c.portSeries, c.portH, "port", signals.TCPSockets, signals.TCPCloseWaitOldestSeconds, signals.TCPRetransmitsCurrent)
	for st := 1; st < tcpStCount; st++ {
		if name := sockdiag.StateNames[st]; name != "" && st != sockdiag.Close {
			if c.targetH[st] == nil {
				c.targetH[st] = store.Handle(signals.ProcessTCPSockets, signals.L("state", name))
			}
			c.targetH[st].Put(float64(target[st]), now)
		}
	}

	clear(c.present)
	labels := c.remoteLabels
	for k := range labels {
		if !slices.Contains(c.sticky, k) {
			delete(labels, k)
		}
	}
	for _, i := range c.topRemotes {
		r := &a.remotes[i]
		l, ok := labels[r.key]
		if !ok {
			l = r.key.endpoint()
			labels[r.key] = l
		}
		c.writeRemote(store, now, c.slotLabels[r.key.owner], l, r)
	}
	for o := range c.slotLabels {
		if c.otherRem[o].sum > 0 {
			c.writeRemote(store, now, c.slotLabels[o], labelOther, &c.otherRem[o])
		}
	}
	c.forget(store, c.remoteSeries, c.remoteH, "remote", signals.TCPSocketsByRemote, signals.TCPEstablishedIdleSeconds)

	if c.nsH[0] == nil {
		c.nsH = [4]*signals.Handle{store.Handle(signals.TCPSocketsDumped, nil), store.Handle(signals.SocketsDumpSeconds, nil),
			store.Handle(signals.SocketsDumpTruncatedTotal, nil), store.Handle(signals.SocketOwnerFDsReadTotal, nil)}
	}
	c.nsH[0].Put(float64(a.total), now)
	c.nsH[1].Put(took.Seconds(), now)
	c.nsH[2].Put(float64(c.truncated), now)
	c.nsH[3].Put(float64(c.owners.Stats().FDsRead), now)
}

// portLabel is the port as a label value, formatted once per port slot.
func (p *portAgg) portLabel() string {
	if p.label == "" {
		p.label = strconv.Itoa(int(p.port))
	}
	return p.label
}

// aged is an idle age of the last dump (ms) as of this cycle: grown by the
// time since the dump when there was such a socket (a cycle without a dump
// runs only while no segment moved in the namespace).
func (c *socketsCollector) aged(ms uint32, present bool) float64 {
	if present {
		ms += c.ageShift
	}
	return float64(ms) / 1000
}

func (c *socketsCollector) writePort(store *signals.Store, now time.Time, owner, port string, p *portAgg) {
	k := seriesKey{owner, port}
	h := c.portH[k]
	if h == nil {
		ls := signals.L("owner", owner, "port", port)
		h = &famHandles{a: store.Handle(signals.TCPCloseWaitOldestSeconds, ls), b: store.Handle(signals.TCPRetransmitsCurrent, ls)}
		c.portH[k] = h
	}
	mask := c.portSeries[k]
	for st := 1; st < tcpStCount; st++ {
		if p.states[st] > 0 {
			mask |= 1 << st
		}
		if mask&(1<<st) != 0 {
			if h.byState[st] == nil {
				h.byState[st] = store.Handle(signals.TCPSockets, signals.L("owner", owner, "port", port, "state", sockdiag.StateNames[st]))
			}
			h.byState[st].Put(float64(p.states[st]), now)
		}
	}
	c.portSeries[k] = mask
	c.present[k] = true
	h.a.Put(c.aged(p.closeWaitMaxMs, p.states[tcpStCloseWait] > 0), now)
	h.b.Put(float64(p.retrans), now)
}

func (c *socketsCollector) writeRemote(store *signals.Store, now time.Time, owner, remote string, r *remoteAgg) {
	k := seriesKey{owner, remote}
	h := c.remoteH[k]
	if h == nil {
		h = &famHandles{a: store.Handle(signals.TCPEstablishedIdleSeconds, signals.L("owner", owner, "remote", remote))}
		c.remoteH[k] = h
	}
	mask := c.remoteSeries[k]
	for i, st := range remoteStates {
		if r.states[i] > 0 {
			mask |= 1 << i
		}
		if mask&(1<<i) != 0 {
			if h.byState[i] == nil {
				h.byState[i] = store.Handle(signals.TCPSocketsByRemote, signals.L("owner", owner, "remote", remote, "state", sockdiag.StateNames[st]))
			}
			h.byState[i].Put(float64(r.states[i]), now)
		}
	}
	c.remoteSeries[k] = mask
	c.present[k] = true
	h.a.Put(c.aged(r.idleMaxMs, r.states[remoteStateIdx[tcpStEstablished]] > 0), now)
}

// forget drops the series of the keys in written that were not written
// this cycle (c.present), so that churning ports and remotes do not grow
// the store.
func (c *socketsCollector) forget(store *signals.Store, written map[seriesKey]uint16, handles map[seriesKey]*famHandles, label string, descs ...*signals.Desc) {
	var gone map[seriesKey]bool
	for k := range written {
		if !c.present[k] {
			if gone == nil {
				gone = map[seriesKey]bool{}
			}
			gone[k] = true
			delete(written, k)
			delete(handles, k)
		}
	}
	if gone == nil {
		return
	}
	for _, d := range descs {
		store.Forget(d, func(ls signals.Labels) bool { return !gone[seriesKey{ls.Get("owner"), ls.Get(label)}] })
	}
}
