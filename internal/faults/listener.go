package faults

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// ListenTCP listens on addr ("127.0.0.1:0") with an explicit backlog, which
// net.Listen does not allow (it always asks for net.core.somaxconn).
func ListenTCP(addr string, backlog int) (*net.TCPListener, error) {
	ap, err := netip.ParseAddrPort(addr)
	if err != nil {
		return nil, fmt.Errorf("listen address %q: %w", addr, err)
	}
	family := unix.AF_INET
	if ap.Addr().Is6() && !ap.Addr().Is4In6() {
		family = unix.AF_INET6
	}
	fd, err := unix.Socket(family, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("socket: %w", err)
	}
	if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_REUSEADDR, 1); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("SO_REUSEADDR: %w", err)
	}
	var sa unix.Sockaddr
	if family == unix.AF_INET {
		sa = &unix.SockaddrInet4{Port: int(ap.Port()), Addr: ap.Addr().As4()}
	} else {
		sa = &unix.SockaddrInet6{Port: int(ap.Port()), Addr: ap.Addr().As16()}
	}
	if err := unix.Bind(fd, sa); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("bind %s: %w", addr, err)
	}
	if err := unix.Listen(fd, backlog); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("listen %s backlog %d: %w", addr, backlog, err)
	}
	f := os.NewFile(uintptr(fd), "listener")
	defer f.Close() // FileListener dups the descriptor
	l, err := net.FileListener(f)
	if err != nil {
		return nil, fmt.Errorf("file listener: %w", err)
	}
	return l.(*net.TCPListener), nil
}

// Gate pauses and resumes an accept loop: while closed, the loop does not
// call accept, so connections pile up in the kernel's accept queue exactly
// as they do behind a worker that is blocked or busy.
type Gate struct {
	mu   sync.Mutex
	open bool
	ch   chan struct{} // closed while the gate is open
}

// NewGate returns an open gate.
func NewGate() *Gate {
	g := &Gate{open: true, ch: make(chan struct{})}
	close(g.ch)
	return g
}

// Set opens or closes the gate.
func (g *Gate) Set(open bool) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if open == g.open {
		return
	}
	g.open = open
	if open {
		close(g.ch)
	} else {
		g.ch = make(chan struct{})
	}
}

// IsOpen reports the gate's state.
func (g *Gate) IsOpen() bool {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.open
}

// Wait blocks until the gate is open or ctx ends.
func (g *Gate) Wait(ctx context.Context) error {
	g.mu.Lock()
	ch := g.ch
	g.mu.Unlock()
	select {
	case <-ch:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// Serve accepts connections on l while gate is open and hands each to
// handle in its own goroutine, until ctx ends or l is closed.
func Serve(ctx context.Context, l net.Listener, gate *Gate, handle func(net.Conn)) error {
	for {
		if err := gate.Wait(ctx); err != nil {
			return nil
		}
		c, err := l.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) || ctx.Err() != nil {
				return nil
			}
			return fmt.Errorf("accept: %w", err)
		}
		go handle(c)
	}
}

// DrainAndClose is a handler that reads until the peer closes, then closes:
// a well-behaved server for connections that carry no protocol.
func DrainAndClose(c net.Conn) {
	buf := make([]byte, 512)
	for {
		if _, err := c.Read(buf); err != nil {
			c.Close()
			return
		}
	}
}

// Dial opens n connections to addr concurrently and returns those that
// completed within timeout. A connection "completes" when the handshake
// does, which for a full accept queue may take SYN retransmissions.
func Dial(ctx context.Context, addr string, n int, timeout time.Duration) []net.Conn {
	var (
		mu    sync.Mutex
		conns []net.Conn
		wg    sync.WaitGroup
	)
	d := net.Dialer{Timeout: timeout}
	for i := 0; i < n; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c, err := d.DialContext(ctx, "tcp", addr)
			if err != nil {
				return
			}
			mu.Lock()
			conns = append(conns, c)
			mu.Unlock()
		}()
	}
	wg.Wait()
	return conns
}

// Burst opens n connections concurrently, and closes each as soon as it is
// established: the short-lived traffic that overflows a small backlog even
// when the app accepts promptly. It returns how many were established.
func Burst(ctx context.Context, addr string, n int, timeout time.Duration) int {
	conns := Dial(ctx, addr, n, timeout)
	for _, c := range conns {
		c.Close()
	}
	return len(conns)
}
