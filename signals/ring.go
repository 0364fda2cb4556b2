package signals

// ring is a fixed-capacity FIFO that overwrites its oldest element when
// full, counting what it overwrote. Not safe for concurrent use: its
// owners lock around it.
type ring[T any] struct {
	buf     []T
	head, n int
	evicted uint64
}

func newRing[T any](size int) ring[T] {
	return ring[T]{buf: make([]T, max(size, 1))}
}

// add appends v and returns its index in buf.
func (r *ring[T]) add(v T) int {
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
	if r.n < len(r.buf) {
		var zero T
		return zero, false
	}
	return r.buf[r.head], true
}

// each calls f on every element, oldest first.
func (r *ring[T]) each(f func(T)) {
	start := (r.head - r.n + len(r.buf)) % len(r.buf)
	for i := 0; i < r.n; i++ {
		f(r.buf[(start+i)%len(r.buf)])
	}
}
