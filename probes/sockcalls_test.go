package probes

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/culprit-dev/culprit/internal/faults"
	"github.com/culprit-dev/culprit/signals"
)

// The sockcalls tests need a process that makes exactly the socket calls
// a test asks for, with the system call named (accept or accept4; read,
// recvfrom or recvmsg; a blocking or a non-blocking connect). testenv's
// server child does not, so this test binary re-executes itself as one.
const sockChildEnv = "CULPRIT_SOCKCALLS_CHILD"

func init() {
	// Before TestMain: in the child, run its command loop instead of tests.
	if os.Getenv(sockChildEnv) == "1" {
		os.Exit(sockChildMain())
	}
}

// sockChild is a child process run by sockChildMain. Commands:
//
//	listen PORT BACKLOG     listen on 127.0.0.1:PORT (0: any); answers "ok PORT"
//	accept PORT N           accept N connections with accept4 (Go's), keep them
//	acceptraw PORT N        accept N connections with accept(2), keep them
//	dial ADDR N             N non-blocking connects (Go's net.Dial); keeps the
//	                        connections; answers "ok OK [ERRNO:COUNT...]"
//	connect ADDR N          N blocking connect(2)s; answers like dial
//	read MODE               read everything waiting on every kept connection
//	                        with MODE: read, recv (recvfrom), recvmsg, peek
//	                        (recvfrom MSG_PEEK); answers "ok BYTES"
//	sysctl NAME VALUE       write a sysctl of the child's netns (_ for spaces)
type sockChild struct {
	pid int
	cmd *exec.Cmd
	in  io.WriteCloser
	out *bufio.Reader
}

// startSockChild runs a child, in a network namespace of its own when
// private (lo up).
func startSockChild(t *testing.T, private bool) *sockChild {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), sockChildEnv+"=1")
	if private {
		cmd.SysProcAttr = &syscall.SysProcAttr{Cloneflags: syscall.CLONE_NEWNET}
	}
	cmd.Stderr = os.Stderr
	in, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatalf("start socket child (a network namespace needs root): %v", err)
	}
	c := &sockChild{pid: cmd.Process.Pid, cmd: cmd, in: in, out: bufio.NewReader(out)}
	t.Cleanup(func() {
		c.in.Close()
		_ = c.cmd.Process.Kill()
		_ = c.cmd.Wait()
	})
	if l := c.line(t); l != "ready" {
		t.Fatalf("socket child: greeting %q", l)
	}
	return c
}

func (c *sockChild) line(t *testing.T) string {
	t.Helper()
	ch := make(chan string, 1)
	go func() {
		l, _ := c.out.ReadString('\n')
		ch <- strings.TrimSpace(l)
	}()
	select {
	case l := <-ch:
		return l
	case <-time.After(30 * time.Second):
		t.Fatalf("socket child %d: no answer in 30s", c.pid)
		return ""
	}
}

// do sends a command and returns the fields of its "ok" answer.
func (c *sockChild) do(t *testing.T, format string, args ...any) []string {
	t.Helper()
	cmd := fmt.Sprintf(format, args...)
	if _, err := fmt.Fprintln(c.in, cmd); err != nil {
		t.Fatalf("socket child %d: %s: %v", c.pid, cmd, err)
	}
	l := c.line(t)
	f := strings.Fields(l)
	if len(f) == 0 || f[0] != "ok" {
		t.Fatalf("socket child %d: %s: %q", c.pid, cmd, l)
	}
	return f[1:]
}

// heldFDs keeps the child's raw sockets open (and never read) until it
// exits.
var heldFDs []int

func sockChildMain() int {
	// A private namespace starts with lo down.
	if lo, err := netlink.LinkByName("lo"); err == nil {
		if err := netlink.LinkSetUp(lo); err != nil {
			fmt.Fprintln(os.Stderr, "socket child: lo up:", err)
			return 1
		}
	}
	listeners := map[int]*net.TCPListener{}
	var conns []net.Conn
	fmt.Println("ready")
	sc := bufio.NewScanner(os.Stdin)
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) == 0 {
			continue
		}
		arg := func(i int) int {
			if i >= len(f) {
				return 0
			}
			n, _ := strconv.Atoi(f[i])
			return n
		}
		switch f[0] {
		case "listen":
			l, err := faults.ListenTCP(net.JoinHostPort("127.0.0.1", f[1]), arg(2))
			if err != nil {
				fmt.Println("error", err)
				continue
			}
			port := l.Addr().(*net.TCPAddr).Port
			listeners[port] = l
			fmt.Println("ok", port)
		case "accept", "acceptraw":
			l := listeners[arg(1)]
			if l == nil {
				fmt.Println("error no listener", f[1])
				continue
			}
			n := 0
			for ; n < arg(2); n++ {
				if f[0] == "accept" {
					c, err := l.Accept()
					if err != nil {
						break
					}
					conns = append(conns, c)
					continue
				}
				fd, err := acceptRaw(l)
				if err != nil {
					break
				}
				heldFDs = append(heldFDs, fd)
			}
			fmt.Println("ok", n)
		case "giveup":
			// Dials that the app gives up on (Go's dialer closes the
			// socket at its timeout) while the SYN waits unanswered.
			gaveUp := 0
			for range arg(2) {
				c, err := net.DialTimeout("tcp", f[1], time.Duration(arg(3))*time.Millisecond)
				if err == nil {
					c.Close()
					continue
				}
				if ne, ok := err.(net.Error); ok && ne.Timeout() {
					gaveUp++
				}
			}
			fmt.Println("ok", gaveUp)
		case "dial", "connect":
			ok, errs := 0, map[string]int{}
			for range arg(2) {
				if f[0] == "dial" {
					c, err := net.DialTimeout("tcp", f[1], 10*time.Second)
					if err != nil {
						errs[errnoOf(err)]++
						continue
					}
					conns = append(conns, c)
					ok++
					continue
				}
				fd, err := connectBlocking(f[1])
				if err != nil {
					errs[errnoOf(err)]++
					continue
				}
				heldFDs = append(heldFDs, fd)
				ok++
			}
			out := []string{"ok", strconv.Itoa(ok)}
			for e, n := range errs {
				out = append(out, e+":"+strconv.Itoa(n))
			}
			fmt.Println(strings.Join(out, " "))
		case "read":
			total := 0
			for _, c := range conns {
				n, err := readWaiting(c, f[1])
				if err != nil {
					fmt.Println("error", err)
					break
				}
				total += n
			}
			fmt.Println("ok", total)
		case "sysctl":
			path := "/proc/sys/" + strings.ReplaceAll(f[1], ".", "/")
			if err := os.WriteFile(path, []byte(strings.ReplaceAll(f[2], "_", " ")), 0o644); err != nil {
				fmt.Println("error", err)
				continue
			}
			fmt.Println("ok")
		default:
			fmt.Println("error unknown command", f[0])
		}
	}
	return 0
}

// acceptRaw accepts with accept(2), which Go itself never calls. A
// listener's RawConn only offers Control, so it polls for a connection.
func acceptRaw(l *net.TCPListener) (int, error) {
	rc, err := l.SyscallConn()
	if err != nil {
		return -1, err
	}
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(5 * time.Millisecond) {
		nfd, aerr := -1, error(nil)
		if err := rc.Control(func(fd uintptr) {
			r, _, e := unix.Syscall(unix.SYS_ACCEPT, fd, 0, 0)
			if e != 0 {
				aerr = e
				return
			}
			nfd = int(r)
		}); err != nil {
			return -1, err
		}
		if aerr != unix.EAGAIN {
			return nfd, aerr
		}
	}
	return -1, fmt.Errorf("accept: no connection in 10s")
}

// connectBlocking connects a blocking socket: connect(2) itself returns
// the outcome, where Go's dial gets EINPROGRESS and the error later.
func connectBlocking(addr string) (int, error) {
	ap, err := netip.ParseAddrPort(addr)
	if err != nil {
		return -1, err
	}
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM, 0)
	if err != nil {
		return -1, err
	}
	if err := unix.Connect(fd, &unix.SockaddrInet4{Port: int(ap.Port()), Addr: ap.Addr().As4()}); err != nil {
		unix.Close(fd)
		return -1, err
	}
	return fd, nil
}

func errnoOf(err error) string {
	var e syscall.Errno
	for err != nil {
		if x, ok := err.(syscall.Errno); ok {
			e = x
			break
		}
		u, ok := err.(interface{ Unwrap() error })
		if !ok {
			break
		}
		err = u.Unwrap()
	}
	if e == 0 {
		return "unknown"
	}
	return unix.ErrnoName(e)
}

// readWaiting reads what is queued on c with the named system call, until
// it would block.
func readWaiting(c net.Conn, mode string) (int, error) {
	rc, err := c.(syscall.Conn).SyscallConn()
	if err != nil {
		return 0, err
	}
	buf := make([]byte, 4096)
	total := 0
	var rerr error
	err = rc.Read(func(fd uintptr) bool {
		for {
			var n int
			var err error
			switch mode {
			case "read":
				n, err = unix.Read(int(fd), buf)
			case "recv":
				n, _, err = unix.Recvfrom(int(fd), buf, 0)
			case "recvmsg":
				n, _, _, _, err = unix.Recvmsg(int(fd), buf, nil, 0)
			case "peek":
				n, _, err = unix.Recvfrom(int(fd), buf, unix.MSG_PEEK)
				if err == nil {
					total += n
				}
				return true
			default:
				rerr = fmt.Errorf("unknown read mode %q", mode)
				return true
			}
			if err == unix.EAGAIN {
				return true
			}
			if err != nil {
				rerr = err
				return true
			}
			if n == 0 {
				return true
			}
			total += n
		}
	})
	if err != nil {
		return total, err
	}
	return total, rerr
}

func startSockCalls(t *testing.T, pid int, opts ...func(*SockCallsOptions)) (*SockCalls, *signals.Store) {
	t.Helper()
	o := SockCallsOptions{
		Options:    Options{Log: testLog, PollInterval: 50 * time.Millisecond, MaxEntries: 1024},
		MaxSockets: 4096, MaxRemotes: 16,
	}
	for _, f := range opts {
		f(&o)
	}
	p := NewSockCalls(o)
	st := signals.New(600, 1000)
	runProbe(t, pid, p, st)
	// target_tgids is set at the first poll, which writes the gauge.
	waitValue(t, st, signals.ProcessUnreadOldestSeconds, nil, func(float64) bool { return true }, "a first poll")
	return p, st
}

// value is a series' latest value, 0 when it does not exist.
func value(st *signals.Store, d *signals.Desc, ls signals.Labels) float64 {
	s, _ := st.Latest(d, ls)
	return s.V
}

// settle waits a few polls for counts still in flight, then checks they
// did not go past want.
func assertStays(t *testing.T, st *signals.Store, d *signals.Desc, ls signals.Labels, want float64) {
	t.Helper()
	time.Sleep(300 * time.Millisecond)
	if v := value(st, d, ls); v != want {
		t.Errorf("%s%s = %v, want %v", d, ls, v, want)
	}
}

// Accepts are the target's own accept calls, per listener port: a
// listener of the target that accepts nothing has none though its
// handshakes complete, and a neighbour accepting in the same namespace is
// not counted. Both accept(2) and accept4(2) count.
func TestSockCallsAcceptsPerPort(t *testing.T) {
	tgt := startSockChild(t, false)
	nb := startSockChild(t, false)
	_, st := startSockCalls(t, tgt.pid, func(o *SockCallsOptions) { o.AcceptsAlways = true })
	waitValue(t, st, signals.ProcessAcceptsCountedSince, nil, func(v float64) bool { return v > 0 }, "> 0 (counting)")

	serving := tgt.do(t, "listen 0 64")[0]
	idle := tgt.do(t, "listen 0 64")[0]
	other := nb.do(t, "listen 0 64")[0]
	dial := func(port string, n int) {
		for range n {
			c, err := net.DialTimeout("tcp", "127.0.0.1:"+port, 5*time.Second)
			if err != nil {
				t.Fatalf("dial %s: %v", port, err)
			}
			t.Cleanup(func() { c.Close() })
		}
	}
	dial(serving, 7)
	dial(idle, 5)
	dial(other, 4)
	if got := tgt.do(t, "accept %s 4", serving)[0]; got != "4" {
		t.Fatalf("target accepted %s with accept4, want 4", got)
	}
	if got := tgt.do(t, "acceptraw %s 3", serving)[0]; got != "3" {
		t.Fatalf("target accepted %s with accept, want 3", got)
	}
	if got := nb.do(t, "accept %s 4", other)[0]; got != "4" {
		t.Fatalf("neighbour accepted %s, want 4", got)
	}
	waitValue(t, st, signals.ProcessAcceptsTotal, signals.L("port", serving), func(v float64) bool { return v >= 7 }, ">= 7")
	assertStays(t, st, signals.ProcessAcceptsTotal, signals.L("port", serving), 7)
	if v := value(st, signals.ProcessAcceptsTotal, signals.L("port", idle)); v != 0 {
		t.Errorf("accepts on the target's listener that accepts nothing = %v, want 0 (its 5 handshakes completed)", v)
	}
	if v := value(st, signals.ProcessAcceptsTotal, signals.L("port", other)); v != 0 {
		t.Errorf("accepts on the neighbour's port = %v, want 0", v)
	}
}

// Connect failures by errno and remote: EADDRNOTAVAIL once a narrow
// ip_local_port_range is used up toward one remote (within connect, no
// SYN sent: no attempt), ECONNREFUSED from a closed port (IPv4 and IPv6;
// non-blocking and blocking connects alike), ETIMEDOUT found after
// connect returned (SYNs to a full accept queue are dropped until the
// retries run out); a neighbour's failures are not counted. Attempts are
// the connects that sent a SYN, whatever their outcome.
func TestSockCallsConnectErrors(t *testing.T) {
	tgt := startSockChild(t, true)
	nb := startSockChild(t, true)
	_, st := startSockCalls(t, tgt.pid)

	tgt.do(t, "sysctl net.ipv4.tcp_tw_reuse 0")
	tgt.do(t, "sysctl net.ipv4.ip_local_port_range 40000_40009")
	tgt.do(t, "sysctl net.ipv4.tcp_syn_retries 1")
	tgt.do(t, "listen 8080 128")
	got := tgt.do(t, "dial 127.0.0.1:8080 15")
	if want := []string{"10", "EADDRNOTAVAIL:5"}; !slices.Equal(got, want) {
		t.Fatalf("dials to a 10-port range: %v, want %v", got, want)
	}
	if got := tgt.do(t, "dial 127.0.0.1:1 3"); !slices.Equal(got, []string{"0", "ECONNREFUSED:3"}) {
		t.Fatalf("non-blocking dials to a closed port: %v", got)
	}
	// The range is used up: free it for the blocking connects.
	tgt.do(t, "sysctl net.ipv4.ip_local_port_range 41000_41999")
	if got := tgt.do(t, "connect 127.0.0.1:1 2"); !slices.Equal(got, []string{"0", "ECONNREFUSED:2"}) {
		t.Fatalf("blocking connects to a closed port: %v", got)
	}
	tgt.do(t, "listen 8081 0")
	tgt.do(t, "dial 127.0.0.1:8081 1") // fills the queue (backlog 0 holds one)
	if got := tgt.do(t, "dial 127.0.0.1:8081 1"); !slices.Equal(got, []string{"0", "ETIMEDOUT:1"}) {
		t.Fatalf("dial to a full queue: %v", got)
	}
	if got := tgt.do(t, "dial [::1]:1 2"); !slices.Equal(got, []string{"0", "ECONNREFUSED:2"}) {
		t.Fatalf("IPv6 dials to a closed port: %v", got)
	}
	if got := nb.do(t, "dial 127.0.0.1:1 4"); !slices.Equal(got, []string{"0", "ECONNREFUSED:4"}) {
		t.Fatalf("neighbour's dials: %v", got)
	}

	errs := signals.ProcessConnectErrorsTotal
	for _, c := range []struct {
		errno, remote string
		want          float64
	}{
		// Go's dialer tries twice more on EADDRNOTAVAIL
		// (net/tcpsock_posix.go, spuriousENOTAVAIL): 3 connect calls
		// for each of the 5 dials that failed.
		{"EADDRNOTAVAIL", "127.0.0.1:8080", 15},
		{"ECONNREFUSED", "127.0.0.1:1", 5},
		{"ETIMEDOUT", "127.0.0.1:8081", 1},
		{"ECONNREFUSED", "[::1]:1", 2},
	} {
		ls := signals.L("errno", c.errno, "remote", c.remote)
		waitValue(t, st, errs, ls, func(v float64) bool { return v >= c.want }, fmt.Sprintf(">= %v", c.want))
		assertStays(t, st, errs, ls, c.want)
	}
	for remote, want := range map[string]float64{"127.0.0.1:8080": 10, "127.0.0.1:1": 5, "127.0.0.1:8081": 2, "[::1]:1": 2} {
		if v := value(st, signals.ProcessConnectsTotal, signals.L("remote", remote)); v != want {
			t.Errorf("connect attempts to %s = %v, want %v", remote, v, want)
		}
	}
	var total float64
	for _, ls := range st.Select(errs) {
		total += value(st, errs, ls)
	}
	if total != 23 {
		t.Errorf("connect errors of the target = %v, want 23 (the neighbour's 4 are not its)", total)
	}
}

// A connect the app gives up on while its SYN waits unanswered (Go's
// dialer closes the socket at its timeout) is an attempt and no error: it
// had a local port and sent a SYN. The kernel frees the port before the
// state change is traced, so the port alone cannot tell it from a connect
// that found none (EADDRNOTAVAIL); the SYN it sent does. Before, each such
// dial was counted as EADDRNOTAVAIL, and port_exhaustion heard of
// exhausted ports beside a target whose clients timed out toward a full
// accept queue.
func TestSockCallsConnectGivenUp(t *testing.T) {
	tgt := startSockChild(t, true)
	_, st := startSockCalls(t, tgt.pid)

	tgt.do(t, "sysctl net.ipv4.tcp_syn_retries 3")
	port := tgt.do(t, "listen 0 0")[0]
	addr := "127.0.0.1:" + port
	tgt.do(t, "dial %s 1", addr) // fills the queue (backlog 0 holds one): later SYNs are dropped
	if got := tgt.do(t, "giveup %s 4 300", addr); !slices.Equal(got, []string{"4"}) {
		t.Fatalf("dials given up on: %v, want 4 timeouts", got)
	}
	waitValue(t, st, signals.ProcessConnectsTotal, signals.L("remote", addr), func(v float64) bool { return v >= 5 }, ">= 5 (1 established, 4 given up)")
	assertStays(t, st, signals.ProcessConnectsTotal, signals.L("remote", addr), 5)
	for _, ls := range st.Select(signals.ProcessConnectErrorsTotal) {
		if v := value(st, signals.ProcessConnectErrorsTotal, ls); v != 0 {
			t.Errorf("connect errors %s = %v, want none: the app gave up, no connect failed", ls, v)
		}
	}
}

// Unread work: a target connection whose peer sent bytes the target does
// not read shows an age that grows; once the target reads (with read,
// recvfrom or recvmsg; a MSG_PEEK does not count), it is back to 0. A
// neighbour's unread socket does not count, and a connection the target
// opened counts like one it accepted.
func TestSockCallsUnreadWork(t *testing.T) {
	tgt := startSockChild(t, false)
	nb := startSockChild(t, false)
	// The accepted sockets are the target's from their accept: counted
	// while sys_exit is attached (always, here; by default while a queue
	// fills up, and otherwise from the target's first read).
	p, st := startSockCalls(t, tgt.pid, func(o *SockCallsOptions) { o.AcceptsAlways, o.UnreadAlways = true, true })

	port := tgt.do(t, "listen 0 16")[0]
	var peers []net.Conn
	for range 2 {
		c, err := net.DialTimeout("tcp", "127.0.0.1:"+port, 5*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		peers = append(peers, c)
	}
	tgt.do(t, "accept %s 2", port)
	// A connection the target opens, to a server in this process.
	srv, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Close()
	tgt.do(t, "dial %s 1", srv.Addr())
	up, err := srv.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer up.Close()
	peers = append(peers, up)

	nport := nb.do(t, "listen 0 16")[0]
	nc, err := net.DialTimeout("tcp", "127.0.0.1:"+nport, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	nb.do(t, "accept %s 1", nport)

	oldest, waiting := signals.ProcessUnreadOldestSeconds, signals.ProcessUnreadSockets
	for round, mode := range []string{"read", "recv", "recvmsg"} {
		if v := value(st, oldest, nil); v != 0 {
			t.Fatalf("round %d: oldest unread %v before anything was sent, want 0", round, v)
		}
		if _, err := nc.Write([]byte("to the neighbour")); err != nil {
			t.Fatal(err)
		}
		for _, c := range peers {
			if _, err := c.Write([]byte("request")); err != nil {
				t.Fatal(err)
			}
		}
		sent := time.Now()
		if round == 0 {
			time.Sleep(100 * time.Millisecond)
			if got := tgt.do(t, "read peek")[0]; got != "21" {
				t.Fatalf("peeked %s bytes, want 21", got)
			}
		}
		waitValue(t, st, oldest, nil, func(v float64) bool { return v > 0.3 }, "> 0.3 s")
		// The age counts from the data's arrival (a peek does not reset
		// it): it is the time from the write to the poll, give or take
		// the few ms between the poll's clock reads.
		s, _ := st.Latest(oldest, nil)
		if since := s.T.Sub(sent).Seconds(); s.V < since-0.03 || s.V > since+0.03 {
			t.Errorf("round %d: oldest unread %.3f s at a poll %.3f s after the data was sent", round, s.V, since)
		}
		if v := value(st, waiting, nil); v != 3 {
			t.Errorf("round %d: %v target sockets waiting, want 3 (not the neighbour's)", round, v)
		}
		us := p.Unread()
		if len(us) != 3 {
			t.Fatalf("round %d: Unread() = %+v, want 3 sockets", round, us)
		}
		ports := map[int]int{}
		for _, u := range us {
			if u.Pid != tgt.pid {
				t.Errorf("unread socket of pid %d, want %d", u.Pid, tgt.pid)
			}
			ports[u.LocalPort]++
		}
		if n, _ := strconv.Atoi(port); ports[n] != 2 {
			t.Errorf("round %d: unread sockets by local port %v, want 2 on the listener's %d", round, ports, n)
		}
		if got := tgt.do(t, "read %s", mode)[0]; got != "21" {
			t.Fatalf("round %d: the target read %s bytes with %s, want 21", round, got, mode)
		}
		waitValue(t, st, oldest, nil, func(v float64) bool { return v == 0 }, "0 after "+mode)
		if v := value(st, waiting, nil); v != 0 {
			t.Errorf("round %d: %v sockets waiting after %s, want 0", round, v, mode)
		}
	}
}

// Data that arrived before the target accepted the connection waits from
// the accept on: the socket was not the target's before.
func TestSockCallsUnreadBeforeAccept(t *testing.T) {
	tgt := startSockChild(t, false)
	_, st := startSockCalls(t, tgt.pid, func(o *SockCallsOptions) { o.AcceptsAlways, o.UnreadAlways = true, true })
	port := tgt.do(t, "listen 0 16")[0]
	c, err := net.DialTimeout("tcp", "127.0.0.1:"+port, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := c.Write([]byte("early request")); err != nil {
		t.Fatal(err)
	}
	time.Sleep(200 * time.Millisecond)
	if v := value(st, signals.ProcessUnreadSockets, nil); v != 0 {
		t.Fatalf("%v unread sockets before the accept, want 0", v)
	}
	accepted := time.Now()
	tgt.do(t, "accept %s 1", port)
	waitValue(t, st, signals.ProcessUnreadSockets, nil, func(v float64) bool { return v == 1 }, "1 after the accept")
	age := waitValue(t, st, signals.ProcessUnreadOldestSeconds, nil, func(v float64) bool { return v > 0.3 }, "> 0.3 s")
	if since := time.Since(accepted).Seconds(); age > since {
		t.Errorf("oldest unread %.3f s, more than the %.3f s since the accept", age, since)
	}
	if got := tgt.do(t, "read read")[0]; got != "13" {
		t.Fatalf("read %s bytes, want 13", got)
	}
	waitValue(t, st, signals.ProcessUnreadOldestSeconds, nil, func(v float64) bool { return v == 0 }, "0 after the read")
}

// Remotes beyond MaxRemotes share the series remote="other", and a remote
// keeps its label; counts the kernel restarted (an LRU eviction) still
// only add.
func TestSockCallsBounds(t *testing.T) {
	p := NewSockCalls(SockCallsOptions{MaxRemotes: 2})
	a, b, c := netip.MustParseAddrPort("10.0.0.1:80"), netip.MustParseAddrPort("[2001:db8::1]:443"), netip.MustParseAddrPort("10.0.0.3:80")
	got := []string{p.remoteLabel(a), p.remoteLabel(b), p.remoteLabel(c), p.remoteLabel(a)}
	if want := []string{"10.0.0.1:80", "[2001:db8::1]:443", "other", "10.0.0.1:80"}; !slices.Equal(got, want) {
		t.Errorf("labels %v, want %v", got, want)
	}
	d := newDeltas[int]()
	var total uint64
	for _, step := range []struct {
		present map[int]uint64
	}{
		{map[int]uint64{1: 5, 2: 1}},
		{map[int]uint64{1: 7, 2: 1}},
		{map[int]uint64{1: 2}}, // 1 evicted and counted again from 0; 2 evicted
		{map[int]uint64{1: 3, 2: 4}},
	} {
		d.begin()
		for k, n := range step.present {
			total += d.add(k, n)
		}
		d.end()
	}
	if total != 15 || len(d.last) != 2 {
		t.Errorf("total %d over %d keys, want 15 over 2 (5+1, +2, +2, +1+4)", total, len(d.last))
	}
	if n := errnoName(99); n != "EADDRNOTAVAIL" {
		t.Errorf("errno 99 is %q", n)
	}
	if n := errnoName(4095); n != "errno_4095" {
		t.Errorf("unknown errno named %q", n)
	}
}

// Accepts are counted while the store says a queue is filling (the
// accept-queue collector does, while a listener's queue fills up) and
// AcceptsLinger after, and process_accepts_counted_since_seconds says since
// when: the sys_exit program they need slows every system call of the
// host, so it is attached only then. Accepts before and after are not
// counted, and the counter does not jump when counting starts again.
func TestSockCallsCountsAcceptsWhileQueueFills(t *testing.T) {
	tgt := startSockChild(t, false)
	_, st := startSockCalls(t, tgt.pid, func(o *SockCallsOptions) { o.AcceptsLinger = time.Second })
	port := tgt.do(t, "listen 0 64")[0]
	accept := func(n int) {
		t.Helper()
		for range n {
			c, err := net.DialTimeout("tcp", "127.0.0.1:"+port, 5*time.Second)
			if err != nil {
				t.Fatalf("dial %s: %v", port, err)
			}
			t.Cleanup(func() { c.Close() })
		}
		if got := tgt.do(t, "accept %s %d", port, n)[0]; got != strconv.Itoa(n) {
			t.Fatalf("target accepted %s, want %d", got, n)
		}
	}
	ls := signals.L("port", port)
	since := func() float64 { return value(st, signals.ProcessAcceptsCountedSince, nil) }

	accept(3)
	time.Sleep(300 * time.Millisecond)
	if v := value(st, signals.ProcessAcceptsTotal, ls); v != 0 || since() != 0 {
		t.Fatalf("no queue held connections: %v accepts counted, counted since %v; want 0, 0", v, since())
	}

	filling := time.Now()
	st.FillingQueue(filling.Add(500 * time.Millisecond))
	waitValue(t, st, signals.ProcessAcceptsCountedSince, nil, func(v float64) bool { return v > 0 }, "> 0 (counting)")
	if from := time.Unix(0, int64(since()*1e9)); from.Before(filling) || from.Sub(filling) > 2*time.Second {
		t.Errorf("counted since %v, filling from %v", from, filling)
	}
	accept(2)
	waitValue(t, st, signals.ProcessAcceptsTotal, ls, func(v float64) bool { return v >= 2 }, ">= 2")
	assertStays(t, st, signals.ProcessAcceptsTotal, ls, 2)

	// The linger (1 s) after the filling (0.5 s) ends: no longer counted.
	waitValue(t, st, signals.ProcessAcceptsCountedSince, nil, func(v float64) bool { return v == 0 }, "0 (no longer counting)")
	if gone := time.Since(filling); gone < 1500*time.Millisecond {
		t.Errorf("accepts stopped being counted %v after the queue stopped filling, before its linger ended", gone)
	}
	accept(4)
	assertStays(t, st, signals.ProcessAcceptsTotal, ls, 2)
}

// By default the socket hooks are attached only while a thread of the
// target sleeps where work may wait for it (Store.WorkerBlocked, which the
// sched probe sets), and UnreadLinger after. When they attach, every
// socket the target holds is its own, though neither its accept nor its
// reads were seen, and data queued on it waits from then on (a lower
// bound); what was left in the waiting map from an earlier attach is
// gone (reads since went unseen). A neighbour's unread data never counts.
func TestSockCallsWatchesUnreadWhileAWorkerBlocks(t *testing.T) {
	tgt := startSockChild(t, false)
	nb := startSockChild(t, false)
	_, st := startSockCalls(t, tgt.pid, func(o *SockCallsOptions) { o.UnreadLinger = time.Second })
	oldest, waiting, since := signals.ProcessUnreadOldestSeconds, signals.ProcessUnreadSockets, signals.ProcessUnreadWatchedSince

	port := tgt.do(t, "listen 0 16")[0]
	nport := nb.do(t, "listen 0 16")[0]
	dial := func(port string) net.Conn {
		c, err := net.DialTimeout("tcp", "127.0.0.1:"+port, 5*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		return c
	}
	peers := []net.Conn{dial(port), dial(port)}
	nc := dial(nport)
	tgt.do(t, "accept %s 2", port)
	nb.do(t, "accept %s 1", nport)
	send := func(cs ...net.Conn) {
		for _, c := range cs {
			if _, err := c.Write([]byte("request")); err != nil {
				t.Fatal(err)
			}
		}
	}
	// Not watched: nothing is said of the data that waits.
	send(append(peers, nc)...)
	time.Sleep(300 * time.Millisecond)
	if v, s := value(st, oldest, nil), value(st, since, nil); v != 0 || s != 0 {
		t.Fatalf("oldest unread %v, watched since %v before any worker blocked; want 0, 0", v, s)
	}

	block := func() { st.BlockedWorker(time.Now().Add(300 * time.Millisecond)) }
	block()
	attached := time.Now()
	waitValue(t, st, since, nil, func(v float64) bool { return v > 0 }, "watched")
	// The data queued before counts from the attach at the latest.
	waitValue(t, st, waiting, nil, func(v float64) bool { return v == 2 }, "the target's 2 sockets, not the neighbour's")
	age := waitValue(t, st, oldest, nil, func(v float64) bool { return v > 0.2 }, "> 0.2 s")
	if d := time.Since(attached).Seconds(); age > d+0.05 {
		t.Errorf("oldest unread %.3f s, more than the %.3f s since watching began", age, d)
	}
	// Reads and new data are seen while it lasts.
	if got := tgt.do(t, "read read")[0]; got != "14" {
		t.Fatalf("the target read %s bytes, want 14", got)
	}
	waitValue(t, st, oldest, nil, func(v float64) bool { return v == 0 }, "0 after the read")
	block()
	send(peers[0])
	waitValue(t, st, waiting, nil, func(v float64) bool { return v == 1 }, "1 socket after new data")

	// The linger ends: not watched any more, and said so.
	waitValue(t, st, since, nil, func(v float64) bool { return v == 0 }, "not watched after the linger")
	if v := value(st, oldest, nil); v != 0 {
		t.Errorf("oldest unread %v while not watched, want 0", v)
	}
	// Read while nobody watches; the next attach must not keep the
	// data that waited before as waiting still.
	if got := tgt.do(t, "read read")[0]; got != "7" {
		t.Fatalf("the target read %s bytes, want 7", got)
	}
	block()
	waitValue(t, st, since, nil, func(v float64) bool { return v > 0 }, "watched again")
	time.Sleep(300 * time.Millisecond)
	if v, n := value(st, oldest, nil), value(st, waiting, nil); v != 0 || n != 0 {
		t.Errorf("after a read nobody saw: oldest unread %v on %v sockets, want 0", v, n)
	}
}
