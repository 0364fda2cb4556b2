package probes

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"strconv"
	"testing"
	"time"

	"github.com/culprit-dev/culprit/internal/testenv"
	"github.com/culprit-dev/culprit/signals"
	"github.com/culprit-dev/culprit/workload"
)

func TestMain(m *testing.M) { testenv.Main(m) }

// startProbe loads the real programs into the running kernel. As root a
// failure is a failure: the kernel here supports tp_btf, and a skip would
// hide a regression.
func startProbe(t *testing.T, pid int) (*TCPListen, *signals.Store) {
	t.Helper()
	p := NewTCPListen(Options{Log: testLog, PollInterval: 50 * time.Millisecond, MaxEntries: 256, RingBufferBytes: 4096})
	st := signals.New(600, 1000)
	runProbe(t, pid, p, st)
	return p, st
}

var testLog = slog.New(slog.NewTextHandler(io.Discard, nil))

// runProbe starts p on the process pid and closes it when the test ends.
func runProbe(t *testing.T, pid int, p Probe, st *signals.Store) {
	t.Helper()
	res, err := workload.NewResolver("/proc")
	if err != nil {
		t.Fatal(err)
	}
	tr := workload.NewTracker(res, workload.Selector{PID: pid}, time.Second, testLog)
	tr.Refresh()
	if _, ok := tr.Current(); !ok {
		t.Fatalf("target %d not found", pid)
	}
	ctx, cancel := context.WithCancel(context.Background())
	if err := p.Start(ctx, tr, st); err != nil {
		cancel()
		if os.Geteuid() != 0 && errors.Is(err, os.ErrPermission) {
			fmt.Fprintf(os.Stderr, "SKIP: %s probe needs CAP_BPF+CAP_PERFMON (not root): %v\n", p.Name(), err)
			t.Skip("no BPF privileges")
		}
		t.Fatalf("load %s probe: %v", p.Name(), err)
	}
	t.Cleanup(func() {
		cancel()
		if err := p.Close(); err != nil {
			t.Errorf("close %s: %v", p.Name(), err)
		}
	})
}

func waitValue(t *testing.T, st *signals.Store, d *signals.Desc, ls signals.Labels, cond func(float64) bool, what string) float64 {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		s, ok := st.Latest(d, ls)
		if ok && cond(s.V) {
			return s.V
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s%s: %s not reached in 10s (last %v, seen %v)", d, ls, what, s.V, ok)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// A listener that does not accept: exactly backlog+1 handshakes complete
// into its queue (the kernel's "full" is ack_backlog > max_ack_backlog),
// and once it accepts, every waiting client's handshake completes and is
// counted — per port, in the target's namespace only.
//
// Measured on loopback (6.18): SYN, SYN-ACK and ACK of one connection are
// handled in one softirq pass, so a full queue drops the SYN itself (no
// drop reason), and the ACK of a SYN cookie meeting a full queue is freed
// with reason NOT_SPECIFIED; kfree_skb TCP_LISTEN_OVERFLOW and SYN-ACK
// retransmits need an RTT between SYN-ACK and ACK, as remote clients have.
// So this test asserts what loopback makes deterministic.
func TestTCPListenCountsHandshakesOfOneListener(t *testing.T) {
	s := testenv.Start(t, testenv.Options{Backlog: 2, Accept: false})
	_, st := startProbe(t, s.PID)
	port := signals.L("port", strconv.Itoa(s.Port))
	s.MustDo(t, "dialasync 20")
	waitValue(t, st, signals.TCPListenHandshakesTotal, port, func(v float64) bool { return v == 3 }, "== backlog+1 while nobody accepts")
	time.Sleep(1500 * time.Millisecond) // SYN retransmits at 1 s must not complete into the full queue
	if v, _ := st.Latest(signals.TCPListenHandshakesTotal, port); v.V != 3 {
		t.Fatalf("%v handshakes completed into a queue of 2 that nobody accepts; want 3", v.V)
	}
	// Once it accepts, new handshakes complete and are counted. (Clients
	// that were sent a SYN cookie while the queue was full believe they
	// are connected although the server dropped their ACK: they never
	// complete, so new, one-at-a-time dials are what is counted here.)
	s.MustDo(t, "accept on")
	for i := 0; i < 5; i++ {
		s.MustDo(t, "dial 1")
	}
	waitValue(t, st, signals.TCPListenHandshakesTotal, port, func(v float64) bool { return v >= 8 }, ">= 3+5 after accepting")
	for _, ls := range st.Select(signals.TCPListenHandshakesTotal) {
		if ls.Get("port") != strconv.Itoa(s.Port) {
			t.Errorf("series for port %s of another namespace leaked into the target's", ls.Get("port"))
		}
	}
}

func TestTCPListenQuietOnHealthyListener(t *testing.T) {
	s := testenv.Start(t, testenv.Options{Backlog: 128, Accept: true})
	_, st := startProbe(t, s.PID)
	port := signals.L("port", strconv.Itoa(s.Port))
	s.MustDo(t, "burst 20")
	waitValue(t, st, signals.TCPListenHandshakesTotal, port, func(v float64) bool { return v >= 20 }, ">= 20")
	for _, name := range []*signals.Desc{signals.TCPListenOverflowDropsTotal, signals.TCPSynAckRetransmitsTotal} {
		if v, _ := st.Latest(name, port); v.V != 0 {
			t.Errorf("%s = %v on a healthy listener, want 0", name, v.V)
		}
	}
}

func TestTCPListenCloseIsIdempotent(t *testing.T) {
	p := NewTCPListen(Options{Log: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err := p.Close(); err != nil {
		t.Fatal(err)
	}
	if err := p.Close(); err != nil {
		t.Fatal(err)
	}
}
