package probes

import (
	"errors"
	"fmt"
	"os"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/culprit-dev/culprit/internal/testenv"
	"github.com/culprit-dev/culprit/sockdiag"
	"github.com/culprit-dev/culprit/workload"
)

// newListenQueues loads the iterator; as root a failure is a failure
// (this kernel has the tcp iterator).
func newListenQueues(t *testing.T) *ListenQueues {
	t.Helper()
	q, err := NewListenQueues()
	if err != nil {
		if os.Geteuid() != 0 && errors.Is(err, os.ErrPermission) {
			fmt.Fprintf(os.Stderr, "SKIP: the listenqueue iterator needs CAP_BPF+CAP_PERFMON (not root): %v\n", err)
			t.Skip("no BPF privileges")
		}
		t.Fatalf("load the listenqueue iterator: %v", err)
	}
	t.Cleanup(func() {
		if err := q.Close(); err != nil {
			t.Errorf("close: %v", err)
		}
	})
	return q
}

// readIn reads the listeners of the network namespace of pid.
func readIn(t *testing.T, q *ListenQueues, pid int) []ListenQueue {
	t.Helper()
	res, err := workload.NewResolver("/proc")
	if err != nil {
		t.Fatal(err)
	}
	tgt, err := res.Resolve(workload.Selector{PID: pid})
	if err != nil {
		t.Fatal(err)
	}
	var ls []ListenQueue
	if err := sockdiag.InTargetNetns("/proc", pid, tgt.NetnsIno, func() error {
		var err error
		ls, err = q.Read(nil)
		return err
	}); err != nil {
		t.Fatalf("read the listeners of pid %d: %v", pid, err)
	}
	return ls
}

// TestListenQueuesHalfOpen makes real half-open connections (with
// TCP_DEFER_ACCEPT the server ignores the client's bare final ACK, so
// each stays a request socket on the server) beside 100 established ones,
// and reads them from the listener. The program must run only for the
// listener and the first socket after it: a walk of the namespace's
// established hash would run it for each of the 200 established sockets
// and the 5 half-open ones. Another namespace's listener and its half-open
// connections are not in the answer.
func TestListenQueuesHalfOpen(t *testing.T) {
	s := testenv.Start(t, testenv.Options{Backlog: 16, Accept: true})
	other := testenv.Start(t, testenv.Options{Backlog: 16, Accept: true})
	if ans := s.MustDo(t, "dial 100"); ans != "ok 100 established" {
		t.Fatalf("dial: %s", ans)
	}
	q := newListenQueues(t)
	// A client is established before the server has its final ACK: under
	// load a few of the 100 are still half-open for a moment, and with
	// TCP_DEFER_ACCEPT set now they would stay so.
	halfOpenIs(t, q, s, 0)
	for _, srv := range []*testenv.Server{s, other} {
		if err := unix.SetsockoptInt(srv.ListenerFD(t), unix.IPPROTO_TCP, unix.TCP_DEFER_ACCEPT, 30); err != nil {
			t.Fatalf("TCP_DEFER_ACCEPT: %v", err)
		}
	}
	if ans := s.MustDo(t, "dial 5"); ans != "ok 5 established" {
		t.Fatalf("dial: %s", ans)
	}
	if ans := other.MustDo(t, "dial 3"); ans != "ok 3 established" {
		t.Fatalf("dial: %s", ans)
	}
	halfOpenIs(t, q, s, 5)
	stats, err := ebpf.EnableStats(uint32(unix.BPF_STATS_RUN_TIME))
	if err != nil {
		t.Fatalf("enable BPF stats: %v", err)
	}
	defer stats.Close()
	before := runCount(t, q)
	ls := readIn(t, q, s.PID)
	runs := runCount(t, q) - before
	if len(ls) != 1 {
		t.Fatalf("listeners in the server's namespace: %+v, want its one", ls)
	}
	l := ls[0]
	if int(l.Port) != s.Port || l.Family != unix.AF_INET || l.HalfOpen != 5 || l.Backlog != 16 || l.Queued != 0 {
		t.Errorf("listener %+v, want port %d, AF_INET, 5 half-open, backlog 16, none queued", l, s.Port)
	}
	// The listener's record and the one that ends the read.
	if runs > 3 {
		t.Errorf("the program ran %d times: the established hash was walked past its first socket", runs)
	}
	if ls := readIn(t, q, other.PID); len(ls) != 1 || int(ls[0].Port) != other.Port || ls[0].HalfOpen != 3 {
		t.Errorf("listeners in the other namespace: %+v, want port %d with 3 half-open", ls, other.Port)
	}
}

// halfOpenIs waits up to 5 s for the listeners of srv's namespace to
// hold n half-open connections.
func halfOpenIs(t *testing.T, q *ListenQueues, srv *testenv.Server, n uint32) {
	t.Helper()
	var ls []ListenQueue
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
		ls = readIn(t, q, srv.PID)
		sum := uint32(0)
		for _, l := range ls {
			sum += l.HalfOpen
		}
		if sum == n {
			return
		}
	}
	t.Fatalf("listeners %+v: never %d half-open in 5 s", ls, n)
}

// runCount is how many times the kernel ran the iterator's program.
func runCount(t *testing.T, q *ListenQueues) uint64 {
	t.Helper()
	st, err := q.objs.CulpritListenQueue.Stats()
	if err != nil {
		t.Fatalf("program stats: %v", err)
	}
	return st.RunCount
}
