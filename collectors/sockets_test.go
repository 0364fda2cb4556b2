package collectors

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/culprit-dev/culprit/internal/testenv"
	"github.com/culprit-dev/culprit/signals"
	"github.com/culprit-dev/culprit/sockdiag"
	"github.com/culprit-dev/culprit/workload"
)

// sockNetns is a goroutine locked to an OS thread that lives in a network
// namespace: sockets created by the functions it runs belong to that
// namespace, wherever they are used from afterwards.
type sockNetns struct {
	tid  int
	ino  uint64
	work chan func()
}

// newSockNetns joins the network namespace of pid, or, for pid 0, makes a
// new one with lo up.
func newSockNetns(tb testing.TB, pid int) *sockNetns {
	tb.Helper()
	n := &sockNetns{work: make(chan func())}
	errc := make(chan error, 1)
	var worker func(onThread chan<- struct{})
	worker = func(onThread chan<- struct{}) {
		// The thread never unlocks: it ends with the goroutine, and its
		// namespace goes with it rather than leaking to other goroutines.
		runtime.LockOSThread()
		if unix.Gettid() == unix.Getpid() {
			// Never the main thread: /proc/self/ns/net is its namespace,
			// and the agent reads its own namespace there
			// (selfNetnsIno). Holding it, start over on another thread.
			next := make(chan struct{})
			go worker(next)
			<-next
			runtime.UnlockOSThread()
			return
		}
		if onThread != nil {
			close(onThread)
		}
		if err := n.enter(pid); err != nil {
			errc <- err
			return
		}
		errc <- nil
		for fn := range n.work {
			fn()
		}
	}
	go worker(nil)
	if err := <-errc; err != nil {
		if os.Geteuid() != 0 {
			tb.Skipf("SKIP: a network namespace needs root: %v", err)
		}
		tb.Fatal(err)
	}
	tb.Cleanup(func() { close(n.work) })
	return n
}

func (n *sockNetns) enter(pid int) error {
	if pid > 0 {
		ns, err := netns.GetFromPath(filepath.Join("/proc", strconv.Itoa(pid), "ns", "net"))
		if err != nil {
			return err
		}
		defer ns.Close()
		if err := netns.Set(ns); err != nil {
			return fmt.Errorf("setns: %w", err)
		}
	} else {
		if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
			return fmt.Errorf("unshare(CLONE_NEWNET): %w", err)
		}
		lo, err := netlink.LinkByName("lo")
		if err != nil {
			return err
		}
		if err := netlink.LinkSetUp(lo); err != nil {
			return fmt.Errorf("lo up: %w", err)
		}
	}
	n.tid = unix.Gettid()
	var st unix.Stat_t
	if err := unix.Stat(fmt.Sprintf("/proc/self/task/%d/ns/net", n.tid), &st); err != nil {
		return err
	}
	n.ino = st.Ino
	return nil
}

// run runs fn on the namespace's thread.
func (n *sockNetns) run(fn func() error) error {
	errc := make(chan error, 1)
	n.work <- func() { errc <- fn() }
	return <-errc
}

// listen opens a listener in the namespace.
func (n *sockNetns) listen(t *testing.T, network, addr string) (net.Listener, int) {
	t.Helper()
	var l net.Listener
	if err := n.run(func() (err error) { l, err = net.Listen(network, addr); return err }); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	return l, l.Addr().(*net.TCPAddr).Port
}

// connect opens k connections from the namespace to l and returns both
// ends of each, client i matching server i.
func (n *sockNetns) connect(t *testing.T, l net.Listener, k int) (clients, servers []net.Conn) {
	t.Helper()
	for i := 0; i < k; i++ {
		var c net.Conn
		if err := n.run(func() (err error) { c, err = net.Dial(l.Addr().Network(), l.Addr().String()); return err }); err != nil {
			t.Fatal(err)
		}
		s, err := l.Accept()
		if err != nil {
			t.Fatal(err)
		}
		clients, servers = append(clients, c), append(servers, s)
	}
	t.Cleanup(func() {
		for i := range clients {
			clients[i].Close()
			servers[i].Close()
		}
	})
	return clients, servers
}

func socketsTarget(t testing.TB, pid int) workload.Process {
	t.Helper()
	r, err := workload.NewResolver("/proc")
	if err != nil {
		t.Fatal(err)
	}
	p, err := r.Resolve(workload.Selector{PID: pid})
	if err != nil {
		t.Fatal(err)
	}
	return p
}

type socketsHarness struct {
	t     *testing.T
	c     *socketsCollector
	store *signals.Store
	tgt   workload.Process
}

func newSocketsHarness(t *testing.T, tgt workload.Process, so SocketsOptions) *socketsHarness {
	t.Helper()
	c := newSocketsCollector(Options{}, so)
	// The harness collects every 100 ms, where a dump of a few ms is
	// dear: deferring is tested on its own.
	c.stateGap = 0
	t.Cleanup(func() { c.Close() })
	return &socketsHarness{t: t, c: c, store: signals.New(16, 5000), tgt: tgt}
}

func (h *socketsHarness) collect() {
	h.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := h.c.Collect(ctx, h.tgt, h.store); err != nil {
		h.t.Fatalf("Collect: %v", err)
	}
}

// series returns the latest non-zero values of name by the values of the
// given labels, joined by "/" ("owner/port/state").
func (h *socketsHarness) series(d *signals.Desc, labels ...string) map[string]float64 {
	out := map[string]float64{}
	for _, ls := range h.store.Select(d) {
		s, ok := h.store.Latest(d, ls)
		if !ok || s.V == 0 {
			continue
		}
		var k []string
		for _, l := range labels {
			k = append(k, ls.Get(l))
		}
		out[strings.Join(k, "/")] = s.V
	}
	return out
}

func (h *socketsHarness) get(d *signals.Desc, ls signals.Labels) float64 {
	h.t.Helper()
	s, ok := h.store.Latest(d, ls)
	if !ok {
		h.t.Fatalf("%s%s not written", d, ls)
	}
	return s.V
}

// until collects every 100 ms until the wanted counts are read, and fails
// with the difference after 5 s.
func (h *socketsHarness) until(d *signals.Desc, want map[string]float64, labels ...string) {
	h.t.Helper()
	var diff string
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(100 * time.Millisecond) {
		h.collect()
		if diff = cmp.Diff(want, h.series(d, labels...)); diff == "" {
			return
		}
	}
	h.t.Fatalf("%s (-want +got):\n%s", d, diff)
}

// TestSocketsStates builds every state of interest in the target's private
// network namespace, next to the target's own listener (accept loop off,
// no connections), and checks the counts exactly. The sockets built here
// are the test process's own (it is the agent here): they are counted,
// labelled owner="agent", and none of them is the target's.
func TestSocketsStates(t *testing.T) {
	srv := testenv.Start(t, testenv.Options{Backlog: 8, Accept: false})
	ns := newSockNetns(t, srv.PID)
	l, q := ns.listen(t, "tcp4", "127.0.0.1:0")
	const est, closeWait, timeWait = 5, 3, 4

	ns.connect(t, l, est)

	cwClients, _ := ns.connect(t, l, closeWait)
	for _, c := range cwClients {
		c.Close() // the server never closes: CLOSE_WAIT on its side, FIN_WAIT2 on the client's
	}

	twClients, twServers := ns.connect(t, l, timeWait)
	for i, c := range twClients {
		c.Close() // the client closes first...
		twServers[i].SetReadDeadline(time.Now().Add(5 * time.Second))
		if _, err := io.Copy(io.Discard, twServers[i]); err != nil {
			t.Fatal(err)
		}
		twServers[i].Close() // ...the server follows: TIME_WAIT on the client's side
	}

	l6, p6 := ns.listen(t, "tcp6", "[::1]:0")
	ns.connect(t, l6, 1)

	h := newSocketsHarness(t, socketsTarget(t, srv.PID), SocketsOptions{})
	sq, sp, s6 := strconv.Itoa(q), strconv.Itoa(srv.Port), strconv.Itoa(p6)
	h.until(signals.TCPSockets, map[string]float64{
		"target/" + sp + "/LISTEN":     1,
		"agent/" + sq + "/LISTEN":      1,
		"agent/" + sq + "/ESTABLISHED": est,
		"agent/" + sq + "/CLOSE_WAIT":  closeWait,
		"agent/" + s6 + "/LISTEN":      1,
		"agent/" + s6 + "/ESTABLISHED": 1,
		"agent/ephemeral/ESTABLISHED":  est + 1,
		// Closed by the test before the collector first saw them held:
		// nobody's, as far as it can tell.
		"unknown/ephemeral/FIN_WAIT2": closeWait,
		"unknown/ephemeral/TIME_WAIT": timeWait,
	}, "owner", "port", "state")
	remote := "127.0.0.1:" + sq
	if diff := cmp.Diff(map[string]float64{
		"agent/" + remote + "/ESTABLISHED":   est,
		"unknown/" + remote + "/FIN_WAIT2":   closeWait,
		"unknown/" + remote + "/TIME_WAIT":   timeWait,
		"agent/[::1]:" + s6 + "/ESTABLISHED": 1,
	}, h.series(signals.TCPSocketsByRemote, "owner", "remote", "state")); diff != "" {
		t.Errorf("tcp_sockets_by_remote (-want +got):\n%s", diff)
	}
	// The target holds its listener and nothing else.
	if diff := cmp.Diff(map[string]float64{"LISTEN": 1}, h.series(signals.ProcessTCPSockets, "state")); diff != "" {
		t.Errorf("process_tcp_sockets (-want +got):\n%s", diff)
	}
	if got, want := h.get(signals.TCPSocketsDumped, nil), float64(3+2*est+2*closeWait+timeWait+2); got != want {
		t.Errorf("tcp_sockets_dumped = %v, want %v", got, want)
	}
	if got := h.get(signals.SocketsDumpTruncatedTotal, nil); got != 0 {
		t.Errorf("sockets_dump_truncated_total = %v, want 0", got)
	}
	if got := h.get(signals.SocketsDumpSeconds, nil); got <= 0 || got > 1 {
		t.Errorf("sockets_dump_seconds = %v", got)
	}
	if got := h.get(signals.TCPRetransmitsCurrent, signals.L("owner", "agent", "port", sq)); got != 0 {
		t.Errorf("tcp_retransmits_current{port=%s} = %v on loopback", sq, got)
	}

	// Nothing moves on these connections: the ages grow with the wall clock.
	time.Sleep(1200 * time.Millisecond)
	h.collect()
	if got := h.get(signals.TCPCloseWaitOldestSeconds, signals.L("owner", "agent", "port", sq)); got < 1 || got > 30 {
		t.Errorf("tcp_close_wait_oldest_seconds{port=%s} = %v after 1.2 s, want within [1, 30]", sq, got)
	}
	if got := h.get(signals.TCPCloseWaitOldestSeconds, signals.L("owner", "agent", "port", portEphemeral)); got != 0 {
		t.Errorf("tcp_close_wait_oldest_seconds{port=ephemeral} = %v with no CLOSE_WAIT there", got)
	}
	if got := h.get(signals.TCPEstablishedIdleSeconds, signals.L("owner", "agent", "remote", remote)); got < 1 || got > 30 {
		t.Errorf("tcp_established_idle_seconds{remote=%s} = %v after 1.2 s idle, want within [1, 30]", remote, got)
	}

	// The steady state allocates nothing, per socket or otherwise.
	ctx := context.Background()
	if n := testing.AllocsPerRun(20, func() {
		if err := h.c.cycleOnce(ctx, h.tgt); err != nil {
			t.Fatal(err)
		}
	}); n != 0 {
		t.Errorf("a dump and its aggregation allocate %v times, want 0", n)
	}
}

// TestSocketsOwners: in one network namespace, the target's connections
// (to its own listener: both ends are its own), a neighbour's (another
// process, given sockets the test made and then closed its copies of) and
// the agent's are told apart; the target's connections that end in
// TIME_WAIT stay the target's. This is the pod: one namespace, many
// programs.
func TestSocketsOwners(t *testing.T) {
	srv := testenv.Start(t, testenv.Options{Backlog: 64, Accept: true})
	ns := newSockNetns(t, srv.PID)
	// The neighbour: a listener and 3 connections to it, made here, then
	// handed to a process in the target's namespace that holds them.
	nl, np := ns.listen(t, "tcp4", "127.0.0.1:0")
	clients, servers := ns.connect(t, nl, 3)
	var files []*os.File
	for _, c := range append(append([]net.Conn{}, clients...), servers...) {
		f, err := c.(*net.TCPConn).File()
		if err != nil {
			t.Fatal(err)
		}
		files = append(files, f)
	}
	lf, err := nl.(*net.TCPListener).File()
	if err != nil {
		t.Fatal(err)
	}
	files = append(files, lf)
	nb := exec.Command("nsenter", "--net=/proc/"+strconv.Itoa(srv.PID)+"/ns/net", "sleep", "300")
	nb.ExtraFiles = files
	if err := nb.Start(); err != nil {
		t.Fatalf("start the neighbour: %v", err)
	}
	t.Cleanup(func() { nb.Process.Kill(); nb.Wait() })
	// Until nsenter has joined the namespace and exec'd sleep, a scan of
	// the namespace's processes does not meet it, and the owner index
	// takes its sockets for held by nobody (for a minute): wait for it.
	tns, _ := os.Readlink("/proc/" + strconv.Itoa(srv.PID) + "/ns/net")
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		nsl, _ := os.Readlink("/proc/" + strconv.Itoa(nb.Process.Pid) + "/ns/net")
		comm, _ := os.ReadFile("/proc/" + strconv.Itoa(nb.Process.Pid) + "/comm")
		if nsl == tns && strings.TrimSpace(string(comm)) == "sleep" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the neighbour did not start sleeping in the target's namespace (%s, %q)", nsl, comm)
		}
	}
	for _, f := range files {
		f.Close()
	}
	for i := range clients {
		clients[i].Close()
		servers[i].Close()
	}
	nl.Close()
	// The target opens 4 connections to itself and keeps them.
	if got, err := srv.Do("dial 4"); err != nil || got != "ok 4 established" {
		t.Fatalf("dial: %q %v", got, err)
	}
	sp, snp := strconv.Itoa(srv.Port), strconv.Itoa(np)
	h := newSocketsHarness(t, socketsTarget(t, srv.PID), SocketsOptions{})
	h.until(signals.TCPSockets, map[string]float64{
		"target/" + sp + "/LISTEN":      1,
		"target/" + sp + "/ESTABLISHED": 4,
		"target/ephemeral/ESTABLISHED":  4,
		"sleep/" + snp + "/LISTEN":      1,
		"sleep/" + snp + "/ESTABLISHED": 3,
		"sleep/ephemeral/ESTABLISHED":   3,
	}, "owner", "port", "state")
	if diff := cmp.Diff(map[string]float64{"LISTEN": 1, "ESTABLISHED": 8}, h.series(signals.ProcessTCPSockets, "state")); diff != "" {
		t.Errorf("process_tcp_sockets counts a neighbour's sockets (-want +got):\n%s", diff)
	}

	// The target closes its client ends first: they go to TIME_WAIT, which
	// no process holds, and are still the target's.
	if got, err := srv.Do("close"); err != nil || got != "ok" {
		t.Fatalf("close: %q %v", got, err)
	}
	var got map[string]float64
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(100 * time.Millisecond) {
		h.collect()
		got = h.series(signals.TCPSocketsByRemote, "owner", "remote", "state")
		if got["target/127.0.0.1:"+sp+"/TIME_WAIT"] == 4 {
			break
		}
	}
	if got["target/127.0.0.1:"+sp+"/TIME_WAIT"] != 4 {
		t.Errorf("the target's closed connections are not its TIME_WAIT sockets: %v", got)
	}
	if n := h.get(signals.SocketOwnerFDsReadTotal, nil); n <= 0 {
		t.Errorf("socket_owner_fds_read_total = %v", n)
	}
}

// TestSocketsMaxRemotes: with MaxRemotes 2 and five remotes, the two
// busiest have series, the three others are summed under "other", and a
// remote that drops out of the top loses its series.
func TestSocketsMaxRemotes(t *testing.T) {
	srv := testenv.Start(t, testenv.Options{Backlog: 8, Accept: false})
	ns := newSockNetns(t, srv.PID)
	var remotes [5]string
	var ls [5]net.Listener
	for i := range ls {
		var p int
		ls[i], p = ns.listen(t, "tcp4", "127.0.0.1:0")
		remotes[i] = "127.0.0.1:" + strconv.Itoa(p)
		ns.connect(t, ls[i], 5-i) // 5, 4, 3, 2, 1 connections
	}
	h := newSocketsHarness(t, socketsTarget(t, srv.PID), SocketsOptions{MaxRemotes: 2})
	h.until(signals.TCPSocketsByRemote, map[string]float64{
		remotes[0] + "/ESTABLISHED": 5,
		remotes[1] + "/ESTABLISHED": 4,
		"other/ESTABLISHED":         3 + 2 + 1,
	}, "remote", "state")
	if got := h.get(signals.TCPSockets, signals.L("owner", "agent", "port", portEphemeral, "state", "ESTABLISHED")); got != 15 {
		t.Errorf("ephemeral ESTABLISHED = %v, want 15", got)
	}
	labelsOf := func(d *signals.Desc) []string {
		var out []string
		for _, ls := range h.store.Select(d) {
			out = append(out, ls.Get("remote"))
		}
		sort.Strings(out)
		return out
	}
	want := []string{remotes[0], remotes[1], "other"}
	sort.Strings(want)
	if diff := cmp.Diff(want, labelsOf(signals.TCPEstablishedIdleSeconds)); diff != "" {
		t.Errorf("tcp_established_idle_seconds remotes (-want +got):\n%s", diff)
	}

	// The last remote becomes the busiest: the second one leaves the top,
	// and its series go.
	ns.connect(t, ls[4], 5)
	h.until(signals.TCPSocketsByRemote, map[string]float64{
		remotes[4] + "/ESTABLISHED": 6,
		remotes[0] + "/ESTABLISHED": 5,
		"other/ESTABLISHED":         4 + 3 + 2,
	}, "remote", "state")
	want = []string{remotes[4], remotes[0], "other"}
	sort.Strings(want)
	for _, name := range []*signals.Desc{signals.TCPSocketsByRemote, signals.TCPEstablishedIdleSeconds} {
		if diff := cmp.Diff(want, slicesCompactSorted(labelsOf(name))); diff != "" {
			t.Errorf("%s remotes (-want +got):\n%s", name, diff)
		}
	}

	// MaxSockets stops the dump; the next cycle starts over.
	h2 := newSocketsHarness(t, h.tgt, SocketsOptions{MaxSockets: 4})
	for i := 1; i <= 2; i++ {
		h2.collect()
		if got := h2.get(signals.TCPSocketsDumped, nil); got != 4 {
			t.Errorf("cycle %d: tcp_sockets_dumped = %v with MaxSockets 4", i, got)
		}
		if got := h2.get(signals.SocketsDumpTruncatedTotal, nil); got < float64(i) {
			t.Errorf("cycle %d: sockets_dump_truncated_total = %v", i, got)
		}
	}
}

func slicesCompactSorted(s []string) []string {
	out := s[:0]
	for i, v := range s {
		if i == 0 || v != s[i-1] {
			out = append(out, v)
		}
	}
	return out
}

// TestSocketsOwnNetns: a target in the agent's own namespace is dumped,
// and a target whose namespace changed under its PID is an error, not
// another namespace's sockets.
func TestSocketsOwnNetns(t *testing.T) {
	h := newSocketsHarness(t, socketsTarget(t, os.Getpid()), SocketsOptions{})
	h.collect()
	h.get(signals.TCPSocketsDumped, nil)

	moved := h.tgt
	moved.NetnsIno++
	err := h.c.Collect(context.Background(), moved, h.store)
	if !errors.Is(err, sockdiag.ErrTargetMoved) {
		t.Errorf("Collect with a stale netns inode: %v, want errTargetMoved", err)
	}
}

// TestSocketsSignalNames applies the naming rules of TestSignalNames to
// this collector's signals, and checks no other collector writes one too.
func TestSocketsSignalNames(t *testing.T) {
	valid := regexp.MustCompile(`^[a-z][a-z0-9_]*$`)
	others := map[string]bool{}
	for _, d := range allDescs() {
		others[d.Name] = true
	}
	for _, d := range socketsDescs {
		if !valid.MatchString(d.Name) || strings.HasSuffix(d.Name, "_total") != (d.Kind == signals.Counter) || d.Help == "" {
			t.Errorf("%s (%s): bad name, kind or help", d.Name, d.Kind)
		}
		if others[d.Name] {
			t.Errorf("%s declared twice", d.Name)
		}
	}
	if _, err := New("sockets", Options{}); err != nil {
		t.Errorf("registry: %v", err)
	}
}

// Sockets whose peer closed but the app did not are counted as the
// target's CLOSE_WAIT: the state that tells an FD leak's cause. The
// target here is this process (an agent watching itself).
func TestSocketsTargetCloseWait(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	var held []net.Conn
	for i := 0; i < 3; i++ {
		cl, err := net.Dial("tcp", l.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		srv, err := l.Accept()
		if err != nil {
			t.Fatal(err)
		}
		held = append(held, srv) // the server side is never closed
		cl.Close()
	}
	defer func() {
		for _, c := range held {
			c.Close()
		}
	}()
	h := newSocketsHarness(t, socketsTarget(t, os.Getpid()), SocketsOptions{})
	var cw float64
	for i := 0; i < 50 && cw < 3; i++ {
		h.collect()
		s, _ := h.store.Latest(signals.ProcessTCPSockets, signals.L("state", "CLOSE_WAIT"))
		cw = s.V
		time.Sleep(20 * time.Millisecond)
	}
	// At least: other tests of this package may leave sockets of their own.
	if cw < 3 {
		t.Fatalf("CLOSE_WAIT = %v, want at least 3", cw)
	}
	if s, _ := h.store.Latest(signals.ProcessTCPSockets, signals.L("state", "LISTEN")); s.V < 1 {
		t.Fatalf("LISTEN = %v, want at least 1", s.V)
	}
}

// connectedHarness is a target listening in its namespace, and k
// connections this process (the "agent") made there to a listener of its
// own on port sq, counted once.
func connectedHarness(t *testing.T, k int, so SocketsOptions) (h *socketsHarness, tgt workload.Process, clients, servers []net.Conn, sq string) {
	t.Helper()
	srv := testenv.Start(t, testenv.Options{Backlog: 8, Accept: false})
	ns := newSockNetns(t, srv.PID)
	l, q := ns.listen(t, "tcp4", "127.0.0.1:0")
	clients, servers = ns.connect(t, l, k)
	tgt = socketsTarget(t, srv.PID)
	h = newSocketsHarness(t, tgt, so)
	sq = strconv.Itoa(q)
	h.until(signals.TCPSockets, map[string]float64{
		"target/" + strconv.Itoa(srv.Port) + "/LISTEN": 1,
		"agent/" + sq + "/LISTEN":                      1,
		"agent/" + sq + "/ESTABLISHED":                 float64(k),
		"agent/ephemeral/ESTABLISHED":                  float64(k),
	}, "owner", "port", "state")
	return h, tgt, clients, servers, sq
}

// TestSocketsSkipsDumps: while the namespace's counters stand still the
// collector writes its last counts again without a dump; while only
// segments move it does so for up to BusyInterval, unless a connection
// event (the tcplife probe's counter) says a state may have changed, or
// nobody publishes that counter.
func TestSocketsSkipsDumps(t *testing.T) {
	h, tgt, clients, servers, sq := connectedHarness(t, 2, SocketsOptions{BusyInterval: time.Hour, IdleInterval: time.Hour})
	var events atomic.Uint64
	name := signals.ConnActivity(tgt.NetnsIno)
	h.store.SetActivity(name, events.Load)
	h.collect() // reads the counter
	traffic := func() {
		t.Helper()
		if _, err := clients[0].Write([]byte("ping")); err != nil {
			t.Fatal(err)
		}
		buf := make([]byte, 4)
		if _, err := io.ReadFull(servers[0], buf); err != nil {
			t.Fatal(err)
		}
		time.Sleep(50 * time.Millisecond) // the ACK
	}
	step := func(what string, skip bool, established float64) {
		t.Helper()
		before := h.c.skipped
		h.collect()
		if got := h.c.skipped > before; got != skip {
			t.Errorf("%s: dump skipped = %v, want %v", what, got, skip)
		}
		if got := h.get(signals.TCPSockets, signals.L("owner", "agent", "port", sq, "state", "ESTABLISHED")); got != established {
			t.Errorf("%s: tcp_sockets{ESTABLISHED} = %v, want %v", what, got, established)
		}
	}
	step("nothing moved", true, 2)
	traffic()
	step("segments only", true, 2)
	traffic()
	events.Add(1)
	step("a connection event", false, 2)
	h.store.SetActivity(name, nil)
	traffic()
	step("segments, without the probe's counter", false, 2)
	servers[1].Close()
	time.Sleep(50 * time.Millisecond)
	h.store.SetActivity(name, events.Load)
	step("a close (the counter read afresh)", false, 1)
}

// TestSocketsBusyGapFollowsDumpCost: while only segments move, a dear
// last dump stretches the wait past BusyInterval to busyCostGap times its
// duration; a cheap one does not.
func TestSocketsBusyGapFollowsDumpCost(t *testing.T) {
	h, tgt, clients, servers, _ := connectedHarness(t, 1, SocketsOptions{BusyInterval: time.Millisecond, IdleInterval: time.Hour})
	var events atomic.Uint64
	h.store.SetActivity(signals.ConnActivity(tgt.NetnsIno), events.Load)
	h.collect()
	for _, tc := range []struct {
		took time.Duration
		skip bool
	}{{10 * time.Millisecond, true}, {0, false}} { // 4 s, then BusyInterval's 1 ms
		if _, err := clients[0].Write([]byte("ping")); err != nil {
			t.Fatal(err)
		}
		if _, err := io.ReadFull(servers[0], make([]byte, 4)); err != nil {
			t.Fatal(err)
		}
		time.Sleep(50 * time.Millisecond) // the ACK, and past BusyInterval
		h.c.took = tc.took
		before := h.c.skipped
		h.collect()
		if got := h.c.skipped > before; got != tc.skip {
			t.Errorf("last dump took %s, segments moved 50 ms after it: skipped = %v, want %v", tc.took, got, tc.skip)
		}
	}
}

// TestSocketsSkipsDumpsForOwnersNobodyCanTell: a socket held only by a
// process outside the namespace (as a scraper's connection dialled into
// it) has no owner the index can find. The dump that met it asks the index
// again, but while the index has no answer, dumping again counts it as
// unknown again: the collector goes back to skipping. (Dumping every
// cycle for it was most of the collector's cost beside 40,000 sockets of
// a neighbour, where the index scans other processes only every ~30 s.)
func TestSocketsSkipsDumpsForOwnersNobodyCanTell(t *testing.T) {
	srv := testenv.Start(t, testenv.Options{Backlog: 8, Accept: false})
	ns := newSockNetns(t, srv.PID)
	l, q := ns.listen(t, "tcp4", "127.0.0.1:0")
	tgt := socketsTarget(t, srv.PID)
	// Other processes are scanned once, at the first cycle, then not for
	// an hour: the socket made after it stays without an answer.
	owners := workload.NewSocketOwners("/proc", workload.SocketOwnersOptions{OthersRescan: time.Hour})
	c := newSocketsCollector(Options{Owners: owners}, SocketsOptions{BusyInterval: time.Hour, IdleInterval: time.Hour})
	t.Cleanup(func() { c.Close() })
	h := &socketsHarness{t: t, c: c, store: signals.New(16, 5000), tgt: tgt}
	sq := strconv.Itoa(q)
	h.until(signals.TCPSockets, map[string]float64{
		"target/" + strconv.Itoa(srv.Port) + "/LISTEN": 1,
		"agent/" + sq + "/LISTEN":                      1,
	}, "owner", "port", "state")

	// The client end goes to a child in the host's namespace; this
	// process closes its own copy.
	clients, _ := ns.connect(t, l, 1)
	f, err := clients[0].(*net.TCPConn).File()
	if err != nil {
		t.Fatal(err)
	}
	child := exec.Command("sleep", "60")
	child.ExtraFiles = []*os.File{f}
	if err := child.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { child.Process.Kill(); child.Wait() })
	f.Close()
	clients[0].Close()

	h.until(signals.TCPSockets, map[string]float64{
		"target/" + strconv.Itoa(srv.Port) + "/LISTEN": 1,
		"agent/" + sq + "/LISTEN":                      1,
		"agent/" + sq + "/ESTABLISHED":                 1,
		"unknown/ephemeral/ESTABLISHED":                1,
	}, "owner", "port", "state")
	if len(h.c.agg.missing) == 0 {
		t.Fatal("the child's socket was not met without an owner: the test does not make its case")
	}
	before := h.c.skipped
	for range 5 {
		h.collect()
	}
	if got := h.c.skipped - before; got != 5 {
		t.Errorf("%d of 5 cycles skipped their dump while the index had no answer for the child's socket", got)
	}
	if got := h.get(signals.TCPSockets, signals.L("owner", "unknown", "port", "ephemeral", "state", "ESTABLISHED")); got != 1 {
		t.Errorf("tcp_sockets{owner=unknown} = %v, want 1 (written again)", got)
	}
}

// TestSocketsRefreshesIdleAges: when only segments moved and BusyInterval
// passed, the collector dumps only the outbound ESTABLISHED sockets, and
// what it writes is what a full dump writes: the same counts, the idle
// ages brought up to date. A new connection brings a full dump back.
func TestSocketsRefreshesIdleAges(t *testing.T) {
	srv := testenv.Start(t, testenv.Options{Backlog: 8, Accept: false})
	ns := newSockNetns(t, srv.PID)
	l1, q1 := ns.listen(t, "tcp4", "127.0.0.1:0")
	l2, q2 := ns.listen(t, "tcp4", "127.0.0.1:0")
	c1, s1 := ns.connect(t, l1, 1)
	ns.connect(t, l2, 2)
	tgt := socketsTarget(t, srv.PID)
	h := newSocketsHarness(t, tgt, SocketsOptions{BusyInterval: time.Nanosecond, IdleInterval: time.Hour})
	r1, r2 := "127.0.0.1:"+strconv.Itoa(q1), "127.0.0.1:"+strconv.Itoa(q2)
	h.until(signals.TCPSocketsByRemote, map[string]float64{"agent/" + r1 + "/ESTABLISHED": 1, "agent/" + r2 + "/ESTABLISHED": 2},
		"owner", "remote", "state")
	var events atomic.Uint64
	h.store.SetActivity(signals.ConnActivity(tgt.NetnsIno), events.Load)
	h.collect() // reads the counter: a full dump
	// Past BusyInterval and the stretch a dear dump adds (busyCostGap
	// times its duration): under -race on a slow VM a dump took over a
	// millisecond, and a fixed 400 ms sleep met a skip, not a refresh.
	time.Sleep(max(400*time.Millisecond, busyCostGap*h.c.took+50*time.Millisecond))
	if _, err := c1[0].Write([]byte("ping")); err != nil {
		t.Fatal(err)
	}
	if _, err := io.ReadFull(s1[0], make([]byte, 4)); err != nil {
		t.Fatal(err)
	}
	time.Sleep(50 * time.Millisecond) // the ACK
	before := h.c.idleRefreshes
	h.collect()
	if h.c.idleRefreshes != before+1 {
		t.Fatalf("segments only, BusyInterval passed: %d outbound-only dumps, want %d", h.c.idleRefreshes, before+1)
	}
	idle := func(h *socketsHarness, remote string) float64 {
		return h.get(signals.TCPEstablishedIdleSeconds, signals.L("owner", "agent", "remote", remote))
	}
	if a1, a2 := idle(h, r1), idle(h, r2); a1 > 0.3 || a2 < 0.4 {
		t.Errorf("idle ages after traffic toward %s only: %v and %v s, want under 0.3 and over 0.4", r1, a1, a2)
	}
	// A full dump now writes the same.
	full := newSocketsHarness(t, tgt, SocketsOptions{BusyInterval: -1, IdleInterval: -1})
	full.collect()
	for _, name := range []*signals.Desc{signals.TCPSockets, signals.TCPSocketsByRemote, signals.ProcessTCPSockets} {
		labels := []string{"owner", "port", "remote", "state"}
		if diff := cmp.Diff(full.series(name, labels...), h.series(name, labels...)); diff != "" {
			t.Errorf("%s after the outbound-only dump (-full +got):\n%s", name, diff)
		}
	}
	for _, r := range []string{r1, r2} {
		if d := idle(full, r) - idle(h, r); d < -0.1 || d > 0.1 {
			t.Errorf("idle age toward %s: %v s, a full dump says %v", r, idle(h, r), idle(full, r))
		}
	}
	// A new connection: counts may have changed, a full dump.
	ns.connect(t, l1, 1)
	before = h.c.idleRefreshes
	h.collect()
	if h.c.idleRefreshes != before {
		t.Error("a new connection was met by an outbound-only dump")
	}
	// Its owner is learnt at the next cycle (the owner index reads fd
	// tables after a dump met an inode it did not know).
	h.until(signals.TCPSocketsByRemote, map[string]float64{"agent/" + r1 + "/ESTABLISHED": 2, "agent/" + r2 + "/ESTABLISHED": 2},
		"owner", "remote", "state")
}

// TestSocketsDearStateDumpsWait: a change of state (a connection event)
// after a dear dump (stateCostGap) waits, cycle after cycle, writing
// nothing, so no count is restamped as new, until the dumps fit their
// budget again or the last dump's samples would grow older than
// maxDeferredAge at the next cycle; then the cycle dumps, even with nothing
// new moving. After a cheap dump a change is dumped at once.
func TestSocketsDearStateDumpsWait(t *testing.T) {
	h, tgt, clients, _, sq := connectedHarness(t, 3, SocketsOptions{BusyInterval: time.Hour, IdleInterval: time.Hour})
	var events atomic.Uint64
	h.store.SetActivity(signals.ConnActivity(tgt.NetnsIno), events.Load)
	h.collect()
	h.c.stateGap = stateCostGap
	established := signals.L("owner", "agent", "port", sq, "state", "ESTABLISHED")
	latest := func() signals.Sample {
		t.Helper()
		s, ok := h.store.Latest(signals.TCPSockets, established)
		if !ok {
			t.Fatalf("tcp_sockets%s not written", established)
		}
		return s
	}
	closeOne := func(c net.Conn) {
		t.Helper()
		c.Close()
		events.Add(1)
		time.Sleep(300 * time.Millisecond) // the close's segments, and a cycle's time
	}
	// past moves the last dump and the last cycle back by d: d of
	// collect intervals gone by without sleeping through them.
	past := func(d time.Duration) {
		h.c.dumpedAt = h.c.dumpedAt.Add(-d)
		h.c.cycleAt = h.c.cycleAt.Add(-d)
	}

	before := latest()
	closeOne(clients[0])
	h.c.took = 30 * time.Millisecond // × stateCostGap: 3 s, more than the 300 ms since
	deferred := h.c.deferred
	h.collect()
	if h.c.deferred != deferred+1 {
		t.Fatalf("a dear dump after a close was not deferred")
	}
	if s := latest(); s != before {
		t.Fatalf("the deferred cycle wrote tcp_sockets %v, want the last dump's %v still", s, before)
	}
	past(time.Second)
	h.collect() // nothing new, still over budget: waits again
	if h.c.deferred != deferred+2 || latest() != before {
		t.Fatalf("the second cycle within the budget: deferred %d times, tcp_sockets %v; want 2 and the last dump's %v", h.c.deferred-deferred, latest(), before)
	}
	past(2 * time.Second) // 3.3 s since the last dump: the budget is met
	h.collect()
	if s := latest(); s.V != 2 || !s.T.After(before.T) {
		t.Fatalf("the cycle once the budget was met: tcp_sockets %v, want 2 written now", s)
	}
	if h.c.deferred != deferred+2 {
		t.Fatalf("the owed dump was deferred again")
	}

	// Dearer: the age bound ends the wait, whatever the budget says.
	before = latest()
	closeOne(clients[1])
	h.c.took = time.Second // × stateCostGap: 100 s
	deferred = h.c.deferred
	h.collect()
	past(time.Second)
	h.collect()
	if h.c.deferred != deferred+2 || latest() != before {
		t.Fatalf("a dearer dump: deferred %d times, tcp_sockets %v; want 2 and the last dump's %v", h.c.deferred-deferred, latest(), before)
	}
	// 3.3 s old now, the cycles 2 s apart: the next would see 5.3 s.
	past(2 * time.Second)
	h.collect()
	if s := latest(); s.V != 1 || !s.T.After(before.T) || h.c.deferred != deferred+2 {
		t.Fatalf("the cycle before the samples outgrow %v: tcp_sockets %v, deferred %d times; want 1 written now, after 2", maxDeferredAge, s, h.c.deferred-deferred)
	}

	// Cheap: dumped at once.
	closeOne(clients[2])
	h.c.took = time.Millisecond
	deferred = h.c.deferred
	h.collect()
	if s := latest(); s.V != 0 || h.c.deferred != deferred {
		t.Fatalf("a cheap dump after a close: tcp_sockets %v, deferred %d times, want 0 at once", s, h.c.deferred-deferred)
	}
}
