package testenv

import (
	"fmt"
	"net"
	"runtime"
	"sync"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// StartIdleCutter starts what sits between an app and its upstream in real
// deployments, a load balancer or NAT gateway with an idle timeout: a
// server in a network namespace of its own, joined to the namespace of
// process pid by a veth pair (10.9.1.1 there, 10.9.1.2 here), that greets
// each connection with a line (so it carries data) and closes it once idle
// for idle. It returns the address to dial from pid's namespace. The
// address is no local listener of that namespace, as a real remote is not.
// Needs root.
func StartIdleCutter(t testing.TB, pid int, idle time.Duration) string {
	t.Helper()
	type result struct {
		l   net.Listener
		err error
	}
	res := make(chan result, 1)
	go func() {
		// This thread moves to a new namespace and is never unlocked, so
		// the runtime retires it with the goroutine; the listener keeps
		// the namespace alive.
		runtime.LockOSThread()
		l, err := cutterListen(pid)
		res <- result{l, err}
	}()
	r := <-res
	if r.err != nil {
		t.Fatalf("testenv: idle cutter: %v", r.err)
	}
	var wg sync.WaitGroup
	var mu sync.Mutex
	open := map[net.Conn]bool{}
	t.Cleanup(func() {
		r.l.Close()
		mu.Lock()
		for c := range open {
			c.Close()
		}
		mu.Unlock()
		wg.Wait()
	})
	wg.Go(func() {
		for {
			c, err := r.l.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			open[c] = true
			mu.Unlock()
			wg.Go(func() {
				defer func() {
					c.Close()
					mu.Lock()
					delete(open, c)
					mu.Unlock()
				}()
				if _, err := c.Write([]byte("hello\n")); err != nil {
					return
				}
				buf := make([]byte, 512)
				for {
					_ = c.SetReadDeadline(time.Now().Add(idle))
					if _, err := c.Read(buf); err != nil {
						return // idle for idle, or the client closed
					}
				}
			})
		}
	})
	return r.l.Addr().String()
}

// cutterListen makes the cutter's namespace on the calling (locked) thread
// and listens there.
func cutterListen(pid int) (net.Listener, error) {
	target, err := netns.GetFromPid(pid)
	if err != nil {
		return nil, fmt.Errorf("target netns: %w", err)
	}
	defer target.Close()
	th, err := netlink.NewHandleAt(target)
	if err != nil {
		return nil, fmt.Errorf("netlink in the target netns: %w", err)
	}
	defer th.Close()
	if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
		return nil, fmt.Errorf("new netns (needs root): %w", err)
	}
	veth := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "cut0"}, PeerName: "cut1"}
	if err := netlink.LinkAdd(veth); err != nil {
		return nil, fmt.Errorf("veth: %w", err)
	}
	peer, err := netlink.LinkByName("cut1")
	if err != nil {
		return nil, err
	}
	if err := netlink.LinkSetNsFd(peer, int(target)); err != nil {
		return nil, fmt.Errorf("move veth end: %w", err)
	}
	local, err := netlink.LinkByName("cut0")
	if err != nil {
		return nil, err
	}
	if err := setUp(netlink.AddrAdd, netlink.LinkSetUp, local, "10.9.1.2/24"); err != nil {
		return nil, err
	}
	remote, err := th.LinkByName("cut1")
	if err != nil {
		return nil, err
	}
	if err := setUp(th.AddrAdd, th.LinkSetUp, remote, "10.9.1.1/24"); err != nil {
		return nil, err
	}
	return net.Listen("tcp", "10.9.1.2:0")
}
