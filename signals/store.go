package signals

import (
	"math"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// Kind tells readers how to interpret a series: a Counter only grows (deltas
// and rates make sense), a Gauge is a level.
type Kind uint8

const (
	Gauge Kind = iota
	Counter
)

func (k Kind) String() string {
	if k == Counter {
		return "counter"
	}
	return "gauge"
}

// Desc names a signal. Every signal the agent writes is declared once, in
// the catalogue (catalog.go): writers put and readers read through the
// same Desc, so a misspelt signal does not compile.
type Desc struct {
	Name string // snake_case, unit-suffixed: listen_queue_length, tcp_listen_overflows_total
	Kind Kind
	Help string
}

// String is the signal's name, so that a test or a log message can print
// a Desc as the name it is known by.
func (d *Desc) String() string { return d.Name }

// Label is one name=value pair of a series.
type Label struct{ Name, Value string }

// Labels is kept sorted by name so that equal sets have equal keys.
type Labels []Label

// L builds Labels from alternating name, value arguments.
func L(kv ...string) Labels {
	ls := make(Labels, 0, len(kv)/2)
	for i := 0; i+1 < len(kv); i += 2 {
		ls = append(ls, Label{kv[i], kv[i+1]})
	}
	sort.Slice(ls, func(i, j int) bool { return ls[i].Name < ls[j].Name })
	return ls
}

// Get returns the value of the named label, or "".
func (ls Labels) Get(name string) string {
	for _, l := range ls {
		if l.Name == name {
			return l.Value
		}
	}
	return ""
}

func (ls Labels) String() string {
	var b strings.Builder
	b.WriteByte('{')
	for i, l := range ls {
		if i > 0 {
			b.WriteByte(',')
		}
		b.WriteString(l.Name)
		b.WriteString(`="`)
		b.WriteString(l.Value)
		b.WriteByte('"')
	}
	b.WriteByte('}')
	return b.String()
}

// Sample is one measurement.
type Sample struct {
	T time.Time
	V float64
}

// point is a Sample as a series keeps it: 16 bytes and no pointer, so a
// ring of them costs the garbage collector nothing to scan.
type point struct {
	t int64 // Unix nanoseconds
	v float64
}

// nanos is t in Unix nanoseconds, saturated for times int64 cannot hold
// (the zero Time a reader passes for "from the beginning").
func nanos(t time.Time) int64 {
	switch y := t.Year(); {
	case y < 1678:
		return math.MinInt64
	case y > 2261:
		return math.MaxInt64
	}
	return t.UnixNano()
}

func (p point) sample() Sample { return Sample{T: time.Unix(0, p.t), V: p.v} }

// minRing is the first size a series' ring is given; it doubles as the
// series fills, up to the store's ring size. A series written once a
// second reaches 600 samples after ten minutes, one written once never
// costs more than minRing.
const minRing = 4

type series struct {
	desc   *Desc
	labels Labels
	key    string  // name + labels, as the series map knows it
	ring   []point // grows to the store's ringSize; head is the next write position
	head   int
	n      int
	// unsorted: a sample older than the one before it was put, so reads
	// scan rather than search by time.
	unsorted bool
	// dead: forgotten; a Handle that still points here looks it up again.
	dead bool
}

// put appends one sample. The ring grows (doubling) while it is full and
// smaller than max; it wraps only at max, so until then the samples sit in
// order from index 0 and growing is one copy.
func (s *series) put(p point, max int) {
	if s.n == len(s.ring) && len(s.ring) < max {
		grown := make([]point, min(max, 2*len(s.ring)+minRing*boolInt(len(s.ring) == 0)))
		copy(grown, s.ring[:s.n])
		s.ring = grown
		s.head = s.n
	}
	if s.n > 0 && p.t < s.ring[(s.head-1+len(s.ring))%len(s.ring)].t {
		s.unsorted = true
	}
	s.ring[s.head] = p
	s.head = (s.head + 1) % len(s.ring)
	if s.n < len(s.ring) {
		s.n++
	}
}

func boolInt(b bool) int {
	if b {
		return 1
	}
	return 0
}

// at returns the i-th oldest sample.
func (s *series) at(i int) point {
	start := (s.head - s.n + len(s.ring)) % len(s.ring)
	return s.ring[(start+i)%len(s.ring)]
}

func (s *series) latest() (Sample, bool) {
	if s.n == 0 {
		return Sample{}, false
	}
	return s.at(s.n - 1).sample(), true
}

// firstFrom is the index of the oldest sample taken at or after from
// (s.n when none): a binary search while the samples are in time order.
func (s *series) firstFrom(from int64) int {
	if s.unsorted {
		for i := 0; i < s.n; i++ {
			if s.at(i).t >= from {
				return i
			}
		}
		return s.n
	}
	return sort.Search(s.n, func(i int) bool { return s.at(i).t >= from })
}

// Component states reported by collectors and probes.
const (
	StateRunning  = "running"
	StateDegraded = "degraded"
	StateFailed   = "failed"
	StateDisabled = "disabled"
)

// Status says whether a collector or probe runs, and if not, what the agent
// can no longer find because of it.
type Status struct {
	Component string
	Kind      string // "collector" or "probe"
	State     string
	Detail    string
	Lost      []string // findings or evidence lost while degraded
	Since     time.Time
}

// Store holds every series in bounded memory. It is safe for concurrent use.
//
// What a write costs: Put looks its series up by a key built in a buffer
// the store keeps (no allocation once the series exists); a Handle skips
// even that. A series' ring starts at minRing samples and doubles up to
// ringSize, so memory follows what was written, not what could be.
type Store struct {
	mu        sync.RWMutex
	ringSize  int
	maxSeries int
	series    map[string]*series
	byName    map[string][]*series
	dropped   uint64 // samples refused because maxSeries was reached
	status    map[string]Status
	wake      chan struct{}
	keyBuf    []byte // Put's key, under mu
	// hurry is when something asked the pollers to stay fast until (Unix
	// ns): a queue holding connections, an event worth watching closely.
	hurry atomic.Int64
	// filling is until when (Unix ns) a listener of the target is filling
	// up: its accepts are evidence (FillingQueue).
	filling atomic.Int64
	// blocked is until when (Unix ns) a thread of the target that serves
	// work sleeps where work may wait for it (BlockedWorker).
	blocked atomic.Int64
	// activity are counters probes publish for collectors (SetActivity).
	activity sync.Map // string -> func() uint64
}

// New returns a store keeping ringSize samples per series and at most
// maxSeries series; samples for further series are dropped and counted.
func New(ringSize, maxSeries int) *Store {
	if ringSize < 2 {
		ringSize = 2
	}
	if maxSeries < 1 {
		maxSeries = 1
	}
	return &Store{
		ringSize:  ringSize,
		maxSeries: maxSeries,
		series:    make(map[string]*series),
		byName:    make(map[string][]*series),
		status:    make(map[string]Status),
		wake:      make(chan struct{}, 1),
	}
}

// appendKey appends the series key of name and ls to b: name, then the
// labels as Labels.String writes them.
func appendKey(b []byte, name string, ls Labels) []byte {
	b = append(b, name...)
	b = append(b, '{')
	for i, l := range ls {
		if i > 0 {
			b = append(b, ',')
		}
		b = append(b, l.Name...)
		b = append(b, '=', '"')
		b = append(b, l.Value...)
		b = append(b, '"')
	}
	return append(b, '}')
}

func key(name string, ls Labels) string { return string(appendKey(nil, name, ls)) }

// lookup finds a series by name and labels without allocating: the key is
// built in a stack buffer (readers hold only the read lock, so they cannot
// share the store's).
func (s *Store) lookup(name string, ls Labels) (*series, bool) {
	var buf [192]byte
	k := appendKey(buf[:0], name, ls)
	sr, ok := s.series[string(k)]
	return sr, ok
}

// create adds a series under s.mu; nil when the store is full (counted).
func (s *Store) create(d *Desc, ls Labels, k string) *series {
	if len(s.series) >= s.maxSeries {
		s.dropped++
		return nil
	}
	sr := &series{desc: d, labels: append(Labels(nil), ls...), key: k}
	s.series[k] = sr
	s.byName[d.Name] = append(s.byName[d.Name], sr)
	return sr
}

// Put appends one sample. It reports false when the series is new and the
// store is full, in which case the sample is dropped and counted. It
// allocates only when it creates the series.
func (s *Store) Put(d *Desc, ls Labels, v float64, t time.Time) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.keyBuf = appendKey(s.keyBuf[:0], d.Name, ls)
	sr, ok := s.series[string(s.keyBuf)]
	if !ok {
		if sr = s.create(d, ls, string(s.keyBuf)); sr == nil {
			return false
		}
	}
	sr.put(point{nanos(t), v}, s.ringSize)
	return true
}

// Handle is one series for a writer that puts into it again and again (a
// collector's per-listener queue length, a probe's counter): Put goes
// straight to the ring, without building a key or a label set. A handle
// outlives Forget: its next Put creates the series again.
type Handle struct {
	s   *Store
	d   *Desc
	ls  Labels
	key string
	sr  *series
}

// Handle returns the handle of one series (created at its first Put). ls
// is copied.
func (s *Store) Handle(d *Desc, ls Labels) *Handle {
	return &Handle{s: s, d: d, ls: append(Labels(nil), ls...), key: key(d.Name, ls)}
}

// Labels are the handle's labels (not to be modified).
func (h *Handle) Labels() Labels { return h.ls }

// Put appends one sample, as Store.Put does, without allocating.
func (h *Handle) Put(v float64, t time.Time) bool {
	s := h.s
	s.mu.Lock()
	defer s.mu.Unlock()
	if h.sr == nil || h.sr.dead {
		sr, ok := s.series[h.key]
		if !ok {
			if sr = s.create(h.d, h.ls, h.key); sr == nil {
				return false
			}
		}
		h.sr = sr
	}
	h.sr.put(point{nanos(t), v}, s.ringSize)
	return true
}

// Forget removes series of d whose labels match keep==false, so that
// series of sockets or threads that are gone stop taking room.
func (s *Store) Forget(d *Desc, keep func(Labels) bool) {
	name := d.Name
	s.mu.Lock()
	defer s.mu.Unlock()
	list := s.byName[name]
	kept := list[:0]
	for _, sr := range list {
		if keep(sr.labels) {
			kept = append(kept, sr)
			continue
		}
		sr.dead = true
		delete(s.series, sr.key)
	}
	for i := len(kept); i < len(list); i++ {
		list[i] = nil
	}
	if len(kept) == 0 {
		delete(s.byName, name)
	} else {
		s.byName[name] = kept
	}
}

// Notify wakes whoever waits on Wake (the rule engine), so that an event a
// probe saw is evaluated now rather than at the next tick.
func (s *Store) Notify() {
	HotNow() // and the pollers look closely for a while
	select {
	case s.wake <- struct{}{}:
	default:
	}
}

// Wake is signalled after Notify; it coalesces bursts into one wake-up.
func (s *Store) Wake() <-chan struct{} { return s.wake }

// Hurry asks the adaptive pollers (probes that slow down when nothing
// happens) to poll at their fast interval until until: a collector saw a
// listener's queue hold connections, so the accepts and drops the probes
// count are wanted at the fast cadence. It costs one atomic store.
//
// A Hurry that finds the store not hurried also wakes whoever waits on
// Wake: the rule engine, which may be idling.
func (s *Store) Hurry(until time.Time) {
	if was, raised := raiseTo(&s.hurry, until.UnixNano()); raised {
		Hot(until)
		if was <= time.Now().UnixNano() {
			s.Notify()
		}
	}
}

// raiseTo moves the deadline a to u unless it is already later, and says
// what it was and whether it moved.
func raiseTo(a *atomic.Int64, u int64) (was int64, raised bool) {
	for {
		cur := a.Load()
		if cur >= u {
			return cur, false
		}
		if a.CompareAndSwap(cur, u) {
			return cur, true
		}
	}
}

// SetActivity publishes a counter that moves whenever what it names
// happened: the tcplisten probe's, which moves when a handshake completes,
// or a queue overflows, in the target's namespace. f must be cheap (it is
// called at the fast collectors' cadence) and safe for concurrent use; nil
// withdraws it.
func (s *Store) SetActivity(name string, f func() uint64) {
	if f == nil {
		s.activity.Delete(name)
		return
	}
	s.activity.Store(name, f)
}

// Activity reads a published counter; ok is false when nobody publishes
// it (the probe does not run), and the reader must then assume anything
// may have happened.
func (s *Store) Activity(name string) (uint64, bool) {
	f, ok := s.activity.Load(name)
	if !ok {
		return 0, false
	}
	return f.(func() uint64)(), true
}

// ListenActivity names the activity counter the tcplisten probe publishes
// for a network namespace (its inode): it moves whenever a handshake
// completes, an accept queue overflows or a SYN-ACK is retransmitted there.
func ListenActivity(netns uint64) string { return "tcplisten:" + strconv.FormatUint(netns, 10) }

// ConnActivity names the counter the tcplife probe publishes for a
// network namespace: it moves at every connection event there (an open,
// a peer's close, a local close, a reset received), some of which change
// no counter of the namespace's but segments (ESTABLISHED to CLOSE_WAIT).
func ConnActivity(netns uint64) string { return "tcplife:" + strconv.FormatUint(netns, 10) }

// ListenWake names the counter that says when (Unix ns) the tcplisten
// probe was last woken by an event of that namespace while the shared
// clock idled: until then nothing had entered an accept queue.
func ListenWake(netns uint64) string { return "tcplisten-wake:" + strconv.FormatUint(netns, 10) }

// Hurried reports whether a Hurry is in force at now.
func (s *Store) Hurried(now time.Time) bool { return now.UnixNano() < s.hurry.Load() }

// FillingQueue says that a listener of the target is filling up until
// until (its queue half full or more, or dropping SYNs): what the app
// accepts meanwhile tells a stall from a burst, so the sockcalls probe
// counts accepts, which costs every system call of the host, only then.
// A queue that merely holds connections is not enough: a busy healthy
// server's queue holds a few at most samples. One atomic store.
func (s *Store) FillingQueue(until time.Time) { raiseTo(&s.filling, until.UnixNano()) }

// QueueFilling reports whether a FillingQueue is in force at now.
func (s *Store) QueueFilling(now time.Time) bool { return now.UnixNano() < s.filling.Load() }

// BlockedWorker says that a thread of the target sleeps, until until,
// where the rules judge it by the work that waited meanwhile (a sleep
// outside its idle wait): the sockcalls probe watches for data left
// unread on the target's sockets, which costs every packet and read of
// the host, only then. One atomic store.
func (s *Store) BlockedWorker(until time.Time) { raiseTo(&s.blocked, until.UnixNano()) }

// WorkerBlocked reports whether a BlockedWorker is in force at now.
func (s *Store) WorkerBlocked(now time.Time) bool { return now.UnixNano() < s.blocked.Load() }

// Latest returns the newest sample of one series.
func (s *Store) Latest(d *Desc, ls Labels) (Sample, bool) {
	s.mu.RLock()
	defer s.mu.RUnlock()
	sr, ok := s.lookup(d.Name, ls)
	if !ok {
		return Sample{}, false
	}
	return sr.latest()
}

// Range returns the samples of one series taken at or after from, oldest
// first. The slice is a copy.
func (s *Store) Range(d *Desc, ls Labels, from time.Time) []Sample {
	s.mu.RLock()
	defer s.mu.RUnlock()
	sr, ok := s.lookup(d.Name, ls)
	if !ok {
		return nil
	}
	f := nanos(from)
	i := sr.firstFrom(f)
	if i == sr.n {
		return nil
	}
	out := make([]Sample, 0, sr.n-i)
	for ; i < sr.n; i++ {
		if p := sr.at(i); p.t >= f {
			out = append(out, p.sample())
		}
	}
	return out
}

// Increase returns how much a counter grew between from and the newest
// sample, counting a drop in value as a reset (like Prometheus' increase).
// The sample just before from is the baseline, so a window that begins
// between two samples still sees the growth that crossed into it.
func (s *Store) Increase(d *Desc, ls Labels, from time.Time) float64 {
	s.mu.RLock()
	defer s.mu.RUnlock()
	sr, ok := s.lookup(d.Name, ls)
	if !ok || sr.n == 0 {
		return 0
	}
	f := nanos(from)
	var inc float64
	var prev point
	havePrev := false
	i := 0
	if !sr.unsorted {
		// The samples before the baseline cannot change the result.
		if i = sr.firstFrom(f) - 1; i < 0 {
			i = 0
		}
	}
	for ; i < sr.n; i++ {
		smp := sr.at(i)
		if smp.t < f {
			prev, havePrev = smp, true
			continue
		}
		if havePrev {
			if d := smp.v - prev.v; d >= 0 {
				inc += d
			} else {
				inc += smp.v
			}
		}
		prev, havePrev = smp, true
	}
	return inc
}

// Select lists the label sets of every series of d.
func (s *Store) Select(d *Desc) []Labels {
	s.mu.RLock()
	defer s.mu.RUnlock()
	list := s.byName[d.Name]
	out := make([]Labels, 0, len(list))
	for _, sr := range list {
		out = append(out, sr.labels)
	}
	return out
}

// Current is the newest value of one series.
type Current struct {
	Desc   *Desc
	Labels Labels
	Sample Sample
}

// Snapshot returns the newest sample of every series, sorted by name and
// labels so that output built from it is stable.
func (s *Store) Snapshot() []Current {
	s.mu.RLock()
	type keyed struct {
		c      Current
		labels string // the labels part of the series key: Labels.String()
	}
	ks := make([]keyed, 0, len(s.series))
	for _, sr := range s.series {
		if smp, ok := sr.latest(); ok {
			ks = append(ks, keyed{Current{Desc: sr.desc, Labels: sr.labels, Sample: smp}, sr.key[len(sr.desc.Name):]})
		}
	}
	s.mu.RUnlock()
	sort.Slice(ks, func(i, j int) bool {
		if ks[i].c.Desc.Name != ks[j].c.Desc.Name {
			return ks[i].c.Desc.Name < ks[j].c.Desc.Name
		}
		return ks[i].labels < ks[j].labels
	})
	out := make([]Current, len(ks))
	for i := range ks {
		out[i] = ks[i].c
	}
	return out
}

// Stats describes the store's own use of its bounds.
type Stats struct {
	Series, MaxSeries, RingSize int
	Dropped                     uint64
}

func (s *Store) Stats() Stats {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return Stats{Series: len(s.series), MaxSeries: s.maxSeries, RingSize: s.ringSize, Dropped: s.dropped}
}

// SetStatus records the state of a collector or probe.
func (s *Store) SetStatus(st Status) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if old, ok := s.status[st.Component]; ok && old.State == st.State && !old.Since.IsZero() {
		st.Since = old.Since
	}
	if st.Since.IsZero() {
		st.Since = time.Now()
	}
	s.status[st.Component] = st
}

// Statuses returns every component's status sorted by name.
func (s *Store) Statuses() []Status {
	s.mu.RLock()
	defer s.mu.RUnlock()
	out := make([]Status, 0, len(s.status))
	for _, st := range s.status {
		out = append(out, st)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Component < out[j].Component })
	return out
}
