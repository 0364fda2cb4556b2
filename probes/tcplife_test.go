package probes

import (
	"net"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/culprit-dev/culprit/internal/testenv"
	"github.com/culprit-dev/culprit/signals"
	"github.com/culprit-dev/culprit/workload"
)

// A server that closes connections idle for 600 ms (an intermediary's
// idle timeout): its clients see a peer close at an idle age of about
// 600 ms, toward the server's address; the server side closes first.
// Connecting to a closed port counts resets sent with reason no_socket.
func TestTCPLifeIdleAgeAtPeerClose(t *testing.T) {
	s := testenv.Start(t, testenv.Options{Backlog: 64, Accept: true})
	st := signals.New(600, 1000)
	evs := signals.NewConnEvents(1024)
	runProbe(t, s.PID, NewTCPLife(Options{Log: testLog, PollInterval: 50 * time.Millisecond, MaxEntries: 1024, RingBufferBytes: 1 << 16, SideStores: signals.SideStores{Conns: evs}}), st)
	time.Sleep(300 * time.Millisecond) // the netns filter is set at the first poll
	from := time.Now()
	s.MustDo(t, "idletimeout 600")
	s.MustDo(t, "dial 10")
	time.Sleep(1500 * time.Millisecond)
	remote := "127.0.0.1:" + strconv.Itoa(s.Port)
	var peer, local, opened int
	for _, e := range evs.Since(from) {
		switch {
		case e.Kind == signals.ConnPeerClose && e.Remote == remote:
			peer++
			if e.Owner != "target" {
				t.Errorf("peer close of the target's own client socket: owner %q, want target", e.Owner)
			}
			if e.Idle < 450*time.Millisecond || e.Idle > 800*time.Millisecond {
				t.Errorf("peer close at idle %v, want about 600ms", e.Idle)
			}
			if e.Lifetime < 500*time.Millisecond {
				t.Errorf("lifetime %v, want about 600ms", e.Lifetime)
			}
		case e.Kind == signals.ConnLocalClose && e.LocalPort == s.Port:
			local++
		case e.Kind == signals.ConnOpened && e.Remote == remote:
			opened++
		}
	}
	if peer != 10 || local != 10 || opened != 10 {
		t.Errorf("peer closes %d, server-side closes %d, opens %d; want 10 each", peer, local, opened)
	}
	s.MustDo(t, "dialclosed 20")
	// The resets answer SYNs to port 1, where nothing listens.
	waitValue(t, st, signals.TCPResetsSentTotal, signals.L("port", "1", "reason", "no_socket"), func(v float64) bool { return v >= 20 }, ">= 20")
}

// Events name their owner: the socket inode that /proc/PID/fd shows, and
// for connections opened here the process that called connect. The child
// dials its own listener, so the namespace holds both ends: the client
// sockets' open and local close carry the child's pid and the client
// inodes; the accepted sockets' peer close carries pid 0 (passive) and the
// other inodes.
func TestTCPLifeEventsNameTheirSocket(t *testing.T) {
	s := testenv.Start(t, testenv.Options{Backlog: 64, Accept: true})
	evs := signals.NewConnEvents(1024)
	runProbe(t, s.PID, NewTCPLife(Options{Log: testLog, PollInterval: 50 * time.Millisecond, MaxEntries: 1024, RingBufferBytes: 1 << 16, SideStores: signals.SideStores{Conns: evs}}), signals.New(600, 1000))
	time.Sleep(300 * time.Millisecond) // the netns filter is set at the first poll
	from := time.Now()
	s.MustDo(t, "dial 5")
	// The listener, 5 client sockets and, once the accept loop caught
	// up, 5 accepted ones.
	fds := socketInodes(t, s.PID)
	for wait := time.Now().Add(5 * time.Second); len(fds) < 11; fds = socketInodes(t, s.PID) {
		if time.Now().After(wait) {
			t.Fatalf("the child holds %d sockets, want 11", len(fds))
		}
		time.Sleep(20 * time.Millisecond)
	}
	s.MustDo(t, "close")
	remote := "127.0.0.1:" + strconv.Itoa(s.Port)
	inodes := map[string]map[uint64]bool{}
	deadline := time.Now().Add(5 * time.Second)
	for {
		clear(inodes)
		for _, e := range evs.Since(from) {
			kind := e.Kind
			switch {
			case kind == signals.ConnOpened && e.Remote == remote, kind == signals.ConnLocalClose && e.Remote == remote:
				if e.Pid != s.PID {
					t.Fatalf("%s event of an active open: pid %d, want the child's %d", kind, e.Pid, s.PID)
				}
			case kind == signals.ConnPeerClose && e.LocalPort == s.Port:
				if e.Pid != 0 {
					t.Fatalf("peer close of an accepted connection: pid %d, want 0", e.Pid)
				}
			default:
				continue
			}
			if !fds[e.Inode] {
				t.Fatalf("%s event with inode %d, not among the child's sockets %v", kind, e.Inode, fds)
			}
			if inodes[kind] == nil {
				inodes[kind] = map[uint64]bool{}
			}
			inodes[kind][e.Inode] = true
		}
		if len(inodes[signals.ConnOpened]) == 5 && len(inodes[signals.ConnLocalClose]) == 5 && len(inodes[signals.ConnPeerClose]) == 5 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("distinct inodes by event kind %v, want 5 opened, 5 local_close, 5 peer_close", inodes)
		}
		time.Sleep(50 * time.Millisecond)
	}
	for ino := range inodes[signals.ConnOpened] {
		if !inodes[signals.ConnLocalClose][ino] {
			t.Errorf("client socket %d opened but its local close carries another inode", ino)
		}
		if inodes[signals.ConnPeerClose][ino] {
			t.Errorf("inode %d is both a client and an accepted socket", ino)
		}
	}
}

// socketInodes reads the inodes of pid's sockets from /proc/PID/fd.
func socketInodes(t *testing.T, pid int) map[uint64]bool {
	t.Helper()
	dir := "/proc/" + strconv.Itoa(pid) + "/fd"
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	out := map[uint64]bool{}
	for _, e := range ents {
		l, err := os.Readlink(dir + "/" + e.Name())
		if err != nil {
			continue // closed meanwhile
		}
		if v, ok := strings.CutPrefix(l, "socket:["); ok {
			if n, err := strconv.ParseUint(strings.TrimSuffix(v, "]"), 10, 64); err == nil {
				out[n] = true
			}
		}
	}
	if len(out) == 0 {
		t.Fatalf("no sockets in %s", dir)
	}
	return out
}

// Whose a peer's close was: in target scope only the target's fd tables
// are read for it (a neighbour's socket is "unknown", a label no finding
// may be about), and every process's only when findings may be about
// other processes (rules.scope = namespace). Beside nginx under wrk, the
// full scans for wrk's sockets were a quarter of the agent's CPU.
func TestTCPLifeOwnerOfOthersOnlyInNamespaceScope(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ino := uint64(testenv.SocketInode(t, l.(*net.TCPListener)))
	f, err := l.(*net.TCPListener).File()
	if err != nil {
		t.Fatal(err)
	}
	start := func(files ...*os.File) int {
		cmd := exec.Command("sleep", "300")
		cmd.ExtraFiles = files
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
		return cmd.Process.Pid
	}
	neighbour := start(f)
	target := start()
	// Only the neighbour holds the socket now.
	f.Close()
	l.Close()
	res, err := workload.NewResolver("/proc")
	if err != nil {
		t.Fatal(err)
	}
	tgt, err := res.Resolve(workload.Selector{PID: target})
	if err != nil {
		t.Fatal(err)
	}
	ev := signals.ConnEvent{Kind: signals.ConnPeerClose, Bytes: 100, Inode: ino, LocalPort: 1}
	for _, c := range []struct {
		others bool
		want   string
	}{{false, "unknown"}, {true, "sleep"}} {
		owners := workload.NewSocketOwners("/proc", workload.SocketOwnersOptions{})
		owners.SetTarget(tgt)
		p := NewTCPLife(Options{Log: testLog, Owners: owners, OthersOwners: c.others})
		if got := p.ownerOf(ev); got != c.want {
			t.Errorf("OthersOwners=%v: the neighbour's (pid %d) socket is owned by %q, want %q", c.others, neighbour, got, c.want)
		}
	}
}

// The client side of a loopback connection to the target's listening port
// costs no fd table: no finding reads its owner (idle_timeout leaves out
// connections to local servers). Nor does the server side: a connection to
// the target's listener is the target's, as the sockets collector counts
// it. A loopback client of another server still has the tables read. Real
// sockets: a listener the target (a sleep) holds, a client this process
// holds.
func TestTCPLifeOwnerOfReadsNoTablesForConnectionsToTheTarget(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	lf, err := l.(*net.TCPListener).File()
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command("sleep", "300")
	cmd.ExtraFiles = []*os.File{lf}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	lf.Close()
	c, err := net.Dial("tcp", l.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	srv, err := l.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Close()
	inode := func(c net.Conn) uint64 { return uint64(testenv.SocketInode(t, c.(*net.TCPConn))) }
	res, err := workload.NewResolver("/proc")
	if err != nil {
		t.Fatal(err)
	}
	tgt, err := res.Resolve(workload.Selector{PID: cmd.Process.Pid})
	if err != nil {
		t.Fatal(err)
	}
	port := uint16(l.Addr().(*net.TCPAddr).Port)
	local := uint16(c.LocalAddr().(*net.TCPAddr).Port)
	for _, tc := range []struct {
		name      string
		ev        signals.ConnEvent
		wantRead  bool
		wantOwner string
	}{
		{"client side", signals.ConnEvent{Kind: signals.ConnPeerClose, Bytes: 100, Inode: inode(c), LocalPort: int(local), Remote: l.Addr().String()}, false, "unknown"},
		// The server side, accepted from the target's listener: the
		// target's, with no fd table read (this process holds it here,
		// which only a listener handed over to another process makes so).
		{"server side", signals.ConnEvent{Kind: signals.ConnPeerClose, Bytes: 100, Inode: inode(srv), LocalPort: int(port), Remote: c.LocalAddr().String()}, false, "target"},
		// A loopback peer at a port the target does not listen on.
		{"client of another server", signals.ConnEvent{Kind: signals.ConnPeerClose, Bytes: 100, Inode: inode(c), LocalPort: int(local), Remote: "127.0.0.1:1"}, true, "agent"},
	} {
		owners := workload.NewSocketOwners("/proc", workload.SocketOwnersOptions{})
		owners.SetTarget(tgt)
		owners.SetTargetPorts([]uint16{port})
		p := NewTCPLife(Options{Log: testLog, Owners: owners})
		got := p.ownerOf(tc.ev)
		if read := owners.Stats().FDsRead > 0; read != tc.wantRead {
			t.Errorf("%s: fd tables read: %v, want %v", tc.name, read, tc.wantRead)
		}
		if got != tc.wantOwner {
			t.Errorf("%s: owner %q, want %q", tc.name, got, tc.wantOwner)
		}
	}
}

// An event of another process is labelled with its name, read once per
// commTTL: flat out, reading /proc/PID/comm for each connection event of
// the load generator was a third of the probe's CPU. A process that exited
// keeps its name for the TTL, which is what its late events should say.
func TestTCPLifeOwnerOfCachesNames(t *testing.T) {
	cmd := exec.Command("sleep", "300")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	pid := cmd.Process.Pid
	p := NewTCPLife(Options{})
	ev := signals.ConnEvent{Kind: signals.ConnLocalClose, Pid: pid}
	if got := p.ownerOf(ev); got != "sleep" {
		t.Fatalf("owner of an event of sleep (pid %d): %q", pid, got)
	}
	cmd.Process.Kill()
	cmd.Wait()
	if _, err := os.Stat("/proc/" + strconv.Itoa(pid)); err == nil {
		t.Fatalf("pid %d still there after its exit", pid)
	}
	if got := p.ownerOf(ev); got != "sleep" {
		t.Errorf("owner within the TTL, read again though the process exited: %q", got)
	}
	p.comms[pid] = commSeen{comm: "sleep", at: time.Now().Add(-commTTL)}
	if got := p.ownerOf(ev); got != "unknown" {
		t.Errorf("owner past the TTL of a process gone: %q, want unknown", got)
	}
}

// While connections keep ending, events are sent without waking the
// reader and each poll flushes them (batch_events): none is lost. Once the
// namespace is quiet again, an event wakes the reader at once.
func TestTCPLifeBatchesEventsWhileBusy(t *testing.T) {
	s := testenv.Start(t, testenv.Options{Backlog: 64, Accept: true})
	st := signals.New(600, 1000)
	evs := signals.NewConnEvents(4096)
	p := NewTCPLife(Options{Log: testLog, PollInterval: 50 * time.Millisecond, MaxEntries: 1024, RingBufferBytes: 1 << 16, SideStores: signals.SideStores{Conns: evs}})
	runProbe(t, s.PID, p, st)
	time.Sleep(300 * time.Millisecond) // the netns filter is set at the first poll
	remote := "127.0.0.1:" + strconv.Itoa(s.Port)
	opens := func(from time.Time) (n int, last time.Time) {
		for _, e := range evs.Since(from) {
			if e.Kind == signals.ConnOpened && e.Remote == remote {
				n++
				last = e.T
			}
		}
		return n, last
	}
	from := time.Now()
	s.MustDo(t, "idletimeout 30")
	batched := false
	for range 40 {
		s.MustDo(t, "dial 5")
		batched = batched || p.batched.Load()
		time.Sleep(25 * time.Millisecond)
	}
	if !batched {
		t.Error("events never batched while connections kept ending")
	}
	deadline := time.Now().Add(3 * time.Second)
	for n, _ := opens(from); n < 200 && time.Now().Before(deadline); n, _ = opens(from) {
		time.Sleep(50 * time.Millisecond)
	}
	if n, _ := opens(from); n != 200 {
		t.Errorf("%d of 200 opens seen", n)
	}
	// Quiet: the poller idles and stops batching.
	for deadline := time.Now().Add(5 * time.Second); p.batched.Load(); time.Sleep(20 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("still batching 5 s after the last connection")
		}
	}
	time.Sleep(500 * time.Millisecond)
	at := time.Now()
	s.MustDo(t, "dial 1")
	deadline = time.Now().Add(2 * time.Second)
	n, seen := opens(at)
	for ; n == 0 && time.Now().Before(deadline); n, seen = opens(at) {
		time.Sleep(5 * time.Millisecond)
	}
	if n != 1 || seen.Sub(at) > 40*time.Millisecond {
		t.Errorf("an open while quiet: %d seen, %v after the dial (want one, at once)", n, seen.Sub(at))
	}
}
