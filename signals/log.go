package signals

import "sync"

// Log is a bounded, concurrency-safe log of the last max values of one
// kind (connection events, stack samples, episodes): a ring behind a lock.
// Its buffer grows on demand up to max, so the log of a quiet source, or of
// a feature that is off, holds next to nothing. Reads copy out, so a reader
// never holds the lock while it works on what it read.
//
// A log made by NewKeyedLog also indexes its values by a key, so that Put
// can replace a value in place (an ongoing episode that grows, then ends)
// instead of appending a new one each time it is reported.
//
// Make one with NewLog or NewKeyedLog: the zero Log is not ready for use.
type Log[T any] struct {
	mu  sync.RWMutex
	r   ring[T]
	idx logIndex[T] // nil unless keyed
}

// logIndex finds a value's position in the ring by its key. Its methods
// run under the log's write lock.
type logIndex[T any] interface {
	lookup(v T) (int, bool)
	set(v T, i int)
	drop(v T)
}

// keyIndex is a logIndex with a typed key, so that keys are not boxed.
type keyIndex[T any, K comparable] struct {
	key func(T) K
	m   map[K]int
}

func (k *keyIndex[T, K]) lookup(v T) (int, bool) { i, ok := k.m[k.key(v)]; return i, ok }
func (k *keyIndex[T, K]) set(v T, i int)         { k.m[k.key(v)] = i }
func (k *keyIndex[T, K]) drop(v T)               { delete(k.m, k.key(v)) }

// NewLog keeps at most max values (at least one).
func NewLog[T any](max int) *Log[T] {
	return &Log[T]{r: newRing[T](max)}
}

// NewKeyedLog keeps at most max values (at least one), indexed by key for
// Put. Two values with the same key are one entry.
func NewKeyedLog[T any, K comparable](max int, key func(T) K) *Log[T] {
	return &Log[T]{r: newRing[T](max), idx: &keyIndex[T, K]{key: key, m: make(map[K]int)}}
}

// Add appends vs, oldest first, evicting the oldest values when full. On a
// keyed log, a value whose key is already in the log is appended all the
// same (Put replaces it instead).
func (l *Log[T]) Add(vs ...T) {
	l.mu.Lock()
	defer l.mu.Unlock()
	for _, v := range vs {
		l.addLocked(v)
	}
}

func (l *Log[T]) addLocked(v T) {
	if l.idx == nil {
		l.r.add(v)
		return
	}
	if old, full := l.r.oldest(); full {
		if i, ok := l.idx.lookup(old); ok && i == l.r.head {
			l.idx.drop(old)
		}
	}
	// The ring never wraps before it reaches max and never moves an
	// element after that, so the index add returns stays valid until the
	// value is overwritten.
	l.idx.set(v, l.r.add(v))
}

// Put adds v or, on a keyed log holding a value with v's key, replaces
// that value in place when replace(old, v) says so (nil: always). On a log
// that is not keyed, Put is Add.
func (l *Log[T]) Put(v T, replace func(old, v T) bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.idx != nil {
		if i, ok := l.idx.lookup(v); ok {
			if replace == nil || replace(l.r.buf[i], v) {
				l.r.buf[i] = v
			}
			return
		}
	}
	l.addLocked(v)
}

// Filter returns a copy of the values keep accepts (all of them when keep
// is nil), oldest first; nil when none. keep runs under the log's read
// lock: it must not call the log.
func (l *Log[T]) Filter(keep func(T) bool) []T {
	l.mu.RLock()
	defer l.mu.RUnlock()
	// Counted first, then copied into a slice of that size: the rules
	// filter episodes and connection events on every evaluation, and
	// growing the result by appends allocated twice what it returned (an
	// Episode is ~170 bytes).
	n := 0
	l.r.each(func(v T) {
		if keep == nil || keep(v) {
			n++
		}
	})
	if n == 0 {
		return nil
	}
	out := make([]T, 0, n)
	l.r.each(func(v T) {
		if keep == nil || keep(v) {
			out = append(out, v)
		}
	})
	return out
}

// After appends to out the values added after the seq-th value ever added
// that keep accepts (all of them when keep is nil), oldest first, and
// returns them with the number of values added so far: pass that as seq
// next time to read only what came since. Values pushed out before they
// were read are gone. keep runs under the log's read lock: it must not
// call the log. Reading what changed is what lets a rule that looks at a
// window of minutes run five times a second: copying the whole log each
// time was most of idle_timeout's cost beside nginx flat out.
func (l *Log[T]) After(seq uint64, keep func(T) bool, out []T) ([]T, uint64) {
	l.mu.RLock()
	defer l.mu.RUnlock()
	total := l.r.evicted + uint64(l.r.n)
	if seq >= total || l.r.n == 0 {
		return out, total
	}
	skip := 0
	if seq > l.r.evicted {
		skip = int(seq - l.r.evicted)
	}
	l.r.eachFrom(skip, func(v T) {
		if keep == nil || keep(v) {
			out = append(out, v)
		}
	})
	return out, total
}

// Max is the most values the log keeps.
func (l *Log[T]) Max() int { return l.r.max }

// Len is how many values the log holds.
func (l *Log[T]) Len() int {
	l.mu.RLock()
	defer l.mu.RUnlock()
	return l.r.n
}

// Evicted is how many values were pushed out by newer ones.
func (l *Log[T]) Evicted() uint64 {
	l.mu.RLock()
	defer l.mu.RUnlock()
	return l.r.evicted
}
