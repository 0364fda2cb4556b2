package testenv

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/culprit-dev/culprit/internal/faults"
)

const roleEnv = "CULPRIT_TESTENV_ROLE"

// Main must be called from TestMain of every package that uses Start or
// StartLeaker: in the re-executed child it runs the child's role (server
// or leaker) and exits.
func Main(m interface{ Run() int }) {
	switch os.Getenv(roleEnv) {
	case "server":
		os.Exit(serverMain())
	case "tracedapp":
		os.Exit(tracedAppMain())
	case "workers":
		os.Exit(workersMain())
	case "leaker":
		os.Exit(leakerMain())
	case "prober":
		os.Exit(proberMain())
	}
	os.Exit(m.Run())
}

// Server is a child process listening in its own network namespace. Its
// commands (Do):
//
//	accept on|off   open or close the accept gate
//	dial N          open N connections and keep them (answers "ok N established")
//	dialto ADDR N   open N connections to ADDR, send a line on each, keep them
//	dialasync N [S] start opening N connections in the background, answer at
//	                once; each gives up after S seconds (10 unless given)
//	burst N         open N connections and close each once established
//	close           close every kept client connection
//	leakclose on|off  the handler stops closing connections the peer closed
//	                  (they stay in CLOSE_WAIT, as in an app that leaks them)
//	idletimeout MS  the handler closes connections idle for MS ms (as a load
//	                balancer's idle timeout does); 0 turns it off
//	dialclosed N    connect N times to a port nothing listens on (RSTs)
//	sysctl K V      write sysctl K (net.ipv4.ip_local_port_range...) in the
//	                child's netns; V may contain spaces as "40000_40199"
type Server struct {
	PID  int
	Port int
	*child
}

// Options for Start.
type Options struct {
	Backlog int
	// Accept starts the accept loop open (a healthy server).
	Accept bool
	// SharedNetns keeps the child in the test's network namespace.
	SharedNetns bool
	// AllInterfaces listens on 0.0.0.0 rather than 127.0.0.1 (for
	// traffic from another namespace: SYNFlood).
	AllInterfaces bool
}

// Start runs a server child. It fails the test when it cannot (creating a
// network namespace needs root, which CI has).
func Start(t testing.TB, o Options) *Server {
	t.Helper()
	c, greeting := startChild(t, "server", o.SharedNetns,
		"CULPRIT_TESTENV_BACKLOG="+strconv.Itoa(o.Backlog),
		"CULPRIT_TESTENV_ACCEPT="+strconv.FormatBool(o.Accept),
		"CULPRIT_TESTENV_ALL_INTERFACES="+strconv.FormatBool(o.AllInterfaces))
	s := &Server{PID: c.pid, child: c}
	if _, err := fmt.Sscanf(greeting, "port %d", &s.Port); err != nil {
		t.Fatalf("testenv: unexpected greeting %q", greeting)
	}
	return s
}

func serverMain() int {
	if lo, err := netlink.LinkByName("lo"); err == nil {
		if err := netlink.LinkSetUp(lo); err != nil {
			fmt.Fprintln(os.Stderr, "testenv: lo up:", err)
			return 1
		}
	}
	backlog, _ := strconv.Atoi(os.Getenv("CULPRIT_TESTENV_BACKLOG"))
	accept, _ := strconv.ParseBool(os.Getenv("CULPRIT_TESTENV_ACCEPT"))
	listen := "127.0.0.1:0"
	if all, _ := strconv.ParseBool(os.Getenv("CULPRIT_TESTENV_ALL_INTERFACES")); all {
		listen = "0.0.0.0:0"
	}
	l, err := faults.ListenTCP(listen, backlog)
	if err != nil {
		fmt.Fprintln(os.Stderr, "testenv:", err)
		return 1
	}
	addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(l.Addr().(*net.TCPAddr).Port))
	gate := faults.NewGate()
	gate.Set(accept)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var leakClose atomic.Bool
	var leakedMu sync.Mutex
	var leaked []net.Conn
	var idleTimeout atomic.Int64
	handle := func(c net.Conn) {
		if d := time.Duration(idleTimeout.Load()); d > 0 {
			buf := make([]byte, 512)
			for {
				_ = c.SetReadDeadline(time.Now().Add(d))
				if _, err := c.Read(buf); err != nil {
					c.Close()
					return
				}
			}
		}
		if !leakClose.Load() {
			faults.DrainAndClose(c)
			return
		}
		// Read to EOF (the peer closed) and keep the socket: CLOSE_WAIT.
		buf := make([]byte, 512)
		for {
			if _, err := c.Read(buf); err != nil {
				break
			}
		}
		leakedMu.Lock()
		leaked = append(leaked, c)
		leakedMu.Unlock()
	}
	go faults.Serve(ctx, l, gate, handle)
	// On SIGTERM, stop accepting but keep serving the open connections, as
	// a graceful shutdown that waits for long-lived streams does.
	term := make(chan os.Signal, 1)
	signal.Notify(term, syscall.SIGTERM)
	go func() {
		<-term
		gate.Set(false)
		l.Close()
	}()
	fmt.Printf("port %d\n", l.Addr().(*net.TCPAddr).Port)

	var (
		keptMu sync.Mutex
		kept   []net.Conn
	)
	keep := func(cs []net.Conn) {
		keptMu.Lock()
		kept = append(kept, cs...)
		keptMu.Unlock()
	}
	sc := bufio.NewScanner(os.Stdin)
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) == 0 {
			continue
		}
		n := 0
		if len(f) > 1 {
			n, _ = strconv.Atoi(f[1])
		}
		switch f[0] {
		case "accept":
			gate.Set(len(f) > 1 && f[1] == "on")
			fmt.Println("ok")
		case "dial":
			conns := faults.Dial(ctx, addr, n, 10*time.Second)
			keep(conns)
			fmt.Printf("ok %d established\n", len(conns))
		case "dialto":
			if len(f) != 3 {
				fmt.Println("error usage: dialto ADDR N")
				continue
			}
			m, _ := strconv.Atoi(f[2])
			conns := faults.Dial(ctx, f[1], m, 10*time.Second)
			for _, c := range conns {
				_, _ = c.Write([]byte("ping\n"))
			}
			keep(conns)
			fmt.Printf("ok %d established\n", len(conns))
		case "dialasync":
			timeout := 10 * time.Second
			if len(f) > 2 {
				secs, err := strconv.Atoi(f[2])
				if err != nil || secs <= 0 {
					fmt.Println("error usage: dialasync N [SECONDS]")
					continue
				}
				timeout = time.Duration(secs) * time.Second
			}
			go func() { keep(faults.Dial(ctx, addr, n, timeout)) }()
			fmt.Println("ok")
		case "burst":
			fmt.Printf("ok %d established\n", faults.Burst(ctx, addr, n, 10*time.Second))
		case "leakclose":
			leakClose.Store(len(f) > 1 && f[1] == "on")
			fmt.Println("ok")
		case "idletimeout":
			idleTimeout.Store(int64(time.Duration(n) * time.Millisecond))
			fmt.Println("ok")
		case "dialclosed":
			refused := 0
			for range n {
				c, err := net.DialTimeout("tcp", "127.0.0.1:1", time.Second)
				if err != nil {
					refused++
					continue
				}
				c.Close()
			}
			fmt.Printf("ok %d refused\n", refused)
		case "sysctl":
			if len(f) != 3 {
				fmt.Println("error usage: sysctl NAME VALUE")
				continue
			}
			path := "/proc/sys/" + strings.ReplaceAll(f[1], ".", "/")
			if err := os.WriteFile(path, []byte(strings.ReplaceAll(f[2], "_", " ")), 0o644); err != nil {
				fmt.Printf("error %v\n", err)
				continue
			}
			fmt.Println("ok")
		case "close":
			keptMu.Lock()
			for _, c := range kept {
				c.Close()
			}
			kept = nil
			keptMu.Unlock()
			fmt.Println("ok")
		default:
			fmt.Printf("error unknown command %q\n", f[0])
		}
	}
	return 0
}

// ListenerFD is a copy of the server's listening socket in the test's
// process (pidfd_getfd), for socket options the test sets on it
// (TCP_DEFER_ACCEPT: the server ignores a client's bare final ACK, so its
// connections stay half-open on the server while their clients consider
// them established). Closed when the test ends.
func (s *Server) ListenerFD(t testing.TB) int {
	t.Helper()
	pidfd, err := unix.PidfdOpen(s.PID, 0)
	if err != nil {
		t.Fatalf("testenv: pidfd_open: %v", err)
	}
	defer unix.Close(pidfd)
	dir := filepath.Join("/proc", strconv.Itoa(s.PID), "fd")
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatalf("testenv: %v", err)
	}
	for _, e := range ents {
		n, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		fd, err := unix.PidfdGetfd(pidfd, n, 0)
		if err != nil {
			continue
		}
		if v, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_ACCEPTCONN); err == nil && v == 1 {
			t.Cleanup(func() { unix.Close(fd) })
			return fd
		}
		unix.Close(fd)
	}
	t.Fatalf("testenv: pid %d has no listening socket", s.PID)
	return -1
}

// SocketInode is the inode of a socket of the test's own (a net.Conn or
// net.Listener of TCP or Unix, or anything else with File()), as
// /proc/PID/fd shows it: socket:[inode].
func SocketInode(t testing.TB, c interface{ File() (*os.File, error) }) uint32 {
	t.Helper()
	f, err := c.File()
	if err != nil {
		t.Fatalf("testenv: %v", err)
	}
	defer f.Close()
	return FDInode(t, "/proc/self/fd/"+strconv.Itoa(int(f.Fd())))
}

// FDInode is the inode of the socket a /proc/PID/fd/N link names.
func FDInode(t testing.TB, fdLink string) uint32 {
	t.Helper()
	link, err := os.Readlink(fdLink)
	if err != nil {
		t.Fatalf("testenv: %v", err)
	}
	n, err := strconv.ParseUint(strings.TrimSuffix(strings.TrimPrefix(link, "socket:["), "]"), 10, 32)
	if err != nil {
		t.Fatalf("testenv: %s is no socket: %v", link, err)
	}
	return uint32(n)
}
