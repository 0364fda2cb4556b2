package exporters

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/google/pprof/profile"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/culprit-dev/culprit/exporters/rawh2"
	culpritv1 "github.com/culprit-dev/culprit/proto/culprit/v1"
	"github.com/culprit-dev/culprit/rules"
	"github.com/culprit-dev/culprit/signals"
)

// countingListener counts the bytes the server reads from its connections:
// what a refused request cost it, measured where it is paid.
type countingListener struct {
	net.Listener
	read atomic.Int64
}

func (l *countingListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	return &countingConn{Conn: c, n: &l.read}, nil
}

type countingConn struct {
	net.Conn
	n *atomic.Int64
}

func (c *countingConn) Read(p []byte) (int, error) {
	n, err := c.Conn.Read(p)
	c.n.Add(int64(n))
	return n, err
}

// hardServer is the gRPC service behind the agent's real options: its
// ConnLimiter, gate, codec and keepalive.
type hardServer struct {
	addr    string
	lim     *ConnLimiter
	counted *countingListener
	svc     *GRPCServer
}

func serveHard(t *testing.T, sec ServerSecurity, maxConns int, o GRPCOptions) *hardServer {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	cl := &countingListener{Listener: l}
	lim, err := NewConnLimiter(cl, "agent.grpc_addr", maxConns, testLog(t))
	if err != nil {
		t.Fatal(err)
	}
	sec.Conns = lim
	opts, err := sec.ServerOptions()
	if err != nil {
		t.Fatal(err)
	}
	srv := grpc.NewServer(opts...)
	if o.Journal == nil {
		o.Journal = rules.NewJournal(64)
	}
	if o.Store == nil {
		o.Store = signals.New(4, 16)
	}
	o.Log = testLog(t)
	svc := NewGRPC(o)
	svc.Register(srv)
	go srv.Serve(lim)
	t.Cleanup(func() { svc.Shutdown(); srv.Stop() })
	return &hardServer{addr: l.Addr().String(), lim: lim, counted: cl, svc: svc}
}

func dial(t *testing.T, addr string, c ClientSecurity) culpritv1.DiagnosticsClient {
	t.Helper()
	opts, err := c.DialOptions()
	if err != nil {
		t.Fatal(err)
	}
	cc, err := grpc.NewClient(addr, opts...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cc.Close() })
	return culpritv1.NewDiagnosticsClient(cc)
}

func tokenFile(t *testing.T, token string) string {
	t.Helper()
	f := filepath.Join(t.TempDir(), "token")
	if err := os.WriteFile(f, []byte(token), 0o600); err != nil {
		t.Fatal(err)
	}
	return f
}

// profiles is a ProfileSource that answers at once with an empty profile.
type profiles struct{}

func (profiles) Profile(time.Time, time.Time, []int) (*profile.Profile, error) {
	return &profile.Profile{SampleType: []*profile.ValueType{{Type: "samples", Unit: "count"}}, Period: 1}, nil
}
func (profiles) Settle() time.Duration { return 0 }

// A 15 MB authorization header is refused at its length prefix, while the
// headers are decoded: the server reads a few frames of it, not 15 MB, and
// closes the connection. grpc-go's default would have taken 16 MB.
func TestHugeHeaderRefusedWhileDecoding(t *testing.T) {
	hs := serveHard(t, ServerSecurity{TokenFile: tokenFile(t, "0123456789abcdef-token")}, 64, GRPCOptions{})
	const size = 15 << 20
	var wg sync.WaitGroup
	results := make([]rawh2.Result, 20)
	errs := make([]error, 20)
	for i := range results {
		wg.Add(1)
		go func() {
			defer wg.Done()
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()
			results[i], errs[i] = rawh2.SendHugeHeader(ctx, hs.addr, culpritv1.Diagnostics_GetSnapshot_FullMethodName, "authorization", size)
		}()
	}
	wg.Wait()
	for i, r := range results {
		if errs[i] != nil {
			t.Fatalf("attacker %d: %v", i, errs[i])
		}
		if !r.ServerClosed {
			t.Errorf("attacker %d: the server took the whole 15 MB header block (%d bytes) without closing", i, r.Written)
		}
	}
	read := hs.counted.read.Load()
	t.Logf("20 requests with a 15 MB header: the server read %d KiB in all", read>>10)
	// Each connection: the preface, a frame or two, whatever was in
	// flight in the socket when it closed. Never the header itself.
	if read > 20*(1<<20) {
		t.Errorf("the server read %d MiB for 20 refused headers: it buffered them", read>>20)
	}
	// And the service is still there for a well-behaved client.
	if _, err := dial(t, hs.addr, ClientSecurity{Token: "0123456789abcdef-token"}).ListFindings(context.Background(), &culpritv1.ListRequest{}); err != nil {
		t.Errorf("ListFindings after the attack: %v", err)
	}
}

// Without a token a call is refused on its headers: the tap handle runs
// before the stream exists, so a 3 MB request is never read (it would
// otherwise be refused as oversized, after reading), and the server reads
// a small part of what the client tried to send.
func TestTokenCheckedBeforeTheMessageIsRead(t *testing.T) {
	token := "0123456789abcdef-token"
	hs := serveHard(t, ServerSecurity{TokenFile: tokenFile(t, token)}, 64, GRPCOptions{Profiles: profiles{}})
	big := &culpritv1.CaptureProfileRequest{Lookback: durationpb.New(time.Second)}
	for len(big.Tids)*5 < 3<<20 {
		big.Tids = append(big.Tids, 1<<30) // 5 bytes each on the wire
	}
	anon := dial(t, hs.addr, ClientSecurity{})
	before := hs.counted.read.Load()
	var wg sync.WaitGroup
	codesSeen := make([]codes.Code, 50)
	for i := range codesSeen {
		wg.Add(1)
		go func() {
			defer wg.Done()
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			_, err := anon.CaptureProfile(ctx, big)
			codesSeen[i] = status.Code(err)
		}()
	}
	wg.Wait()
	for i, c := range codesSeen {
		if c != codes.Unauthenticated {
			t.Fatalf("call %d: %v, want Unauthenticated before the message is read", i, c)
		}
	}
	read := hs.counted.read.Load() - before
	t.Logf("50 unauthenticated 3 MB calls: the server read %d KiB", read>>10)
	if read > 50*(3<<20)/4 {
		t.Errorf("the server read %d MiB of 150 MiB refused requests: it read them before refusing", read>>20)
	}
	// With the token, the same request is refused for its size, and a
	// normal one is served.
	authed := dial(t, hs.addr, ClientSecurity{Token: token})
	if _, err := authed.CaptureProfile(context.Background(), big); status.Code(err) != codes.ResourceExhausted {
		t.Errorf("a 3 MB request with the token: %v, want ResourceExhausted", err)
	}
	if _, err := authed.CaptureProfile(context.Background(), &culpritv1.CaptureProfileRequest{Lookback: durationpb.New(time.Second)}); err != nil {
		t.Errorf("a normal CaptureProfile with the token: %v", err)
	}
}

// Requests of methods that take little are limited to little, before
// they are decoded, with an error that says so.
func TestRequestLimitPerMethod(t *testing.T) {
	hs := serveHard(t, ServerSecurity{}, 64, GRPCOptions{})
	c := dial(t, hs.addr, ClientSecurity{})
	rulesOf := func(n int) []string {
		var out []string
		for total := 0; total < n; total += 32 {
			out = append(out, strings.Repeat("r", 30))
		}
		return out
	}
	if _, err := c.ListFindings(context.Background(), &culpritv1.ListRequest{Rules: rulesOf(3 << 10)}); err != nil {
		t.Errorf("a 3 KiB ListRequest: %v", err)
	}
	_, err := c.ListFindings(context.Background(), &culpritv1.ListRequest{Rules: rulesOf(6 << 10)})
	if status.Code(err) != codes.ResourceExhausted || !strings.Contains(err.Error(), "ListRequest") || !strings.Contains(err.Error(), "limit") {
		t.Errorf("a 6 KiB ListRequest: %v, want ResourceExhausted naming the request and its limit", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	s, err := c.WatchFindings(ctx, &culpritv1.WatchRequest{Rules: rulesOf(6 << 10)})
	if err == nil {
		_, err = s.Recv()
	}
	if status.Code(err) != codes.ResourceExhausted || !strings.Contains(err.Error(), "WatchRequest") {
		t.Errorf("a 6 KiB WatchRequest: %v, want ResourceExhausted naming it", err)
	}
	_, err = c.GetFinding(context.Background(), &culpritv1.GetFindingRequest{Id: strings.Repeat("x", 2<<10)})
	if status.Code(err) != codes.ResourceExhausted {
		t.Errorf("a 2 KiB finding id: %v, want ResourceExhausted", err)
	}
	// The server's global cap refuses anything larger, whatever the method.
	big := &culpritv1.CaptureProfileRequest{Lookback: durationpb.New(time.Second), Tids: make([]int32, 20<<10)}
	if _, err := c.CaptureProfile(context.Background(), big); status.Code(err) != codes.ResourceExhausted {
		t.Errorf("a 20 KiB CaptureProfile: %v, want ResourceExhausted", err)
	}
}

// TLS alone lets anyone in: it is not protection. An API listening beyond
// loopback without a token or mTLS (allowed by allow_non_local) serves
// findings but refuses GetSnapshot and CaptureProfile, saying which key
// would allow them; health stays open.
func TestExposedAPIWithoutAuthenticationKeepsSnapshotsAndProfiles(t *testing.T) {
	dir := t.TempDir()
	ca, sc, sk, _, _ := pki(t, dir)
	tlsOnly := ServerSecurity{CertFile: sc, KeyFile: sk, Exposed: true}
	if tlsOnly.Protected() {
		t.Fatal("TLS without client certificates counts as protected")
	}
	hs := serveHard(t, tlsOnly, 64, GRPCOptions{Profiles: profiles{}})
	c := dial(t, hs.addr, ClientSecurity{CAFile: ca})
	if _, err := c.ListFindings(context.Background(), &culpritv1.ListRequest{}); err != nil {
		t.Errorf("ListFindings (allowed by allow_non_local): %v", err)
	}
	_, err := c.GetSnapshot(context.Background(), &culpritv1.SnapshotRequest{})
	if status.Code(err) != codes.PermissionDenied || !strings.Contains(err.Error(), "agent.grpc_addr") || !strings.Contains(err.Error(), "agent.token_file") {
		t.Errorf("GetSnapshot over TLS without authentication: %v, want PermissionDenied naming agent.grpc_addr and agent.token_file", err)
	}
	if _, err := c.CaptureProfile(context.Background(), &culpritv1.CaptureProfileRequest{Lookback: durationpb.New(time.Second)}); status.Code(err) != codes.PermissionDenied {
		t.Errorf("CaptureProfile over TLS without authentication: %v, want PermissionDenied", err)
	}
	opts, _ := ClientSecurity{CAFile: ca}.DialOptions()
	cc, _ := grpc.NewClient(hs.addr, opts...)
	defer cc.Close()
	if _, err := healthpb.NewHealthClient(cc).Check(context.Background(), &healthpb.HealthCheckRequest{}); err != nil {
		t.Errorf("health: %v", err)
	}

	// With a token, the same exposed API serves them to its holder.
	token := "0123456789abcdef-token"
	hs2 := serveHard(t, ServerSecurity{CertFile: sc, KeyFile: sk, TokenFile: tokenFile(t, token), Exposed: true}, 64, GRPCOptions{Profiles: profiles{}})
	if _, err := dial(t, hs2.addr, ClientSecurity{CAFile: ca, Token: token}).GetSnapshot(context.Background(), &culpritv1.SnapshotRequest{}); err != nil {
		t.Errorf("GetSnapshot with the token: %v", err)
	}
	if _, err := dial(t, hs2.addr, ClientSecurity{CAFile: ca}).GetSnapshot(context.Background(), &culpritv1.SnapshotRequest{}); status.Code(err) != codes.Unauthenticated {
		t.Errorf("GetSnapshot without the token: %v, want Unauthenticated", err)
	}
}

// Snapshots and profiles in progress at once are bounded; the next is
// refused at once with a clear error, and served again when one ends.
func TestHeavyCallsBounded(t *testing.T) {
	hs := serveHard(t, ServerSecurity{Limits: GRPCLimits{MaxHeavyCalls: 2}}, 64, GRPCOptions{Profiles: profiles{}})
	c := dial(t, hs.addr, ClientSecurity{})
	var wg sync.WaitGroup
	for range 2 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			// The probing snapshots below hold a slot for an instant: a
			// profile that starts in that instant is refused, rightly, and
			// asks again.
			for end := time.Now().Add(waitFor); ; time.Sleep(10 * time.Millisecond) {
				_, err := c.CaptureProfile(context.Background(), &culpritv1.CaptureProfileRequest{Duration: durationpb.New(1500 * time.Millisecond)})
				if status.Code(err) == codes.ResourceExhausted && time.Now().Before(end) {
					continue
				}
				if err != nil {
					t.Errorf("a profile within the bound: %v", err)
				}
				return
			}
		}()
	}
	deadline := time.Now().Add(waitFor)
	for time.Now().Before(deadline) {
		_, err := c.GetSnapshot(context.Background(), &culpritv1.SnapshotRequest{})
		if status.Code(err) == codes.ResourceExhausted {
			if !strings.Contains(err.Error(), "in progress") {
				t.Errorf("refusal does not say why: %v", err)
			}
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if time.Now().After(deadline) {
		t.Fatal("a third heavy call was never refused while two profiles ran")
	}
	wg.Wait()
	if _, err := c.GetSnapshot(context.Background(), &culpritv1.SnapshotRequest{}); err != nil {
		t.Errorf("GetSnapshot after the profiles ended: %v", err)
	}
}

// A flood of idle gRPC connections never costs a watcher its stream: the
// listener holds its cap, evicts the idle ones, and a new client is
// served.
func TestGRPCConnectionCap(t *testing.T) {
	j := rules.NewJournal(64)
	hs := serveHard(t, ServerSecurity{}, 8, GRPCOptions{Journal: j})
	r := newRecorder(j)
	w := startWatch(t, dial(t, hs.addr, ClientSecurity{}), &culpritv1.WatchRequest{})
	time.Sleep(100 * time.Millisecond) // the stream has begun

	var idle []net.Conn
	for range 200 {
		c, err := net.Dial("tcp", hs.addr)
		if err != nil {
			t.Fatal(err)
		}
		idle = append(idle, c)
	}
	t.Cleanup(func() {
		for _, c := range idle {
			c.Close()
		}
	})
	if st := hs.lim.Stats(); st.Open > 8 {
		t.Errorf("%d connections open, cap 8", st.Open)
	}
	r.open("a", "accept_overflow", rules.SeverityCritical)
	if ev := w.next(t, 1)[0]; ev.GetType() != culpritv1.FindingEvent_TYPE_OPENED {
		t.Errorf("the watcher got %s after the flood, want OPENED", describe([]*culpritv1.FindingEvent{ev}))
	}
	start := time.Now()
	if _, err := dial(t, hs.addr, ClientSecurity{}).ListFindings(context.Background(), &culpritv1.ListRequest{}); err != nil {
		t.Errorf("a new client during the flood: %v", err)
	}
	st := hs.lim.Stats()
	t.Logf("after 200 idle connections: %d open (cap %d), %d evicted, %d refused; a new call took %s", st.Open, st.Max, st.Evicted, st.Refused, time.Since(start).Round(time.Millisecond))
	if st.Evicted == 0 {
		t.Error("no idle connection was evicted")
	}
}

// The HTTP server under a flood of idle and slow connections: it holds
// its cap, /healthz answers a fresh client quickly, bodies are refused,
// and idle connections are closed after the idle timeout.
func TestHTTPServerBounded(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	lim, err := NewConnLimiter(l, "agent.http_addr", 16, testLog(t))
	if err != nil {
		t.Fatal(err)
	}
	lim.ForHTTP()
	p := NewPrometheus(PromOptions{Store: signals.New(4, 16), Journal: rules.NewJournal(4), Listeners: []*ConnLimiter{lim}})
	mux := http.NewServeMux()
	mux.Handle("/metrics", p.Handler(NewRegistry(p)))
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) { fmt.Fprintln(w, "ok") })
	srv := NewHTTPServer(mux, HTTPLimits{IdleTimeout: 300 * time.Millisecond, ReadHeaderTimeout: 2 * time.Second}, testLog(t))
	go srv.Serve(lim)
	t.Cleanup(func() { srv.Close() })
	addr := l.Addr().String()

	// 300 connections: idle, slow senders of a request line, and
	// keep-alives that made one request.
	var flood []net.Conn
	t.Cleanup(func() {
		for _, c := range flood {
			c.Close()
		}
	})
	for i := range 300 {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		switch i % 3 {
		case 1:
			io.WriteString(c, "GET /healthz HTTP/1.1\r\nHost: x\r\n") // never ends its headers
		case 2:
			io.WriteString(c, "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
		}
		flood = append(flood, c)
	}
	client := &http.Client{Transport: &http.Transport{DisableKeepAlives: true}, Timeout: 2 * time.Second}
	var worst time.Duration
	for range 20 {
		start := time.Now()
		resp, err := client.Get("http://" + addr + "/healthz")
		if err != nil {
			t.Fatalf("/healthz during the flood: %v", err)
		}
		resp.Body.Close()
		worst = max(worst, time.Since(start))
		if resp.StatusCode != http.StatusOK {
			t.Fatalf("/healthz: %s", resp.Status)
		}
	}
	st := lim.Stats()
	t.Logf("300 flooding connections: %d open (cap %d), %d evicted, %d refused; worst /healthz %s", st.Open, st.Max, st.Evicted, st.Refused, worst)
	if st.Open > 16 {
		t.Errorf("%d connections open, cap 16", st.Open)
	}
	if worst > time.Second {
		t.Errorf("/healthz took %s during the flood", worst)
	}

	// A body is refused, and says why.
	resp, err := client.Post("http://"+addr+"/healthz", "text/plain", strings.NewReader(strings.Repeat("x", 8<<10)))
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusRequestEntityTooLarge {
		t.Errorf("an 8 KiB body: %s, want 413", resp.Status)
	}

	// The listener's counts are on /metrics.
	resp, err = client.Get("http://" + addr + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	for _, want := range []string{`culprit_listener_connections_max{listener="agent.http_addr"} 16`, `culprit_listener_connections_closed_total{listener="agent.http_addr",reason="evicted"}`} {
		if !strings.Contains(string(body), want) {
			t.Errorf("/metrics lacks %s", want)
		}
	}
	promtoolCheck(t, string(body))

	// An idle keep-alive is closed by the server after the idle timeout.
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	io.WriteString(c, "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
	c.SetReadDeadline(time.Now().Add(3 * time.Second))
	if _, err := io.Copy(io.Discard, c); err != nil {
		t.Errorf("the idle connection was not closed within 3 s (idle timeout 300 ms): %v", err)
	}
}

// Sequences restart with the agent. A watcher whose cursor came from
// another run gets a GAP that says so, then this run from its first event
// (nothing of it lost); when this run's journal already dropped its
// first events, GAP then CURRENT. A cursor of this run resumes as before.
func TestWatchResumeAcrossRuns(t *testing.T) {
	j1 := rules.NewJournal(64)
	run1 := serve(t, GRPCOptions{Journal: j1, Store: signals.New(4, 16)})
	r1 := newRecorder(j1)
	for range 5 {
		r1.open(fmt.Sprint("old", j1.Sequence()), "accept_overflow", rules.SeverityWarning)
	}
	old := startWatch(t, run1.client, &culpritv1.WatchRequest{}).next(t, 5)
	cursor, inst1 := old[4].GetSequence(), old[4].GetInstanceId()
	if inst1 == "" || inst1 != run1.svc.InstanceID() {
		t.Fatalf("events carry instance %q, want the run's %q", inst1, run1.svc.InstanceID())
	}

	// The agent restarts: a new journal numbers from 1.
	j2 := rules.NewJournal(64)
	run2 := serve(t, GRPCOptions{Journal: j2, Store: signals.New(4, 16)})
	r2 := newRecorder(j2)
	r2.open("new", "fd_exhaustion", rules.SeverityCritical) // 1: the event the old code skipped
	r2.update("new")                                        // 2
	for range 5 {
		r2.update("new") // 3..7: past the old cursor
	}
	w := startWatch(t, run2.client, &culpritv1.WatchRequest{SinceSequence: cursor, InstanceId: inst1})
	got := w.next(t, 8)
	gap := got[0]
	if gap.GetType() != culpritv1.FindingEvent_TYPE_GAP || gap.GetInstanceId() != run2.svc.InstanceID() || !strings.Contains(gap.GetDetail(), "restarted") {
		t.Fatalf("first event %s (instance %q, detail %q), want GAP from the new run saying it restarted", describe(got[:1]), gap.GetInstanceId(), gap.GetDetail())
	}
	wantEvent(t, got[1], culpritv1.FindingEvent_TYPE_OPENED, 1, "new")
	for i, ev := range got[1:] {
		if ev.GetSequence() != uint64(i+1) || ev.GetInstanceId() != run2.svc.InstanceID() {
			t.Fatalf("after the GAP: %s, want sequences 1..7 of the new run", describe(got))
		}
	}
	w.quiet(t, 100*time.Millisecond)

	// Resuming within the new run is as before: no GAP.
	w2 := startWatch(t, run2.client, &culpritv1.WatchRequest{SinceSequence: 6, InstanceId: run2.svc.InstanceID()})
	wantEvent(t, w2.next(t, 1)[0], culpritv1.FindingEvent_TYPE_UPDATED, 7, "new")

	// A new run whose journal already dropped its first events: GAP,
	// then the open findings.
	j3 := rules.NewJournal(4)
	run3 := serve(t, GRPCOptions{Journal: j3, Store: signals.New(4, 16)})
	r3 := newRecorder(j3)
	r3.open("x", "oom_ahead", rules.SeverityCritical)
	for range 6 {
		r3.update("x")
	}
	got = startWatch(t, run3.client, &culpritv1.WatchRequest{SinceSequence: 3, InstanceId: inst1}).next(t, 2)
	if got[0].GetType() != culpritv1.FindingEvent_TYPE_GAP {
		t.Fatalf("got %s, want GAP then CURRENT", describe(got))
	}
	wantEvent(t, got[1], culpritv1.FindingEvent_TYPE_CURRENT, 7, "x")

	l, err := run2.client.ListFindings(context.Background(), &culpritv1.ListRequest{})
	if err != nil || l.GetInstanceId() != run2.svc.InstanceID() {
		t.Errorf("ListFindings instance %q (%v), want %q", l.GetInstanceId(), err, run2.svc.InstanceID())
	}
	s, err := run2.client.GetSnapshot(context.Background(), &culpritv1.SnapshotRequest{})
	if err != nil || s.GetInstanceId() != run2.svc.InstanceID() {
		t.Errorf("GetSnapshot instance %q (%v), want %q", s.GetInstanceId(), err, run2.svc.InstanceID())
	}
}

// smallSendBufListener accepts TCP connections with a 4 KiB send buffer.
type smallSendBufListener struct{ *net.TCPListener }

func (l smallSendBufListener) Accept() (net.Conn, error) {
	c, err := l.AcceptTCP()
	if err != nil {
		return nil, err
	}
	c.SetWriteBuffer(4096)
	return c, nil
}

// Clients that pipeline requests and never read the responses keep every
// handler blocked in a write: all places are busy. Newcomers are refused
// only until the oldest has been busy StuckAfter; then it is evicted and
// the probe is served.
func TestHTTPStuckConnectionsGiveWay(t *testing.T) {
	tl, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	// Small send buffers on the server side too: with the kernel's
	// autotuning the responses could all fit in a send buffer of up to
	// tcp_wmem's 4 MB, and the handlers never block (seen in CI: 0 of 4
	// busy after 5 s).
	l := smallSendBufListener{tl.(*net.TCPListener)}
	lim, err := NewConnLimiter(l, "agent.http_addr", 4, testLog(t))
	if err != nil {
		t.Fatal(err)
	}
	lim.ForHTTP()
	lim.stuckAfter = 500 * time.Millisecond
	mux := http.NewServeMux()
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) { fmt.Fprintln(w, "ok") })
	srv := NewHTTPServer(mux, HTTPLimits{}, testLog(t))
	go srv.Serve(lim)
	t.Cleanup(func() { srv.Close() })
	addr := l.Addr().String()

	// A small receive buffer, so the responses fill it soon.
	d := net.Dialer{Control: func(_, _ string, rc syscall.RawConn) error {
		return rc.Control(func(fd uintptr) { syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_RCVBUF, 4096) })
	}}
	pipeline := []byte(strings.Repeat("GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n", 20000))
	for range 4 {
		c, err := d.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		go c.Write(pipeline) // blocks too, once the server stops reading
	}
	// Wait until all four are busy writing.
	deadline := time.Now().Add(5 * time.Second)
	for {
		busy := 0
		lim.mu.Lock()
		for c := range lim.conns {
			if !c.idle() {
				busy++
			}
		}
		lim.mu.Unlock()
		if busy == 4 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d of 4 pipelining connections busy after 5 s", busy)
		}
		time.Sleep(20 * time.Millisecond)
	}
	// Refused while they have been busy for less than stuckAfter (each
	// turns busy again at every pipelined request it gets to), served
	// once one has been stuck longer.
	client := &http.Client{Transport: &http.Transport{DisableKeepAlives: true}, Timeout: 2 * time.Second}
	start := time.Now()
	for time.Since(start) < 5*time.Second {
		var resp *http.Response
		if resp, err = client.Get("http://" + addr + "/healthz"); err == nil {
			resp.Body.Close()
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	if err != nil {
		t.Fatalf("/healthz never served in 5 s with every place stuck (stuckAfter 500 ms): %v", err)
	}
	st := lim.Stats()
	t.Logf("served %s after all four were busy; %d refused before, %d evicted", time.Since(start).Round(time.Millisecond), st.Refused, st.Evicted)
	if st.Evicted == 0 {
		t.Errorf("served without evicting a stuck connection: %+v", st)
	}
}
