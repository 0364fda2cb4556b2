package collectors

import (
	"bytes"
	"cmp"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"net/netip"
	"path/filepath"
	"sort"
	"strconv"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/culprit-dev/culprit/signals"
	"github.com/culprit-dev/culprit/sockdiag"
	"github.com/culprit-dev/culprit/workload"
)

func init() {
	register(signals.CollectorAcceptQueue, true, func(o Options) (Collector, error) { return newAcceptQueueCollector(o) })
}

// TCP states as inet_diag reports them (include/net/tcp_states.h).
const (
	tcpSynRecv = 3
	tcpListen  = 10
)

// inetDiagMsgLen is the size of struct inet_diag_msg (tests build them).
const inetDiagMsgLen = 72

// diagSocket is the part of one inet_diag_msg this collector uses.
type diagSocket struct {
	Family uint8
	State  uint8
	Addr   netip.Addr // local address
	Port   uint16     // local port
	Remote netip.Addr // remote address
	RQueue uint32     // LISTEN: accept queue length; else bytes unread
	WQueue uint32     // LISTEN: max accept queue length
	Inode  uint32
}

// parseInetDiagMsg decodes the fixed part of a struct inet_diag_msg.
func parseInetDiagMsg(b []byte) (diagSocket, error) {
	if len(b) < inetDiagMsgLen {
		return diagSocket{}, fmt.Errorf("inet_diag_msg: %d bytes, want %d", len(b), inetDiagMsgLen)
	}
	s := diagSocket{
		Family: b[0],
		State:  b[1],
		Port:   binary.BigEndian.Uint16(b[4:6]),
		RQueue: binary.NativeEndian.Uint32(b[56:60]),
		WQueue: binary.NativeEndian.Uint32(b[60:64]),
		Inode:  binary.NativeEndian.Uint32(b[68:72]),
	}
	switch s.Family {
	case unix.AF_INET:
		s.Addr = netip.AddrFrom4([4]byte(b[8:12]))
		s.Remote = netip.AddrFrom4([4]byte(b[24:28]))
	case unix.AF_INET6:
		s.Addr = netip.AddrFrom16([16]byte(b[8:24]))
		s.Remote = netip.AddrFrom16([16]byte(b[24:40]))
	default:
		return diagSocket{}, fmt.Errorf("inet_diag_msg: address family %d", s.Family)
	}
	return s, nil
}

// listenerKey names a listener as its labels do. Sockets sharing a key
// (an SO_REUSEPORT group) are reported as one listener.
type listenerKey struct {
	Addr netip.Addr
	Port uint16
}

func (k listenerKey) labels() signals.Labels {
	return signals.L("addr", k.Addr.String(), "port", strconv.Itoa(int(k.Port)))
}

func (k listenerKey) less(o listenerKey) bool {
	if k.Port != o.Port {
		return k.Port < o.Port
	}
	return k.Addr.Less(o.Addr)
}

// listenerSample is one listener's state in one dump.
type listenerSample struct {
	Queue   uint32 // sum of idiag_rqueue
	Backlog uint32 // sum of idiag_wqueue
	Full    bool   // some member had rqueue > wqueue
	SynRecv int
	// SynRecvSources is how many distinct remote addresses the half-open
	// connections come from: a flood's are many, a burst's few.
	SynRecvSources int
	Owned          bool // some member is held open by the target
}

// fillingRatio is how full a queue must be for the app's accepts to be
// counted (Store.FillingQueue): a stall fills it from empty, so counting
// begins before it is full; a burst that fills it between two samples is
// counted from the first sample that sees it full, within the accept_overflow
// rule's runEdge. nginx flat out (its queue of 511 held a few connections
// at most samples) never comes near.
const fillingRatio = 0.5

// ratio is how full the queue is; a listener with backlog 0 is full with
// one connection, so it counts as backlog 1 here.
func (l listenerSample) ratio() float64 {
	return float64(l.Queue) / float64(max(l.Backlog, 1))
}

// summarizeListeners turns one dump into per-listener state: LISTEN
// sockets give the queues, SYN_RECV ones are counted on the listener they
// arrived at. owned holds the inodes of the target's sockets.
func summarizeListeners(socks []diagSocket, owned map[uint32]bool) map[listenerKey]listenerSample {
	return summarizeInto(make(map[listenerKey]listenerSample), socks, owned)
}

// summarizeInto is summarizeListeners into out (cleared first), so that a
// sample reuses the maps of the one before last.
func summarizeInto(out map[listenerKey]listenerSample, socks []diagSocket, owned map[uint32]bool) map[listenerKey]listenerSample {
	clear(out)
	for _, s := range socks {
		if s.State != tcpListen {
			continue
		}
		k := listenerKey{s.Addr, s.Port}
		l := out[k]
		l.Queue += s.RQueue
		l.Backlog += s.WQueue
		l.Full = l.Full || s.RQueue > s.WQueue
		l.Owned = l.Owned || owned[s.Inode]
		out[k] = l
	}
	var sources map[listenerKey]map[netip.Addr]bool
	for _, s := range socks {
		if s.State != tcpSynRecv {
			continue
		}
		if sources == nil {
			sources = map[listenerKey]map[netip.Addr]bool{}
		}
		if k, ok := listenerFor(out, s); ok {
			l := out[k]
			l.SynRecv++
			if sources[k] == nil {
				sources[k] = map[netip.Addr]bool{}
			}
			if !sources[k][s.Remote] {
				sources[k][s.Remote] = true
				l.SynRecvSources++
			}
			out[k] = l
		}
	}
	return out
}

// listenerFor finds the listener a half-open connection belongs to: the
// one bound to its exact local address, else a wildcard listener on its
// port, preferring the wildcard of its own family (a v4 connection may
// reach a dual-stack [::] listener).
func listenerFor(ls map[listenerKey]listenerSample, s diagSocket) (listenerKey, bool) {
	own, other := netip.IPv4Unspecified(), netip.IPv6Unspecified()
	if s.Addr.Is6() && !s.Addr.Is4In6() {
		own, other = other, own
	}
	for _, a := range [...]netip.Addr{s.Addr, s.Addr.Unmap(), own, other} {
		k := listenerKey{a, s.Port}
		if _, ok := ls[k]; ok {
			return k, true
		}
	}
	return listenerKey{}, false
}

// candidate is a listener that may have caused some of the namespace's
// ListenOverflows since the previous sample.
type candidate struct {
	Key   listenerKey
	Score float64 // evidence: seen full, plus per-port probe counts
	Ratio float64 // how full its queue was, for when nobody scored
	// Arrivals are handshakes completed on it (eBPF) and half-open
	// connections: where connections arrive is where a burst overflows
	// between two samples, for when no queue was seen holding anything.
	Arrivals float64
}

// attribute splits delta overflows among candidates. Those with a positive
// score share in proportion to it, in whole overflows, the rounding rest
// going to the top scorer. When none scored, the fullest queue takes all;
// when no queue held anything, the listener with the most arrivals takes
// all; and when nothing arrived anywhere the overflows stay unattributed: blaming
// the target's listener by default would make a neighbour's overflow look
// like the target's.
func attribute(delta uint64, cands []candidate) (shares []uint64, unattributed uint64) {
	shares = make([]uint64, len(cands))
	if delta == 0 {
		return shares, 0
	}
	var total float64
	top := -1
	for i, c := range cands {
		if c.Score <= 0 {
			continue
		}
		total += c.Score
		if top < 0 || c.Score > cands[top].Score {
			top = i
		}
	}
	if top < 0 {
		for i, c := range cands {
			if c.Ratio > 0 && (top < 0 || c.Ratio > cands[top].Ratio) {
				top = i
			}
		}
		if top < 0 {
			for i, c := range cands {
				if c.Arrivals > 0 && (top < 0 || c.Arrivals > cands[top].Arrivals) {
					top = i
				}
			}
		}
		if top < 0 {
			return shares, delta
		}
		shares[top] = delta
		return shares, 0
	}
	var given uint64
	for i, c := range cands {
		if c.Score <= 0 {
			continue
		}
		shares[i] = min(uint64(math.Floor(float64(delta)*c.Score/total)), delta-given)
		given += shares[i]
	}
	shares[top] += delta - given
	return shares, 0
}

// pendingDrop is overflows one sample read and could not attribute: no
// listener was seen full, and no evidence of arrivals was published yet.
// The tcplisten probe publishes its per-port counts when it polls, on the
// same clock as this collector but not in step with it: a herd of SYNs
// that fills a queue and is accepted between two samples (on loopback the
// whole herd is one softirq pass) leaves its handshakes in the probe's map
// before the sample reads the overflow, and in the store only at the
// probe's next poll, after the read (measured: 4 herds in 10 were
// unattributed so). So such drops wait for the samples that follow.
type pendingDrop struct {
	// The kernel counted them after the sample at from and by the one at
	// at: evidence is what the probe published since from.
	from, at time.Time
	n        uint64
	// keys are the namespace's listeners at from or at: only they can
	// have overflowed then (a listener opened since cannot).
	keys  []listenerKey
	tries int // retries so far; the queue seen full counts at the first
}

// attributionGrace is how long drops wait for their evidence before they
// are unattributed. The probe polls every probes.poll_interval (100 ms)
// while the clock is hot, as it is for 2 s after an overflow and while
// drops wait (Hurry): what it saw by a sample is published by the next,
// or the one after when the poll and the sample fall the other way round
// in a tick. 500 ms is five samples, room for the scheduling delays of a
// loaded machine, and short beside what the rules allow for a drop to
// come late (betweenSamplesSettle and the retry rounds' slack are 1 s):
// a drop attributed late is written at the sample that attributes it.
const attributionGrace = 500 * time.Millisecond

// maxPending bounds the samples whose drops wait (five at the fast
// interval; more only if the grace spans slower cycles).
const maxPending = 16

// lateCandidates is the evidence for drops left pending, at a later
// sample (cur): the probe's per-port counts published since the drops'
// interval began, including those published after they were read (drops
// and SYN-ACK retransmits score, handshakes are arrivals), and, at the
// first retry only, a queue seen full at the next sample (a burst that
// the sample before missed by a moment). A queue that merely holds
// connections later says nothing of the interval: no ratio here.
func lateCandidates(store *signals.Store, p pendingDrop, cur map[listenerKey]listenerSample) []candidate {
	out := make([]candidate, 0, len(p.keys))
	for _, k := range p.keys {
		port := signals.L("port", strconv.Itoa(int(k.Port)))
		score := store.Increase(signals.TCPListenOverflowDropsTotal, port, p.from) +
			store.Increase(signals.TCPSynAckRetransmitsTotal, port, p.from)
		if p.tries == 0 && cur[k].Full {
			score++
		}
		out = append(out, candidate{Key: k, Score: score, Arrivals: store.Increase(signals.TCPListenHandshakesTotal, port, p.from)})
	}
	return out
}

// counterDelta is the growth of a kernel counter between two reads; a
// decrease means it restarted from zero.
func counterDelta(prev, cur uint64) uint64 {
	if cur < prev {
		return cur
	}
	return cur - prev
}

var (
	tcpExtPrefix        = []byte("TcpExt:")
	listenOverflowsName = []byte("ListenOverflows")
	listenDropsName     = []byte("ListenDrops")
)

// parseListenCounters finds ListenOverflows and ListenDrops in the TcpExt
// lines of /proc/net/netstat. It runs ten times a second, so it walks the
// header and value lines in step without splitting or allocating.
func parseListenCounters(b []byte) (overflows, drops uint64, err error) {
	var header, values []byte
	for len(b) > 0 {
		line := b
		if i := bytes.IndexByte(b, '\n'); i >= 0 {
			line, b = b[:i], b[i+1:]
		} else {
			b = nil
		}
		if !bytes.HasPrefix(line, tcpExtPrefix) {
			continue
		}
		if header == nil {
			header = line
			continue
		}
		values = line
		break
	}
	if values == nil {
		return 0, 0, fmt.Errorf("netstat: no TcpExt header and value lines")
	}
	found := 0
	for {
		var name, val []byte
		name, header = nextField(header)
		val, values = nextField(values)
		if name == nil || val == nil {
			break
		}
		var dst *uint64
		switch {
		case bytes.Equal(name, listenOverflowsName):
			dst = &overflows
		case bytes.Equal(name, listenDropsName):
			dst = &drops
		default:
			continue
		}
		v, ok := parseUint(val)
		if !ok {
			return 0, 0, fmt.Errorf("netstat: TcpExt %s: bad value %q", name, val)
		}
		*dst = v
		if found++; found == 2 {
			return overflows, drops, nil
		}
	}
	return 0, 0, fmt.Errorf("netstat: TcpExt lacks ListenOverflows or ListenDrops")
}

func nextField(b []byte) (field, rest []byte) {
	for len(b) > 0 && b[0] == ' ' {
		b = b[1:]
	}
	if len(b) == 0 {
		return nil, nil
	}
	i := bytes.IndexByte(b, ' ')
	if i < 0 {
		return b, nil
	}
	return b[:i], b[i:]
}

func parseUint(b []byte) (uint64, bool) {
	if len(b) == 0 || len(b) > 20 {
		return 0, false
	}
	var v uint64
	for _, c := range b {
		if c < '0' || c > '9' {
			return 0, false
		}
		d := uint64(c - '0')
		if v > (math.MaxUint64-d)/10 {
			return 0, false
		}
		v = v*10 + d
	}
	return v, true
}

// acceptQueueCollector samples the target's listeners fast enough to see
// an accept queue full while it is full, and blames the namespace's
// ListenOverflows on the listeners that were.
//
// It keeps a sock_diag socket open in the target's network namespace
// between calls; Close releases it.
type acceptQueueCollector struct {
	mu       sync.Mutex
	procRoot string
	owners   *workload.SocketOwners

	conn  *sockdiag.Conn
	socks []diagSocket // reused across dumps
	buf   []byte       // reused for net/netstat

	// What was seen of the current target.
	tgt           workload.Process
	havePrev      bool
	prevT         time.Time
	prevOverflows uint64
	prev          map[listenerKey]listenerSample // every listener of the netns at the last sample
	owned         map[uint32]bool                // listener inode -> held by the target (this sample)
	missing       []uint32                       // listener inodes of unknown owner (this sample)

	totals       map[listenerKey]uint64 // attributed overflows, per target listener
	unattributed uint64
	pending      []pendingDrop        // overflows read but not attributed yet, oldest first
	written      map[listenerKey]bool // target listeners with series in the store

	// What a sample costs, and the quiet cycles that skip one: a sample
	// reads net/netstat and dumps the namespace's listeners (about 60 us
	// hot, a few times that cold). While the tcplisten probe's activity
	// counter for the namespace stands still (no handshake completed, no
	// queue overflowed) and every queue was empty at the last sample,
	// nothing can have entered a queue or overflowed it: the cycle writes
	// the last sample's values again (a memory read and a ring write per
	// series), for up to quietFor after the last real sample.
	spare     map[listenerKey]listenerSample // the map before last, reused
	handles   map[listenerKey]*listenerHandles
	nsHandles [3]*signals.Handle // overflows sampled, drops sampled, unattributed
	netstat   procFile
	act       uint64 // the activity counter read before the last sample
	haveAct   bool
	sampledAt time.Time
	quiet     bool // the last sample saw every queue empty
	lastDrops uint64
	quietRuns uint64 // cycles that skipped the sample, ever (tests)
	// While the shared clock idles (signals.Ticker) Collect is called a
	// second apart instead of every interval; the samples it would have
	// taken meanwhile are written afterwards, at their times, when they are
	// provably what the last sample said (the activity counter did not
	// move, or moved only at a wake-up after them). Readers that count
	// samples (a share of samples full) see the same series either way.
	interval  time.Duration
	writtenAt time.Time // the last sample written, taken or filled in
	filledIn  uint64    // samples written afterwards, ever (tests)

	// SYN_RECV sockets live in the established hash, which a dump walks
	// bucket by bucket however few sockets it holds: 2.2 ms against
	// 0.17 ms for LISTEN alone (measured, BenchmarkAcceptQueueCollect). So
	// half-open connections are counted every synRecvEvery, and the counts
	// carried over in between. A walk that found none is not repeated
	// while the listen activity counter stands still: a half-open
	// connection moves it at its first SYN-ACK retransmission (1 s, the
	// kernel's initial RTO), its completion or its drop, so one it has not
	// seen is younger than the cadence's own staleness. Beside 40,000
	// established sockets of a neighbour the walk each second was ~0.5 %
	// of a core.
	//
	// With Options.HalfOpen (the listenqueue eBPF iterator, which reads
	// the listeners' own counts and stops where the listening hash ends)
	// a walk is due only when some listener of the namespace holds a
	// half-open connection: under nginx at 170,000 requests/s beside
	// 10,000 established sockets the walks were 12 % of the agent's CPU,
	// and a loopback handshake is half-open for microseconds.
	synRecvAt    time.Time
	synRecv      map[listenerKey][2]int // SYN_RECV count and distinct sources
	synRecvAct   uint64                 // the listen activity counter at the last walk
	synRecvAny   bool                   // the last walk found half-open connections
	synRecvWalks uint64                 // walks, ever (tests)
	halfOpen     HalfOpenCounter
	halfOpenErr  bool   // the counter failed once: walks from then on (logged once)
	walksSpared  uint64 // walks the counter made unnecessary, ever (tests)
	log          *slog.Logger
}

// HalfOpenCounter counts the half-open connections (SYN_RECV) of every
// listener of the calling thread's network namespace from the listeners
// themselves, without walking the established hash (probes.ListenQueues).
type HalfOpenCounter interface {
	HalfOpen() (int, error)
}

const synRecvEvery = time.Second

// quietFor bounds how long quiet cycles may stand in for samples: the
// SYN_RECV counts and the namespace's counters are read at least this
// often.
const quietFor = time.Second

// listenerHandles are the series of one target listener.
type listenerHandles struct {
	queue, backlog, full, synRecv, sources, overflows *signals.Handle
}

func newAcceptQueueCollector(o Options) (*acceptQueueCollector, error) {
	owners := o.Owners
	if owners == nil {
		owners = workload.NewSocketOwners(procRootOf(o), workload.SocketOwnersOptions{})
	}
	return &acceptQueueCollector{
		procRoot: procRootOf(o),
		interval: o.Interval,
		owners:   owners,
		buf:      make([]byte, 0, 8192),
		prev:     map[listenerKey]listenerSample{},
		owned:    map[uint32]bool{},
		totals:   map[listenerKey]uint64{},
		written:  map[listenerKey]bool{},
		synRecv:  map[listenerKey][2]int{},
		spare:    map[listenerKey]listenerSample{},
		handles:  map[listenerKey]*listenerHandles{},
		halfOpen: o.HalfOpen,
		log:      cmp.Or(o.Log, slog.New(slog.DiscardHandler)),
	}, nil
}

func (c *acceptQueueCollector) Name() string { return signals.CollectorAcceptQueue }

// Close releases the sock_diag socket.
func (c *acceptQueueCollector) Close() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.closeDiag()
	return nil
}

func (c *acceptQueueCollector) closeDiag() {
	if c.conn != nil {
		c.conn.Close()
		c.conn = nil
	}
	c.netstat.close()
}

func sameProcess(a, b workload.Process) bool {
	return a.PID == b.PID && a.StartTime == b.StartTime && a.NetnsIno == b.NetnsIno
}

func (c *acceptQueueCollector) Collect(ctx context.Context, tgt workload.Process, store *signals.Store) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if !sameProcess(c.tgt, tgt) {
		// Another process, maybe another namespace: its counters and
		// listeners are not a continuation of the old ones.
		c.tgt = tgt
		c.havePrev = false
		c.quiet = false
		c.synRecvAt = time.Time{}
		clear(c.prev)
		clear(c.owned)
		c.owners.SetTarget(tgt)
		c.netstat.close()
		c.dropTargetPending()
	}
	// Read before the sample, so that anything during it shows next time.
	act, haveAct := store.Activity(signals.ListenActivity(tgt.NetnsIno))
	now := time.Now()
	if c.quiet && haveAct && c.haveAct {
		// Nothing could enter a queue until the counter moved: fill in the
		// samples the clock's idle skipped, up to now, or up to the
		// wake-up that the first event since sent.
		until := now
		if act != c.act {
			until = time.Time{}
			if w, ok := store.Activity(signals.ListenWake(tgt.NetnsIno)); ok && int64(w) > c.sampledAt.UnixNano() {
				until = time.Unix(0, int64(w))
			}
		}
		c.fillIn(store, until)
		// Drops waiting for their evidence are retried at real samples
		// only (the evidence is the listeners' state, too).
		if act == c.act && now.Sub(c.sampledAt) < quietFor && len(c.pending) == 0 {
			c.quietRuns++
			c.rewrite(store, now)
			if len(c.written) == 0 {
				return fmt.Errorf("pid %d holds no listening TCP socket: %w", tgt.PID, ErrNoData)
			}
			return nil
		}
	}
	c.act, c.haveAct = act, haveAct
	if err := c.openDiag(tgt); err != nil {
		return fmt.Errorf("pid %d: %w", tgt.PID, err)
	}
	// The counters are read just before the dump, not after: an overflow
	// counted in this read then happened before the dump, so the queue it
	// hit is seen full in this dump or was in the previous one. Read the
	// other way round, a burst starting between the two reads is counted
	// against queues sampled before it began (seen in testing: 6 of 17
	// overflows unattributed).
	now = time.Now()
	path := filepath.Join(c.procRoot, strconv.Itoa(tgt.PID), "net", "netstat")
	b, err := c.netstat.read(&c.buf, path)
	if err != nil {
		return fmt.Errorf("pid %d: %w", tgt.PID, err)
	}
	overflows, drops, err := parseListenCounters(b)
	if err != nil {
		return fmt.Errorf("pid %d: %s: %w", tgt.PID, path, err)
	}
	withSynRecv := now.Sub(c.synRecvAt) >= synRecvEvery && (c.synRecvAny || !haveAct || act != c.synRecvAct || c.synRecvAt.IsZero())
	spared := withSynRecv && c.noneHalfOpen(tgt)
	withSynRecv = withSynRecv && !spared
	if err := c.dump(ctx, withSynRecv); err != nil {
		c.closeDiag() // a broken socket is reopened next time
		return fmt.Errorf("pid %d: %w", tgt.PID, err)
	}
	if c.refreshOwned(now) {
		// A listener of unknown owner was looked up: judge this sample
		// with the answer rather than miss a new listener for a cycle.
		c.refreshOwned(now)
	}
	cur := summarizeInto(c.spare, c.socks, c.owned)
	if withSynRecv || spared {
		// A spared walk is one that found none: the dump had no SYN_RECV
		// sockets, so every count below is 0.
		c.synRecvAt, c.synRecvAct, c.synRecvAny = now, act, false
		if withSynRecv {
			c.synRecvWalks++
		} else {
			c.walksSpared++
		}
		clear(c.synRecv)
		for k, l := range cur {
			c.synRecv[k] = [2]int{l.SynRecv, l.SynRecvSources}
			c.synRecvAny = c.synRecvAny || l.SynRecv > 0
		}
	} else {
		for k, l := range cur {
			l.SynRecv, l.SynRecvSources = c.synRecv[k][0], c.synRecv[k][1]
			cur[k] = l
		}
	}

	c.record(store, cur, overflows, drops, now)
	if len(c.written) == 0 {
		return fmt.Errorf("pid %d holds no listening TCP socket: %w", tgt.PID, ErrNoData)
	}
	return nil
}

// noneHalfOpen reports whether HalfOpen says that no listener of the
// target's namespace holds a half-open connection, so that a walk for
// them would find none. A counter that fails is not asked again: the
// walks go on as without it (a namespace it could not enter costs one
// walk).
func (c *acceptQueueCollector) noneHalfOpen(tgt workload.Process) bool {
	if c.halfOpen == nil || c.halfOpenErr {
		return false
	}
	n := 0
	var countErr error
	err := sockdiag.InTargetNetns(c.procRoot, tgt.PID, tgt.NetnsIno, func() error {
		n, countErr = c.halfOpen.HalfOpen()
		return nil
	})
	switch {
	case err != nil:
		// The namespace could not be entered (the target just went):
		// this cycle walks; the dump says what is wrong.
		return false
	case countErr != nil:
		c.halfOpenErr = true
		c.log.Warn("count half-open connections on the listeners; walking the established hash for them instead", "err", countErr)
		return false
	}
	return n == 0
}

// record accounts for one real sample: it attributes the overflows
// counted since the last one and retries those left pending, writes the
// series at now, and makes the sample the baseline of the next.
func (c *acceptQueueCollector) record(store *signals.Store, cur map[listenerKey]listenerSample, overflows, drops uint64, now time.Time) {
	if c.havePrev {
		c.account(store, cur, counterDelta(c.prevOverflows, overflows), now)
	}

	gone := c.write(store, now, cur)
	c.putNamespace(store, float64(overflows), float64(drops), now)
	c.forget(store, gone)

	c.quiet = true
	for _, l := range cur {
		if l.Queue > 0 || l.Full {
			c.quiet = false
			// Connections wait: the probes whose counts are evidence
			// here (accepts, handshakes) poll fast meanwhile.
			store.Hurry(now.Add(2 * time.Second))
		}
		if l.Full || l.ratio() >= fillingRatio {
			// And the app's accepts are counted (they cost every system
			// call of the host while they are).
			store.FillingQueue(now.Add(2 * time.Second))
		}
	}
	if len(c.pending) > 0 {
		// Drops wait for their evidence: the probes that publish it poll
		// at their fast interval meanwhile, and so does this collector.
		store.Hurry(now.Add(attributionGrace))
		store.FillingQueue(now.Add(attributionGrace))
	}
	c.spare = c.prev
	c.prev, c.prevT, c.prevOverflows, c.havePrev = cur, now, overflows, true
	c.lastDrops, c.sampledAt, c.writtenAt = drops, now, now
}

// account attributes the delta overflows the kernel counted between the
// last sample (c.prevT) and now, after retrying the drops earlier samples
// left pending, oldest first. Drops no evidence points to yet wait, up to
// attributionGrace, for evidence published after this read (see
// pendingDrop); only then are they unattributed.
func (c *acceptQueueCollector) account(store *signals.Store, cur map[listenerKey]listenerSample, delta uint64, now time.Time) {
	kept := c.pending[:0]
	for _, p := range c.pending {
		shares, un := attribute(p.n, lateCandidates(store, p, cur))
		c.credit(p.keys, shares, cur)
		if un == 0 {
			continue
		}
		p.n, p.tries = un, p.tries+1
		if now.Sub(p.at) >= attributionGrace {
			c.unattributed += un
			continue
		}
		kept = append(kept, p)
	}
	clear(c.pending[len(kept):])
	c.pending = kept
	if delta == 0 {
		return
	}
	cands := c.candidates(cur, store)
	shares, un := attribute(delta, cands)
	keys := make([]listenerKey, len(cands))
	for i, cd := range cands {
		keys[i] = cd.Key
	}
	c.credit(keys, shares, cur)
	if un == 0 {
		return
	}
	if len(c.pending) == maxPending {
		// Bounded: the oldest gives up early rather than the newest
		// (whose evidence is the likeliest still to come).
		c.unattributed += c.pending[0].n
		c.pending = append(c.pending[:0], c.pending[1:]...)
	}
	c.pending = append(c.pending, pendingDrop{from: c.prevT, at: now, n: un, keys: keys})
}

// credit adds the shares of keys to the totals of the target's listeners.
// A neighbour's share is its own: counted nowhere here, and not
// unattributed either. A share is credited at the sample that attributes
// it (written at now), which is never before the kernel counted the drop:
// a pending drop appears up to attributionGrace late rather than being
// written into samples readers may already have passed (the rules count
// a counter's samples once, in order: stallMemory.count).
func (c *acceptQueueCollector) credit(keys []listenerKey, shares []uint64, cur map[listenerKey]listenerSample) {
	for i, k := range keys {
		if shares[i] > 0 && cur[k].Owned {
			c.totals[k] += shares[i]
		}
	}
}

// dropTargetPending gives up the drops of the namespace the collector
// leaves: no evidence of it will be read any more.
func (c *acceptQueueCollector) dropTargetPending() {
	for _, p := range c.pending {
		c.unattributed += p.n
	}
	clear(c.pending)
	c.pending = c.pending[:0]
}

// putNamespace writes the namespace's counters as this sample read them.
func (c *acceptQueueCollector) putNamespace(store *signals.Store, overflows, drops float64, now time.Time) {
	if c.nsHandles[0] == nil {
		c.nsHandles = [3]*signals.Handle{store.Handle(signals.TCPExtListenOverflowsSampledTotal, nil), store.Handle(signals.TCPExtListenDropsSampledTotal, nil),
			store.Handle(signals.ListenOverflowsUnattributedTotal, nil)}
	}
	c.nsHandles[0].Put(overflows, now)
	c.nsHandles[1].Put(drops, now)
	c.nsHandles[2].Put(float64(c.unattributed), now)
}

// rewrite is a quiet cycle: the last sample's values, at now.
func (c *acceptQueueCollector) rewrite(store *signals.Store, now time.Time) {
	c.write(store, now, c.prev)
	c.putNamespace(store, float64(c.prevOverflows), float64(c.lastDrops), now)
	c.writtenAt = now
}

// fillIn writes the last sample's values at the interval's steps after the
// last sample written and before until (at most quietFor's worth past the
// last real sample: the counter is read no less often).
func (c *acceptQueueCollector) fillIn(store *signals.Store, until time.Time) {
	if c.interval <= 0 || c.writtenAt.IsZero() {
		return
	}
	limit := c.sampledAt.Add(quietFor * 10)
	for t := c.writtenAt.Add(c.interval); t.Before(until) && t.Before(limit) && until.Sub(t) > c.interval/2; t = t.Add(c.interval) {
		c.rewrite(store, t)
		c.filledIn++
	}
}

// openDiag makes sure c.conn is a sock_diag socket in the target's netns.
// A netlink socket stays in the namespace it was created in, so the setns
// dance happens once per namespace, not per sample.
func (c *acceptQueueCollector) openDiag(tgt workload.Process) error {
	if c.conn != nil && c.conn.Netns() == tgt.NetnsIno {
		return nil
	}
	c.closeDiag()
	conn, err := sockdiag.Open(c.procRoot, tgt.PID, tgt.NetnsIno)
	if err != nil {
		return err
	}
	c.conn = conn
	return nil
}

// dump reads every LISTEN (and, withSynRecv, SYN_RECV) TCP socket of the
// namespace into c.socks. A dump the kernel marks interrupted (the tables
// changed under it) is retried, since a listener missing from it would
// look closed.
func (c *acceptQueueCollector) dump(ctx context.Context, withSynRecv bool) error {
	states := sockdiag.Of(sockdiag.Listen)
	if withSynRecv {
		states |= sockdiag.Of(sockdiag.SynRecv)
	}
	var err error
	for attempt := 0; attempt < 3; attempt++ {
		c.socks = c.socks[:0]
		err = c.conn.Dump(ctx, states, false, func(s *sockdiag.Socket) bool {
			c.socks = append(c.socks, diagSocket{Family: s.Family, State: s.State, Addr: s.LocalAddr(), Port: s.LocalPort,
				Remote: s.RemoteAddr(), RQueue: s.RQueue, WQueue: s.WQueue, Inode: s.Inode})
			return true
		})
		if !errors.Is(err, sockdiag.ErrInterrupted) {
			return err
		}
	}
	return err
}

// refreshOwned learns which listeners the target (or its children) holds.
// It reports whether it asked the owner index to look up listeners it did
// not know (rate-limited there): then the caller asks again.
func (c *acceptQueueCollector) refreshOwned(now time.Time) bool {
	clear(c.owned) // also drops inodes of closed listeners
	c.missing = c.missing[:0]
	for _, s := range c.socks {
		if s.State != tcpListen {
			continue
		}
		o, ok := c.owners.Owner(s.Inode)
		if !ok {
			c.missing = append(c.missing, s.Inode)
		}
		c.owned[s.Inode] = o.Role == workload.RoleTarget
	}
	if len(c.missing) == 0 {
		return false
	}
	return c.owners.Refresh(now, c.missing) > 0
}

// candidates lists every listener of the namespace seen now or at the
// previous sample (one that closed in between may still have overflowed),
// with its evidence.
func (c *acceptQueueCollector) candidates(cur map[listenerKey]listenerSample, store *signals.Store) []candidate {
	keys := make([]listenerKey, 0, len(cur)+len(c.prev))
	for k := range cur {
		keys = append(keys, k)
	}
	for k := range c.prev {
		if _, ok := cur[k]; !ok {
			keys = append(keys, k)
		}
	}
	sort.Slice(keys, func(i, j int) bool { return keys[i].less(keys[j]) })
	out := make([]candidate, 0, len(keys))
	for _, k := range keys {
		now, prev := cur[k], c.prev[k]
		var score float64
		if now.Full || prev.Full {
			score = 1
		}
		port := signals.L("port", strconv.Itoa(int(k.Port)))
		// Per-port counters the tcplisten probe writes when it runs: their
		// growth is evidence of which listener overflowed.
		score += store.Increase(signals.TCPListenOverflowDropsTotal, port, c.prevT)
		score += store.Increase(signals.TCPSynAckRetransmitsTotal, port, c.prevT)
		arrivals := store.Increase(signals.TCPListenHandshakesTotal, port, c.prevT) + float64(now.SynRecv)
		out = append(out, candidate{Key: k, Score: score, Ratio: max(now.ratio(), prev.ratio()), Arrivals: arrivals})
	}
	return out
}

// write puts the series of the target's listeners and returns the keys of
// those that were written before and are gone now.
func (c *acceptQueueCollector) write(store *signals.Store, now time.Time, cur map[listenerKey]listenerSample) map[listenerKey]bool {
	for k, l := range cur {
		if !l.Owned {
			continue
		}
		h := c.handles[k]
		if h == nil {
			ls := k.labels()
			h = &listenerHandles{queue: store.Handle(signals.ListenQueueLength, ls), backlog: store.Handle(signals.ListenBacklog, ls),
				full: store.Handle(signals.ListenQueueFull, ls), synRecv: store.Handle(signals.ListenSynRecv, ls),
				sources: store.Handle(signals.ListenSynRecvSources, ls), overflows: store.Handle(signals.ListenOverflowsTotal, ls)}
			c.handles[k] = h
		}
		h.queue.Put(float64(l.Queue), now)
		h.backlog.Put(float64(l.Backlog), now)
		h.full.Put(b2f(l.Full), now)
		h.synRecv.Put(float64(l.SynRecv), now)
		h.sources.Put(float64(l.SynRecvSources), now)
		h.overflows.Put(float64(c.totals[k]), now)
		c.written[k] = true
	}
	var gone map[listenerKey]bool
	for k := range c.written {
		if l, ok := cur[k]; !ok || !l.Owned {
			if gone == nil {
				gone = map[listenerKey]bool{}
			}
			gone[k] = true
			delete(c.written, k)
			delete(c.totals, k)
			delete(c.handles, k)
		}
	}
	return gone
}

// forget drops the series of listeners that closed, so a server opening
// many short-lived ports does not grow the store.
func (c *acceptQueueCollector) forget(store *signals.Store, gone map[listenerKey]bool) {
	if len(gone) == 0 {
		return
	}
	labels := make(map[string]bool, len(gone))
	for k := range gone {
		labels[k.labels().String()] = true
	}
	keep := func(ls signals.Labels) bool { return !labels[ls.String()] }
	for _, d := range []*signals.Desc{signals.ListenQueueLength, signals.ListenBacklog, signals.ListenQueueFull, signals.ListenSynRecv, signals.ListenSynRecvSources, signals.ListenOverflowsTotal} {
		store.Forget(d, keep)
	}
}

func b2f(b bool) float64 {
	if b {
		return 1
	}
	return 0
}
