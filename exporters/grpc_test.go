package exporters

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"slices"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	culpritv1 "github.com/culprit-dev/culprit/proto/culprit/v1"
	"github.com/culprit-dev/culprit/rules"
	"github.com/culprit-dev/culprit/signals"
	"github.com/culprit-dev/culprit/workload"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	reflectionpb "google.golang.org/grpc/reflection/grpc_reflection_v1"
	"google.golang.org/grpc/status"
)

const waitFor = 5 * time.Second

// testLog logs to the test's output until the test ends; a server
// goroutine that logs as it winds down after that (a watch stream's last
// line) writes nowhere, rather than race with the test's end.
func testLog(t *testing.T) *slog.Logger {
	w := &testOutput{w: t.Output()}
	t.Cleanup(func() {
		w.mu.Lock()
		w.done = true
		w.mu.Unlock()
	})
	return slog.New(slog.NewTextHandler(w, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

type testOutput struct {
	mu   sync.Mutex
	w    io.Writer
	done bool
}

func (o *testOutput) Write(p []byte) (int, error) {
	o.mu.Lock()
	defer o.mu.Unlock()
	if o.done {
		return len(p), nil
	}
	return o.w.Write(p)
}

type testServer struct {
	svc    *GRPCServer
	conn   *grpc.ClientConn
	client culpritv1.DiagnosticsClient
}

// serve runs the service on a real listener and dials it with a real
// client, the way the agent and the CLI do.
func serve(t *testing.T, o GRPCOptions) *testServer {
	t.Helper()
	if o.Log == nil {
		o.Log = testLog(t)
	}
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := grpc.NewServer()
	svc := NewGRPC(o)
	svc.Register(srv)
	served := make(chan error, 1)
	go func() { served <- srv.Serve(lis) }()
	conn, err := grpc.NewClient(lis.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		conn.Close()
		svc.Shutdown()
		srv.GracefulStop()
		if err := <-served; err != nil {
			t.Errorf("Serve: %v", err)
		}
	})
	return &testServer{svc: svc, conn: conn, client: culpritv1.NewDiagnosticsClient(conn)}
}

var t0 = time.Date(2025, 3, 1, 12, 0, 0, 0, time.UTC)

func finding(id, rule string, sev rules.Severity, first time.Time) rules.Finding {
	return rules.Finding{
		ID:   id,
		Rule: rule,
		Observation: rules.Observation{
			Key:        "127.0.0.1:8080",
			Cause:      "app_not_accepting",
			Title:      "accept queue overflows on " + id,
			Severity:   sev,
			Confidence: 0.9,
			Evidence:   []rules.Evidence{{Signal: `listen_overflows_total{port="8080"}`, Value: 12, Threshold: 0, Unit: "connections", Window: 5 * time.Second}},
			Artifacts:  []rules.Artifact{{Kind: "listener", Value: "127.0.0.1:8080"}},
			Labels:     map[string]string{"port": "8080"},
		},
		State:     rules.StateOpen,
		FirstSeen: first,
		LastSeen:  first,
	}
}

// recorder writes findings' lifecycles into a journal the way the engine
// does, so tests state what happens rather than build Finding values.
type recorder struct {
	j    *rules.Journal
	now  time.Time
	byID map[string]rules.Finding
}

func newRecorder(j *rules.Journal) *recorder {
	return &recorder{j: j, now: t0, byID: map[string]rules.Finding{}}
}

func (r *recorder) open(id, rule string, sev rules.Severity) rules.Event {
	r.now = r.now.Add(time.Second)
	f := finding(id, rule, sev, r.now)
	ev := r.j.Record(rules.EventOpened, f, r.now)
	r.byID[id] = ev.Finding
	return ev
}

func (r *recorder) update(id string) rules.Event {
	r.now = r.now.Add(time.Second)
	f := r.byID[id]
	f.LastSeen = r.now
	f.Confidence = 0.95
	ev := r.j.Record(rules.EventUpdated, f, r.now)
	r.byID[id] = ev.Finding
	return ev
}

func (r *recorder) resolve(id string) rules.Event {
	r.now = r.now.Add(time.Second)
	f := r.byID[id]
	f.State, f.Resolved = rules.StateResolved, r.now
	ev := r.j.Record(rules.EventResolved, f, r.now)
	r.byID[id] = ev.Finding
	return ev
}

type watch struct {
	events <-chan *culpritv1.FindingEvent
	errc   <-chan error
	cancel context.CancelFunc
}

func startWatch(t *testing.T, c culpritv1.DiagnosticsClient, req *culpritv1.WatchRequest) *watch {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	stream, err := c.WatchFindings(ctx, req)
	if err != nil {
		t.Fatalf("WatchFindings: %v", err)
	}
	events := make(chan *culpritv1.FindingEvent, 1024)
	errc := make(chan error, 1)
	go func() {
		defer close(events)
		for {
			ev, err := stream.Recv()
			if err != nil {
				errc <- err
				return
			}
			events <- ev
		}
	}()
	return &watch{events: events, errc: errc, cancel: cancel}
}

// next returns the next n events, failing if they do not arrive in time.
func (w *watch) next(t *testing.T, n int) []*culpritv1.FindingEvent {
	t.Helper()
	var out []*culpritv1.FindingEvent
	deadline := time.After(waitFor)
	for len(out) < n {
		select {
		case ev, ok := <-w.events:
			if !ok {
				t.Fatalf("stream ended after %d of %d events: %v", len(out), n, <-w.errc)
			}
			out = append(out, ev)
		case <-deadline:
			t.Fatalf("got %d of %d events within %s: %s", len(out), n, waitFor, describe(out))
		}
	}
	return out
}

// quiet fails if any event arrives within d.
func (w *watch) quiet(t *testing.T, d time.Duration) {
	t.Helper()
	select {
	case ev, ok := <-w.events:
		if ok {
			t.Fatalf("unexpected event: %s", describe([]*culpritv1.FindingEvent{ev}))
		}
	case <-time.After(d):
	}
}

func describe(evs []*culpritv1.FindingEvent) string {
	var parts []string
	for _, ev := range evs {
		parts = append(parts, fmt.Sprintf("%s#%d(%s)", strings.TrimPrefix(ev.GetType().String(), "TYPE_"), ev.GetSequence(), ev.GetFinding().GetId()))
	}
	return "[" + strings.Join(parts, " ") + "]"
}

func wantEvent(t *testing.T, ev *culpritv1.FindingEvent, typ culpritv1.FindingEvent_Type, seq uint64, id string) {
	t.Helper()
	if ev.GetType() != typ || ev.GetSequence() != seq || ev.GetFinding().GetId() != id {
		t.Fatalf("got %s, want %s#%d(%s)", describe([]*culpritv1.FindingEvent{ev}), strings.TrimPrefix(typ.String(), "TYPE_"), seq, id)
	}
}

func ids(evs []*culpritv1.FindingEvent) []string {
	var out []string
	for _, ev := range evs {
		out = append(out, ev.GetFinding().GetId())
	}
	sort.Strings(out)
	return out
}

func TestWatchFromZeroSendsCurrentThenLive(t *testing.T) {
	j := rules.NewJournal(64)
	ts := serve(t, GRPCOptions{Journal: j, Store: signals.New(4, 16)})
	r := newRecorder(j)
	r.open("a", "accept_overflow", rules.SeverityCritical) // 1
	r.open("b", "fd_exhaustion", rules.SeverityWarning)    // 2
	r.update("a")                                          // 3
	r.open("gone", "fd_exhaustion", rules.SeverityInfo)    // 4
	r.resolve("gone")                                      // 5

	w := startWatch(t, ts.client, &culpritv1.WatchRequest{})
	cur := w.next(t, 2)
	// Lowest sequence first, each with its finding's own last sequence.
	wantEvent(t, cur[0], culpritv1.FindingEvent_TYPE_CURRENT, 2, "b")
	wantEvent(t, cur[1], culpritv1.FindingEvent_TYPE_CURRENT, 3, "a")
	if f := cur[1].GetFinding(); f.GetConfidence() != 0.95 || f.GetState() != culpritv1.FindingState_FINDING_STATE_OPEN ||
		f.GetSeverity() != culpritv1.Severity_SEVERITY_CRITICAL || len(f.GetEvidence()) != 1 || f.GetEvidence()[0].GetWindow().AsDuration() != 5*time.Second ||
		f.GetLabels()["port"] != "8080" || f.GetResolved() != nil {
		t.Errorf("CURRENT a carries %v", f)
	}

	r.open("c", "accept_overflow", rules.SeverityWarning) // 6
	r.update("c")                                         // 7
	r.resolve("a")                                        // 8
	live := w.next(t, 3)
	wantEvent(t, live[0], culpritv1.FindingEvent_TYPE_OPENED, 6, "c")
	wantEvent(t, live[1], culpritv1.FindingEvent_TYPE_UPDATED, 7, "c")
	wantEvent(t, live[2], culpritv1.FindingEvent_TYPE_RESOLVED, 8, "a")
	if f := live[2].GetFinding(); f.GetState() != culpritv1.FindingState_FINDING_STATE_RESOLVED || !f.GetResolved().AsTime().Equal(r.now) {
		t.Errorf("RESOLVED a carries state %v resolved %v", f.GetState(), f.GetResolved())
	}
	w.quiet(t, 100*time.Millisecond)
}

func TestWatchResumeLosesAndRepeatsNothing(t *testing.T) {
	j := rules.NewJournal(64)
	ts := serve(t, GRPCOptions{Journal: j, Store: signals.New(4, 16), MaxBatch: 2})
	r := newRecorder(j)

	r.open("a", "accept_overflow", rules.SeverityCritical) // 1
	w := startWatch(t, ts.client, &culpritv1.WatchRequest{})
	wantEvent(t, w.next(t, 1)[0], culpritv1.FindingEvent_TYPE_CURRENT, 1, "a")
	r.update("a")                                         // 2
	r.open("b", "accept_overflow", rules.SeverityWarning) // 3
	got := w.next(t, 2)
	wantEvent(t, got[0], culpritv1.FindingEvent_TYPE_UPDATED, 2, "a")
	wantEvent(t, got[1], culpritv1.FindingEvent_TYPE_OPENED, 3, "b")
	k := got[1].GetSequence()
	w.cancel()

	// While nobody watches, more happens than one MaxBatch read returns.
	r.update("b")                                    // 4
	r.resolve("a")                                   // 5
	r.open("c", "fd_exhaustion", rules.SeverityInfo) // 6
	r.update("c")                                    // 7
	r.update("b")                                    // 8

	w2 := startWatch(t, ts.client, &culpritv1.WatchRequest{SinceSequence: k})
	got = w2.next(t, 5)
	for i, ev := range got {
		if want := k + 1 + uint64(i); ev.GetSequence() != want || ev.GetType() == culpritv1.FindingEvent_TYPE_CURRENT {
			t.Fatalf("resume from %d: got %s, want sequences %d..8 replayed", k, describe(got), k+1)
		}
	}
	r.resolve("b") // 9, live after the replay
	wantEvent(t, w2.next(t, 1)[0], culpritv1.FindingEvent_TYPE_RESOLVED, 9, "b")
	w2.quiet(t, 100*time.Millisecond)
}

func TestWatchResumeAfterGapResynchronises(t *testing.T) {
	j := rules.NewJournal(4)
	ts := serve(t, GRPCOptions{Journal: j, Store: signals.New(4, 16)})
	r := newRecorder(j)
	r.open("a", "accept_overflow", rules.SeverityCritical) // 1: the client saw this
	// Ten events while the client is away; the ring keeps the last four.
	r.open("b", "accept_overflow", rules.SeverityWarning) // 2
	r.open("c", "fd_exhaustion", rules.SeverityInfo)      // 3
	for range 4 {
		r.update("b") // 4..7
	}
	r.resolve("a")                                   // 8
	r.open("d", "oom_ahead", rules.SeverityCritical) // 9
	r.update("c")                                    // 10
	r.resolve("b")                                   // 11

	w := startWatch(t, ts.client, &culpritv1.WatchRequest{SinceSequence: 1})
	gap := w.next(t, 1)[0]
	if gap.GetType() != culpritv1.FindingEvent_TYPE_GAP || gap.GetFinding() != nil || gap.GetSequence() != 2 {
		t.Fatalf("first event %s (finding %v), want GAP#2 with no finding", describe([]*culpritv1.FindingEvent{gap}), gap.GetFinding())
	}
	cur := w.next(t, 2)
	for _, ev := range cur {
		if ev.GetType() != culpritv1.FindingEvent_TYPE_CURRENT {
			t.Fatalf("after GAP: %s, want CURRENT for the open findings", describe(cur))
		}
	}
	if got := ids(cur); !slices.Equal(got, []string{"c", "d"}) {
		t.Fatalf("CURRENT for %v, want [c d]", got)
	}
	w.quiet(t, 100*time.Millisecond) // nothing from the ring is replayed
	r.resolve("d")                   // 12
	wantEvent(t, w.next(t, 1)[0], culpritv1.FindingEvent_TYPE_RESOLVED, 12, "d")
}

// A cursor above the journal's sequence was issued by an earlier run of the
// agent; following it would wait silently for sequences already reused.
// The journal still holds this run from its first event, so the client
// gets that after the GAP: nothing of this run is lost.
func TestWatchFromFutureSequenceResynchronises(t *testing.T) {
	j := rules.NewJournal(16)
	ts := serve(t, GRPCOptions{Journal: j, Store: signals.New(4, 16)})
	r := newRecorder(j)
	r.open("a", "accept_overflow", rules.SeverityCritical)
	w := startWatch(t, ts.client, &culpritv1.WatchRequest{SinceSequence: 500})
	got := w.next(t, 2)
	if got[0].GetType() != culpritv1.FindingEvent_TYPE_GAP || !strings.Contains(got[0].GetDetail(), "never issued") {
		t.Fatalf("got %s (%q), want GAP saying why, then OPENED#1", describe(got), got[0].GetDetail())
	}
	wantEvent(t, got[1], culpritv1.FindingEvent_TYPE_OPENED, 1, "a")
}

func TestWatchAndListFilters(t *testing.T) {
	j := rules.NewJournal(64)
	ts := serve(t, GRPCOptions{Journal: j, Store: signals.New(4, 16)})
	r := newRecorder(j)
	r.open("info", "accept_overflow", rules.SeverityInfo)     // 1
	r.open("warn", "accept_overflow", rules.SeverityWarning)  // 2
	r.open("crit", "accept_overflow", rules.SeverityCritical) // 3
	r.open("other", "fd_exhaustion", rules.SeverityCritical)  // 4
	r.open("third", "oom_ahead", rules.SeverityCritical)      // 5
	req := &culpritv1.WatchRequest{MinSeverity: culpritv1.Severity_SEVERITY_WARNING, Rules: []string{"accept_overflow", "oom_ahead"}}

	w := startWatch(t, ts.client, req)
	if got := ids(w.next(t, 3)); !slices.Equal(got, []string{"crit", "third", "warn"}) {
		t.Fatalf("CURRENT for %v, want [crit third warn]", got)
	}
	// Dropped events still move the cursor: the matching one after them
	// arrives, and nothing else does.
	r.update("info")  // 6
	r.update("other") // 7
	r.update("warn")  // 8
	wantEvent(t, w.next(t, 1)[0], culpritv1.FindingEvent_TYPE_UPDATED, 8, "warn")
	w.quiet(t, 100*time.Millisecond)

	// The replay path filters the same way.
	req.SinceSequence = 1
	w2 := startWatch(t, ts.client, req)
	got := w2.next(t, 4)
	for i, want := range []uint64{2, 3, 5, 8} {
		if got[i].GetSequence() != want {
			t.Fatalf("replay from 1 with filters: %s, want sequences 2 3 5 8", describe(got))
		}
	}
	w2.quiet(t, 100*time.Millisecond)

	r.resolve("crit") // 9
	l, err := ts.client.ListFindings(context.Background(), &culpritv1.ListRequest{MinSeverity: culpritv1.Severity_SEVERITY_CRITICAL})
	if err != nil {
		t.Fatal(err)
	}
	var listed []string
	for _, f := range l.GetFindings() {
		listed = append(listed, f.GetId())
	}
	if !slices.Equal(listed, []string{"other", "third"}) || l.GetSequence() != 9 {
		t.Errorf("ListFindings(critical) = %v as of %d, want [other third] as of 9", listed, l.GetSequence())
	}
	l, err = ts.client.ListFindings(context.Background(), &culpritv1.ListRequest{IncludeResolved: true, Rules: []string{"accept_overflow"}})
	if err != nil {
		t.Fatal(err)
	}
	states := map[string]culpritv1.FindingState{}
	for _, f := range l.GetFindings() {
		states[f.GetId()] = f.GetState()
	}
	if len(states) != 3 || states["crit"] != culpritv1.FindingState_FINDING_STATE_RESOLVED || states["warn"] != culpritv1.FindingState_FINDING_STATE_OPEN {
		t.Errorf("ListFindings(include_resolved, accept_overflow) = %v", states)
	}

	_, err = ts.client.ListFindings(context.Background(), &culpritv1.ListRequest{MinSeverity: 42})
	if status.Code(err) != codes.InvalidArgument {
		t.Errorf("ListFindings(min_severity 42): %v, want InvalidArgument", err)
	}
}

func TestGetFinding(t *testing.T) {
	j := rules.NewJournal(64)
	ts := serve(t, GRPCOptions{Journal: j, Store: signals.New(4, 16)})
	r := newRecorder(j)
	r.open("a", "accept_overflow", rules.SeverityCritical)
	r.resolve("a")

	f, err := ts.client.GetFinding(context.Background(), &culpritv1.GetFindingRequest{Id: "a"})
	if err != nil {
		t.Fatalf("GetFinding(a), recently resolved: %v", err)
	}
	if f.GetState() != culpritv1.FindingState_FINDING_STATE_RESOLVED || f.GetSequence() != 2 {
		t.Errorf("GetFinding(a) = state %v sequence %d, want resolved at 2", f.GetState(), f.GetSequence())
	}

	_, err = ts.client.GetFinding(context.Background(), &culpritv1.GetFindingRequest{Id: "no-such-finding"})
	if s := status.Convert(err); s.Code() != codes.NotFound || !strings.Contains(s.Message(), "no-such-finding") {
		t.Errorf("GetFinding(missing): %v, want NotFound naming the id", err)
	}
	_, err = ts.client.GetFinding(context.Background(), &culpritv1.GetFindingRequest{})
	if status.Code(err) != codes.InvalidArgument {
		t.Errorf("GetFinding(empty id): %v, want InvalidArgument", err)
	}
}

func TestGetSnapshot(t *testing.T) {
	store := signals.New(4, 16)
	j := rules.NewJournal(64)
	now := time.Now()
	store.Put(signals.ListenQueueLength, signals.L("port", "8080", "addr", "127.0.0.1"), 17, now)
	store.SetStatus(signals.Status{Component: "sock_diag", Kind: "collector", State: signals.StateDegraded, Detail: "no CAP_NET_ADMIN", Lost: []string{"accept_overflow"}})
	newRecorder(j).open("a", "accept_overflow", rules.SeverityCritical)

	// The test process is a real target: found by PID through /proc.
	res, err := workload.NewResolver("/proc")
	if err != nil {
		t.Fatal(err)
	}
	tr := workload.NewTracker(res, workload.Selector{PID: os.Getpid()}, time.Minute, testLog(t))
	tr.Refresh()

	ts := serve(t, GRPCOptions{Journal: j, Store: store, Tracker: tr, Version: "v1.2.3-test"})
	snap, err := ts.client.GetSnapshot(context.Background(), &culpritv1.SnapshotRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if snap.GetVersion() != "v1.2.3-test" || snap.GetSequence() != 1 || snap.GetTime() == nil {
		t.Errorf("snapshot version %q sequence %d time %v", snap.GetVersion(), snap.GetSequence(), snap.GetTime())
	}
	if len(snap.GetSignals()) != 1 {
		t.Fatalf("signals = %v, want one", snap.GetSignals())
	}
	s := snap.GetSignals()[0]
	labels := map[string]string{}
	for _, l := range s.GetLabels() {
		labels[l.GetName()] = l.GetValue()
	}
	if s.GetName() != signals.ListenQueueLength.Name || s.GetValue() != 17 || s.GetKind() != "gauge" || s.GetHelp() != signals.ListenQueueLength.Help ||
		labels["port"] != "8080" || labels["addr"] != "127.0.0.1" || !s.GetTime().AsTime().Equal(now) {
		t.Errorf("signal = %v", s)
	}
	if len(snap.GetComponents()) != 1 {
		t.Fatalf("components = %v, want one", snap.GetComponents())
	}
	c := snap.GetComponents()[0]
	if c.GetName() != "sock_diag" || c.GetKind() != "collector" || c.GetState() != "degraded" || c.GetDetail() != "no CAP_NET_ADMIN" ||
		!slices.Equal(c.GetLost(), []string{"accept_overflow"}) || c.GetSince() == nil {
		t.Errorf("component = %v", c)
	}
	tg := snap.GetTarget()
	if !tg.GetFound() || tg.GetPid() != int32(os.Getpid()) || tg.GetSelector() != fmt.Sprintf("pid %d", os.Getpid()) || tg.GetNetnsInode() == 0 || tg.GetComm() == "" {
		t.Errorf("target = %v", tg)
	}
}

func TestHealthAndReflection(t *testing.T) {
	ts := serve(t, GRPCOptions{Journal: rules.NewJournal(4), Store: signals.New(4, 16)})
	ctx, cancel := context.WithTimeout(context.Background(), waitFor)
	defer cancel()

	hc := healthpb.NewHealthClient(ts.conn)
	for _, svc := range []string{"", "culprit.v1.Diagnostics"} {
		resp, err := hc.Check(ctx, &healthpb.HealthCheckRequest{Service: svc})
		if err != nil || resp.GetStatus() != healthpb.HealthCheckResponse_SERVING {
			t.Errorf("health %q: %v %v, want SERVING", svc, resp.GetStatus(), err)
		}
	}

	stream, err := reflectionpb.NewServerReflectionClient(ts.conn).ServerReflectionInfo(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := stream.Send(&reflectionpb.ServerReflectionRequest{MessageRequest: &reflectionpb.ServerReflectionRequest_ListServices{}}); err != nil {
		t.Fatal(err)
	}
	resp, err := stream.Recv()
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, s := range resp.GetListServicesResponse().GetService() {
		names = append(names, s.GetName())
	}
	for _, want := range []string{"culprit.v1.Diagnostics", "grpc.health.v1.Health"} {
		if !slices.Contains(names, want) {
			t.Errorf("reflection lists %v, want %s among them", names, want)
		}
	}
	// grpcurl also needs the descriptors, not just the names.
	if err := stream.Send(&reflectionpb.ServerReflectionRequest{MessageRequest: &reflectionpb.ServerReflectionRequest_FileContainingSymbol{FileContainingSymbol: "culprit.v1.Diagnostics"}}); err != nil {
		t.Fatal(err)
	}
	resp, err = stream.Recv()
	if err != nil {
		t.Fatal(err)
	}
	if len(resp.GetFileDescriptorResponse().GetFileDescriptorProto()) == 0 {
		t.Errorf("reflection has no descriptor for culprit.v1.Diagnostics: %v", resp)
	}
}

func TestShutdownEndsWatchersAsUnavailable(t *testing.T) {
	ts := serve(t, GRPCOptions{Journal: rules.NewJournal(4), Store: signals.New(4, 16)})
	w := startWatch(t, ts.client, &culpritv1.WatchRequest{})
	ts.svc.Shutdown()
	select {
	case err := <-w.errc:
		if status.Code(err) != codes.Unavailable {
			t.Errorf("watch ended with %v, want Unavailable", err)
		}
	case <-time.After(waitFor):
		t.Fatal("watch still open after Shutdown")
	}
	resp, err := healthpb.NewHealthClient(ts.conn).Check(context.Background(), &healthpb.HealthCheckRequest{Service: "culprit.v1.Diagnostics"})
	if err != nil || resp.GetStatus() != healthpb.HealthCheckResponse_NOT_SERVING {
		t.Errorf("health after Shutdown: %v %v, want NOT_SERVING", resp.GetStatus(), err)
	}
}

// On shutdown a watcher gets everything the journal holds after its cursor
// (the final state), then Unavailable, so it resumes at the next agent
// from its last sequence.
func TestWatchShutdownFlushesFinalState(t *testing.T) {
	j := rules.NewJournal(64)
	ts := serve(t, GRPCOptions{Journal: j, Store: signals.New(4, 16), MaxBatch: 2})
	r := newRecorder(j)
	r.open("a", "accept_overflow", rules.SeverityCritical) // 1
	r.update("a")                                          // 2
	r.resolve("a")                                         // 3
	r.open("b", "fd_exhaustion", rules.SeverityWarning)    // 4
	ts.svc.Shutdown()
	w := startWatch(t, ts.client, &culpritv1.WatchRequest{SinceSequence: 1})
	got := w.next(t, 3)
	for i, ev := range got {
		if ev.GetSequence() != uint64(i+2) {
			t.Fatalf("flush: %s, want sequences 2..4", describe(got))
		}
	}
	if err := <-w.errc; status.Code(err) != codes.Unavailable {
		t.Errorf("stream ended with %v, want Unavailable", err)
	}
}
