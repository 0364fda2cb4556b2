package signals

import (
	"sort"
	"strings"
	"sync"
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

// Desc names a signal. Collectors declare one per signal they write, so the
// help text and kind live next to the code that measures it.
type Desc struct {
	Name string // snake_case, unit-suffixed: listen_queue_length, tcp_listen_overflows_total
	Kind Kind
	Help string
}

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

type series struct {
	desc   *Desc
	labels Labels
	ring   []Sample // fixed capacity; head is the next write position
	head   int
	n      int
}

func (s *series) put(smp Sample) {
	s.ring[s.head] = smp
	s.head = (s.head + 1) % len(s.ring)
	if s.n < len(s.ring) {
		s.n++
	}
}

// at returns the i-th oldest sample.
func (s *series) at(i int) Sample {
	start := (s.head - s.n + len(s.ring)) % len(s.ring)
	return s.ring[(start+i)%len(s.ring)]
}

func (s *series) latest() (Sample, bool) {
	if s.n == 0 {
		return Sample{}, false
	}
	return s.at(s.n - 1), true
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
type Store struct {
	mu        sync.RWMutex
	ringSize  int
	maxSeries int
	series    map[string]*series
	byName    map[string][]*series
	dropped   uint64 // samples refused because maxSeries was reached
	status    map[string]Status
	wake      chan struct{}
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

func key(name string, ls Labels) string { return name + ls.String() }

// Put appends one sample. It reports false when the series is new and the
// store is full, in which case the sample is dropped and counted.
func (s *Store) Put(d *Desc, ls Labels, v float64, t time.Time) bool {
	k := key(d.Name, ls)
	s.mu.Lock()
	defer s.mu.Unlock()
	sr, ok := s.series[k]
	if !ok {
		if len(s.series) >= s.maxSeries {
			s.dropped++
			return false
		}
		sr = &series{desc: d, labels: append(Labels(nil), ls...), ring: make([]Sample, s.ringSize)}
		s.series[k] = sr
		s.byName[d.Name] = append(s.byName[d.Name], sr)
	}
	sr.put(Sample{T: t, V: v})
	return true
}

// Forget removes series of name whose labels match keep==false, so that
// series of sockets or threads that are gone stop taking room.
func (s *Store) Forget(name string, keep func(Labels) bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	list := s.byName[name]
	kept := list[:0]
	for _, sr := range list {
		if keep(sr.labels) {
			kept = append(kept, sr)
			continue
		}
		delete(s.series, key(name, sr.labels))
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
	select {
	case s.wake <- struct{}{}:
	default:
	}
}

// Wake is signalled after Notify; it coalesces bursts into one wake-up.
func (s *Store) Wake() <-chan struct{} { return s.wake }

// Latest returns the newest sample of one series.
func (s *Store) Latest(name string, ls Labels) (Sample, bool) {
	s.mu.RLock()
	defer s.mu.RUnlock()
	sr, ok := s.series[key(name, ls)]
	if !ok {
		return Sample{}, false
	}
	return sr.latest()
}

// Range returns the samples of one series taken at or after from, oldest
// first. The slice is a copy.
func (s *Store) Range(name string, ls Labels, from time.Time) []Sample {
	s.mu.RLock()
	defer s.mu.RUnlock()
	sr, ok := s.series[key(name, ls)]
	if !ok {
		return nil
	}
	var out []Sample
	for i := 0; i < sr.n; i++ {
		if smp := sr.at(i); !smp.T.Before(from) {
			out = append(out, smp)
		}
	}
	return out
}

// Increase returns how much a counter grew between from and the newest
// sample, counting a drop in value as a reset (like Prometheus' increase).
// The sample just before from is the baseline, so a window that begins
// between two samples still sees the growth that crossed into it.
func (s *Store) Increase(name string, ls Labels, from time.Time) float64 {
	s.mu.RLock()
	defer s.mu.RUnlock()
	sr, ok := s.series[key(name, ls)]
	if !ok || sr.n == 0 {
		return 0
	}
	var inc float64
	var prev Sample
	havePrev := false
	for i := 0; i < sr.n; i++ {
		smp := sr.at(i)
		if smp.T.Before(from) {
			prev, havePrev = smp, true
			continue
		}
		if havePrev {
			if d := smp.V - prev.V; d >= 0 {
				inc += d
			} else {
				inc += smp.V
			}
		}
		prev, havePrev = smp, true
	}
	return inc
}

// Select lists the label sets of every series with that name.
func (s *Store) Select(name string) []Labels {
	s.mu.RLock()
	defer s.mu.RUnlock()
	list := s.byName[name]
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
	out := make([]Current, 0, len(s.series))
	for _, sr := range s.series {
		if smp, ok := sr.latest(); ok {
			out = append(out, Current{Desc: sr.desc, Labels: sr.labels, Sample: smp})
		}
	}
	s.mu.RUnlock()
	sort.Slice(out, func(i, j int) bool {
		if out[i].Desc.Name != out[j].Desc.Name {
			return out[i].Desc.Name < out[j].Desc.Name
		}
		return out[i].Labels.String() < out[j].Labels.String()
	})
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
