package main

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/culprit-dev/culprit/internal/testenv"
	culpritv1 "github.com/culprit-dev/culprit/proto/culprit/v1"
	"github.com/culprit-dev/culprit/signals"
)

func TestMain(m *testing.M) { testenv.Main(cleanupRun{m}) }

// cleanupRun removes the binary culpritBinary built, after the tests.
type cleanupRun struct{ m *testing.M }

func (r cleanupRun) Run() int {
	code := r.m.Run()
	if buildErr == nil && builtBin != "" {
		os.RemoveAll(filepath.Dir(builtBin))
	}
	return code
}

// startAgent runs a real agent in this process, watching pid, on ephemeral
// loopback ports.
func startAgent(t testing.TB, pid int) *Agent {
	t.Helper()
	return startAgentConfig(t, testConfig(t, pid))
}

func startAgentConfig(t testing.TB, cfg Config) *Agent {
	t.Helper()
	if err := cfg.Validate(); err != nil {
		t.Fatal(err)
	}
	var w io.Writer = io.Discard
	if testing.Verbose() {
		w = os.Stderr
	}
	a, err := StartAgent(context.Background(), cfg, newLogger(cfg, w))
	if err != nil {
		t.Fatalf("start agent: %v", err)
	}
	t.Cleanup(func() {
		if err := a.Stop(5 * time.Second); err != nil {
			t.Errorf("stop agent: %v", err)
		}
	})
	return a
}

// scenario is a server child in its own netns and a real agent watching it,
// with a gRPC client that has seen the agent sample the server's listener.
type scenario struct {
	s *testenv.Server
	a *Agent
	c culpritv1.DiagnosticsClient
}

func newScenario(t testing.TB, o testenv.Options) scenario {
	t.Helper()
	s := testenv.Start(t, o)
	a := startAgent(t, s.PID)
	c := client(t, a.GRPCAddr)
	waitWatching(t, c, s.Port)
	return scenario{s, a, c}
}

func client(t testing.TB, addr string) culpritv1.DiagnosticsClient {
	t.Helper()
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return culpritv1.NewDiagnosticsClient(conn)
}

// watch streams events into a channel until the returned cancel is called.
func watch(t testing.TB, c culpritv1.DiagnosticsClient, since uint64) (<-chan *culpritv1.FindingEvent, context.CancelFunc) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	stream, err := c.WatchFindings(ctx, &culpritv1.WatchRequest{SinceSequence: since})
	if err != nil {
		cancel()
		t.Fatalf("WatchFindings: %v", err)
	}
	ch := make(chan *culpritv1.FindingEvent, 256)
	go func() {
		defer close(ch)
		for {
			ev, err := stream.Recv()
			if err != nil {
				return
			}
			ch <- ev
		}
	}()
	t.Cleanup(cancel)
	return ch, cancel
}

// next waits for an event that matches, failing the test after timeout.
// Events that do not match are returned in skipped for the caller to check.
func next(t testing.TB, ch <-chan *culpritv1.FindingEvent, timeout time.Duration, match func(*culpritv1.FindingEvent) bool) (ev *culpritv1.FindingEvent, skipped []*culpritv1.FindingEvent) {
	t.Helper()
	deadline := time.After(timeout)
	for {
		select {
		case ev, ok := <-ch:
			if !ok {
				t.Fatal("finding stream ended")
			}
			if match(ev) {
				return ev, skipped
			}
			skipped = append(skipped, ev)
		case <-deadline:
			t.Fatalf("no matching finding event within %s (saw %d others: %v)", timeout, len(skipped), skipped)
		}
	}
}

// waitWatching blocks until the agent has sampled the server's listener, so
// a fault is not injected before the agent can see it.
func waitWatching(t testing.TB, c culpritv1.DiagnosticsClient, port int) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		s, err := c.GetSnapshot(context.Background(), &culpritv1.SnapshotRequest{})
		if err == nil && signalValue(s, signals.ListenBacklog, "port", strconv.Itoa(port)) != nil {
			return
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Fatalf("agent never saw the listener on port %d", port)
}

func signalValue(s *culpritv1.Snapshot, d *signals.Desc, label, value string) *float64 {
	for _, sg := range s.Signals {
		if sg.Name != d.Name {
			continue
		}
		for _, l := range sg.Labels {
			if l.Name == label && l.Value == value {
				v := sg.Value
				return &v
			}
		}
		if label == "" {
			v := sg.Value
			return &v
		}
	}
	return nil
}

func isAcceptOverflow(cause string, typ culpritv1.FindingEvent_Type) func(*culpritv1.FindingEvent) bool {
	return func(ev *culpritv1.FindingEvent) bool {
		return ev.Type == typ && ev.Finding != nil && ev.Finding.Rule == "accept_overflow" && (cause == "" || ev.Finding.Cause == cause)
	}
}

// The main scenario: a real listener with a small backlog stops
// accepting, more clients than the backlog connect, and a real gRPC client
// of the running agent receives "app not accepting" within 1 s; after the
// listener accepts again the finding resolves. The resolve happens while
// the client is disconnected, and resuming with since_sequence delivers it
// exactly once.
func TestAppNotAcceptingFindingOverGRPC(t *testing.T) {
	sc := newScenario(t, testenv.Options{Backlog: 4, Accept: false})
	s, a, c := sc.s, sc.a, sc.c
	events, stop := watch(t, c, 0)

	start := time.Now()
	s.MustDo(t, "dialasync 40")
	opened, skipped := next(t, events, 5*time.Second, isAcceptOverflow("", culpritv1.FindingEvent_TYPE_OPENED))
	took := time.Since(start)
	for _, ev := range skipped {
		t.Errorf("unexpected event before the finding: %v", ev)
	}
	f := opened.Finding
	if f.Cause != "app_not_accepting" {
		t.Fatalf("cause = %s, want app_not_accepting; root cause: %s", f.Cause, f.RootCause)
	}
	t.Logf("finding after %s: %s\n  root cause: %s", took, f.Title, f.RootCause)
	if took > time.Second {
		t.Errorf("finding arrived %s after the first connections, want within 1s", took)
	}
	wantKey := fmt.Sprintf("127.0.0.1:%d", s.Port)
	if f.Key != wantKey || !strings.Contains(f.RootCause, wantKey) {
		t.Errorf("finding names %q / %q, want the listener %s", f.Key, f.RootCause, wantKey)
	}
	if !strings.Contains(f.RootCause, "Threads:") {
		t.Errorf("root cause lacks the thread states: %s", f.RootCause)
	}
	// The child never calls accept; none of its threads is stuck. Its main
	// thread waits for commands on its stdin pipe, which is idle (it was
	// once named here as the cause).
	if strings.Contains(f.RootCause, "During the stall") {
		t.Errorf("root cause blames a thread of an app that simply never accepts: %s", f.RootCause)
	}
	if f.Remediation == "" || len(f.Evidence) == 0 {
		t.Errorf("finding lacks remediation or evidence: %+v", f)
	}

	// While it is open, /metrics shows it, and the exposition is valid.
	body := scrape(t, a.HTTPAddr)
	if !strings.Contains(body, `culprit_findings_active{rule="accept_overflow",severity="critical"} 1`) {
		t.Errorf("/metrics lacks the open finding:\n%s", grepLines(body, "culprit_finding"))
	}
	promtoolCheck(t, body)

	// Disconnect, let the listener recover while nobody watches, resume.
	lastSeen := opened.Sequence
	for drained := false; !drained; {
		select {
		case ev := <-events:
			if ev.Type == culpritv1.FindingEvent_TYPE_RESOLVED {
				t.Fatalf("resolved before the listener accepted again: %v", ev)
			}
			lastSeen = ev.Sequence
		default:
			drained = true
		}
	}
	stop()
	s.MustDo(t, "accept on")
	deadline := time.Now().Add(20 * time.Second)
	for {
		l, err := c.ListFindings(context.Background(), &culpritv1.ListRequest{})
		if err != nil {
			t.Fatal(err)
		}
		if len(l.Findings) == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("finding did not resolve within 20s of accepting again: %v", l.Findings)
		}
		time.Sleep(100 * time.Millisecond)
	}
	resumed, _ := watch(t, c, lastSeen)
	seen := map[uint64]bool{}
	want := lastSeen + 1
	for {
		ev, _ := next(t, resumed, 5*time.Second, func(*culpritv1.FindingEvent) bool { return true })
		if seen[ev.Sequence] || ev.Sequence != want {
			t.Fatalf("resume after %d: got sequence %d, want %d (lost or repeated)", lastSeen, ev.Sequence, want)
		}
		seen[ev.Sequence] = true
		want++
		if ev.Finding != nil && ev.Finding.Id == f.Id && ev.Finding.Cause != "app_not_accepting" {
			t.Errorf("the stall's finding changed cause to %s while recovering: %s", ev.Finding.Cause, ev.Finding.RootCause)
		}
		if ev.Type == culpritv1.FindingEvent_TYPE_RESOLVED && ev.Finding.Id == f.Id {
			break
		}
	}
}

// Bursts of short connections overflow a small backlog while the app keeps
// accepting: the finding must say "backlog too small", not "not accepting".
func TestBacklogTooSmallFinding(t *testing.T) {
	sc := newScenario(t, testenv.Options{Backlog: 2, Accept: true})
	s, c := sc.s, sc.c
	events, _ := watch(t, c, 0)

	match := isAcceptOverflow("", culpritv1.FindingEvent_TYPE_OPENED)
	var ev *culpritv1.FindingEvent
	for i := 0; ev == nil && i < 15; i++ {
		s.MustDo(t, "burst 300")
		wait := time.After(500 * time.Millisecond)
		for ev == nil {
			select {
			case e := <-events:
				if match(e) {
					ev = e
				}
				continue
			case <-wait:
			}
			break
		}
	}
	if ev == nil {
		t.Fatal("15 bursts of 300 connections against backlog 2 raised no accept_overflow finding")
	}
	f := ev.Finding
	if f.Cause != "backlog_too_small" {
		t.Fatalf("cause = %s, want backlog_too_small; root cause: %s", f.Cause, f.RootCause)
	}
	if !strings.Contains(f.RootCause, "backlog of 127.0.0.1:"+strconv.Itoa(s.Port)+" is 2") {
		t.Errorf("root cause does not name the backlog: %s", f.RootCause)
	}
	if !strings.Contains(f.Remediation, "somaxconn") {
		t.Errorf("remediation does not mention somaxconn: %s", f.Remediation)
	}
	t.Logf("%s\n  root cause: %s\n  fix: %s", f.Title, f.RootCause, f.Remediation)
}

// The herd after a stall (docs/NOTES.md): the app stops accepting on
// backlog 4 while 30 clients connect, and accepts again 20 s later. The
// clients it kept waiting retransmit their SYNs together on the kernel's
// schedule (Linux 6.5 on: 1, 2, 3, 4, 5, 7, 11, 19, 35 s after their
// first), so they overflow the backlog again at 35 s, 15 s after the
// stall, when it has left the window. Judged by itself that herd was
// "backlog too small". No event for the listener may say so: the drops
// are the stall's tail.
func TestAcceptOverflowHerdAfterStall(t *testing.T) {
	sc := newScenario(t, testenv.Options{Backlog: 4, Accept: false})
	s, c := sc.s, sc.c
	events, _ := watch(t, c, 0)

	// The kernel's own drop counter, to tell when the rounds came.
	start := time.Now()
	done := make(chan struct{})
	var mu sync.Mutex
	var rounds []string
	lastRound := time.Time{}
	var polled sync.WaitGroup
	polled.Add(1)
	go func() {
		defer polled.Done()
		last, _ := readListenOverflows(s.PID)
		for {
			select {
			case <-done:
				return
			case <-time.After(20 * time.Millisecond):
			}
			if v, err := readListenOverflows(s.PID); err == nil && v != last {
				mu.Lock()
				rounds = append(rounds, fmt.Sprintf("%.2fs:+%d", time.Since(start).Seconds(), v-last))
				lastRound = time.Now()
				mu.Unlock()
				last = v
			}
		}
	}()
	defer func() {
		close(done)
		polled.Wait()
		t.Logf("drops (time since the first dial:count): %s", strings.Join(rounds, " "))
	}()

	s.MustDo(t, "dialasync 30 90")
	opened, _ := next(t, events, 5*time.Second, isAcceptOverflow("", culpritv1.FindingEvent_TYPE_OPENED))
	if opened.Finding.Cause != "app_not_accepting" {
		t.Fatalf("cause = %s, want app_not_accepting: %s", opened.Finding.Cause, opened.Finding.RootCause)
	}
	key := opened.Finding.Key
	var tail *culpritv1.Finding
	// check fails any event for the listener that blames the backlog, and
	// keeps the last that called drops after 30 s the stall's tail. The
	// queue that stays full while the process idles is the stall seen from
	// another side: no throughput_plateau of its own ("a lock, a bounded
	// pool" would be untrue advice for an app that stopped accepting).
	check := func(ev *culpritv1.FindingEvent) {
		f := ev.Finding
		if f != nil && f.Rule == "throughput_plateau" && f.Key == key && ev.Type == culpritv1.FindingEvent_TYPE_OPENED {
			t.Errorf("%.1fs the stall also opened throughput_plateau: %s", time.Since(start).Seconds(), f.Title)
		}
		if f == nil || f.Rule != "accept_overflow" || f.Key != key {
			return
		}
		t.Logf("%.1fs %s %s: %s", time.Since(start).Seconds(), ev.Type, f.Cause, f.RootCause)
		// One fault, one finding: the tail lingers between the rounds
		// until the clients' last SYN, rather than resolve and open again.
		if ev != opened && (ev.Type == culpritv1.FindingEvent_TYPE_OPENED || ev.Type == culpritv1.FindingEvent_TYPE_RESOLVED) {
			t.Errorf("%.1fs the stall's finding was %s again (%s)", time.Since(start).Seconds(), ev.Type, f.Id)
		}
		if f.Cause == "backlog_too_small" {
			t.Errorf("the stall's herd was called a backlog too small (%s): %s", ev.Type, f.RootCause)
		}
		if time.Since(start) > 30*time.Second && ev.Type != culpritv1.FindingEvent_TYPE_RESOLVED && strings.Contains(f.RootCause, "the stall's tail") {
			tail = f
		}
	}
	check(opened)
	// drain checks the events until until, or, given quiet, as soon as
	// quiet holds.
	drain := func(until time.Time, quiet func() bool) {
		for end := time.After(time.Until(until)); ; {
			select {
			case ev := <-events:
				check(ev)
				continue
			case <-time.After(100 * time.Millisecond):
				if quiet == nil || !quiet() {
					continue
				}
			case <-end:
			}
			return
		}
	}
	// The round at 19 s (measured at 19.4 s: the timers run late by a
	// few percent) still falls into the stall: accept again half a second
	// after it.
	drain(start.Add(18*time.Second), nil)
	drain(start.Add(23*time.Second), func() bool {
		mu.Lock()
		defer mu.Unlock()
		return time.Since(lastRound) > 500*time.Millisecond && lastRound.After(start.Add(18*time.Second))
	})
	resumed := time.Now()
	stallDrops, err := readListenOverflows(s.PID) // the namespace is the child's own: all its drops are the listener's
	if err != nil {
		t.Fatal(err)
	}
	s.MustDo(t, "accept on")
	// The round at 35 s comes 15 s later; its drops are recent for 2 s,
	// and judged by themselves after 1 s more.
	drain(resumed.Add(20*time.Second), nil)
	total, err := readListenOverflows(s.PID)
	if err != nil {
		t.Fatal(err)
	}
	// The namespace is the child's own, and the first drop came after the
	// agent's first sample: every drop the kernel counted is the
	// listener's, and none may be left unattributed (the herd's wait for
	// their evidence: attributionGrace in collectors/accept_queue.go).
	snap, err := c.GetSnapshot(context.Background(), &culpritv1.SnapshotRequest{})
	if err != nil {
		t.Fatal(err)
	}
	agent, un := 0.0, 0.0
	if v := signalValue(snap, signals.ListenOverflowsTotal, "port", strconv.Itoa(s.Port)); v != nil {
		agent = *v
	}
	if v := signalValue(snap, signals.ListenOverflowsUnattributedTotal, "", ""); v != nil {
		un = *v
	}
	t.Logf("drops: kernel %d (%d by the stall's end), on the listener %v, unattributed %v", total, stallDrops, agent, un)
	if agent != float64(total) || un != 0 {
		t.Errorf("the listener was given %v drops and %v went unattributed; the kernel counted %d, all the listener's", agent, un, total)
	}
	if tail == nil && total == stallDrops {
		// A herd is not certain: the app, on the other core, may accept
		// the retries as they come (docs/NOTES.md).
		t.Skipf("no drop after the stall (%d during it): no herd to judge", stallDrops)
	}
	if tail == nil {
		// The herd's SYNs are dropped and its 5 handshakes completed in
		// one softirq pass, and the app drains the queue at once: the only
		// evidence of whose drops they were is those handshakes, which the
		// tcplisten probe publishes at its next poll, after the
		// accept_queue collector read the counter in 4 runs of 10. The
		// collector keeps such drops pending for that evidence: they must
		// reach the listener and be judged.
		t.Fatalf("no finding called the herd after 30 s the stall's tail (%v drops on the listener, %d by the stall's end, %v unattributed)", agent, stallDrops, un)
	}
	for _, want := range []string{"was full for", "ago", "dropped since", "retrying their SYNs together"} {
		if !strings.Contains(tail.RootCause, want) {
			t.Errorf("the tail's root cause lacks %q: %s", want, tail.RootCause)
		}
	}
	// Its count is of drops since the stall ended, no more.
	var since int
	if _, err := fmt.Sscanf(tail.RootCause[strings.Index(tail.RootCause, "and the ")+len("and the "):], "%d connection attempt", &since); err != nil {
		t.Fatalf("no count of drops since the stall in %q: %v", tail.RootCause, err)
	}
	if since <= 0 || uint64(since) > total-stallDrops {
		t.Errorf("the tail counts %d drops since the stall; the kernel dropped %d after it", since, total-stallDrops)
	}
}

// Healthy load against an adequate backlog raises nothing.
func TestHealthyLoadRaisesNoFinding(t *testing.T) {
	sc := newScenario(t, testenv.Options{Backlog: 512, Accept: true})
	s, c := sc.s, sc.c
	events, _ := watch(t, c, 0)
	end := time.Now().Add(4 * time.Second)
	total := 0
	for time.Now().Before(end) {
		ans := s.MustDo(t, "burst 100")
		n, _ := strconv.Atoi(strings.Fields(ans)[1])
		total += n
	}
	if total < 100 {
		t.Fatalf("the load did not run: %d connections", total)
	}
	select {
	case ev := <-events:
		t.Fatalf("healthy load (%d connections) raised a finding: %v", total, ev)
	case <-time.After(time.Second):
	}
	snap, err := c.GetSnapshot(context.Background(), &culpritv1.SnapshotRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if v := signalValue(snap, signals.ListenOverflowsTotal, "port", strconv.Itoa(s.Port)); v == nil || *v != 0 {
		t.Fatalf("listen_overflows_total for the healthy listener = %v, want 0", v)
	}
}

func scrape(t testing.TB, addr string) string {
	t.Helper()
	resp, err := http.Get("http://" + addr + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

func grepLines(s, sub string) string {
	var out []string
	for _, l := range strings.Split(s, "\n") {
		if strings.Contains(l, sub) {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}

// promtoolCheck runs the real promtool; CI installs it, a developer
// machine without it skips loudly.
func promtoolCheck(t testing.TB, exposition string) {
	t.Helper()
	if _, err := exec.LookPath("promtool"); err != nil {
		if os.Getenv("CI") != "" {
			t.Fatal("promtool missing: .ci/run must install Debian's prometheus package")
		}
		fmt.Fprintln(os.Stderr, "SKIP promtool check: promtool not on PATH (apt-get install prometheus)")
		return
	}
	cmd := exec.Command("promtool", "check", "metrics")
	cmd.Stdin = strings.NewReader(exposition)
	out, err := cmd.CombinedOutput()
	if err != nil || len(strings.TrimSpace(string(out))) > 0 {
		t.Errorf("promtool check metrics: %v\n%s", err, out)
	}
}

// freeAddr returns a loopback address nothing listens on right now.
func freeAddr(t testing.TB) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

// The connections a burst could not queue come back in rounds: clients
// retransmit the SYNs it dropped, and the server its SYN-ACKs to clients
// whose handshake completed on a full queue, each answer dropped again.
// The rounds' gaps double (1.7, 3.4, 6.6, 13.3 s after one burst here) and
// outgrow the rule's window. One fault, one finding: it must not resolve
// in a gap and open again for the same connections' next round (the demo's
// burst fault did, 3 s after resolving; this test did, 2 runs of 2, before
// the finding lingered twice the last gap).
func TestBacklogTooSmallOpenThroughItsRetries(t *testing.T) {
	sc := newScenario(t, testenv.Options{Backlog: 2, Accept: true})
	events, _ := watch(t, sc.c, 0)
	sc.s.MustDo(t, "burst 300")
	k0, err := readListenOverflows(sc.s.PID)
	if err != nil {
		t.Fatal(err)
	}
	var opened, resolved int
	var reopenedAfter time.Duration
	var firstOpen time.Time
	end := time.After(45 * time.Second)
	for done := false; !done; {
		select {
		case ev := <-events:
			if ev.Finding == nil || ev.Finding.Rule != "accept_overflow" {
				continue
			}
			switch ev.Type {
			case culpritv1.FindingEvent_TYPE_OPENED:
				opened++
				if opened == 1 {
					firstOpen = time.Now()
				} else if reopenedAfter == 0 {
					reopenedAfter = time.Since(firstOpen)
				}
				t.Logf("opened: %s | %s", ev.Finding.Title, ev.Finding.RootCause)
			case culpritv1.FindingEvent_TYPE_RESOLVED:
				resolved++
				t.Logf("resolved after %v", time.Since(firstOpen))
			}
		case <-end:
			done = true
		}
	}
	if k, err := readListenOverflows(sc.s.PID); err == nil {
		t.Logf("drops after the burst (its connections coming back): %d", k-k0)
	}
	if opened == 0 {
		t.Fatal("a burst of 300 connections against backlog 2 opened no accept_overflow finding")
	}
	if opened > 1 {
		t.Errorf("one fault opened %d findings (the second %v after the first, %d resolved between): a finding resolved between its clients' retry rounds", opened, reopenedAfter, resolved)
	}
}
