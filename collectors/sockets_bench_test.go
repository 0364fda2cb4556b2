package collectors

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/culprit-dev/culprit/signals"
	"github.com/culprit-dev/culprit/workload"
)

const (
	benchTimeWait = 100_000
	// Loopback listeners the TIME_WAIT connections are spread over: each
	// destination has at most 64512 local ports to use.
	benchTWListeners = 4
	benchTWFirstPort = 10001
	// Connections opened, accepted and closed per round: two descriptors
	// each, under RLIMIT_NOFILE (20000 on the machine these were measured on).
	benchTWBatch = 3000
)

// BenchmarkSockets100kTimeWait compares one cycle of the sockets collector
// with `ss -tan` and with vishvananda/netlink's SocketDiagTCPInfo, over the
// same 100k TIME_WAIT sockets made once in a private network namespace. A
// TIME_WAIT socket lives 60 s (not tunable), so everything runs within that.
//
//	go test -run '^$' -bench Sockets -benchtime 5x ./collectors/
func BenchmarkSockets100kTimeWait(b *testing.B) {
	ns := newSockNetns(b, 0)
	start := time.Now()
	var made int
	if err := ns.run(func() (err error) { made, err = makeTimeWait(benchTimeWait); return err }); err != nil {
		b.Fatal(err)
	}
	b.Logf("%d client-closed connections in %v", made, time.Since(start).Round(time.Millisecond))
	tgt := workload.Process{PID: ns.tid, NetnsIno: ns.ino}

	// A dump every cycle: nothing changes between cycles here, and a cycle
	// that skips its dump (collect.sockets_idle_interval) measures nothing.
	c := newSocketsCollector(Options{}, SocketsOptions{IdleInterval: -1, BusyInterval: -1})
	defer c.Close()
	store := signals.New(4, 10000)
	if err := c.Collect(context.Background(), tgt, store); err != nil {
		b.Fatal(err)
	}
	tw, _ := store.Latest(signals.TCPSockets, signals.L("owner", "unknown", "port", portEphemeral, "state", "TIME_WAIT"))
	if tw.V < benchTimeWait {
		b.Fatalf("%v TIME_WAIT sockets in the namespace, want %d", tw.V, benchTimeWait)
	}
	took, _ := store.Latest(signals.SocketsDumpSeconds, nil)
	b.Logf("%v TIME_WAIT sockets; first cycle took %.1f ms", tw.V, took.V*1000)
	alive := func(b *testing.B) {
		if time.Since(start) > 55*time.Second {
			b.Fatalf("%v since the sockets were made: TIME_WAIT (60 s) may be expiring under the benchmark", time.Since(start))
		}
	}

	if !c.conn.UsesV1() {
		b.Error("the kernel refused the inet_diag v1 request")
	}
	b.Run("culprit", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			if err := c.Collect(context.Background(), tgt, store); err != nil {
				b.Fatal(err)
			}
		}
		if n, _ := store.Latest(signals.TCPSocketsDumped, nil); n.V < benchTimeWait {
			b.Fatalf("dumped %v sockets", n.V)
		}
		alive(b)
	})

	// The same collector made to use per-family (v2) requests, as on a
	// kernel that refuses v1.
	c2 := newSocketsCollector(Options{}, SocketsOptions{IdleInterval: -1, BusyInterval: -1})
	defer c2.Close()
	if err := c2.Collect(context.Background(), tgt, store); err != nil {
		b.Fatal(err)
	}
	c2.conn.UseV2()
	b.Run("culprit_v2", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			if err := c2.Collect(context.Background(), tgt, store); err != nil {
				b.Fatal(err)
			}
		}
		if n, _ := store.Latest(signals.TCPSocketsDumped, nil); n.V < benchTimeWait {
			b.Fatalf("dumped %v sockets", n.V)
		}
		alive(b)
	})

	b.Run("ss", func(b *testing.B) {
		ssPath, err := exec.LookPath("ss")
		if err != nil {
			b.Skipf("SKIP: ss (iproute2) is not installed, no comparison: %v", err)
		}
		b.ReportAllocs()
		var lines int
		for b.Loop() {
			// Started from the namespace's thread, ss runs in the namespace.
			if err := ns.run(func() (err error) { lines, err = runSs(ssPath); return err }); err != nil {
				b.Fatal(err)
			}
		}
		if lines < benchTimeWait {
			b.Fatalf("ss printed %d lines", lines)
		}
		alive(b)
	})

	b.Run("netlink_SocketDiagTCPInfo", func(b *testing.B) {
		b.ReportAllocs()
		var n int
		for b.Loop() {
			n = 0
			if err := ns.run(func() error {
				for _, fam := range []uint8{unix.AF_INET6, unix.AF_INET} {
					s, err := netlink.SocketDiagTCPInfo(fam)
					if err != nil && !errors.Is(err, netlink.ErrDumpInterrupted) {
						return err
					}
					n += len(s)
				}
				return nil
			}); err != nil {
				b.Fatal(err)
			}
		}
		if n < benchTimeWait {
			b.Fatalf("netlink returned %d sockets", n)
		}
		alive(b)
	})
}

// lineCounter counts the lines written to it.
type lineCounter int

func (l *lineCounter) Write(p []byte) (int, error) {
	*l += lineCounter(bytes.Count(p, []byte{'\n'}))
	return len(p), nil
}

func runSs(path string) (int, error) {
	var lines lineCounter
	var stderr bytes.Buffer
	cmd := exec.Command(path, "-tan")
	cmd.Stdout, cmd.Stderr = &lines, &stderr
	if err := cmd.Run(); err != nil {
		return 0, fmt.Errorf("ss -tan: %v: %s", err, stderr.String())
	}
	return int(lines), nil
}

// makeTimeWait must run on a thread of a private network namespace. It
// widens the port range, lets TIME_WAIT sockets pile up (no reuse, a high
// bucket limit), and opens n loopback connections spread over a few
// listeners, in rounds: nonblocking connects, accepts, then the clients
// close first and the servers after them, which leaves each client side in
// TIME_WAIT.
func makeTimeWait(n int) (int, error) {
	for name, v := range map[string]string{
		"net/ipv4/ip_local_port_range": "1024 65535",
		"net/ipv4/tcp_max_tw_buckets":  "1000000",
		"net/ipv4/tcp_tw_reuse":        "0",
		"net/core/somaxconn":           "65535",
	} {
		// /proc/sys/net is the namespace of the thread that opens it.
		if err := os.WriteFile(filepath.Join("/proc/sys", name), []byte(v), 0); err != nil {
			return 0, err
		}
	}
	var dsts []unix.SockaddrInet4
	var lfds []int
	defer func() {
		for _, fd := range lfds {
			unix.Close(fd)
		}
	}()
	for i := 0; i < benchTWListeners; i++ {
		fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			return 0, err
		}
		lfds = append(lfds, fd)
		sa := unix.SockaddrInet4{Port: benchTWFirstPort + i, Addr: [4]byte{127, 0, 0, 1}}
		if err := unix.Bind(fd, &sa); err != nil {
			return 0, fmt.Errorf("bind %d: %w", sa.Port, err)
		}
		if err := unix.Listen(fd, benchTWBatch); err != nil {
			return 0, err
		}
		dsts = append(dsts, sa)
	}
	clients := make([]int, 0, benchTWBatch)
	servers := make([]int, 0, benchTWBatch)
	closeAll := func(fds []int) []int {
		for _, fd := range fds {
			unix.Close(fd)
		}
		return fds[:0]
	}
	defer func() { closeAll(clients); closeAll(servers) }()
	made := 0
	for made < n {
		k := min(benchTWBatch, n-made)
		perDst := make([]int, len(dsts))
		for i := 0; i < k; i++ {
			fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, 0)
			if err != nil {
				return made, err
			}
			clients = append(clients, fd)
			d := (made + i) % len(dsts)
			if err := unix.Connect(fd, &dsts[d]); err != nil && err != unix.EINPROGRESS {
				return made, fmt.Errorf("connect %d after %d connections: %w", dsts[d].Port, made+i, err)
			}
			perDst[d]++
		}
		// Accepting (blocking) waits for each handshake: both sides are
		// ESTABLISHED before anyone closes.
		for d, cnt := range perDst {
			for j := 0; j < cnt; j++ {
				fd, _, err := unix.Accept4(lfds[d], unix.SOCK_CLOEXEC)
				if err != nil {
					return made, fmt.Errorf("accept: %w", err)
				}
				servers = append(servers, fd)
			}
		}
		clients = closeAll(clients) // FIN_WAIT2 here, CLOSE_WAIT there
		servers = closeAll(servers) // LAST_ACK there, TIME_WAIT here
		made += k
	}
	return made, nil
}

// TestSocketsBenchSetup keeps the benchmark's namespace plumbing honest on
// a small scale, in a normal test run.
func TestSocketsBenchSetup(t *testing.T) {
	ns := newSockNetns(t, 0)
	var made int
	if err := ns.run(func() (err error) { made, err = makeTimeWait(50); return err }); err != nil {
		t.Fatal(err)
	}
	h := newSocketsHarness(t, workload.Process{PID: ns.tid, NetnsIno: ns.ino}, SocketsOptions{})
	// The listeners are closed by now: only the client sides are left.
	h.until(signals.TCPSockets, map[string]float64{"unknown/ephemeral/TIME_WAIT": float64(made)}, "owner", "port", "state")
	ssPath, err := exec.LookPath("ss")
	if err != nil {
		t.Skipf("SKIP: ss (iproute2) is not installed: %v", err)
	}
	var out []byte
	if err := ns.run(func() (err error) { out, err = exec.Command(ssPath, "-tan", "state", "time-wait").Output(); return err }); err != nil {
		t.Fatal(err)
	}
	if got := strings.Count(string(out), "\n") - 1; got != made {
		t.Errorf("ss in the namespace sees %d TIME_WAIT sockets, want %d:\n%s", got, made, out)
	}
}
