package testenv

import (
	"bufio"
	"bytes"
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// This file holds what every real-program target (StartRedis, StartNginx,
// StartTokioApp, StartNodeApp) shares: the network namespace it runs in,
// the process and its stop, and the TCP socket table tests check; then the
// noisy neighbour, a server child started in a target's namespace.

// Netns is a network namespace that targets run in: a fresh private one
// (NewNetns), another process's (NetnsOf), or the test's own (OwnNetns).
// Namespaces belong to threads, so everything done "in" it (Do, Dial,
// Listen, starting a process) runs on an OS thread that joined it for the
// duration; a socket keeps the namespace it was created in.
type Netns struct {
	h   netns.NsHandle
	own bool
}

// NewNetns makes a fresh network namespace with only lo, up, and closes
// it when the test ends (the kernel frees it once no process is left in
// it). Its counters (ListenOverflows, OutRsts, ...) are the test's alone.
// Needs root; without it the test fails (skips outside CI).
func NewNetns(t testing.TB) *Netns {
	t.Helper()
	if os.Geteuid() != 0 {
		skipUnlessCI(t, "SKIP: not root: cannot make a network namespace; targets in their own namespace are NOT TESTED")
	}
	type res struct {
		h   netns.NsHandle
		err error
	}
	ch := make(chan res, 1)
	go func() {
		// The thread unshares into the new namespace and then goes back.
		// It must not stay there: if this goroutine ran on the main thread,
		// the runtime cannot end that thread with it (it wedges it), and
		// /proc/self/ns/net, which names the main thread's namespace, would
		// then say the test itself lives in the target's namespace.
		runtime.LockOSThread()
		orig, err := netns.Get()
		if err != nil {
			ch <- res{netns.None(), fmt.Errorf("open this thread's network namespace: %w", err)}
			return // still locked: the runtime discards the thread
		}
		defer orig.Close()
		h, err := netns.New()
		if err != nil {
			ch <- res{netns.None(), fmt.Errorf("unshare a network namespace: %w", err)}
			return
		}
		lo, err := netlink.LinkByName("lo")
		if err == nil {
			err = netlink.LinkSetUp(lo)
		}
		if err != nil {
			h.Close()
			ch <- res{netns.None(), fmt.Errorf("lo up in the new namespace: %w", err)}
			return
		}
		if err := netns.Set(orig); err != nil {
			// Stays locked: the goroutine ends and takes the thread along.
			h.Close()
			ch <- res{netns.None(), fmt.Errorf("return to the test's network namespace: %w", err)}
			return
		}
		runtime.UnlockOSThread()
		ch <- res{h, nil}
	}()
	r := <-ch
	if r.err != nil {
		t.Fatalf("testenv: %v", r.err)
	}
	t.Cleanup(func() { r.h.Close() })
	return &Netns{h: r.h}
}

// NetnsOf opens the network namespace of process pid (a target's), closed
// when the test ends.
func NetnsOf(t testing.TB, pid int) *Netns {
	t.Helper()
	h, err := netns.GetFromPid(pid)
	if err != nil {
		t.Fatalf("testenv: network namespace of pid %d: %v", pid, err)
	}
	t.Cleanup(func() { h.Close() })
	return &Netns{h: h}
}

// OwnNetns is the test process's own network namespace: a target started
// in it shares the test's loopback (and its namespace-wide counters with
// every other test of the package).
func OwnNetns() *Netns { return &Netns{h: netns.None(), own: true} }

// Own reports whether n is the test's own namespace.
func (n *Netns) Own() bool { return n.own }

// Inode is the namespace's inode number, as /proc/PID/ns/net shows it
// ("net:[INODE]").
func (n *Netns) Inode() (uint64, error) {
	if n.own {
		var st unix.Stat_t
		if err := unix.Stat("/proc/self/ns/net", &st); err != nil {
			return 0, fmt.Errorf("stat /proc/self/ns/net: %w", err)
		}
		return st.Ino, nil
	}
	var st unix.Stat_t
	if err := unix.Fstat(int(n.h), &st); err != nil {
		return 0, fmt.Errorf("stat network namespace: %w", err)
	}
	return st.Ino, nil
}

// Do runs fn on an OS thread that has joined n, and returns its error.
// Sockets fn creates, and processes it starts, are in n. If the thread
// cannot return to the test's namespace it is left locked, and the
// runtime discards it rather than letting another goroutine run there.
func (n *Netns) Do(fn func() error) error {
	if n.own {
		return fn()
	}
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := netns.Get()
		if err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("open this thread's network namespace: %w", err)
			return
		}
		defer orig.Close()
		if err := netns.Set(n.h); err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("join the target's network namespace: %w", err)
			return
		}
		ferr := fn()
		if err := netns.Set(orig); err != nil {
			errc <- errors.Join(ferr, fmt.Errorf("return to the test's network namespace: %w", err))
			return
		}
		runtime.UnlockOSThread()
		errc <- ferr
	}()
	return <-errc
}

// here runs fn on the calling goroutine with its thread in n, for helpers
// that must call t.Fatal (which only the test's goroutine may) while a
// child process is started. If fn ends the goroutine (t.Fatal), the
// deferred return still runs.
func (n *Netns) here(t testing.TB, fn func()) {
	t.Helper()
	if n.own {
		fn()
		return
	}
	runtime.LockOSThread()
	orig, err := netns.Get()
	if err != nil {
		runtime.UnlockOSThread()
		t.Fatalf("testenv: open this thread's network namespace: %v", err)
	}
	if err := netns.Set(n.h); err != nil {
		orig.Close()
		runtime.UnlockOSThread()
		t.Fatalf("testenv: join the target's network namespace: %v", err)
	}
	defer func() {
		err := netns.Set(orig)
		orig.Close()
		if err != nil {
			// Still locked: the goroutine ends here and takes the thread
			// with it.
			t.Fatalf("testenv: return to the test's network namespace: %v", err)
		}
		runtime.UnlockOSThread()
	}()
	fn()
}

// DialContext connects from inside n (to its loopback, where targets
// listen). It fits http.Transport.DialContext.
func (n *Netns) DialContext(ctx context.Context, network, addr string) (net.Conn, error) {
	var c net.Conn
	var d net.Dialer
	err := n.Do(func() error {
		var err error
		c, err = d.DialContext(ctx, network, addr)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("dial %s in the target's network namespace: %w", addr, err)
	}
	return c, nil
}

// Listen listens inside n.
func (n *Netns) Listen(network, addr string) (net.Listener, error) {
	var l net.Listener
	err := n.Do(func() error {
		var err error
		l, err = net.Listen(network, addr)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("listen on %s in the target's network namespace: %w", addr, err)
	}
	return l, nil
}

// FreePort returns a TCP port free on 127.0.0.1 in n, for a server the
// test starts next. It is picked below the namespace's ephemeral range
// (ip_local_port_range): a port the kernel hands out for ":0" is one that
// any connect() in the namespace may take as its source port between this
// probe and the server's bind (seen: the agent's gRPC listener failed with
// "address already in use" while other tests' clients ran). Below the
// range only an explicit bind can take it; the start is random so that
// concurrent tests rarely probe the same port.
func (n *Netns) FreePort() (int, error) {
	lo := 32768
	_ = n.Do(func() error {
		// /proc/sys/net is the opening thread's namespace's.
		b, err := os.ReadFile("/proc/sys/net/ipv4/ip_local_port_range")
		if err == nil {
			if f := strings.Fields(string(b)); len(f) == 2 {
				if v, err := strconv.Atoi(f[0]); err == nil {
					lo = v
				}
			}
		}
		return nil
	})
	const first = 20000
	if lo-first < 1000 {
		return n.ephemeralPort()
	}
	start := first + rand.IntN(lo-first)
	for i := range 200 {
		port := first + (start-first+i*7919)%(lo-first)
		l, err := n.Listen("tcp", "127.0.0.1:"+strconv.Itoa(port))
		if err != nil {
			continue
		}
		if err := l.Close(); err != nil {
			return 0, fmt.Errorf("close port probe: %w", err)
		}
		return port, nil
	}
	return n.ephemeralPort()
}

// ephemeralPort is FreePort's fallback: a port the kernel picks.
func (n *Netns) ephemeralPort() (int, error) {
	l, err := n.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	port := l.Addr().(*net.TCPAddr).Port
	if err := l.Close(); err != nil {
		return 0, fmt.Errorf("close port probe: %w", err)
	}
	return port, nil
}

// Forward makes to, an address in the test's own namespace (an agent's
// OTLP receiver), reachable from inside n: it listens on 127.0.0.1 in n
// and relays each connection, both ways, until the test ends. It returns
// the address to use inside n. In the test's own namespace it returns to.
func (n *Netns) Forward(t testing.TB, to string) string {
	t.Helper()
	if n.own {
		return to
	}
	l, err := n.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("testenv: forward to %s: %v", to, err)
	}
	var (
		mu    sync.Mutex
		conns = map[net.Conn]bool{}
		wg    sync.WaitGroup
	)
	track := func(c net.Conn, on bool) {
		mu.Lock()
		defer mu.Unlock()
		if on {
			conns[c] = true
		} else {
			delete(conns, c)
		}
	}
	relay := func(dst, src net.Conn) {
		defer wg.Done()
		_, _ = io.Copy(dst, src)
		// Pass the half-close on, so that request/response protocols see
		// the end of the stream as they would without the relay.
		if tc, ok := dst.(*net.TCPConn); ok {
			_ = tc.CloseWrite()
		}
	}
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			in, err := l.Accept()
			if err != nil {
				return
			}
			out, err := net.DialTimeout("tcp", to, 5*time.Second)
			if err != nil {
				in.Close()
				continue
			}
			track(in, true)
			track(out, true)
			wg.Add(2)
			go relay(out, in)
			go func() {
				relay(in, out)
				track(in, false)
				track(out, false)
				in.Close()
				out.Close()
			}()
		}
	}()
	t.Cleanup(func() {
		l.Close()
		mu.Lock()
		for c := range conns {
			c.Close()
		}
		mu.Unlock()
		wg.Wait()
	})
	return l.Addr().String()
}

// Process is a real program a helper started, in Netns, with a private
// directory. Stop ends it; the test's cleanup calls Stop.
type Process struct {
	PID   int
	Netns *Netns
	// Dir is the program's private directory (its config, logs).
	Dir string
	// LogPath is where its stdout and stderr go.
	LogPath string

	name     string
	cmd      *exec.Cmd
	done     chan struct{}
	stopSig  syscall.Signal
	stopOnce sync.Once
	stopErr  error
	cleanups []func()
}

// startProcess starts exe with args in ns (nil: a new private namespace),
// its output in dir/NAME.log, in a process group of its own (so Stop can
// reach the children it forks), killed if the test process dies first.
func startProcess(t testing.TB, ns *Netns, dir, exe string, args, env []string) *Process {
	t.Helper()
	if ns == nil {
		ns = NewNetns(t)
	}
	name := filepath.Base(exe)
	logPath := filepath.Join(dir, name+".log")
	logf, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		t.Fatalf("testenv: %s log: %v", name, err)
	}
	defer logf.Close() // the child has its own copy
	cmd := exec.Command(exe, args...)
	cmd.Dir = dir
	cmd.Env = append(cleanEnv(), env...)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := spawn(ns, cmd); err != nil {
		t.Fatalf("testenv: start %s: %v", name, err)
	}
	p := &Process{PID: cmd.Process.Pid, Netns: ns, Dir: dir, LogPath: logPath, name: name, cmd: cmd,
		done: make(chan struct{}), stopSig: syscall.SIGTERM}
	go func() {
		_ = cmd.Wait() // the status is irrelevant: Stop or the test judge the program by what it did
		close(p.done)
	}()
	t.Cleanup(func() {
		if err := p.Stop(); err != nil {
			t.Logf("testenv: %v", err)
		}
		if t.Failed() {
			t.Logf("testenv: %s's output (%s), last lines:\n%s", name, logPath, p.LogTail(30))
		}
	})
	return p
}

// The spawner is one goroutine locked to its thread for the life of the
// test process, which starts every target. A target is started with
// Pdeathsig (killed when the thread that forked it ends, so none outlives
// a crashed test binary), and Go ends threads: any thread a goroutine
// leaves locked (NewNetns's, a failed namespace switch). A thread that is
// never unlocked cannot be taken by such a goroutine.
var spawner struct {
	once sync.Once
	reqs chan spawnReq
}

type spawnReq struct {
	ns   *Netns
	cmd  *exec.Cmd
	errc chan error
}

// spawn starts cmd in ns on the spawner thread.
func spawn(ns *Netns, cmd *exec.Cmd) error {
	spawner.once.Do(func() {
		spawner.reqs = make(chan spawnReq)
		go spawnLoop(spawner.reqs)
	})
	errc := make(chan error, 1)
	spawner.reqs <- spawnReq{ns, cmd, errc}
	return <-errc
}

func spawnLoop(reqs chan spawnReq) {
	runtime.LockOSThread() // never unlocked: see spawner
	home, homeErr := netns.Get()
	if homeErr != nil {
		homeErr = fmt.Errorf("open the spawner thread's network namespace: %w", homeErr)
	}
	for r := range reqs {
		if homeErr != nil {
			r.errc <- homeErr
			continue
		}
		if !r.ns.own {
			if err := netns.Set(r.ns.h); err != nil {
				r.errc <- fmt.Errorf("join the target's network namespace: %w", err)
				continue
			}
		}
		err := r.cmd.Start()
		if !r.ns.own {
			if serr := netns.Set(home); serr != nil {
				// The thread is stuck in that namespace: start nothing
				// more on it, rather than in the wrong namespace.
				homeErr = fmt.Errorf("spawner thread could not return to the test's network namespace: %w", serr)
			}
		}
		r.errc <- err
	}
}

// cleanEnv is the test's environment without what would change how a
// target behaves (an OpenTelemetry exporter the test runner was given).
func cleanEnv() []string {
	var env []string
	for _, kv := range os.Environ() {
		if strings.HasPrefix(kv, "OTEL_") || strings.HasPrefix(kv, roleEnv+"=") {
			continue
		}
		env = append(env, kv)
	}
	return env
}

// Exited reports whether the process has ended.
func (p *Process) Exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// Done is closed when the process has ended.
func (p *Process) Done() <-chan struct{} { return p.done }

// Stop ends the program: its stop signal (SIGTERM; nginx's master takes
// its workers down on it), then SIGKILL to its whole process group after
// 10 s. It is idempotent and returns an error when the program had to be
// killed or had already died on its own.
func (p *Process) Stop() error {
	p.stopOnce.Do(func() {
		if p.Exited() {
			p.stopErr = fmt.Errorf("%s (pid %d) had exited before Stop: %v", p.name, p.PID, p.cmd.ProcessState)
		} else {
			_ = p.cmd.Process.Signal(p.stopSig)
			select {
			case <-p.done:
			case <-time.After(10 * time.Second):
				// The whole group: children it forked (nginx's workers)
				// would outlive a killed leader. The leader is not reaped
				// yet, so the group id is still ours.
				_ = syscall.Kill(-p.PID, syscall.SIGKILL)
				<-p.done
				p.stopErr = fmt.Errorf("%s (pid %d) ignored %v for 10 s: killed", p.name, p.PID, p.stopSig)
			}
		}
		for i := len(p.cleanups) - 1; i >= 0; i-- {
			p.cleanups[i]()
		}
	})
	return p.stopErr
}

// LogTail returns the last n lines of the program's output.
func (p *Process) LogTail(n int) string { return readTail(p.LogPath, n) }

// Threads returns the process's threads: tid -> name (comm, at most 15
// bytes: Tokio's "tokio-runtime-worker" reads "tokio-runtime-w").
func (p *Process) Threads() (map[int]string, error) { return Threads(p.PID) }

// Threads returns the threads of pid: tid -> comm.
func Threads(pid int) (map[int]string, error) {
	dir := fmt.Sprintf("/proc/%d/task", pid)
	ents, err := os.ReadDir(dir)
	if err != nil {
		return nil, fmt.Errorf("threads of %d: %w", pid, err)
	}
	out := make(map[int]string, len(ents))
	for _, e := range ents {
		tid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		b, err := os.ReadFile(filepath.Join(dir, e.Name(), "comm"))
		if err != nil {
			continue // the thread ended meanwhile
		}
		out[tid] = strings.TrimSpace(string(b))
	}
	return out, nil
}

// childPIDs returns the processes whose parent is pid.
func childPIDs(pid int) ([]int, error) {
	if b, err := os.ReadFile(fmt.Sprintf("/proc/%d/task/%d/children", pid, pid)); err == nil {
		var out []int
		for _, f := range strings.Fields(string(b)) {
			if c, err := strconv.Atoi(f); err == nil {
				out = append(out, c)
			}
		}
		return out, nil
	}
	// Without CONFIG_PROC_CHILDREN: every process's parent.
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return nil, fmt.Errorf("list /proc: %w", err)
	}
	var out []int
	for _, e := range ents {
		c, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		b, err := os.ReadFile(filepath.Join("/proc", e.Name(), "stat"))
		if err != nil {
			continue
		}
		// The fields after the command's closing parenthesis: state, ppid.
		f := strings.Fields(string(b[bytes.LastIndexByte(b, ')')+1:]))
		if len(f) > 1 && f[1] == strconv.Itoa(pid) {
			out = append(out, c)
		}
	}
	return out, nil
}

// lookProgram finds a program on PATH or in the sbin directories a
// non-login PATH lacks (nginx is /usr/sbin/nginx). Missing, the test is
// skipped, loudly, outside CI and fails under CI=true.
func lookProgram(t testing.TB, name, install string) string {
	t.Helper()
	if p, err := exec.LookPath(name); err == nil {
		return p
	}
	for _, d := range []string{"/usr/sbin", "/usr/local/sbin", "/sbin", "/usr/local/bin", "/usr/bin"} {
		p := filepath.Join(d, name)
		if st, err := os.Stat(p); err == nil && st.Mode()&0o111 != 0 {
			return p
		}
	}
	skipUnlessCI(t, fmt.Sprintf("SKIP: %s not found: the targets that need it are NOT TESTED; install it with %s", name, install))
	return ""
}

// waitFor polls ready every 20 ms until it returns nil, the process exits,
// or timeout passes; then it fails the test with the last error and the
// program's output.
func (p *Process) waitFor(t testing.TB, what string, timeout time.Duration, ready func() error) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	var err error
	for {
		if err = ready(); err == nil {
			return
		}
		if p.Exited() {
			t.Fatalf("testenv: %s exited before %s (%v); its output:\n%s", p.name, what, p.cmd.ProcessState, p.LogTail(30))
		}
		if time.Now().After(deadline) {
			t.Fatalf("testenv: %s not %s within %v: %v; its output:\n%s", p.name, what, timeout, err, p.LogTail(30))
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TCPSocket is one line of /proc/PID/net/tcp{,6}: a TCP socket of the
// process's network namespace.
type TCPSocket struct {
	Local, Remote netip.AddrPort
	State         string // ESTABLISHED, CLOSE_WAIT, LISTEN, ...
	Inode         uint64
}

var tcpStates = map[string]string{
	"01": "ESTABLISHED", "02": "SYN_SENT", "03": "SYN_RECV", "04": "FIN_WAIT1",
	"05": "FIN_WAIT2", "06": "TIME_WAIT", "07": "CLOSE", "08": "CLOSE_WAIT",
	"09": "LAST_ACK", "0A": "LISTEN", "0B": "CLOSING", "0C": "NEW_SYN_RECV",
}

// TCPSockets lists every TCP socket of pid's network namespace, IPv4 and
// IPv6, from /proc/PID/net/tcp{,6} (which show the process's namespace).
func TCPSockets(pid int) ([]TCPSocket, error) {
	var out []TCPSocket
	for _, f := range []string{"tcp", "tcp6"} {
		path := fmt.Sprintf("/proc/%d/net/%s", pid, f)
		b, err := os.ReadFile(path)
		if err != nil {
			if f == "tcp6" && errors.Is(err, os.ErrNotExist) {
				continue // IPv6 off
			}
			return nil, fmt.Errorf("read %s: %w", path, err)
		}
		sc := bufio.NewScanner(bytes.NewReader(b))
		sc.Scan() // header
		for sc.Scan() {
			fs := strings.Fields(sc.Text())
			if len(fs) < 10 {
				continue
			}
			l, err1 := parseProcAddr(fs[1])
			r, err2 := parseProcAddr(fs[2])
			if err := errors.Join(err1, err2); err != nil {
				return nil, fmt.Errorf("%s: %q: %w", path, sc.Text(), err)
			}
			ino, _ := strconv.ParseUint(fs[9], 10, 64)
			st := tcpStates[fs[3]]
			if st == "" {
				st = "0x" + fs[3]
			}
			out = append(out, TCPSocket{Local: l, Remote: r, State: st, Inode: ino})
		}
	}
	return out, nil
}

// parseProcAddr parses "0100007F:1F90": the address as the kernel's
// 32-bit words in host (little-endian) order, then the port in hex.
func parseProcAddr(s string) (netip.AddrPort, error) {
	a, p, ok := strings.Cut(s, ":")
	if !ok {
		return netip.AddrPort{}, fmt.Errorf("address %q without a port", s)
	}
	raw, err := hex.DecodeString(a)
	if err != nil || (len(raw) != 4 && len(raw) != 16) {
		return netip.AddrPort{}, fmt.Errorf("address %q: bad hex", s)
	}
	for i := 0; i < len(raw); i += 4 {
		raw[i], raw[i+1], raw[i+2], raw[i+3] = raw[i+3], raw[i+2], raw[i+1], raw[i]
	}
	port, err := strconv.ParseUint(p, 16, 16)
	if err != nil {
		return netip.AddrPort{}, fmt.Errorf("port of %q: %w", s, err)
	}
	addr, _ := netip.AddrFromSlice(raw)
	return netip.AddrPortFrom(addr.Unmap(), uint16(port)), nil
}

// CountTCP counts pid's namespace's TCP sockets in state whose local port
// (or, with remote, remote port) is port.
func CountTCP(pid int, state string, port int, remote bool) (int, error) {
	socks, err := TCPSockets(pid)
	if err != nil {
		return 0, err
	}
	n := 0
	for _, s := range socks {
		p := s.Local.Port()
		if remote {
			p = s.Remote.Port()
		}
		if s.State == state && int(p) == port {
			n++
		}
	}
	return n, nil
}

// Neighbour is a noisy neighbour: testenv's server child (see Server)
// started inside the network namespace of a target, so that what it does
// shows in the namespace's counters and socket tables next to the
// target's own, as another container of the pod would. Its listener is
// Port on 127.0.0.1, in that namespace; every Server command works.
//
// Each fault switches the child's server behaviour for the connections it
// accepts afterwards (leakclose, idletimeout): start one neighbour per
// fault when a test combines them.
type Neighbour struct {
	*Server
	Netns *Netns

	holding []*holder // HoldEstablished's processes, the neighbour's first
}

// StartNeighbour starts a neighbour in the network namespace of pid (a
// target's PID). It accepts at once, with a backlog of 4096 so that its
// own dials never overflow its queue (ListenOverflows stays the
// target's).
func StartNeighbour(t testing.TB, pid int) *Neighbour {
	t.Helper()
	ns := NetnsOf(t, pid)
	var s *Server
	// The child inherits the namespace of the thread that forks it.
	ns.here(t, func() { s = Start(t, Options{Backlog: 4096, Accept: true, SharedNetns: true}) })
	return &Neighbour{Server: s, Netns: ns}
}

// LeakCloseWait makes n more sockets sit in CLOSE_WAIT on the neighbour's
// port: clients connect and close, and its server reads to the end and
// never closes them (an app that leaks connections its peers closed). It
// returns once they are all in CLOSE_WAIT, with their count on the port.
func (nb *Neighbour) LeakCloseWait(t testing.TB, n int) int {
	t.Helper()
	before, err := CountTCP(nb.PID, "CLOSE_WAIT", nb.Port, false)
	if err != nil {
		t.Fatalf("testenv: %v", err)
	}
	nb.MustDo(t, "leakclose on")
	if ans := nb.MustDo(t, "burst "+strconv.Itoa(n)); ans != fmt.Sprintf("ok %d established", n) {
		t.Fatalf("testenv: neighbour burst %d: %q", n, ans)
	}
	var now int
	waitUntil(t, 5*time.Second, func() error {
		var err error
		if now, err = CountTCP(nb.PID, "CLOSE_WAIT", nb.Port, false); err != nil {
			return err
		}
		if now < before+n {
			return fmt.Errorf("%d sockets in CLOSE_WAIT on port %d, want %d", now, nb.Port, before+n)
		}
		return nil
	})
	return now
}

// CutIdle opens n connections to the neighbour's server and leaves them
// idle; its server closes each once it has been idle for idle (a load
// balancer's or NAT's idle timeout, seen from the client: the peer closes
// at one idle age). It returns at once: the cuts come idle later, and the
// clients' sockets then stay in CLOSE_WAIT until Do("close").
func (nb *Neighbour) CutIdle(t testing.TB, idle time.Duration, n int) {
	t.Helper()
	nb.MustDo(t, "idletimeout "+strconv.FormatInt(idle.Milliseconds(), 10))
	if ans := nb.MustDo(t, "dial "+strconv.Itoa(n)); ans != fmt.Sprintf("ok %d established", n) {
		t.Fatalf("testenv: neighbour dial %d: %q", n, ans)
	}
}

// StartResets makes the neighbour connect perSecond times a second to a
// port nothing listens on (127.0.0.1:1), so the namespace answers each
// SYN with a reset, until stop is called or the test ends (and at most 10
// minutes). stop returns how many connections were refused.
func (nb *Neighbour) StartResets(t testing.TB, perSecond int) (stop func() int) {
	t.Helper()
	if perSecond < 1 {
		t.Fatalf("testenv: StartResets: perSecond must be positive, got %d", perSecond)
	}
	// Ten rounds a second, the rate spread as evenly as that allows.
	const rounds = 10
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	done := make(chan struct{})
	var refused int
	var firstErr error
	go func() {
		defer close(done)
		tick := time.NewTicker(time.Second / rounds)
		defer tick.Stop()
		for i := 0; ; i++ {
			n := perSecond*(i+1)/rounds - perSecond*i/rounds
			if n > 0 {
				ans, err := nb.Do("dialclosed " + strconv.Itoa(n))
				var r int
				if _, serr := fmt.Sscanf(ans, "ok %d refused", &r); err == nil && serr != nil {
					err = fmt.Errorf("dialclosed answered %q", ans)
				}
				if err != nil && firstErr == nil {
					firstErr = err
				}
				refused += r
			}
			select {
			case <-ctx.Done():
				return
			case <-tick.C:
			}
		}
	}()
	var once sync.Once
	stop = func() int {
		once.Do(func() {
			cancel()
			<-done
			if firstErr != nil {
				t.Errorf("testenv: neighbour resets: %v", firstErr)
			}
		})
		return refused
	}
	t.Cleanup(func() { stop() })
	return stop
}

// HoldEstablished makes the neighbour open n more connections to a
// server of its own and keep both ends: 2n more ESTABLISHED sockets in
// the namespace. One process holds as many as its open-file limit allows
// (raised when the test may: CAP_SYS_RESOURCE, which this project's
// sandbox lacks, leaving ~9,500 connections under a hard limit of
// 20,000); more start further server children in the same namespace
// (Holders). It returns the number of connections held in all.
func (nb *Neighbour) HoldEstablished(t testing.TB, n int) int {
	t.Helper()
	const chunk = 2000 // well under the backlog: the dials never overflow it
	for n > 0 {
		var h *holder
		for _, c := range nb.holders(t) {
			if c.held < c.capacity {
				h = c
				break
			}
		}
		if h == nil {
			var s *Server
			nb.Netns.here(t, func() { s = Start(t, Options{Backlog: 4096, Accept: true, SharedNetns: true}) })
			h = nb.addHolder(t, s, n)
		}
		k := min(chunk, n, h.capacity-h.held)
		ans := h.s.MustDo(t, "dial "+strconv.Itoa(k))
		var got int
		if _, err := fmt.Sscanf(ans, "ok %d established", &got); err != nil || got != k {
			t.Fatalf("testenv: neighbour %d: dial %d with %d held: %q", h.s.PID, k, h.held, ans)
		}
		h.held += k
		n -= k
	}
	total := 0
	for _, h := range nb.holding {
		held, err := CountTCP(h.s.PID, "ESTABLISHED", h.s.Port, true)
		if err != nil {
			t.Fatalf("testenv: %v", err)
		}
		total += held
	}
	return total
}

// Holders returns the PIDs of the processes holding HoldEstablished's
// connections: the neighbour's, then any more it started.
func (nb *Neighbour) Holders() []int {
	pids := []int{nb.PID}
	for _, h := range nb.holding[min(1, len(nb.holding)):] {
		pids = append(pids, h.s.PID)
	}
	return pids
}

// holder is a server child that holds connections to itself.
type holder struct {
	s              *Server
	held, capacity int
}

func (nb *Neighbour) holders(t testing.TB) []*holder {
	t.Helper()
	if len(nb.holding) == 0 {
		nb.addHolder(t, nb.Server, 0)
	}
	return nb.holding
}

// maxHeldPerProcess keeps one holder's connections under what one client
// address may have to one server port (ip_local_port_range's 28,232 by
// default), so the namespace's sysctls stay untouched. A variable for the
// test of several holders.
var maxHeldPerProcess = 25000

// addHolder raises s's open-file limit for want more connections (two
// descriptors each) if it can, and records how many it can hold.
func (nb *Neighbour) addHolder(t testing.TB, s *Server, want int) *holder {
	t.Helper()
	var lim unix.Rlimit
	if err := unix.Prlimit(s.PID, unix.RLIMIT_NOFILE, nil, &lim); err != nil {
		t.Fatalf("testenv: open-file limit of %d: %v", s.PID, err)
	}
	const spare = 1024 // the child's own files, and slack
	if need := uint64(2*min(want, maxHeldPerProcess) + spare); lim.Cur < need {
		raised := unix.Rlimit{Cur: need, Max: max(need, lim.Max)}
		if err := unix.Prlimit(s.PID, unix.RLIMIT_NOFILE, &raised, nil); err == nil {
			lim = raised
		} else if lim.Max > lim.Cur {
			// Without CAP_SYS_RESOURCE: up to the hard limit.
			raised = unix.Rlimit{Cur: min(need, lim.Max), Max: lim.Max}
			if err := unix.Prlimit(s.PID, unix.RLIMIT_NOFILE, &raised, nil); err == nil {
				lim = raised
			}
		}
	}
	if lim.Cur < 2*spare {
		t.Fatalf("testenv: neighbour %d may open only %d files", s.PID, lim.Cur)
	}
	h := &holder{s: s, capacity: min(int(lim.Cur-spare)/2, maxHeldPerProcess)}
	nb.holding = append(nb.holding, h)
	return h
}

// waitUntil polls cond every 20 ms until it returns nil; after timeout it
// fails the test with cond's last error.
func waitUntil(t testing.TB, timeout time.Duration, cond func() error) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		err := cond()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("testenv: after %v: %v", timeout, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}
