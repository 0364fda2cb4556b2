package collectors

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"regexp"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"
	"unsafe"

	"github.com/google/go-cmp/cmp"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/culprit-dev/culprit/internal/testenv"
	"github.com/culprit-dev/culprit/signals"
	"github.com/culprit-dev/culprit/target"
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

func socketsTarget(t testing.TB, pid int) target.Process {
	t.Helper()
	r, err := target.NewResolver("/proc")
	if err != nil {
		t.Fatal(err)
	}
	p, err := r.Resolve(target.Selector{PID: pid})
	if err != nil {
		t.Fatal(err)
	}
	return p
}

type socketsHarness struct {
	t     *testing.T
	c     *socketsCollector
	store *signals.Store
	tgt   target.Process
}

func newSocketsHarness(t *testing.T, tgt target.Process, so SocketsOptions) *socketsHarness {
	t.Helper()
	c := newSocketsCollector(Options{}, so)
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
// labels a and b ("a/b").
func (h *socketsHarness) series(name, a, b string) map[string]float64 {
	out := map[string]float64{}
	for _, ls := range h.store.Select(name) {
		s, ok := h.store.Latest(name, ls)
		if !ok || s.V == 0 {
			continue
		}
		k := ls.Get(a)
		if b != "" {
			k += "/" + ls.Get(b)
		}
		out[k] = s.V
	}
	return out
}

func (h *socketsHarness) get(name string, ls signals.Labels) float64 {
	h.t.Helper()
	s, ok := h.store.Latest(name, ls)
	if !ok {
		h.t.Fatalf("%s%s not written", name, ls)
	}
	return s.V
}

// until collects every 100 ms until the wanted counts are read, and fails
// with the difference after 5 s.
func (h *socketsHarness) until(name, a, b string, want map[string]float64) {
	h.t.Helper()
	var diff string
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(100 * time.Millisecond) {
		h.collect()
		if diff = cmp.Diff(want, h.series(name, a, b)); diff == "" {
			return
		}
	}
	h.t.Fatalf("%s (-want +got):\n%s", name, diff)
}

// TestSocketsStates builds every state of interest in the target's private
// network namespace, next to the target's own listener (accept loop off,
// no connections), and checks the counts exactly.
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
	h.until("tcp_sockets", "port", "state", map[string]float64{
		sp + "/LISTEN":          1,
		sq + "/LISTEN":          1,
		sq + "/ESTABLISHED":     est,
		sq + "/CLOSE_WAIT":      closeWait,
		s6 + "/LISTEN":          1,
		s6 + "/ESTABLISHED":     1,
		"ephemeral/ESTABLISHED": est + 1,
		"ephemeral/FIN_WAIT2":   closeWait,
		"ephemeral/TIME_WAIT":   timeWait,
	})
	remote := "127.0.0.1:" + sq
	if diff := cmp.Diff(map[string]float64{
		remote + "/ESTABLISHED":        est,
		remote + "/FIN_WAIT2":          closeWait,
		remote + "/TIME_WAIT":          timeWait,
		"[::1]:" + s6 + "/ESTABLISHED": 1,
	}, h.series("tcp_sockets_by_remote", "remote", "state")); diff != "" {
		t.Errorf("tcp_sockets_by_remote (-want +got):\n%s", diff)
	}
	if h.c.noV1 {
		t.Error("the kernel refused the inet_diag v1 request (TCPDIAG_GETSOCK); the collector fell back to v2")
	}
	// Per-family v2 requests, the fallback, read the same.
	v2 := newSocketsHarness(t, h.tgt, SocketsOptions{})
	v2.c.noV1 = true
	v2.collect()
	for _, name := range []string{"tcp_sockets", "tcp_sockets_by_remote"} {
		a, b := "port", "state"
		if name == "tcp_sockets_by_remote" {
			a = "remote"
		}
		if diff := cmp.Diff(h.series(name, a, b), v2.series(name, a, b)); diff != "" {
			t.Errorf("%s, v1 (-) and v2 (+) requests:\n%s", name, diff)
		}
	}
	if got, want := h.get("tcp_sockets_dumped", nil), float64(3+2*est+2*closeWait+timeWait+2); got != want {
		t.Errorf("tcp_sockets_dumped = %v, want %v", got, want)
	}
	if got := h.get("sockets_dump_truncated_total", nil); got != 0 {
		t.Errorf("sockets_dump_truncated_total = %v, want 0", got)
	}
	if got := h.get("sockets_dump_seconds", nil); got <= 0 || got > 1 {
		t.Errorf("sockets_dump_seconds = %v", got)
	}
	if got := h.get("tcp_retransmits_current", signals.L("port", sq)); got != 0 {
		t.Errorf("tcp_retransmits_current{port=%s} = %v on loopback", sq, got)
	}

	// Nothing moves on these connections: the ages grow with the wall clock.
	time.Sleep(1200 * time.Millisecond)
	h.collect()
	if got := h.get("tcp_close_wait_oldest_seconds", signals.L("port", sq)); got < 1 || got > 30 {
		t.Errorf("tcp_close_wait_oldest_seconds{port=%s} = %v after 1.2 s, want within [1, 30]", sq, got)
	}
	if got := h.get("tcp_close_wait_oldest_seconds", signals.L("port", portEphemeral)); got != 0 {
		t.Errorf("tcp_close_wait_oldest_seconds{port=ephemeral} = %v with no CLOSE_WAIT there", got)
	}
	if got := h.get("tcp_established_idle_seconds", signals.L("remote", remote)); got < 1 || got > 30 {
		t.Errorf("tcp_established_idle_seconds{remote=%s} = %v after 1.2 s idle, want within [1, 30]", remote, got)
	}

	// The steady state allocates nothing, per socket or otherwise.
	ctx := context.Background()
	if n := testing.AllocsPerRun(20, func() {
		if err := h.c.cycle(ctx, h.tgt); err != nil {
			t.Fatal(err)
		}
	}); n != 0 {
		t.Errorf("a dump and its aggregation allocate %v times, want 0", n)
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
	h.until("tcp_sockets_by_remote", "remote", "state", map[string]float64{
		remotes[0] + "/ESTABLISHED": 5,
		remotes[1] + "/ESTABLISHED": 4,
		"other/ESTABLISHED":         3 + 2 + 1,
	})
	if got := h.get("tcp_sockets", signals.L("port", portEphemeral, "state", "ESTABLISHED")); got != 15 {
		t.Errorf("ephemeral ESTABLISHED = %v, want 15", got)
	}
	labelsOf := func(name string) []string {
		var out []string
		for _, ls := range h.store.Select(name) {
			out = append(out, ls.Get("remote"))
		}
		sort.Strings(out)
		return out
	}
	want := []string{remotes[0], remotes[1], "other"}
	sort.Strings(want)
	if diff := cmp.Diff(want, labelsOf("tcp_established_idle_seconds")); diff != "" {
		t.Errorf("tcp_established_idle_seconds remotes (-want +got):\n%s", diff)
	}

	// The last remote becomes the busiest: the second one leaves the top,
	// and its series go.
	ns.connect(t, ls[4], 5)
	h.until("tcp_sockets_by_remote", "remote", "state", map[string]float64{
		remotes[4] + "/ESTABLISHED": 6,
		remotes[0] + "/ESTABLISHED": 5,
		"other/ESTABLISHED":         4 + 3 + 2,
	})
	want = []string{remotes[4], remotes[0], "other"}
	sort.Strings(want)
	for _, name := range []string{"tcp_sockets_by_remote", "tcp_established_idle_seconds"} {
		if diff := cmp.Diff(want, slicesCompactSorted(labelsOf(name))); diff != "" {
			t.Errorf("%s remotes (-want +got):\n%s", name, diff)
		}
	}

	// MaxSockets stops the dump; the next cycle starts over.
	h2 := newSocketsHarness(t, h.tgt, SocketsOptions{MaxSockets: 4})
	for i := 1; i <= 2; i++ {
		h2.collect()
		if got := h2.get("tcp_sockets_dumped", nil); got != 4 {
			t.Errorf("cycle %d: tcp_sockets_dumped = %v with MaxSockets 4", i, got)
		}
		if got := h2.get("sockets_dump_truncated_total", nil); got != float64(i) {
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
	h.get("tcp_sockets_dumped", nil)

	moved := h.tgt
	moved.NetnsIno++
	err := h.c.Collect(context.Background(), moved, h.store)
	if !errors.Is(err, errTargetMoved) {
		t.Errorf("Collect with a stale netns inode: %v, want errTargetMoved", err)
	}
}

// sockMsg builds one netlink message as the kernel sends a socket: header,
// inet_diag_msg and, when info is not nil, an INET_DIAG_INFO attribute
// after another attribute.
func sockMsg(seq uint32, family, state uint8, src, dst netip.AddrPort, info *unix.TCPInfo) []byte {
	body := make([]byte, inetDiagMsgLen)
	body[0], body[1] = family, state
	binary.BigEndian.PutUint16(body[4:6], src.Port())
	binary.BigEndian.PutUint16(body[6:8], dst.Port())
	copy(body[8:24], src.Addr().AsSlice())
	copy(body[24:40], dst.Addr().AsSlice())
	if info != nil {
		// INET_DIAG_SHUTDOWN, one byte padded to four, as the kernel puts first.
		body = append(body, 5, 0, 8, 0, 0, 0, 0, 0)
		raw := unsafe.Slice((*byte)(unsafe.Pointer(info)), unsafe.Sizeof(*info))
		attr := make([]byte, 4, 4+len(raw))
		binary.NativeEndian.PutUint16(attr[0:2], uint16(4+len(raw)))
		binary.NativeEndian.PutUint16(attr[2:4], inetDiagInfo)
		body = append(body, append(attr, raw...)...)
		for len(body)%4 != 0 {
			body = append(body, 0)
		}
	}
	return nlMsg(seq, unix.SOCK_DIAG_BY_FAMILY, body)
}

func nlMsg(seq uint32, typ uint16, body []byte) []byte {
	b := make([]byte, unix.NLMSG_HDRLEN, unix.NLMSG_HDRLEN+len(body))
	binary.NativeEndian.PutUint32(b[0:4], uint32(unix.NLMSG_HDRLEN+len(body)))
	binary.NativeEndian.PutUint16(b[4:6], typ)
	binary.NativeEndian.PutUint16(b[6:8], unix.NLM_F_MULTI)
	binary.NativeEndian.PutUint32(b[8:12], seq)
	return append(b, body...)
}

func errMsg(seq uint32, errno unix.Errno) []byte {
	b := make([]byte, 4)
	binary.NativeEndian.PutUint32(b, uint32(-int32(errno)))
	return nlMsg(seq, unix.NLMSG_ERROR, b)
}

// TestSocketAggParse feeds crafted dumps through the parser and the
// aggregation, for what a loopback namespace does not produce on demand.
func TestSocketAggParse(t *testing.T) {
	ap := netip.MustParseAddrPort
	v6 := func(s string) netip.AddrPort { // a v4 endpoint as a dual-stack socket shows it
		a := ap(s)
		return netip.AddrPortFrom(netip.AddrFrom16(a.Addr().As16()), a.Port())
	}
	cw := &unix.TCPInfo{State: tcpStCloseWait, Retransmits: 2, Last_data_recv: 9000, Last_ack_recv: 7000}
	estBusy := &unix.TCPInfo{State: tcpStEstablished, Last_data_sent: 10, Last_data_recv: 50000}
	estIdle := &unix.TCPInfo{State: tcpStEstablished, Last_data_sent: 4000, Last_data_recv: 3000}
	var dump []byte
	add := func(b []byte) { dump = append(dump, b...) }
	// IPv6 first: a dual-stack listener on 8080 and a v4 client accepted by it.
	add(sockMsg(1, unix.AF_INET6, tcpListen, ap("[::]:8080"), ap("[::]:0"), nil))
	add(sockMsg(1, unix.AF_INET6, tcpStCloseWait, v6("10.0.0.1:8080"), v6("10.9.9.9:40000"), cw))
	add(sockMsg(7, unix.AF_INET6, tcpStCloseWait, v6("10.0.0.1:8080"), v6("10.9.9.9:40001"), cw)) // stale sequence: skipped
	add(nlMsg(1, unix.NLMSG_DONE, make([]byte, 4)))
	// A stray message after DONE in the same read is not looked at.
	add(sockMsg(1, unix.AF_INET6, tcpStCloseWait, v6("10.0.0.1:8080"), v6("10.9.9.9:40002"), cw))

	a := newSocketAgg(1000, 100)
	a.reset(nil)
	done, err := parseDiagBatch(dump, 1, a)
	if !done || err != nil {
		t.Fatalf("parseDiagBatch = %v, %v; want done", done, err)
	}

	dump = dump[:0]
	add(sockMsg(2, unix.AF_INET, tcpListen, ap("0.0.0.0:9090"), ap("0.0.0.0:0"), nil))
	add(sockMsg(2, unix.AF_INET, tcpStEstablished, ap("10.0.0.1:51000"), ap("10.1.1.1:5432"), estBusy))
	add(sockMsg(2, unix.AF_INET, tcpStEstablished, ap("10.0.0.1:51001"), ap("10.1.1.1:5432"), estIdle))
	add(sockMsg(2, unix.AF_INET, tcpStTimeWait, ap("10.0.0.1:51002"), ap("10.1.1.1:5432"), nil))
	add(sockMsg(2, unix.AF_INET, tcpStCloseWait, ap("10.0.0.1:51003"), ap("10.2.2.2:443"), cw))
	add(sockMsg(2, unix.AF_INET, tcpStEstablished, ap("10.0.0.1:9090"), ap("10.3.3.3:1234"), estIdle)) // inbound: no remote
	add(sockMsg(2, unix.AF_INET, tcpSynRecv, ap("10.0.0.1:9090"), ap("10.3.3.3:1235"), nil))
	if done, err := parseDiagBatch(dump, 2, a); done || err != nil {
		t.Fatalf("parseDiagBatch = %v, %v; want more to come", done, err)
	}
	if done, err := parseDiagBatch(nlMsg(2, unix.NLMSG_DONE, make([]byte, 4)), 2, a); !done || err != nil {
		t.Fatalf("DONE: %v, %v", done, err)
	}

	if a.total != 9 {
		t.Errorf("total = %d, want 9", a.total)
	}
	ports := map[uint16]portAgg{}
	for _, p := range a.ports {
		ports[p.port] = p
	}
	want := map[uint16]portAgg{
		8080: {port: 8080, total: 2, retrans: 2, closeWaitMaxMs: 7000},
		9090: {port: 9090, total: 3},
	}
	p8080, p9090 := want[8080], want[9090]
	p8080.states[tcpListen], p8080.states[tcpStCloseWait] = 1, 1
	p9090.states[tcpListen], p9090.states[tcpStEstablished], p9090.states[tcpSynRecv] = 1, 1, 1
	want[8080], want[9090] = p8080, p9090
	if diff := cmp.Diff(want, ports, cmp.AllowUnexported(portAgg{})); diff != "" {
		t.Errorf("ports (-want +got):\n%s", diff)
	}
	eph := portAgg{total: 4, retrans: 2, closeWaitMaxMs: 7000}
	eph.states[tcpStEstablished], eph.states[tcpStTimeWait], eph.states[tcpStCloseWait] = 2, 1, 1
	if diff := cmp.Diff(eph, a.ephemeral, cmp.AllowUnexported(portAgg{})); diff != "" {
		t.Errorf("ephemeral (-want +got):\n%s", diff)
	}
	got := map[string]remoteAgg{}
	for _, r := range a.remotes {
		got[r.key.String()] = r
	}
	pg := remoteAgg{sum: 3, idleMaxMs: 3000}
	pg.states[remoteStateIdx[tcpStEstablished]], pg.states[remoteStateIdx[tcpStTimeWait]] = 2, 1
	web := remoteAgg{sum: 1}
	web.states[remoteStateIdx[tcpStCloseWait]] = 1
	if diff := cmp.Diff(map[string]remoteAgg{"10.1.1.1:5432": pg, "10.2.2.2:443": web}, got,
		cmp.AllowUnexported(remoteAgg{}), cmp.FilterPath(func(p cmp.Path) bool { return p.Last().String() == ".key" }, cmp.Ignore())); diff != "" {
		t.Errorf("remotes (-want +got):\n%s", diff)
	}

	// Errors end the dump.
	if done, err := parseDiagBatch(errMsg(3, unix.ENOENT), 3, a); !done || !errors.Is(err, unix.ENOENT) {
		t.Errorf("NLMSG_ERROR ENOENT: %v, %v", done, err)
	}
	if _, err := parseDiagBatch(errMsg(3, unix.ENOENT)[:18], 3, a); err == nil {
		t.Error("a message longer than the read is not an error")
	}

	// The socket cap stops the dump.
	a = newSocketAgg(2, 100)
	a.reset(nil)
	dump = dump[:0]
	for i := 0; i < 3; i++ {
		add(sockMsg(4, unix.AF_INET, tcpStTimeWait, ap(fmt.Sprintf("10.0.0.1:%d", 50000+i)), ap("10.1.1.1:80"), nil))
	}
	if done, err := parseDiagBatch(dump, 4, a); !done || err != nil || !a.truncated || a.total != 2 {
		t.Errorf("past MaxSockets: done %v err %v truncated %v total %d", done, err, a.truncated, a.total)
	}
	if n := testing.AllocsPerRun(100, func() { a.reset(nil); parseDiagBatch(dump, 4, a) }); n != 0 {
		t.Errorf("parseDiagBatch allocates %v times", n)
	}
}

// TestSocketsTrackedRemotes: past MaxTrackedRemotes, sockets to new
// remotes are summed under "other", and last cycle's top is tracked first.
func TestSocketsTrackedRemotes(t *testing.T) {
	c := newSocketsCollector(Options{}, SocketsOptions{MaxRemotes: 1, MaxTrackedRemotes: 2})
	ap := netip.MustParseAddrPort
	var dump []byte
	for i, dst := range []string{"10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80", "10.0.0.3:80", "10.0.0.3:80"} {
		dump = append(dump, sockMsg(1, unix.AF_INET, tcpStEstablished, ap(fmt.Sprintf("10.9.9.9:%d", 40000+i)), ap(dst), nil)...)
	}
	// 10.0.0.3 is the busiest but comes third: the table is full.
	c.agg.reset(c.sticky)
	parseDiagBatch(dump, 1, c.agg)
	c.rank()
	if n := len(c.topRemotes); n != 1 || c.agg.remotes[c.topRemotes[0]].key.String() != "10.0.0.1:80" {
		t.Fatalf("top after the first cycle: %v", c.sticky)
	}
	if c.otherRem.sum != 4 {
		t.Errorf("other = %d, want 4", c.otherRem.sum)
	}
	// A sticky remote keeps its place; the total stays whole.
	c.agg.reset(c.sticky)
	parseDiagBatch(dump, 1, c.agg)
	c.rank()
	if top := c.agg.remotes[c.topRemotes[0]]; top.key.String() != "10.0.0.1:80" || top.sum+c.otherRem.sum != 5 {
		t.Errorf("second cycle: top %v (%d), other %d", top.key, top.sum, c.otherRem.sum)
	}
}

func TestSocketsTCPInfoOffsets(t *testing.T) {
	var ti unix.TCPInfo
	for _, tc := range []struct {
		name      string
		got, want uintptr
	}{
		{"retransmits", tcpiRetransmits, unsafe.Offsetof(ti.Retransmits)},
		{"last_data_sent", tcpiLastDataSent, unsafe.Offsetof(ti.Last_data_sent)},
		{"last_data_recv", tcpiLastDataRecv, unsafe.Offsetof(ti.Last_data_recv)},
		{"last_ack_recv", tcpiLastAckRecv, unsafe.Offsetof(ti.Last_ack_recv)},
	} {
		if tc.got != tc.want {
			t.Errorf("tcp_info %s at %d, x/sys/unix says %d", tc.name, tc.got, tc.want)
		}
	}
	if uintptr(tcpiMinLen) != unsafe.Offsetof(ti.Last_ack_recv)+4 {
		t.Errorf("tcpiMinLen %d", tcpiMinLen)
	}
}

// TestSocketsSignalNames applies the naming rules of TestSignalNames to
// this collector's signals, and checks none is declared elsewhere too.
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
