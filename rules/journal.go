package rules

import (
	"sort"
	"sync"
	"time"
)

// Journal keeps the open findings and the last events in a fixed-size ring.
// Readers never block the writer: a watcher is woken through a channel of
// capacity one and then pulls what it has not seen with After, so a slow
// client costs a cursor, not a queue. A reader that falls behind the ring
// learns it from the gap flag and starts again from the open findings.
type Journal struct {
	mu      sync.Mutex
	ring    []Event
	head, n int
	seq     uint64
	open    map[string]Finding // by ID
	recent  map[string]Finding // resolved, kept for GetFinding until evicted from the ring
	waiters map[chan struct{}]struct{}
}

// NewJournal keeps the last size events.
func NewJournal(size int) *Journal {
	if size < 1 {
		size = 1
	}
	return &Journal{
		ring:    make([]Event, size),
		open:    make(map[string]Finding),
		recent:  make(map[string]Finding),
		waiters: make(map[chan struct{}]struct{}),
	}
}

// append assigns the next sequence to ev and stores it; the engine is the
// only writer.
func (j *Journal) append(typ EventType, f Finding, t time.Time) Event {
	j.mu.Lock()
	j.seq++
	f.Sequence = j.seq
	ev := Event{Sequence: j.seq, Type: typ, Time: t, Finding: f}
	if j.n == len(j.ring) {
		// The oldest event leaves the ring; forget a resolved finding it
		// was the last word on, so recent stays bounded by the ring.
		old := j.ring[j.head]
		if r, ok := j.recent[old.Finding.ID]; ok && r.Sequence == old.Sequence {
			delete(j.recent, old.Finding.ID)
		}
	}
	j.ring[j.head] = ev
	j.head = (j.head + 1) % len(j.ring)
	if j.n < len(j.ring) {
		j.n++
	}
	if typ == EventResolved {
		delete(j.open, f.ID)
		j.recent[f.ID] = f
	} else {
		j.open[f.ID] = f
	}
	for w := range j.waiters {
		select {
		case w <- struct{}{}:
		default:
		}
	}
	j.mu.Unlock()
	return ev
}

// Touch replaces an open finding's current state without an event: the
// numbers moved, but not enough to tell watchers (ListFindings and
// GetFinding show it; the stream carries only material changes).
func (j *Journal) Touch(f Finding) {
	j.mu.Lock()
	defer j.mu.Unlock()
	if old, ok := j.open[f.ID]; ok {
		f.Sequence = old.Sequence
		j.open[f.ID] = f
	}
}

// Sequence is the sequence of the newest event (0 before any).
func (j *Journal) Sequence() uint64 {
	j.mu.Lock()
	defer j.mu.Unlock()
	return j.seq
}

// After returns up to max events with a sequence above since, oldest first.
// gap is true when events after since have already left the ring: the
// caller missed some and should resynchronise from Open.
func (j *Journal) After(since uint64, max int) (evs []Event, gap bool) {
	j.mu.Lock()
	defer j.mu.Unlock()
	if j.n == 0 || since >= j.seq {
		return nil, false
	}
	oldest := j.seq - uint64(j.n) + 1
	if since+1 < oldest {
		gap = true
		since = oldest - 1
	}
	start := (j.head - j.n + len(j.ring)) % len(j.ring)
	skip := int(since + 1 - oldest)
	for i := skip; i < j.n && len(evs) < max; i++ {
		evs = append(evs, j.ring[(start+i)%len(j.ring)])
	}
	return evs, gap
}

// Open returns the open findings, oldest first, and the sequence they are
// current as of.
func (j *Journal) Open() ([]Finding, uint64) {
	j.mu.Lock()
	defer j.mu.Unlock()
	out := make([]Finding, 0, len(j.open))
	for _, f := range j.open {
		out = append(out, f)
	}
	sort.Slice(out, func(a, b int) bool {
		return out[a].FirstSeen.Before(out[b].FirstSeen) || (out[a].FirstSeen.Equal(out[b].FirstSeen) && out[a].ID < out[b].ID)
	})
	return out, j.seq
}

// Get returns a finding that is open or was resolved recently.
func (j *Journal) Get(id string) (Finding, bool) {
	j.mu.Lock()
	defer j.mu.Unlock()
	if f, ok := j.open[id]; ok {
		return f, true
	}
	f, ok := j.recent[id]
	return f, ok
}

// Resolved returns the recently resolved findings still remembered.
func (j *Journal) Resolved() []Finding {
	j.mu.Lock()
	defer j.mu.Unlock()
	out := make([]Finding, 0, len(j.recent))
	for _, f := range j.recent {
		out = append(out, f)
	}
	sort.Slice(out, func(a, b int) bool { return out[a].Sequence < out[b].Sequence })
	return out
}

// Subscribe returns a channel that receives a token whenever events are
// appended, and a function to stop.
func (j *Journal) Subscribe() (<-chan struct{}, func()) {
	ch := make(chan struct{}, 1)
	j.mu.Lock()
	j.waiters[ch] = struct{}{}
	j.mu.Unlock()
	return ch, func() {
		j.mu.Lock()
		delete(j.waiters, ch)
		j.mu.Unlock()
	}
}

// Watchers counts current subscribers.
func (j *Journal) Watchers() int {
	j.mu.Lock()
	defer j.mu.Unlock()
	return len(j.waiters)
}
