package traces

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"
)

var (
	// errBusy: the in-flight budget stayed taken for the whole wait.
	errBusy = errors.New("the receiver is busy: traces.max_inflight_bytes is taken by other requests")
	// errOverBudget: the request alone needs more than the budget allows.
	errOverBudget = errors.New("request needs more memory than traces.max_inflight_bytes allows")
)

// budget is a semaphore in bytes over everything the receiver holds for
// requests in flight: bodies being read, and what decoding them takes.
// Without it, 200 uploads that each send all but the last byte of a 4 MB
// body held 800 MB.
//
// The last eighth of it is kept for small requests (a thirty-second of
// the budget or less): a handful of stalled large uploads can then fill
// the rest, but an SDK's ordinary export (kilobytes) still gets in.
// Waiters are not served in order: whoever fits when bytes free up goes,
// so small requests are not stuck behind large ones.
type budget struct {
	total, reserve, small int64

	mu      sync.Mutex
	used    int64
	changed chan struct{} // closed and replaced at each release
}

func newBudget(total int64) *budget {
	return &budget{total: total, reserve: total / 8, small: total / 32, changed: make(chan struct{})}
}

// largest is the most one request may hold.
func (b *budget) largest() int64 { return b.total - b.reserve }

func (b *budget) fitsLocked(n int64) bool {
	free := b.total - b.used
	if n <= b.small {
		return n <= free
	}
	return n <= free-b.reserve
}

func (b *budget) tryAcquire(n int64) bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	if !b.fitsLocked(n) {
		return false
	}
	b.used += n
	return true
}

// acquire takes n bytes, waiting up to wait for them; errOverBudget if n
// can never fit, errBusy when the wait ran out, ctx's error if it ended.
func (b *budget) acquire(ctx context.Context, n int64, wait time.Duration) error {
	if n > b.largest() && n > b.small {
		return errOverBudget
	}
	var timeout <-chan time.Time
	for {
		b.mu.Lock()
		if b.fitsLocked(n) {
			b.used += n
			b.mu.Unlock()
			return nil
		}
		changed := b.changed
		b.mu.Unlock()
		if timeout == nil {
			if wait <= 0 {
				return errBusy
			}
			t := time.NewTimer(wait)
			defer t.Stop()
			timeout = t.C
		}
		select {
		case <-changed:
		case <-timeout:
			return errBusy
		case <-ctx.Done():
			return fmt.Errorf("waiting for traces.max_inflight_bytes: %w", ctx.Err())
		}
	}
}

func (b *budget) release(n int64) {
	if n == 0 {
		return
	}
	b.mu.Lock()
	b.used -= n
	close(b.changed)
	b.changed = make(chan struct{})
	b.mu.Unlock()
}

func (b *budget) inUse() int64 {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.used
}

// hold is one request's share of the budget, grown and shrunk as the
// request goes from reading to decoding; released once, by whoever ends
// it first (the handler, or the end of a gRPC stream whose handler never
// ran).
type hold struct {
	b *budget

	mu       sync.Mutex
	held     int64
	claimed  bool // a handler owns the hold and releases it
	released bool
}

// claim makes the caller the hold's owner; false if it was already let go
// (the stream ended or timed out before its handler ran).
func (h *hold) claim() bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.released {
		return false
	}
	h.claimed = true
	return true
}

// abandon releases the hold unless a handler claimed it.
func (h *hold) abandon() {
	h.mu.Lock()
	if h.claimed {
		h.mu.Unlock()
		return
	}
	n := h.held
	h.held, h.released = 0, true
	h.mu.Unlock()
	h.b.release(n)
}

// grow takes n more bytes (see budget.acquire).
func (h *hold) grow(ctx context.Context, n int64, wait time.Duration) error {
	if n <= 0 {
		return nil
	}
	if err := h.b.acquire(ctx, n, wait); err != nil {
		return err
	}
	h.mu.Lock()
	if h.released {
		h.mu.Unlock()
		h.b.release(n)
		return errBusy
	}
	h.held += n
	h.mu.Unlock()
	return nil
}

// resize grows or shrinks the hold to n bytes.
func (h *hold) resize(ctx context.Context, n int64, wait time.Duration) error {
	h.mu.Lock()
	cur := h.held
	if n < cur && !h.released {
		h.held = n
		h.mu.Unlock()
		h.b.release(cur - n)
		return nil
	}
	h.mu.Unlock()
	return h.grow(ctx, n-cur, wait)
}

// release gives everything back; later calls do nothing.
func (h *hold) release() {
	h.mu.Lock()
	n := h.held
	h.held, h.released = 0, true
	h.mu.Unlock()
	h.b.release(n)
}

// Connection states for eviction: a connection that has not sent a whole
// request yet, or is idle between requests, may be closed to make room.
const (
	connFresh int32 = iota // accepted, no request seen yet
	connBusy               // serving a request (HTTP), or has had a stream (gRPC)
	connIdle               // HTTP keep-alive, between requests
)

// minEvictAge protects a connection that just arrived: an SDK's request
// follows its connect within microseconds on loopback, so only a
// connection this old with nothing sent can be a stalled one.
const minEvictAge = 200 * time.Millisecond

// limitListener caps the connections a listener holds. At the cap, a new
// connection closes the oldest one that is fresh or idle and older than
// minEvictAge, so a flood of connections that send nothing (or a byte a
// second) cannot keep an SDK out; if every connection is busy, the new
// one is closed at once (the client retries) rather than left in the
// kernel's backlog behind the flood.
type limitListener struct {
	net.Listener
	max     int
	onClose func(reason string) // counts evicted and refused connections

	mu     sync.Mutex
	conns  map[*limitedConn]struct{}
	byAddr map[string]*limitedConn // remote address: how gRPC's tap finds its connection
}

func newLimitListener(l net.Listener, max int, onClose func(string)) *limitListener {
	return &limitListener{Listener: l, max: max, onClose: onClose, conns: map[*limitedConn]struct{}{}, byAddr: map[string]*limitedConn{}}
}

func (l *limitListener) Accept() (net.Conn, error) {
	for {
		c, err := l.Listener.Accept()
		if err != nil {
			return nil, err
		}
		if lc := l.admit(c); lc != nil {
			return lc, nil
		}
	}
}

func (l *limitListener) admit(c net.Conn) *limitedConn {
	now := time.Now()
	l.mu.Lock()
	var victim *limitedConn
	if len(l.conns) >= l.max {
		for lc := range l.conns {
			st, since := lc.get()
			if st == connBusy || now.Sub(since) < minEvictAge {
				continue
			}
			if victim == nil || since.Before(victimSince(victim)) {
				victim = lc
			}
		}
		if victim == nil {
			l.mu.Unlock()
			_ = c.Close()
			l.onClose("refused")
			return nil
		}
		l.removeLocked(victim)
	}
	lc := &limitedConn{Conn: c, l: l, addr: c.RemoteAddr().String()}
	lc.set(connFresh)
	l.conns[lc] = struct{}{}
	l.byAddr[lc.addr] = lc
	l.mu.Unlock()
	if victim != nil {
		_ = victim.Conn.Close() // its server goroutine sees the error and lets go
		l.onClose("evicted")
	}
	return lc
}

func victimSince(lc *limitedConn) time.Time { _, s := lc.get(); return s }

func (l *limitListener) removeLocked(lc *limitedConn) {
	if _, ok := l.conns[lc]; !ok {
		return
	}
	delete(l.conns, lc)
	if l.byAddr[lc.addr] == lc {
		delete(l.byAddr, lc.addr)
	}
}

// markBusy marks the connection from addr as in use (gRPC: it opened a
// stream), so it is never evicted; gRPC's own idle timeout closes it.
func (l *limitListener) markBusy(addr string) {
	l.mu.Lock()
	lc := l.byAddr[addr]
	l.mu.Unlock()
	if lc != nil {
		lc.set(connBusy)
	}
}

// open is how many connections the listener holds.
func (l *limitListener) open() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return len(l.conns)
}

type limitedConn struct {
	net.Conn
	l     *limitListener
	addr  string
	state atomic.Int32
	since atomic.Int64 // Unix ns of the last state change
	once  sync.Once
}

func (c *limitedConn) set(st int32) {
	c.state.Store(st)
	c.since.Store(time.Now().UnixNano())
}

func (c *limitedConn) get() (int32, time.Time) {
	return c.state.Load(), time.Unix(0, c.since.Load())
}

func (c *limitedConn) Close() error {
	c.once.Do(func() {
		c.l.mu.Lock()
		c.l.removeLocked(c)
		c.l.mu.Unlock()
	})
	return c.Conn.Close()
}

// fdReserve is kept for the rest of the agent (eBPF maps and links,
// netlink sockets, /proc reads, its own gRPC and metrics clients) beyond
// any share of the OTLP listeners.
const fdReserve = 128

// connectionCap is the cap per OTLP listener: the configured one, cut so
// that the two listeners together hold at most half the file descriptors
// free at start (RLIMIT_NOFILE less those open) after fdReserve. A
// connection flood then cannot take the descriptors the agent needs: it
// meets the cap first. (Go raises the soft limit to the hard one at
// start, so this is usually the configured cap.)
func connectionCap(configured int) (int, string) {
	var rl unix.Rlimit
	if err := unix.Getrlimit(unix.RLIMIT_NOFILE, &rl); err != nil {
		return configured, ""
	}
	fds, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		return configured, ""
	}
	free := int64(rl.Cur) - int64(len(fds)) - fdReserve
	share := int(max(1, free/4))
	if share >= configured {
		return configured, ""
	}
	return share, fmt.Sprintf("traces.max_connections cut from %d to %d per listener: RLIMIT_NOFILE is %d with %d open", configured, share, rl.Cur, len(fds))
}
