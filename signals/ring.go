package signals

// ring is a FIFO bounded by max that overwrites its oldest element when
// full, counting what it overwrote. Its buffer grows on demand (doubling
// from minRingBuf) up to max, so a ring whose source is quiet, or whose
// feature is off, costs next to nothing. Not safe for concurrent use: Log
// locks around it.
//
// Until the buffer reaches max it never wraps: the elements sit in order
// from index 0, so growing is one copy and an index add returned stays
// valid (a keyed Log keeps them).
type ring[T any] struct {
	buf     []T
	max     int
	head, n int
	evicted uint64
}

const minRingBuf = 16

func newRing[T any](size int) ring[T] {
	return ring[T]{max: max(size, 1)}
}

// add appends v and returns its index in buf.
func (r *ring[T]) add(v T) int {
	if r.n == len(r.buf) && len(r.buf) < r.max {
		grown := make([]T, min(r.max, max(minRingBuf, 2*len(r.buf))))
		copy(grown, r.buf[:r.n])
		r.buf = grown
		r.head = r.n
	}
	if r.n == len(r.buf) {
		r.evicted++
	} else {
		r.n++
	}
	i := r.head
	r.buf[i] = v
	r.head = (r.head + 1) % len(r.buf)
	return i
}

// oldest is the element add would overwrite next when full.
func (r *ring[T]) oldest() (T, bool) {
	if r.n < r.max || len(r.buf) == 0 {
		var zero T
		return zero, false
	}
	return r.buf[r.head], true
}

// each calls f on every element, oldest first.
func (r *ring[T]) each(f func(T)) { r.eachFrom(0, f) }

// eachFrom calls f on every element but the skip oldest, oldest first.
func (r *ring[T]) eachFrom(skip int, f func(T)) {
	if r.n == 0 {
		return
	}
	start := (r.head - r.n + len(r.buf)) % len(r.buf)
	for i := max(skip, 0); i < r.n; i++ {
		f(r.buf[(start+i)%len(r.buf)])
	}
}
