package rules

import (
	"fmt"
	"io"
	"log/slog"
	"strings"
	"testing"
	"time"

	"github.com/culprit-dev/culprit/signals"
)

// scripted reports what the test tells it to, so the lifecycle can be
// driven step by step.
type scripted struct {
	obs   []Observation
	panic bool
}

func (*scripted) Name() string  { return "scripted" }
func (*scripted) Needs() []Need { return nil }
func (s *scripted) Evaluate(Window) []Observation {
	if s.panic {
		panic("boom")
	}
	return s.obs
}

func newTestEngine(r Rule, maxOpen int) (*Engine, *Journal) {
	j := NewJournal(64)
	e := NewEngine([]Rule{r}, signals.New(16, 64), j, nil, EngineOptions{
		Interval: time.Second, ResolveAfter: 3 * time.Second, MinUpdateInterval: time.Second, MaxOpen: maxOpen,
		Log: slog.New(slog.NewTextHandler(io.Discard, nil)),
	})
	return e, j
}

func TestEngineLifecycle(t *testing.T) {
	r := &scripted{}
	e, j := newTestEngine(r, 10)
	t0 := time.Unix(1000, 0)
	obs := Observation{Key: "k", Cause: "c1", Severity: SeverityWarning, RootCause: "n=1"}

	r.obs = []Observation{obs}
	e.Evaluate(t0)
	e.Evaluate(t0.Add(100 * time.Millisecond)) // same observation: nothing new
	// Numbers change within MinUpdateInterval: held back.
	obs.RootCause = "n=2"
	r.obs = []Observation{obs}
	e.Evaluate(t0.Add(500 * time.Millisecond))
	// Cause changes: sent at once.
	obs.Cause = "c2"
	r.obs = []Observation{obs}
	e.Evaluate(t0.Add(600 * time.Millisecond))
	// Evidence gone for less than ResolveAfter, then back: no flap.
	r.obs = nil
	e.Evaluate(t0.Add(2 * time.Second))
	r.obs = []Observation{obs}
	e.Evaluate(t0.Add(3 * time.Second))
	// Gone for good.
	r.obs = nil
	e.Evaluate(t0.Add(5 * time.Second))
	e.Evaluate(t0.Add(6100 * time.Millisecond))

	evs, gap := j.After(0, 100)
	if gap {
		t.Fatal("unexpected gap")
	}
	var types []EventType
	for i, ev := range evs {
		types = append(types, ev.Type)
		if ev.Sequence != uint64(i+1) {
			t.Errorf("event %d has sequence %d: sequences must have no holes", i, ev.Sequence)
		}
		if ev.Finding.ID != evs[0].Finding.ID {
			t.Errorf("finding id changed from %s to %s", evs[0].Finding.ID, ev.Finding.ID)
		}
	}
	want := []EventType{EventOpened, EventUpdated, EventResolved}
	if len(types) != len(want) {
		t.Fatalf("events = %v, want %v", types, want)
	}
	for i := range want {
		if types[i] != want[i] {
			t.Fatalf("events = %v, want %v", types, want)
		}
	}
	if evs[1].Finding.Cause != "c2" {
		t.Errorf("update carries cause %q, want c2", evs[1].Finding.Cause)
	}
	if open, _ := j.Open(); len(open) != 0 {
		t.Errorf("%d findings still open after resolve", len(open))
	}
	if f, ok := j.Get(evs[0].Finding.ID); !ok || f.State != StateResolved {
		t.Errorf("resolved finding not retrievable: %v %v", ok, f.State)
	}
}

func TestEngineBoundsAndContainsPanics(t *testing.T) {
	r := &scripted{obs: []Observation{{Key: "a"}, {Key: "b"}, {Key: "c"}}}
	e, j := newTestEngine(r, 2)
	e.Evaluate(time.Unix(1, 0))
	if open, _ := j.Open(); len(open) != 2 {
		t.Fatalf("%d open, want the bound of 2", len(open))
	}
	if e.Stats().Dropped != 1 {
		t.Errorf("dropped = %d, want 1", e.Stats().Dropped)
	}
	r.panic = true
	e.Evaluate(time.Unix(2, 0)) // must not panic
}

func TestJournalGapAndBound(t *testing.T) {
	j := NewJournal(4)
	for i := 0; i < 10; i++ {
		j.Record(EventOpened, Finding{ID: string(rune('a' + i))}, time.Unix(int64(i), 0))
	}
	evs, gap := j.After(2, 100)
	if !gap {
		t.Fatal("no gap reported after the ring dropped events 3..6")
	}
	if len(evs) != 4 || evs[0].Sequence != 7 || evs[3].Sequence != 10 {
		t.Fatalf("got %d events from %d, want 7..10", len(evs), evs[0].Sequence)
	}
	if evs, gap := j.After(8, 1); gap || len(evs) != 1 || evs[0].Sequence != 9 {
		t.Fatalf("After(8,1) = %v gap=%v", evs, gap)
	}
	if evs, _ := j.After(10, 100); len(evs) != 0 {
		t.Fatalf("After(newest) returned %d events", len(evs))
	}
}

// named is a scripted rule under another name; symptomRule a scripted
// symptom (as latency_spike is).
type named struct {
	scripted
	name string
}

func (n *named) Name() string { return n.name }

type symptomRule struct{ named }

func (*symptomRule) Symptom() {}

// newPairEngine is an engine of rules rs with a 2 s hold-down, and its
// journal.
func newPairEngine(rs ...Rule) (*Engine, *Journal) {
	j := NewJournal(64)
	return NewEngine(rs, signals.New(16, 64), j, nil, EngineOptions{
		Interval: time.Second, ResolveAfter: 2 * time.Second, MinUpdateInterval: time.Second, MaxOpen: 10,
		Log: slog.New(slog.NewTextHandler(io.Discard, nil)),
	}), j
}

// A latency spike whose slow traces the blocking-worker finding carries is
// that finding's symptom: it is not reported on its own, and the blocking
// finding names the route. A spike on other traces is reported.
func TestEngineExplainsSymptoms(t *testing.T) {
	cause := &named{name: "blocking_worker"}
	spike := &symptomRule{named{name: "latency_spike"}}
	e, j := newPairEngine(cause, spike)
	trace := func(id string) Artifact { return Artifact{Kind: "trace", Value: id} }
	cause.obs = []Observation{{Key: "worker", Title: "blocked", Artifacts: []Artifact{trace("a"), trace("b")}}}
	spike.obs = []Observation{{Key: "/checkout", Title: "Latency spike on /checkout", Artifacts: []Artifact{trace("x"), trace("b")}}}
	t0 := time.Unix(1000, 0)
	e.Evaluate(t0)
	open, _ := j.Open()
	if len(open) != 1 || open[0].Rule != "blocking_worker" {
		t.Fatalf("open findings %+v, want only blocking_worker", open)
	}
	var route bool
	for _, a := range open[0].Artifacts {
		route = route || (a.Kind == "route" && a.Value == "/checkout")
	}
	if !route {
		t.Errorf("the explaining finding does not name the route: %+v", open[0].Artifacts)
	}
	if n := len(cause.obs[0].Artifacts); n != 2 {
		t.Errorf("the rule's own observation was changed: %d artifacts", n)
	}

	// The cause is no longer observed but still open (hold-down): it
	// still explains the spike.
	cause.obs = nil
	e.Evaluate(t0.Add(time.Second))
	if open, _ := j.Open(); len(open) != 1 || open[0].Rule != "blocking_worker" {
		t.Fatalf("during the hold-down: open %+v", open)
	}

	// Unrelated slow traces: the spike is its own finding.
	spike.obs = []Observation{{Key: "/search", Title: "Latency spike on /search", Artifacts: []Artifact{trace("y")}}}
	e.Evaluate(t0.Add(1500 * time.Millisecond))
	open, _ = j.Open()
	var spikes []string
	for _, f := range open {
		if f.Rule == "latency_spike" {
			spikes = append(spikes, f.Key)
		}
	}
	if len(spikes) != 1 || spikes[0] != "/search" {
		t.Errorf("latency_spike findings %v, want [/search]", spikes)
	}
}

// facetRule is a scripted rule that is a facet of accept_overflow's
// app_not_accepting, as throughput_plateau is.
type facetRule struct{ named }

func (*facetRule) FacetOf() []RuleCause {
	return []RuleCause{{Rule: "accept_overflow", Cause: CauseAppNotAccepting}}
}

// A plateau on a listener whose app stopped accepting is the stall seen
// from another side: not reported while the stall is observed or open on
// the same listener (an open plateau resolves), reported on another
// listener, or beside another cause on the same one.
func TestEngineExplainsFacets(t *testing.T) {
	stall := &named{name: "accept_overflow"}
	plateau := &facetRule{named{name: "throughput_plateau"}}
	e, j := newPairEngine(plateau, stall)
	openRules := func() map[string]bool {
		open, _ := j.Open()
		out := map[string]bool{}
		for _, f := range open {
			out[f.Rule+"/"+f.Key] = true
		}
		return out
	}
	t0 := time.Unix(1000, 0)
	at := func(d time.Duration) time.Time { return t0.Add(d) }

	// The plateau first (it opens), then the stall on the same listener:
	// the plateau is explained and resolves after its hold-down.
	plateau.obs = []Observation{{Key: ":8080", Cause: CauseWaitingNotWorking}}
	e.Evaluate(at(0))
	if !openRules()["throughput_plateau/:8080"] {
		t.Fatalf("plateau alone did not open: %v", openRules())
	}
	stall.obs = []Observation{{Key: ":8080", Cause: CauseAppNotAccepting}}
	e.Evaluate(at(time.Second))
	e.Evaluate(at(4 * time.Second))
	if got := openRules(); got["throughput_plateau/:8080"] || !got["accept_overflow/:8080"] {
		t.Fatalf("with the stall open: %v, want accept_overflow only", got)
	}
	// The stall no longer observed but open (hold-down): still explains.
	stall.obs = nil
	e.Evaluate(at(4500 * time.Millisecond))
	if openRules()["throughput_plateau/:8080"] {
		t.Fatalf("during the stall's hold-down the plateau opened: %v", openRules())
	}
	// Another listener, and another cause on the same listener: reported.
	e.Evaluate(at(10 * time.Second)) // the stall resolves
	stall.obs = []Observation{{Key: ":8080", Cause: CauseBacklogTooSmall}}
	plateau.obs = []Observation{{Key: ":8080", Cause: CauseWaitingNotWorking}, {Key: ":9090", Cause: CauseWaitingNotWorking}}
	e.Evaluate(at(11 * time.Second))
	if got := openRules(); !got["throughput_plateau/:8080"] || !got["throughput_plateau/:9090"] {
		t.Errorf("plateaus beside backlog_too_small and on another listener: %v, want both open", got)
	}
	// A facet that names a thread is explained only by the same thread.
	thread := func(v string) []Artifact { return []Artifact{{Kind: "thread", Value: v}} }
	stall.obs = []Observation{{Key: ":7070", Cause: CauseAppNotAccepting, Artifacts: thread("worker-2 (tid 12)")}}
	plateau.obs = []Observation{{Key: ":7070", Cause: CauseWaitingNotWorking, Artifacts: thread("worker-0 (tid 10)")}}
	e.Evaluate(at(12 * time.Second))
	if got := openRules(); !got["throughput_plateau/:7070"] {
		t.Errorf("a facet on another thread than the cause's was explained: %v", got)
	}
	stall.obs[0].Key, plateau.obs[0].Key = ":6060", ":6060"
	plateau.obs[0].Artifacts = thread("worker-2 (tid 12)")
	e.Evaluate(at(13 * time.Second))
	if got := openRules(); got["throughput_plateau/:6060"] {
		t.Errorf("a facet on the cause's thread was reported: %v", got)
	}
}

// One fault, one finding: an episode that goes quiet for less than its
// Linger (a burst every few seconds) stays one finding; numbers that drift
// under update_threshold are not events (but are current in the journal's
// open findings); what a finding learned (its thread, stack, function)
// stays when later observations no longer carry it.
func TestEngineOneFaultOneFinding(t *testing.T) {
	r := &scripted{}
	j := NewJournal(64)
	e := NewEngine([]Rule{r}, signals.New(16, 64), j, nil, EngineOptions{
		Interval: time.Second, ResolveAfter: 3 * time.Second, MinUpdateInterval: time.Second, MaxOpen: 10,
		UpdateThreshold: 0.2, Log: slog.New(slog.NewTextHandler(io.Discard, nil)),
	})
	t0 := time.Unix(1000, 0)
	ev := func(v float64) []Evidence { return []Evidence{{Signal: "drops", Value: v}} }
	thread := []Artifact{{Kind: "thread", Value: "worker-1 (tid 7)"}, {Kind: "frame", Value: "app.fsync"}}
	burst := Observation{Key: ":8080", Cause: "c", Severity: SeverityWarning, Evidence: ev(100), Artifacts: thread, Linger: 10 * time.Second}
	at := func(d time.Duration) time.Time { return t0.Add(d) }
	// Bursts 6 s apart: quiet longer than resolve_after, shorter than Linger.
	for i := 0; i < 4; i++ {
		r.obs = []Observation{burst}
		e.Evaluate(at(time.Duration(6*i) * time.Second))
		r.obs = nil
		e.Evaluate(at(time.Duration(6*i)*time.Second + 4*time.Second))
	}
	// Numbers drift by 10%: no event, but the open finding is current.
	drift := burst
	drift.Evidence, drift.Artifacts = ev(110), nil // and the thread is no longer seen
	r.obs = []Observation{drift}
	e.Evaluate(at(25 * time.Second))
	open, _ := j.Open()
	if len(open) != 1 || open[0].Evidence[0].Value != 110 {
		t.Fatalf("open findings %+v, want the one finding with the current value", open)
	}
	var keptThread bool
	for _, a := range open[0].Artifacts {
		keptThread = keptThread || (a.Kind == "frame" && a.Value == "app.fsync")
	}
	if !keptThread {
		t.Errorf("the finding forgot the function it had named: %+v", open[0].Artifacts)
	}
	// A material move (x2) is an event.
	drift.Evidence = ev(220)
	r.obs = []Observation{drift}
	e.Evaluate(at(27 * time.Second))
	// Quiet past Linger: resolved, once.
	r.obs = nil
	e.Evaluate(at(38 * time.Second))
	evs, _ := j.After(0, 100)
	var types []EventType
	for _, ev := range evs {
		types = append(types, ev.Type)
	}
	want := []EventType{EventOpened, EventUpdated, EventResolved}
	if fmt.Sprint(types) != fmt.Sprint(want) {
		t.Fatalf("events %v, want %v", types, want)
	}
	if evs[1].Finding.Evidence[0].Value != 220 {
		t.Errorf("the update carries %v", evs[1].Finding.Evidence)
	}
}

// A windowed count that rises with each burst and falls between them is
// news when it leaves the range already told (a new high or a new low),
// not each time it swings back inside it.
func TestEngineUpdatesOnlyBeyondWhatWasTold(t *testing.T) {
	r := &scripted{}
	j := NewJournal(64)
	e := NewEngine([]Rule{r}, signals.New(16, 64), j, nil, EngineOptions{
		Interval: time.Second, ResolveAfter: 3 * time.Second, MinUpdateInterval: time.Second, MaxOpen: 10,
		UpdateThreshold: 0.2, Log: slog.New(slog.NewTextHandler(io.Discard, nil)),
	})
	t0 := time.Unix(1000, 0)
	values := []float64{700, 1000, 400, 1000, 420, 980, 700, 1300, 450, 1250}
	for i, v := range values {
		r.obs = []Observation{{Key: "k", Cause: "c", Severity: SeverityWarning, Evidence: []Evidence{{Signal: "drops", Value: v}}}}
		e.Evaluate(t0.Add(time.Duration(2*i) * time.Second))
	}
	evs, _ := j.After(0, 100)
	var got []float64
	for _, ev := range evs {
		got = append(got, ev.Finding.Evidence[0].Value)
	}
	// 700 opens; 1000 (+43%) and 400 (-43%) leave the range; 1300 (+30%
	// over 1000) does; the swings inside 400..1000 (and 1250) do not.
	if want := []float64{700, 1000, 400, 1300}; fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("events carry %v, want %v", got, want)
	}
	// A new cause starts a new range: its first numbers are news.
	r.obs = []Observation{{Key: "k", Cause: "other", Severity: SeverityWarning, Evidence: []Evidence{{Signal: "drops", Value: 800}}}}
	e.Evaluate(t0.Add(30 * time.Second))
	r.obs = []Observation{{Key: "k", Cause: "other", Severity: SeverityWarning, Evidence: []Evidence{{Signal: "drops", Value: 1100}}}}
	e.Evaluate(t0.Add(32 * time.Second))
	evs, _ = j.After(0, 100)
	if n := len(evs); n != 6 {
		t.Errorf("%d events after the cause changed and its count rose 37%%, want 6", n)
	}
}

// A material change that arrives within min_update_interval of the last
// event is held back, then sent once the interval is over, even though
// the finding's current state already holds it.
func TestEngineSendsAHeldBackChange(t *testing.T) {
	r := &scripted{}
	j := NewJournal(64)
	e := NewEngine([]Rule{r}, signals.New(16, 64), j, nil, EngineOptions{
		Interval: time.Second, ResolveAfter: 3 * time.Second, MinUpdateInterval: time.Second, MaxOpen: 10,
		UpdateThreshold: 0.2, Log: slog.New(slog.NewTextHandler(io.Discard, nil)),
	})
	t0 := time.Unix(1000, 0)
	o := Observation{Key: "k", Cause: "c", Severity: SeverityWarning, Evidence: []Evidence{{Signal: "x", Value: 1}}}
	r.obs = []Observation{o}
	e.Evaluate(t0)
	// A new frame is learned 100 ms later: material, but too soon.
	o.Artifacts = []Artifact{{Kind: "frame", Value: "app.hot"}}
	r.obs = []Observation{o}
	e.Evaluate(t0.Add(100 * time.Millisecond))
	e.Evaluate(t0.Add(1500 * time.Millisecond))
	evs, _ := j.After(0, 10)
	if len(evs) != 2 || evs[1].Type != EventUpdated || len(evs[1].Finding.Artifacts) != 1 {
		t.Fatalf("events %+v: the held-back frame was never sent", evs)
	}
}

// A symptom that stops while its finding stays open changes the words from
// present to past ("still grows" to "has not grown since") with no number
// moving: watchers are told, once, and told again if it resumes.
func TestEngineTellsASymptomThatStopped(t *testing.T) {
	r := &scripted{}
	j := NewJournal(64)
	e := NewEngine([]Rule{r}, signals.New(16, 64), j, nil, EngineOptions{
		Interval: time.Second, ResolveAfter: 3 * time.Second, MinUpdateInterval: time.Second, MaxOpen: 10,
		UpdateThreshold: 0.2, Log: slog.New(slog.NewTextHandler(io.Discard, nil)),
	})
	t0 := time.Unix(1000, 0)
	o := Observation{Key: "k", Cause: "c", Severity: SeverityWarning, Symptom: "grew and still grows", Evidence: []Evidence{{Signal: "rate", Value: 100}}}
	step := func(i int, stopped bool, words string) {
		o.Stopped, o.Symptom = stopped, words
		o.StopEstimated = strings.Contains(words, "about")
		r.obs = []Observation{o}
		e.Evaluate(t0.Add(time.Duration(i) * time.Second))
	}
	step(0, false, "grew and still grows")
	// An estimated stop, then the measured one: both are news.
	step(2, true, "grew and slowed or stopped about 12:00:01")
	step(4, true, "grew and has not grown since 12:00:01")
	step(6, true, "grew and has not grown since 12:00:01")
	step(8, false, "grew and still grows")
	evs, _ := j.After(0, 10)
	var got []string
	for _, ev := range evs {
		got = append(got, fmt.Sprintf("%v:%s", ev.Type, ev.Finding.Symptom))
	}
	want := []string{
		fmt.Sprintf("%v:grew and still grows", EventOpened),
		fmt.Sprintf("%v:grew and slowed or stopped about 12:00:01", EventUpdated),
		fmt.Sprintf("%v:grew and has not grown since 12:00:01", EventUpdated),
		fmt.Sprintf("%v:grew and still grows", EventUpdated),
	}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("events %q, want %q", got, want)
	}
}
