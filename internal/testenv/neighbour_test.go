package testenv

import (
	"bufio"
	"fmt"
	"os"
	"runtime/debug"
	"strconv"
	"strings"
	"testing"
	"time"
)

// A neighbour lives in its target's namespace, and each of its faults
// leaves what it says in that namespace's sockets and counters.
func TestNeighbour(t *testing.T) {
	target := Start(t, Options{Backlog: 16, Accept: true})
	nb := StartNeighbour(t, target.PID)
	tns, _ := os.Readlink(fmt.Sprintf("/proc/%d/ns/net", target.PID))
	nns, _ := os.Readlink(fmt.Sprintf("/proc/%d/ns/net", nb.PID))
	self, _ := os.Readlink("/proc/self/ns/net")
	if tns != nns || nns == self {
		t.Fatalf("neighbour in %s, target in %s, test in %s", nns, tns, self)
	}
	if ino, err := nb.Netns.Inode(); err != nil || fmt.Sprintf("net:[%d]", ino) != tns {
		t.Fatalf("Netns.Inode() = %d, %v; target's is %s", ino, err, tns)
	}

	t.Run("close_wait", func(t *testing.T) {
		if n := nb.LeakCloseWait(t, 5); n != 5 {
			t.Fatalf("%d in CLOSE_WAIT after leaking 5", n)
		}
		if n := nb.LeakCloseWait(t, 3); n != 8 {
			t.Fatalf("%d in CLOSE_WAIT after leaking 3 more", n)
		}
	})

	t.Run("resets", func(t *testing.T) {
		before := tcpCounter(t, target.PID, "OutRsts")
		stop := nb.StartResets(t, 200)
		time.Sleep(500 * time.Millisecond)
		refused := stop()
		sent := tcpCounter(t, target.PID, "OutRsts") - before
		t.Logf("%d connections refused, OutRsts +%d in the target's namespace", refused, sent)
		if refused < 50 || refused > 150 || sent < int64(refused) {
			t.Errorf("200/s for 0.5 s: %d refused, OutRsts +%d", refused, sent)
		}
	})

	t.Run("established", func(t *testing.T) {
		held := nb.HoldEstablished(t, 3000)
		if held != 3000 {
			t.Fatalf("%d connections held, want 3000", held)
		}
		server, err := CountTCP(nb.PID, "ESTABLISHED", nb.Port, false)
		if err != nil || server != 3000 {
			t.Fatalf("server side: %d ESTABLISHED (%v)", server, err)
		}
	})

	t.Run("idle_cut", func(t *testing.T) {
		other := StartNeighbour(t, target.PID)
		other.CutIdle(t, 300*time.Millisecond, 4)
		if n, _ := CountTCP(other.PID, "ESTABLISHED", other.Port, true); n != 4 {
			t.Errorf("%d idle client connections right after CutIdle, want 4", n)
		}
		// The server cuts them at 300 ms: the clients see the peer close
		// (CLOSE_WAIT on their side).
		start := time.Now()
		waitUntil(t, 3*time.Second, func() error {
			n, err := CountTCP(other.PID, "CLOSE_WAIT", other.Port, true)
			if err == nil && n != 4 {
				err = fmt.Errorf("%d client connections cut", n)
			}
			return err
		})
		if d := time.Since(start); d < 200*time.Millisecond {
			t.Errorf("cut after %v, want about 300 ms", d)
		}
	})
}

// More connections than one process may hold go to more processes in the
// same namespace (here with 1,000 a process).
func TestNeighbourHolders(t *testing.T) {
	defer func(n int) { maxHeldPerProcess = n }(maxHeldPerProcess)
	maxHeldPerProcess = 1000
	target := Start(t, Options{Backlog: 16, Accept: true})
	nb := StartNeighbour(t, target.PID)
	if held := nb.HoldEstablished(t, 1500); held != 1500 {
		t.Fatalf("%d connections held, want 1500", held)
	}
	if held := nb.HoldEstablished(t, 1000); held != 2500 {
		t.Fatalf("%d connections held, want 2500", held)
	}
	holders := nb.Holders()
	if len(holders) != 3 || holders[0] != nb.PID {
		t.Fatalf("holders %v, want the neighbour %d and 2 more", holders, nb.PID)
	}
	if est := countState(t, target.PID, "ESTABLISHED"); est != 5000 {
		t.Errorf("%d ESTABLISHED sockets in the namespace, want 5000 (both ends)", est)
	}
	for _, pid := range holders[1:] {
		ns, _ := os.Readlink(fmt.Sprintf("/proc/%d/ns/net", pid))
		if tns, _ := os.Readlink(fmt.Sprintf("/proc/%d/ns/net", target.PID)); ns != tns {
			t.Errorf("holder %d in %s, target in %s", pid, ns, tns)
		}
	}
}

// Tens of thousands of established connections: past the open-file limit
// of one process. Seconds without the race detector, ~30 s with it (each
// connection is two goroutines of a -race child): not under -race or
// -short.
func TestNeighbourManyEstablished(t *testing.T) {
	if testing.Short() || raceEnabled() {
		t.Skip("-short or -race: 30,000 connections take too long; TestNeighbourHolders covers the logic")
	}
	target := Start(t, Options{Backlog: 16, Accept: true})
	nb := StartNeighbour(t, target.PID)
	start := time.Now()
	held := nb.HoldEstablished(t, 30000)
	t.Logf("%d connections held by %v after %v", held, nb.Holders(), time.Since(start).Round(time.Millisecond))
	if held != 30000 {
		t.Fatalf("%d connections held, want 30000", held)
	}
	if est := countState(t, target.PID, "ESTABLISHED"); est != 60000 {
		t.Errorf("%d ESTABLISHED sockets in the namespace, want 60000 (both ends)", est)
	}
}

func raceEnabled() bool {
	bi, ok := debug.ReadBuildInfo()
	if !ok {
		return false
	}
	for _, s := range bi.Settings {
		if s.Key == "-race" && s.Value == "true" {
			return true
		}
	}
	return false
}

func countState(t *testing.T, pid int, state string) int {
	t.Helper()
	socks, err := TCPSockets(pid)
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, s := range socks {
		if s.State == state {
			n++
		}
	}
	return n
}

// tcpCounter reads one Tcp: counter of pid's namespace (/proc/PID/net/snmp).
func tcpCounter(t *testing.T, pid int, name string) int64 {
	t.Helper()
	f, err := os.Open(fmt.Sprintf("/proc/%d/net/snmp", pid))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var header []string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fs := strings.Fields(sc.Text())
		if len(fs) == 0 || fs[0] != "Tcp:" {
			continue
		}
		if header == nil {
			header = fs
			continue
		}
		for i, h := range header {
			if h == name && i < len(fs) {
				v, err := strconv.ParseInt(fs[i], 10, 64)
				if err != nil {
					t.Fatal(err)
				}
				return v
			}
		}
	}
	t.Fatalf("no Tcp: %s in /proc/%d/net/snmp", name, pid)
	return 0
}

func TestParseProcAddr(t *testing.T) {
	for in, want := range map[string]string{
		"0100007F:1F90":                         "127.0.0.1:8080",
		"00000000:0000":                         "0.0.0.0:0",
		"00000000000000000000000001000000:0050": "[::1]:80",
		"0000000000000000FFFF00000100007F:01BB": "127.0.0.1:443", // v4-mapped
	} {
		got, err := parseProcAddr(in)
		if err != nil || got.String() != want {
			t.Errorf("parseProcAddr(%q) = %v, %v; want %s", in, got, err, want)
		}
	}
	for _, bad := range []string{"", "0100007F", "XYZ:0050", "0100007F:GGGG", "01007F:0050"} {
		if got, err := parseProcAddr(bad); err == nil {
			t.Errorf("parseProcAddr(%q) = %v, want an error", bad, got)
		}
	}
}

// NewNetns leaves no thread of the test in the namespace it made. A
// thread left there and ended with its goroutine could be the main one,
// which the runtime keeps (wedged): /proc/self/ns/net would then name the
// target's namespace, and every "not in the test's namespace" check, and
// an in-process agent's idea of its own namespace, would be wrong (a
// fresh-clone CI's TestRedis saw exactly that).
func TestNewNetnsLeavesNoThreadBehind(t *testing.T) {
	for i := 0; i < 20; i++ {
		ns := NewNetns(t)
		ino, err := ns.Inode()
		if err != nil {
			t.Fatal(err)
		}
		want := fmt.Sprintf("net:[%d]", ino)
		tasks, err := os.ReadDir("/proc/self/task")
		if err != nil {
			t.Fatal(err)
		}
		for _, task := range tasks {
			if got, _ := os.Readlink("/proc/self/task/" + task.Name() + "/ns/net"); got == want {
				t.Fatalf("round %d: thread %s is still in the namespace NewNetns made (%s)", i, task.Name(), want)
			}
		}
	}
}
