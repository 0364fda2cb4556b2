package exporters

import (
	"bytes"
	"cmp"
	"context"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"slices"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/stats"
)

// ConnLimiter is a net.Listener that keeps at most Max connections open.
// When a connection arrives and Max are open, the one idle the longest is
// closed to make room; if every one is busy, the new one is closed at
// once. Either way the listener keeps accepting, so the kernel's accept
// queue drains behind it and the agent never holds more than Max (plus
// ConnCloseQueue being closed) descriptors for the listener: a flood of idle
// connections costs old idle connections, never /healthz or the agent's
// own files.
//
// A connection is busy while the server works on it: from the end of an
// HTTP request's headers to the end of its response (NewHTTPServer), or
// while a gRPC call that passed authentication runs (GRPCStats). One
// whose request already waits in its receive queue, unread, goes only
// after every idle one without: a probe accepted from behind thousands of
// flooding connections has sent its request long before the server reads
// it, and evicting it for being oldest would fail exactly the client the
// cap protects. A slow sender whose partial request the server has read
// is idle: it holds no place. The order is
// oldest first and there is no grace for young connections: a grace (or
// counting a request that is still arriving as busy) would let a flood
// that keeps every place young refuse all newcomers, the probe among
// them.
type ConnLimiter struct {
	net.Listener
	name string // the config key of the listener, for logs and metrics
	max  int
	log  *slog.Logger

	mu     sync.Mutex
	conns  map[*limitedConn]struct{}
	byAddr map[string]*limitedConn // remote address -> conn, for gRPC stats

	accepted, evicted, refused atomic.Uint64
	lastFullLog                atomic.Int64 // unix ns

	// closing hands evicted and refused connections to a goroutine that
	// closes them: a close that resets a connection is a syscall plus
	// the peer's side of the reset, and the accept loop must keep
	// draining the kernel's queue, where a probe may be waiting.
	closing chan net.Conn
	closed  bool // closing is closed; guarded by mu

	http       bool          // connections carry HTTP/1: a complete request makes one busy
	stuckAfter time.Duration // StuckAfter; shorter in tests
}

// ConnCloseQueue bounds the connections waiting to be closed; beyond it
// the accept loop closes them itself. A listener holds at most its cap
// plus this many descriptors.
const ConnCloseQueue = 64

// NewConnLimiter caps l at maxConns open connections; name is the
// listener's config key (agent.http_addr), used in logs and metrics.
func NewConnLimiter(l net.Listener, name string, maxConns int, log *slog.Logger) (*ConnLimiter, error) {
	if maxConns < 1 {
		return nil, fmt.Errorf("%s: at most %d connections: want at least 1", name, maxConns)
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	cl := &ConnLimiter{
		Listener: l, name: name, max: maxConns, log: log, stuckAfter: StuckAfter,
		conns:   make(map[*limitedConn]struct{}, maxConns),
		byAddr:  make(map[string]*limitedConn, maxConns),
		closing: make(chan net.Conn, ConnCloseQueue),
	}
	go cl.closer()
	return cl, nil
}

func (l *ConnLimiter) closer() {
	for c := range l.closing {
		c.Close()
	}
}

// drop closes c off the accept loop when the closer keeps up.
func (l *ConnLimiter) drop(c net.Conn) {
	l.mu.Lock()
	queued := false
	if !l.closed { // never send on the queue Close closed
		select {
		case l.closing <- c:
			queued = true
		default:
		}
	}
	l.mu.Unlock()
	if !queued {
		c.Close()
	}
}

// Close closes the listener and the closer's queue (the closer closes
// what is left in it). Connections still open are the server's to close.
func (l *ConnLimiter) Close() error {
	err := l.Listener.Close()
	l.mu.Lock()
	if !l.closed {
		l.closed = true
		close(l.closing)
	}
	l.mu.Unlock()
	return err
}

// Accept returns the next connection within the cap. It never returns an
// error for a connection it refused: servers treat Accept errors as fatal
// or back off, and a flood must cost neither.
func (l *ConnLimiter) Accept() (net.Conn, error) {
	for {
		c, err := l.Listener.Accept()
		if err != nil {
			return nil, err
		}
		l.accepted.Add(1)
		if lc := l.admit(c); lc != nil {
			return lc, nil
		}
	}
}

// admit tracks c, evicting the longest-idle connection when full; nil
// when c was refused (and closed).
func (l *ConnLimiter) admit(c net.Conn) *limitedConn {
	now := time.Now()
	lc := &limitedConn{Conn: c, l: l, addr: c.RemoteAddr().String(), http: l.http}
	lc.idleSince.Store(now.UnixNano())
	l.mu.Lock()
	var victim *limitedConn
	if len(l.conns) >= l.max {
		victim = l.oldestIdle()
		if victim == nil {
			l.mu.Unlock()
			l.refused.Add(1)
			l.drop(c)
			l.logFull()
			return nil
		}
		l.forget(victim)
	}
	l.conns[lc] = struct{}{}
	l.byAddr[lc.addr] = lc
	l.mu.Unlock()
	if victim != nil {
		l.evicted.Add(1)
		l.drop(victim.Conn) // the server sees the read fail and cleans up
		l.logFull()
	}
	return lc
}

// StuckAfter is how long a connection may stay busy and still never be
// evicted. A full listener whose connections are all busy evicts the one
// busy longest beyond it rather than refuse newcomers: a client that
// pipelines requests and never reads the responses keeps its handler
// blocked in a write until the write timeout, and a few hundred such
// would otherwise lock every probe out. A watcher evicted this way
// resumes from its cursor.
const StuckAfter = 10 * time.Second

// oldestIdle is the connection to evict: the one idle longest whose
// receive queue is empty, else (every idle one has a request waiting) the
// one idle longest, else the one busy longest if for over StuckAfter.
// nil when all are busy and none for that long. Called with mu held: a
// scan of at most max entries, which is small, and one ioctl in the
// common case.
func (l *ConnLimiter) oldestIdle() *limitedConn {
	var oldest, stuck *limitedConn
	for c := range l.conns {
		if c.idle() {
			if oldest == nil || c.idleSince.Load() < oldest.idleSince.Load() {
				oldest = c
			}
		} else if stuck == nil || c.busySince.Load() < stuck.busySince.Load() {
			stuck = c
		}
	}
	if oldest == nil {
		if stuck != nil && time.Since(time.Unix(0, stuck.busySince.Load())) > l.stuckAfter {
			return stuck
		}
		return nil
	}
	if !oldest.pending() {
		return oldest
	}
	// Requests wait in the oldest: look further, oldest first.
	idle := make([]*limitedConn, 0, len(l.conns))
	for c := range l.conns {
		if c.idle() && c != oldest {
			idle = append(idle, c)
		}
	}
	slices.SortFunc(idle, func(a, b *limitedConn) int { return cmp.Compare(a.idleSince.Load(), b.idleSince.Load()) })
	for _, c := range idle {
		if !c.pending() {
			return c
		}
	}
	return oldest
}

func (l *ConnLimiter) forget(c *limitedConn) {
	delete(l.conns, c)
	if l.byAddr[c.addr] == c {
		delete(l.byAddr, c.addr)
	}
}

// logFull says the listener is full at most once a minute: a flood must
// not turn into a log flood.
func (l *ConnLimiter) logFull() {
	now := time.Now().UnixNano()
	prev := l.lastFullLog.Load()
	if now-prev < int64(time.Minute) || !l.lastFullLog.CompareAndSwap(prev, now) {
		return
	}
	l.log.Warn("listener at its connection cap: closing idle connections, refusing new ones while all are busy",
		"listener", l.name, "max", l.max, "evicted_total", l.evicted.Load(), "refused_total", l.refused.Load())
}

// ConnStats is what a ConnLimiter has seen.
type ConnStats struct {
	Name     string // config key of the listener
	Open     int
	Max      int
	Accepted uint64
	Evicted  uint64 // idle connections closed to make room
	Refused  uint64 // new connections closed because all were busy
}

// Stats returns the current counts.
func (l *ConnLimiter) Stats() ConnStats {
	l.mu.Lock()
	n := len(l.conns)
	l.mu.Unlock()
	return ConnStats{Name: l.name, Open: n, Max: l.max, Accepted: l.accepted.Load(), Evicted: l.evicted.Load(), Refused: l.refused.Load()}
}

// Max is the cap.
func (l *ConnLimiter) Max() int { return l.max }

// lookup finds an open connection by its remote address.
func (l *ConnLimiter) lookup(addr string) *limitedConn {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.byAddr[addr]
}

// limitedConn is one admitted connection.
type limitedConn struct {
	net.Conn
	l         *ConnLimiter
	addr      string
	busy      atomic.Int32 // requests or streams in progress
	idleSince atomic.Int64 // unix ns the last one ended (or the accept)
	busySince atomic.Int64 // unix ns it last turned busy
	closed    atomic.Bool

	// HTTP/1 only: a request's headers are complete and its response is
	// not flushed. Set when the server reads their blank line (the moment
	// between that read and the parse, when the request is neither in the
	// receive queue nor known to the server, is covered too) and at
	// StateActive; cleared at StateIdle. tail holds the last bytes read,
	// for a blank line split between reads; only the goroutine serving
	// the connection reads it.
	http      bool
	requestIn atomic.Bool
	tail      [3]byte
}

func (c *limitedConn) idle() bool { return c.busy.Load() == 0 && !c.requestIn.Load() }

// Read notes the end of an HTTP request's headers.
func (c *limitedConn) Read(p []byte) (int, error) {
	n, err := c.Conn.Read(p)
	if c.http && n > 0 {
		if endOfHeaders(c.tail, p[:n]) && !c.requestIn.Swap(true) && c.busy.Load() == 0 {
			c.busySince.Store(time.Now().UnixNano())
		}
		c.tail = lastThree(c.tail, p[:n])
	}
	return n, err
}

var crlfcrlf = []byte("\r\n\r\n")

// endOfHeaders reports whether the blank line that ends HTTP headers is
// in b, or straddles tail (the previous read's last bytes) and b.
func endOfHeaders(tail [3]byte, b []byte) bool {
	if bytes.Contains(b, crlfcrlf) {
		return true
	}
	var joined [6]byte
	copy(joined[:3], tail[:])
	k := copy(joined[3:], b)
	return bytes.Contains(joined[:3+k], crlfcrlf)
}

func lastThree(tail [3]byte, b []byte) [3]byte {
	if len(b) >= 3 {
		return [3]byte(b[len(b)-3:])
	}
	var out [3]byte
	joined := append(tail[:], b...)
	copy(out[:], joined[len(joined)-3:])
	return out
}

// pending reports whether bytes wait unread in the connection's receive
// queue (SIOCINQ).
func (c *limitedConn) pending() bool {
	sc, ok := c.Conn.(syscall.Conn)
	if !ok {
		return false
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return false
	}
	n := 0
	if err := rc.Control(func(fd uintptr) { n, _ = unix.IoctlGetInt(int(fd), unix.SIOCINQ) }); err != nil {
		return false
	}
	return n > 0
}

// Close releases the connection's place.
func (c *limitedConn) Close() error {
	if c.closed.CompareAndSwap(false, true) {
		c.l.mu.Lock()
		c.l.forget(c)
		c.l.mu.Unlock()
	}
	return c.Conn.Close()
}

// begin and end bracket a request or stream: a busy connection is never
// evicted.
func (c *limitedConn) begin() {
	if c.busy.Add(1) == 1 && !c.requestIn.Load() {
		c.busySince.Store(time.Now().UnixNano())
	}
}

func (c *limitedConn) end() {
	c.idleSince.Store(time.Now().UnixNano())
	c.busy.Add(-1)
}

// GRPCStats returns a stats.Handler that marks a connection busy while an
// RPC runs on it. Streams refused by the tap handle (no token) never start
// an RPC, so a connection that only sends refused calls stays evictable.
func (l *ConnLimiter) GRPCStats() stats.Handler { return grpcConnStats{l} }

type grpcConnStats struct{ l *ConnLimiter }

type rpcConnKey struct{}

// rpcConn carries the connection of one RPC from Begin to End, so End
// releases exactly what Begin took even if the map changed meanwhile.
type rpcConn struct {
	c     *limitedConn
	begun atomic.Bool
}

func (h grpcConnStats) TagRPC(ctx context.Context, _ *stats.RPCTagInfo) context.Context {
	p, ok := peer.FromContext(ctx)
	if !ok || p.Addr == nil {
		return ctx
	}
	c := h.l.lookup(p.Addr.String())
	if c == nil {
		return ctx
	}
	return context.WithValue(ctx, rpcConnKey{}, &rpcConn{c: c})
}

func (h grpcConnStats) HandleRPC(ctx context.Context, s stats.RPCStats) {
	rc, _ := ctx.Value(rpcConnKey{}).(*rpcConn)
	if rc == nil {
		return
	}
	switch s.(type) {
	case *stats.Begin:
		if rc.begun.CompareAndSwap(false, true) {
			rc.c.begin()
		}
	case *stats.End:
		if rc.begun.CompareAndSwap(true, false) {
			rc.c.end()
		}
	}
}

func (grpcConnStats) TagConn(ctx context.Context, _ *stats.ConnTagInfo) context.Context { return ctx }
func (grpcConnStats) HandleConn(context.Context, stats.ConnStats)                       {}

// httpConnKey carries the connection into requests (http.Server.ConnContext).
type httpConnKey struct{}

// markBusy returns a function that marks the request's connection idle
// again; it does nothing for a connection the limiter does not know.
func markBusy(ctx context.Context) func() {
	c, _ := ctx.Value(httpConnKey{}).(*limitedConn)
	if c == nil {
		return func() {}
	}
	c.begin()
	return c.end
}

// connState is the http.Server.ConnState of a limited listener. A request
// parsed (StateActive) is in, even one the server took from its buffer of
// pipelined requests without a read; a response flushed (StateIdle) ends
// it. See limitedConn.requestIn.
func connState(c net.Conn, st http.ConnState) {
	lc, ok := c.(*limitedConn)
	if !ok {
		return
	}
	switch st {
	case http.StateActive:
		if !lc.requestIn.Swap(true) && lc.busy.Load() == 0 {
			lc.busySince.Store(time.Now().UnixNano())
		}
	case http.StateIdle:
		lc.idleSince.Store(time.Now().UnixNano())
		lc.requestIn.Store(false)
	}
}

// ForHTTP says the listener serves HTTP/1 (NewHTTPServer's server): its
// connections then watch for complete requests. Call it before serving.
func (l *ConnLimiter) ForHTTP() { l.http = true }

// connContext is the http.Server.ConnContext of a limited listener.
func connContext(ctx context.Context, c net.Conn) context.Context {
	if lc, ok := c.(*limitedConn); ok {
		return context.WithValue(ctx, httpConnKey{}, lc)
	}
	return ctx
}
