package exporters

import (
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"strings"
	"sync"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/culprit-dev/culprit/rules"
	"github.com/culprit-dev/culprit/signals"
	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
)

// scrape fetches /metrics through a real HTTP server, parses it and
// returns the families and the raw text.
func scrape(t *testing.T, p *Prometheus) (map[string]*dto.MetricFamily, string) {
	t.Helper()
	srv := httptest.NewServer(p.Handler(NewRegistry(p)))
	defer srv.Close()
	resp, err := http.Get(srv.URL)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("scrape: %s\n%s", resp.Status, body)
	}
	parser := expfmt.NewTextParser(model.LegacyValidation)
	fams, err := parser.TextToMetricFamilies(strings.NewReader(string(body)))
	if err != nil {
		t.Fatalf("parse exposition: %v\n%s", err, body)
	}
	return fams, string(body)
}

// value finds the sample of name whose labels include want; ok is false
// when there is none.
func value(fams map[string]*dto.MetricFamily, name string, want map[string]string) (v float64, typ dto.MetricType, ok bool) {
	mf := fams[name]
	if mf == nil {
		return 0, 0, false
	}
outer:
	for _, m := range mf.GetMetric() {
		have := map[string]string{}
		for _, lp := range m.GetLabel() {
			have[lp.GetName()] = lp.GetValue()
		}
		for k, v := range want {
			if have[k] != v {
				continue outer
			}
		}
		switch mf.GetType() {
		case dto.MetricType_COUNTER:
			return m.GetCounter().GetValue(), mf.GetType(), true
		case dto.MetricType_GAUGE:
			return m.GetGauge().GetValue(), mf.GetType(), true
		default:
			return m.GetUntyped().GetValue(), mf.GetType(), true
		}
	}
	return 0, 0, false
}

func wantValue(t *testing.T, fams map[string]*dto.MetricFamily, name string, labels map[string]string, typ dto.MetricType, want float64) {
	t.Helper()
	v, gotTyp, ok := value(fams, name, labels)
	switch {
	case !ok:
		t.Errorf("%s%v missing", name, labels)
	case gotTyp != typ:
		t.Errorf("%s is a %v, want %v", name, gotTyp, typ)
	case v != want:
		t.Errorf("%s%v = %v, want %v", name, labels, v, want)
	}
}

// promtoolCheck runs the real promtool on the exposition. CI installs it;
// a developer machine without it skips loudly rather than passing quietly.
func promtoolCheck(t *testing.T, exposition string) {
	t.Helper()
	if _, err := exec.LookPath("promtool"); err != nil {
		if os.Getenv("CI") != "" {
			t.Fatal("promtool missing: .ci/run must install the prometheus package")
		}
		fmt.Fprintln(os.Stderr, "!!! SKIP promtool check metrics: promtool not on PATH (apt-get install prometheus) !!!")
		t.Skip("promtool not on PATH; the exposition was not linted")
	}
	cmd := exec.Command("promtool", "check", "metrics")
	cmd.Stdin = strings.NewReader(exposition)
	out, err := cmd.CombinedOutput()
	if err != nil || strings.TrimSpace(string(out)) != "" {
		t.Errorf("promtool check metrics: %v\n%s", err, out)
	}
}

// A counter declared without _total (as signals.FindingsExported is):
// exported with it.
var retransDesc = &signals.Desc{Name: "tcp_synack_retransmits", Kind: signals.Counter, Help: "SYN-ACKs retransmitted."}

func TestPrometheusExposition(t *testing.T) {
	store := signals.New(4, 4)
	now := time.Now()
	store.Put(signals.ListenQueueLength, signals.L("port", "8080"), 5, now)
	store.Put(signals.ListenQueueLength, signals.L("port", "9090"), 0, now)
	store.Put(signals.ListenOverflowsTotal, signals.L("port", "8080"), 7, now)
	store.Put(retransDesc, nil, 3, now)
	store.Put(signals.ListenQueueLength, signals.L("port", "1"), 1, now) // the fifth series is dropped
	store.SetStatus(signals.Status{Component: "netstat", Kind: "collector", State: signals.StateRunning})
	store.SetStatus(signals.Status{Component: "runqlat", Kind: "probe", State: signals.StateFailed, Detail: "no CAP_BPF"})

	j := rules.NewJournal(64)
	r := newRecorder(j)
	r.open("a", "accept_overflow", rules.SeverityCritical)
	r.open("b", "accept_overflow", rules.SeverityCritical)
	r.update("a")
	r.open("c", "fd_exhaustion", rules.SeverityWarning)
	r.open("gone", "fd_exhaustion", rules.SeverityInfo)
	r.resolve("gone")
	_, unsubscribe := j.Subscribe() // one watcher
	defer unsubscribe()

	p := NewPrometheus(PromOptions{Store: store, Journal: j, Log: testLog(t)})
	fams, body := scrape(t, p)
	G, C := dto.MetricType_GAUGE, dto.MetricType_COUNTER

	wantValue(t, fams, "culprit_listen_queue_length", map[string]string{"port": "8080"}, G, 5)
	wantValue(t, fams, "culprit_listen_queue_length", map[string]string{"port": "9090"}, G, 0)
	wantValue(t, fams, "culprit_listen_overflows_total", map[string]string{"port": "8080"}, C, 7)
	wantValue(t, fams, "culprit_tcp_synack_retransmits_total", nil, C, 3)
	if h := fams["culprit_listen_queue_length"].GetHelp(); h != signals.ListenQueueLength.Help {
		t.Errorf("help = %q, want the Desc's", h)
	}

	wantValue(t, fams, "culprit_findings_active", map[string]string{"rule": "accept_overflow", "severity": "critical"}, G, 2)
	wantValue(t, fams, "culprit_findings_active", map[string]string{"rule": "fd_exhaustion", "severity": "warning"}, G, 1)
	wantValue(t, fams, "culprit_finding_active", map[string]string{
		"id": "a", "rule": "accept_overflow", "severity": "critical", "cause": "app_not_accepting", "key": "127.0.0.1:8080", "port": "8080",
	}, G, 1)
	if n := len(fams["culprit_finding_active"].GetMetric()); n != 3 {
		t.Errorf("culprit_finding_active has %d series, want one per open finding (3)", n)
	}
	wantValue(t, fams, "culprit_findings_events_total", map[string]string{"type": "opened"}, C, 4)
	wantValue(t, fams, "culprit_findings_events_total", map[string]string{"type": "updated"}, C, 1)
	wantValue(t, fams, "culprit_findings_events_total", map[string]string{"type": "resolved"}, C, 1)
	wantValue(t, fams, "culprit_findings_events_total", map[string]string{"type": "unknown"}, C, 0)

	wantValue(t, fams, "culprit_signals_series", nil, G, 4)
	wantValue(t, fams, "culprit_signals_series_max", nil, G, 4)
	wantValue(t, fams, "culprit_signals_dropped_samples_total", nil, C, 1)
	wantValue(t, fams, "culprit_component_up", map[string]string{"component": "netstat", "kind": "collector", "state": "running"}, G, 1)
	wantValue(t, fams, "culprit_component_up", map[string]string{"component": "runqlat", "kind": "probe", "state": "failed"}, G, 0)
	wantValue(t, fams, "culprit_watchers", nil, G, 1)
	wantValue(t, fams, "culprit_metrics_skipped_series", map[string]string{"reason": skipKind}, G, 0)
	// The agent's own CPU and memory come from the standard collectors.
	for _, name := range []string{"process_cpu_seconds_total", "process_resident_memory_bytes", "go_goroutines"} {
		if fams[name] == nil {
			t.Errorf("%s missing from the registry", name)
		}
	}
	promtoolCheck(t, body)

	// Resolving keeps the (rule, severity) series at 0 and drops the
	// finding's own series; the event counters carry on.
	r.resolve("a")
	r.resolve("b")
	fams, _ = scrape(t, p)
	wantValue(t, fams, "culprit_findings_active", map[string]string{"rule": "accept_overflow", "severity": "critical"}, G, 0)
	if _, _, ok := value(fams, "culprit_finding_active", map[string]string{"id": "a"}); ok {
		t.Error("culprit_finding_active still has the resolved finding a")
	}
	wantValue(t, fams, "culprit_findings_events_total", map[string]string{"type": "resolved"}, C, 3)
}

// Events that leave the ring between scrapes are still counted, as
// unknown, so the counters add up to the journal's sequence.
func TestPrometheusEventsBeyondTheRing(t *testing.T) {
	j := rules.NewJournal(4)
	r := newRecorder(j)
	r.open("a", "accept_overflow", rules.SeverityCritical)
	p := NewPrometheus(PromOptions{Store: signals.New(4, 16), Journal: j})
	fams, _ := scrape(t, p)
	wantValue(t, fams, "culprit_findings_events_total", map[string]string{"type": "opened"}, dto.MetricType_COUNTER, 1)
	for range 9 {
		r.update("a")
	}
	fams, _ = scrape(t, p)
	var sum float64
	for _, typ := range []string{"opened", "updated", "resolved", "unknown"} {
		v, _, _ := value(fams, "culprit_findings_events_total", map[string]string{"type": typ})
		sum += v
	}
	wantValue(t, fams, "culprit_findings_events_total", map[string]string{"type": "updated"}, dto.MetricType_COUNTER, 4)
	wantValue(t, fams, "culprit_findings_events_total", map[string]string{"type": "unknown"}, dto.MetricType_COUNTER, 5)
	if sum != float64(j.Sequence()) {
		t.Errorf("events_total sums to %v, journal sequence is %d", sum, j.Sequence())
	}
}

// Collectors may declare one name twice, with different label names or
// kinds, or use names Prometheus cannot take. The scrape must still succeed
// and lint clean, leaving out (and counting) only what cannot be exported.
func TestPrometheusInconsistentSignals(t *testing.T) {
	store := signals.New(4, 64)
	now := time.Now()
	mixedA := &signals.Desc{Name: "mixed_level", Kind: signals.Gauge, Help: "First declaration."}
	mixedB := &signals.Desc{Name: "mixed_level", Kind: signals.Gauge, Help: "Second declaration, other help."}
	mixedCounter := &signals.Desc{Name: "mixed_level", Kind: signals.Counter, Help: "Declared as a counter too."}
	store.Put(mixedA, signals.L("port", "80"), 1, now)
	store.Put(mixedB, signals.L("thread", "worker-1"), 2, now)
	store.Put(mixedB, nil, 3, now)
	store.Put(mixedCounter, signals.L("zone", "z"), 4, now)
	store.Put(&signals.Desc{Name: "camelCase", Kind: signals.Gauge, Help: "x"}, nil, 1, now)
	store.Put(&signals.Desc{Name: "threads_total", Kind: signals.Gauge, Help: "A gauge named like a counter."}, nil, 1, now)
	store.Put(&signals.Desc{Name: "watchers", Kind: signals.Gauge, Help: "Clashes with culprit_watchers."}, nil, 1, now)
	store.Put(&signals.Desc{Name: "bad_labels", Kind: signals.Gauge, Help: "x"}, signals.L("Bad-Name", "1"), 1, now)
	store.Put(&signals.Desc{Name: "bad_labels", Kind: signals.Gauge, Help: "x"}, signals.Labels{{Name: "a", Value: "1"}, {Name: "a", Value: "2"}}, 1, now)
	store.Put(&signals.Desc{Name: "bad_labels", Kind: signals.Gauge, Help: "x"}, signals.L("__reserved", "1"), 1, now)
	store.Put(&signals.Desc{Name: "bad_value", Kind: signals.Gauge, Help: "x"}, signals.L("path", "caf\xe9"), 1, now)
	store.Put(&signals.Desc{Name: "no_help", Kind: signals.Gauge}, nil, 1, now)
	// Two counters that both become culprit_retrans_total.
	store.Put(&signals.Desc{Name: "retrans", Kind: signals.Counter, Help: "x"}, nil, 1, now)
	store.Put(&signals.Desc{Name: "retrans_total", Kind: signals.Counter, Help: "x"}, nil, 2, now)

	p := NewPrometheus(PromOptions{Store: store, Journal: rules.NewJournal(4), Log: testLog(t)})
	fams, body := scrape(t, p)
	G := dto.MetricType_GAUGE
	wantValue(t, fams, "culprit_mixed_level", map[string]string{"port": "80"}, G, 1)
	wantValue(t, fams, "culprit_mixed_level", map[string]string{"thread": "worker-1"}, G, 2)
	if n := len(fams["culprit_mixed_level"].GetMetric()); n != 3 {
		t.Errorf("culprit_mixed_level has %d series, want the three gauges", n)
	}
	wantValue(t, fams, "culprit_bad_value", map[string]string{"path": "caf\uFFFD"}, G, 1)
	wantValue(t, fams, "culprit_no_help", nil, G, 1)
	if fams["culprit_no_help"].GetHelp() == "" {
		t.Error("culprit_no_help has no help text")
	}
	// retrans sorts first and takes the name; retrans_total is the clash.
	wantValue(t, fams, "culprit_retrans_total", nil, dto.MetricType_COUNTER, 1)
	wantValue(t, fams, "culprit_watchers", nil, G, 0)
	for reason, want := range map[string]float64{skipKind: 1, skipInvalidName: 2, skipNameClash: 2, skipLabels: 3, skipDuplicate: 0} {
		wantValue(t, fams, "culprit_metrics_skipped_series", map[string]string{"reason": reason}, G, want)
	}
	for _, name := range []string{"culprit_camelCase", "culprit_threads_total", "culprit_bad_labels"} {
		if fams[name] != nil {
			t.Errorf("%s exported, want it skipped", name)
		}
	}
	promtoolCheck(t, body)
}

// Scrapes race with the engine and collectors writing; -race checks it.
func TestPrometheusConcurrentScrapes(t *testing.T) {
	store := signals.New(8, 256)
	j := rules.NewJournal(16)
	p := NewPrometheus(PromOptions{Store: store, Journal: j})
	srv := httptest.NewServer(p.Handler(NewRegistry(p)))
	defer srv.Close()

	var wg sync.WaitGroup
	stop := make(chan struct{})
	wg.Add(1)
	go func() {
		defer wg.Done()
		r := newRecorder(j)
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			default:
			}
			id := fmt.Sprintf("f%d", i%8)
			f, seen := r.byID[id]
			switch open := seen && f.State == rules.StateOpen; {
			case open && i%3 == 0:
				r.resolve(id)
			case open:
				r.update(id)
			default:
				r.open(id, "accept_overflow", rules.SeverityCritical)
			}
			store.Put(signals.ListenQueueLength, signals.L("port", fmt.Sprint(i%100)), float64(i), time.Now())
		}
	}()
	for range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range 20 {
				resp, err := http.Get(srv.URL)
				if err != nil {
					t.Error(err)
					return
				}
				io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
				if resp.StatusCode != http.StatusOK {
					t.Errorf("scrape: %s", resp.Status)
					return
				}
			}
		}()
	}
	time.Sleep(200 * time.Millisecond)
	close(stop)
	wg.Wait()
}

type engineStats rules.EngineStats

func (s engineStats) Stats() rules.EngineStats { return rules.EngineStats(s) }

// finding_info carries an open finding's title and remediation as first
// scraped: a later title with new numbers does not start a new series
// (alerts quote it without flapping), an oversized text is cut at a rune
// boundary, and a resolved finding's info goes. The engine's counters are
// exported beside it.
func TestPrometheusFindingInfo(t *testing.T) {
	j := rules.NewJournal(64)
	r := newRecorder(j)
	f := r.open("a", "accept_overflow", rules.SeverityCritical).Finding
	f.Title, f.Remediation = "Accept queue of :8080 overflowing: 30 dropped", strings.Repeat("é", 600)+" Raise the backlog."
	j.Record(rules.EventUpdated, f, r.now)
	p := NewPrometheus(PromOptions{Journal: j, Log: testLog(t), Engine: engineStats{Evaluations: 42, Dropped: 3}})
	fams, body := scrape(t, p)
	ms := fams["culprit_finding_info"].GetMetric()
	if len(ms) != 1 {
		t.Fatalf("culprit_finding_info has %d series, want 1", len(ms))
	}
	labels := map[string]string{}
	for _, lp := range ms[0].GetLabel() {
		labels[lp.GetName()] = lp.GetValue()
	}
	if labels["title"] != f.Title || labels["id"] != "a" || labels["key"] != f.Key {
		t.Errorf("labels %v", labels)
	}
	if rem := labels["remediation"]; len(rem) > maxInfoText || !utf8.ValidString(rem) || !strings.HasSuffix(rem, "…") {
		t.Errorf("remediation of %d bytes, valid UTF-8 %v: %q", len(rem), utf8.ValidString(rem), rem[max(0, len(rem)-12):])
	}
	wantValue(t, fams, "culprit_rules_evaluations_total", nil, dto.MetricType_COUNTER, 42)
	wantValue(t, fams, "culprit_findings_dropped_total", nil, dto.MetricType_COUNTER, 3)
	promtoolCheck(t, body)

	f.Title = "Accept queue of :8080 overflowing: 60 dropped"
	j.Record(rules.EventUpdated, f, r.now)
	fams, _ = scrape(t, p)
	if _, _, ok := value(fams, "culprit_finding_info", map[string]string{"id": "a", "title": "Accept queue of :8080 overflowing: 30 dropped"}); !ok {
		t.Errorf("the title changed on the series: %v", fams["culprit_finding_info"].GetMetric())
	}
	r.resolve("a")
	fams, _ = scrape(t, p)
	if n := len(fams["culprit_finding_info"].GetMetric()); n != 0 || len(p.infoText) != 0 {
		t.Errorf("after the finding resolved: %d series, %d texts kept", n, len(p.infoText))
	}
}

// slowRule reports one observation per key in keys, taking a millisecond
// to do so, so that the engine's evaluation time is measurable.
type slowRule struct {
	mu   sync.Mutex
	keys []string
}

func (*slowRule) Name() string        { return "slow" }
func (*slowRule) Needs() []rules.Need { return nil }

func (r *slowRule) set(keys ...string) {
	r.mu.Lock()
	r.keys = keys
	r.mu.Unlock()
}

func (r *slowRule) Evaluate(rules.Window) []rules.Observation {
	time.Sleep(time.Millisecond)
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []rules.Observation
	for _, k := range r.keys {
		out = append(out, rules.Observation{Key: k, Cause: "slow", Title: "slow " + k, Severity: rules.SeverityWarning})
	}
	return out
}

// The real engine's own stats on /metrics, scraped through the handler
// the agent serves: they start at 0 and move as the engine evaluates,
// opens, drops and resolves findings.
func TestPrometheusEngineStats(t *testing.T) {
	store := signals.New(16, 64)
	j := rules.NewJournal(64)
	r := &slowRule{}
	e := rules.NewEngine([]rules.Rule{r}, store, j, nil, rules.EngineOptions{MaxOpen: 1, ResolveAfter: time.Second, Log: testLog(t)})
	p := NewPrometheus(PromOptions{Store: store, Journal: j, Engine: e, Log: testLog(t)})
	engineValues := func() map[string]float64 {
		t.Helper()
		fams, body := scrape(t, p)
		out := map[string]float64{}
		for _, m := range []struct {
			name string
			typ  dto.MetricType
		}{
			{"culprit_rules_evaluations_total", dto.MetricType_COUNTER},
			{"culprit_findings_dropped_total", dto.MetricType_COUNTER},
			{"culprit_engine_findings_opened_total", dto.MetricType_COUNTER},
			{"culprit_engine_findings_open", dto.MetricType_GAUGE},
			{"culprit_engine_evaluation_seconds_total", dto.MetricType_COUNTER},
			{"culprit_engine_last_evaluation_seconds", dto.MetricType_GAUGE},
		} {
			v, typ, ok := value(fams, m.name, nil)
			if !ok || typ != m.typ {
				t.Fatalf("%s: present %v, type %v; want a %v\n%s", m.name, ok, typ, m.typ, body)
			}
			out[strings.TrimPrefix(m.name, "culprit_")] = v
		}
		return out
	}
	for name, v := range engineValues() {
		if v != 0 {
			t.Errorf("before any evaluation %s = %v, want 0", name, v)
		}
	}

	now := time.Unix(1700000000, 0)
	r.set("a", "b") // one opens, the other is beyond max_open_findings
	e.Evaluate(now)
	m1 := engineValues()
	for name, want := range map[string]float64{"rules_evaluations_total": 1, "findings_dropped_total": 1, "engine_findings_opened_total": 1, "engine_findings_open": 1} {
		if m1[name] != want {
			t.Errorf("after one evaluation %s = %v, want %v", name, m1[name], want)
		}
	}
	if m1["engine_evaluation_seconds_total"] < 0.001 || m1["engine_last_evaluation_seconds"] < 0.001 {
		t.Errorf("after an evaluation of a rule that takes 1 ms: %v s in all, %v s last; want at least 1 ms each",
			m1["engine_evaluation_seconds_total"], m1["engine_last_evaluation_seconds"])
	}

	r.set() // nothing seen: the finding resolves after the hold-down
	e.Evaluate(now.Add(2 * time.Second))
	m2 := engineValues()
	if m2["rules_evaluations_total"] != 2 || m2["engine_findings_open"] != 0 || m2["engine_findings_opened_total"] != 1 {
		t.Errorf("after the finding resolved: %v; want 2 evaluations, 0 open, 1 opened", m2)
	}
	if m2["engine_evaluation_seconds_total"] < m1["engine_evaluation_seconds_total"]+0.001 {
		t.Errorf("evaluation time went from %v to %v s over a 1 ms evaluation", m1["engine_evaluation_seconds_total"], m2["engine_evaluation_seconds_total"])
	}

	r.set("c")
	e.Evaluate(now.Add(3 * time.Second))
	if m3 := engineValues(); m3["engine_findings_opened_total"] != 2 || m3["engine_findings_open"] != 1 {
		t.Errorf("after another finding opened: %v; want 2 opened, 1 open", m3)
	}
	_, body := scrape(t, p)
	promtoolCheck(t, body)
}
