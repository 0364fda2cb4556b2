package exporters

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"os"
	"regexp"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"

	"github.com/culprit-dev/culprit/rules"
	"github.com/culprit-dev/culprit/signals"
	"github.com/culprit-dev/culprit/tools/otelcol/testcollector"
	"github.com/culprit-dev/culprit/workload"
)

func TestResolveOTLPProtocol(t *testing.T) {
	for _, tc := range []struct {
		conf    string
		env     []string
		want    string
		wantErr string
	}{
		{want: "grpc"},
		{conf: "http/protobuf", env: []string{"OTEL_EXPORTER_OTLP_LOGS_PROTOCOL=grpc"}, want: "http/protobuf"},
		{env: []string{"OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf"}, want: "http/protobuf"},
		{env: []string{"OTEL_EXPORTER_OTLP_PROTOCOL=grpc", "OTEL_EXPORTER_OTLP_LOGS_PROTOCOL=http/protobuf"}, want: "http/protobuf"},
		{env: []string{"OTEL_EXPORTER_OTLP_LOGS_PROTOCOL=", "OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf"}, want: "http/protobuf"},
		{env: []string{"OTEL_EXPORTER_OTLP_PROTOCOL=http/json"}, wantErr: "environment OTEL_EXPORTER_OTLP_PROTOCOL: http/json is not supported"},
		{conf: "udp", wantErr: `findings.otlp_protocol: want grpc or http/protobuf, got "udp"`},
		{env: []string{"OTEL_EXPORTER_OTLP_LOGS_PROTOCOL=HTTP"}, wantErr: `environment OTEL_EXPORTER_OTLP_LOGS_PROTOCOL: want grpc or http/protobuf, got "HTTP"`},
	} {
		got, err := ResolveOTLPProtocol(tc.conf, tc.env)
		if tc.wantErr != "" {
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Errorf("%q %v: err = %v, want %q", tc.conf, tc.env, err, tc.wantErr)
			}
			continue
		}
		if err != nil || got != tc.want {
			t.Errorf("%q %v = %q, %v; want %q", tc.conf, tc.env, got, err, tc.want)
		}
	}
}

func TestParseOTLPEndpoint(t *testing.T) {
	for _, tc := range []struct {
		raw, protocol string
		want          string // otlpTarget.String()
		wantErr       string
	}{
		{raw: "localhost:4317", protocol: "grpc", want: "http://localhost:4317/v1/logs"},
		{raw: "http://otel-agent:4317", protocol: "grpc", want: "http://otel-agent:4317/v1/logs"},
		{raw: "https://collector.observability.svc:4317/", protocol: "grpc", want: "https://collector.observability.svc:4317/v1/logs"},
		{raw: "http://127.0.0.1:4318", protocol: "http/protobuf", want: "http://127.0.0.1:4318/v1/logs"},
		{raw: "https://gw.example:443/otlp/v1/logs", protocol: "http/protobuf", want: "https://gw.example:443/otlp/v1/logs"},
		{raw: "[::1]:4318", protocol: "http/protobuf", want: "http://[::1]:4318/v1/logs"},
		{raw: "http://c:4317/v1/logs", protocol: "grpc", wantErr: "OTLP/gRPC takes no path"},
		{raw: "collector", protocol: "grpc", wantErr: "want host:port"},
		{raw: "https://collector/v1/logs", protocol: "http/protobuf", wantErr: "want host:port"},
		{raw: "unix:///run/otel.sock", protocol: "grpc", wantErr: `scheme "unix"`},
		{raw: "c:99999", protocol: "grpc", wantErr: `port "99999"`},
		{raw: ":4317", protocol: "grpc", wantErr: "no host"},
		{raw: "http://u:p@c:4318", protocol: "http/protobuf", wantErr: "no user, query or fragment"},
	} {
		got, err := parseOTLPEndpoint(tc.raw, tc.protocol)
		if tc.wantErr != "" {
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) || !strings.Contains(err.Error(), "findings.otlp_endpoint") {
				t.Errorf("%s (%s): err = %v, want %q naming the key", tc.raw, tc.protocol, err, tc.wantErr)
			}
			continue
		}
		if err != nil || got.String() != tc.want {
			t.Errorf("%s (%s) = %s, %v; want %s", tc.raw, tc.protocol, got, err, tc.want)
		}
	}
}

// selfTracker follows this test process, a real target whose command name
// becomes service.name.
func selfTracker(t *testing.T) (*workload.Tracker, string) {
	t.Helper()
	res, err := workload.NewResolver("/proc")
	if err != nil {
		t.Fatal(err)
	}
	tr := workload.NewTracker(res, workload.Selector{PID: os.Getpid()}, time.Second, slog.New(slog.DiscardHandler))
	tr.Refresh()
	p, ok := tr.Current()
	if !ok || p.Comm == "" {
		t.Fatalf("the tracker did not find this process: %s", tr.Reason())
	}
	return tr, p.Comm
}

func attrMap(r *Resource) map[string]string {
	m := map[string]string{}
	for _, kv := range r.Attributes() {
		m[string(kv.Key)] = kv.Value.String()
	}
	return m
}

var podEnv = []string{
	"K8S_POD_NAME=web-7d9c-x2k", "K8S_NAMESPACE_NAME=shop", "K8S_NODE_NAME=node-a", "K8S_CONTAINER_NAME=web",
	"CULPRIT_AGENT_LOG_LEVEL=debug", "PATH=/usr/bin",
}

func TestResource(t *testing.T) {
	tr, comm := selfTracker(t)

	r, err := newResource(podEnv, tr, func() (string, error) { return "ignored-in-a-pod", nil })
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]string{
		"service.name": comm, "service.instance.id": "shop.web-7d9c-x2k.web",
		"k8s.pod.name": "web-7d9c-x2k", "k8s.namespace.name": "shop", "k8s.node.name": "node-a", "k8s.container.name": "web",
	}
	if got := attrMap(r); !mapsEqual(got, want) {
		t.Errorf("attributes %v, want %v", got, want)
	}

	// OTEL_SERVICE_NAME wins over the target; outside a pod the instance
	// is a UUID v5 of the host name, the same on every run.
	host := func() (string, error) { return "build-7", nil }
	r, err = newResource([]string{"OTEL_SERVICE_NAME=checkout", "K8S_POD_NAME="}, tr, host)
	if err != nil {
		t.Fatal(err)
	}
	got := attrMap(r)
	if got["service.name"] != "checkout" || len(got) != 2 {
		t.Errorf("attributes %v, want service.name checkout and an instance id only", got)
	}
	if id := got["service.instance.id"]; !regexp.MustCompile(`^[0-9a-f]{8}-[0-9a-f]{4}-5[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$`).MatchString(id) {
		t.Errorf("service.instance.id %q is not a UUID v5", id)
	}
	r2, _ := newResource(nil, nil, host)
	if a, b := got["service.instance.id"], attrMap(r2)["service.instance.id"]; a != b {
		t.Errorf("instance id not stable for one host: %s, %s", a, b)
	}
	if n := attrMap(r2)["service.name"]; n != "unknown_service" {
		t.Errorf("without a target or OTEL_SERVICE_NAME service.name = %q, want unknown_service", n)
	}
	// The RFC 9562 example: the DNS namespace and www.example.com.
	dns := [16]byte{0x6b, 0xa7, 0xb8, 0x10, 0x9d, 0xad, 0x11, 0xd1, 0x80, 0xb4, 0x00, 0xc0, 0x4f, 0xd4, 0x30, 0xc8}
	if u := uuidV5(dns, "www.example.com"); u != "2ed6657d-e927-568b-95e1-2665a8aea6a2" {
		t.Errorf("uuidV5 = %s", u)
	}

	for _, bad := range []struct{ env, want string }{
		{"K8S_POD_NAME=" + strings.Repeat("p", 254), "environment K8S_POD_NAME: 254 bytes, at most 253"},
		{"K8S_NAMESPACE_NAME=a\x00b", "environment K8S_NAMESPACE_NAME: control character"},
		{"OTEL_SERVICE_NAME=\xff", "environment OTEL_SERVICE_NAME: not UTF-8"},
	} {
		if _, err := NewResource([]string{bad.env}, nil); err == nil || !strings.Contains(err.Error(), bad.want) {
			t.Errorf("%q: err = %v, want %q", bad.env, err, bad.want)
		}
	}
}

func mapsEqual(a, b map[string]string) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		if w, ok := b[k]; !ok || w != v {
			return false
		}
	}
	return true
}

// testFinding is a finding as rules make them, with evidence, labels and
// three trace artifacts.
func testFinding(id string, sev rules.Severity) rules.Finding {
	return rules.Finding{
		ID: id, Rule: "accept_overflow", State: rules.StateOpen,
		Observation: rules.Observation{
			Key: "127.0.0.1:8080", Cause: "app_not_accepting", Severity: sev, Confidence: 0.9,
			Title:   "accept queue of 127.0.0.1:8080 overflowing: the app is not accepting",
			Symptom: "30 connections dropped", RootCause: "the accept loop is starved", Remediation: "move the blocking call off the accept loop",
			Labels: map[string]string{"port": "8080", "addr": "127.0.0.1"},
			Evidence: []rules.Evidence{
				{Signal: `listen_overflows_total{port="8080"}`, Value: 30, Unit: "connections", Window: 10 * time.Second, Note: "queue full without an accept"},
				{Signal: "listen_queue_full_seconds", Value: 0.425, Threshold: 0.3, Unit: "seconds"},
			},
			Artifacts: []rules.Artifact{
				{Kind: "thread", Value: "worker-1 (tid 6150)"},
				{Kind: "trace", Value: "4bf92f3577b34da6a3ce929d0e0e4736", Detail: "/block took 812ms, on this thread"},
				{Kind: "trace", Value: "00f067aa0ba902b7a3ce929d0e0e4736", Detail: "/block took 790ms"},
				{Kind: "trace", Value: "0af7651916cd43dd8448eb211c80319c", Detail: "/fast took 300ms"},
			},
		},
	}
}

type logsRig struct {
	j     *rules.Journal
	store *signals.Store
	f     *FindingsLogs
}

func startLogs(t *testing.T, o FindingsLogsOptions, history int) logsRig {
	t.Helper()
	rig := logsRig{j: rules.NewJournal(history), store: signals.New(16, 256)}
	o.Journal, o.Store = rig.j, rig.store
	if testing.Verbose() {
		o.Log = slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	f, err := NewFindingsLogs(o)
	if err != nil {
		t.Fatal(err)
	}
	rig.f = f
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Go(func() { f.Run(ctx) })
	t.Cleanup(func() { cancel(); wg.Wait(); f.Close(2 * time.Second) })
	return rig
}

// endpointFor is how a user would write the collector's address.
func endpointFor(c *testcollector.Collector, protocol string) string {
	if protocol == OTLPProtocolHTTP {
		return "http://" + c.HTTPAddr
	}
	return c.GRPCAddr
}

func bySequence(seq int64) func(testcollector.Record) bool {
	return func(r testcollector.Record) bool { return r.Attributes["culprit.finding.sequence"] == seq }
}

// Every finding event reaches a real OpenTelemetry Collector as a log
// record, over OTLP/gRPC and OTLP/HTTP, with the finding's severity, title,
// attributes, evidence, artifacts and first trace id, and the resource of
// the target and its pod.
func TestFindingsLogsToCollector(t *testing.T) {
	tr, comm := selfTracker(t)
	res, err := NewResource(podEnv, tr)
	if err != nil {
		t.Fatal(err)
	}
	for _, protocol := range []string{OTLPProtocolGRPC, OTLPProtocolHTTP} {
		t.Run(strings.ReplaceAll(protocol, "/", "_"), func(t *testing.T) {
			c := testcollector.Start(t)
			rig := startLogs(t, FindingsLogsOptions{
				Resource: res, InstanceID: "a1b2c3d4e5f60718", Version: "test",
				Endpoint: endpointFor(c, protocol), Protocol: protocol,
				Interval: 50 * time.Millisecond, Timeout: 10 * time.Second,
			}, 64)
			f := testFinding("f-1", rules.SeverityCritical)
			t0 := time.Now()
			rig.j.Record(rules.EventOpened, f, t0)
			opened := c.WaitFor(t, 10*time.Second, "OPENED", bySequence(1))
			latency := time.Since(t0)
			f.Severity = rules.SeverityWarning
			rig.j.Record(rules.EventUpdated, f, time.Now())
			f.State = rules.StateResolved
			rig.j.Record(rules.EventResolved, f, time.Now())
			updated := c.WaitFor(t, 10*time.Second, "UPDATED", bySequence(2))
			resolved := c.WaitFor(t, 10*time.Second, "RESOLVED", bySequence(3))
			t.Logf("%s: event to record in the collector's file: %s (export interval 50ms, file flush 100ms)", protocol, latency)

			wantRes := map[string]any{
				"service.name": comm, "service.instance.id": "shop.web-7d9c-x2k.web",
				"k8s.pod.name": "web-7d9c-x2k", "k8s.namespace.name": "shop", "k8s.node.name": "node-a", "k8s.container.name": "web",
			}
			for k, v := range wantRes {
				if opened.Resource[k] != v {
					t.Errorf("resource %s = %v, want %v (resource %v)", k, opened.Resource[k], v, opened.Resource)
				}
			}
			if opened.Scope != "github.com/culprit-dev/culprit" || opened.ScopeVersion != "test" {
				t.Errorf("scope %s %s", opened.Scope, opened.ScopeVersion)
			}
			for _, tc := range []struct {
				r          testcollector.Record
				event      string
				sevNum     int
				sevText    string
				sevAttr    string
				wantTraced bool
			}{
				{opened, "opened", 17, "critical", "critical", true},
				{updated, "updated", 13, "warning", "warning", true},
				{resolved, "resolved", 9, "info", "warning", true},
			} {
				r := tc.r
				if r.EventName != "culprit.finding."+tc.event || r.SeverityNumber != tc.sevNum || r.SeverityText != tc.sevText {
					t.Errorf("%s: event %s severity %d %s, want culprit.finding.%s %d %s", tc.event, r.EventName, r.SeverityNumber, r.SeverityText, tc.event, tc.sevNum, tc.sevText)
				}
				if r.Body != f.Title {
					t.Errorf("%s: body %v", tc.event, r.Body)
				}
				want := map[string]any{
					"culprit.finding.event": tc.event, "culprit.finding.id": "f-1", "culprit.finding.rule": "accept_overflow",
					"culprit.finding.cause": "app_not_accepting", "culprit.finding.key": "127.0.0.1:8080",
					"culprit.finding.severity": tc.sevAttr, "culprit.finding.confidence": 0.9,
					"culprit.agent.instance_id": "a1b2c3d4e5f60718", "culprit.finding.root_cause": "the accept loop is starved",
					"culprit.finding.remediation": "move the blocking call off the accept loop",
				}
				for k, v := range want {
					if r.Attributes[k] != v {
						t.Errorf("%s: %s = %#v, want %#v", tc.event, k, r.Attributes[k], v)
					}
				}
				if r.TraceID != "4bf92f3577b34da6a3ce929d0e0e4736" || r.SpanID != "" {
					t.Errorf("%s: trace context %q/%q, want the first trace artifact's id", tc.event, r.TraceID, r.SpanID)
				}
				if got := fmt.Sprint(r.Attributes["culprit.finding.other_trace_ids"]); got != "[00f067aa0ba902b7a3ce929d0e0e4736 0af7651916cd43dd8448eb211c80319c]" {
					t.Errorf("%s: other trace ids %s", tc.event, got)
				}
				if r.Time.UnixNano() == 0 || r.ObservedTime.Before(r.Time) {
					t.Errorf("%s: time %s observed %s", tc.event, r.Time, r.ObservedTime)
				}
			}
			if !opened.Time.Equal(t0) {
				t.Errorf("record time %s, want the event's %s", opened.Time, t0)
			}
			ev, _ := opened.Attributes["culprit.finding.evidence"].([]any)
			if len(ev) != 2 {
				t.Fatalf("evidence %#v", opened.Attributes["culprit.finding.evidence"])
			}
			e0, _ := ev[0].(map[string]any)
			if e0["signal"] != `listen_overflows_total{port="8080"}` || e0["value"] != 30.0 || e0["unit"] != "connections" || e0["window_seconds"] != 10.0 || e0["note"] != "queue full without an accept" {
				t.Errorf("evidence[0] %v", e0)
			}
			if e1, _ := ev[1].(map[string]any); e1["threshold"] != 0.3 || e1["value"] != 0.425 {
				t.Errorf("evidence[1] %v", e1)
			}
			arts, _ := opened.Attributes["culprit.finding.artifacts"].([]any)
			if len(arts) != 4 {
				t.Fatalf("artifacts %#v", opened.Attributes["culprit.finding.artifacts"])
			}
			if a, _ := arts[1].(map[string]any); a["kind"] != "trace" || a["value"] != "4bf92f3577b34da6a3ce929d0e0e4736" || a["detail"] != "/block took 812ms, on this thread" {
				t.Errorf("artifact %v", a)
			}
			if l, _ := opened.Attributes["culprit.finding.labels"].(map[string]any); l["port"] != "8080" || l["addr"] != "127.0.0.1" {
				t.Errorf("labels %v", opened.Attributes["culprit.finding.labels"])
			}
			waitCounts(t, rig.f, map[string]float64{"exported": 3, "failed": 0, "dropped": 0, "lost": 0})

			// The counters are on /metrics, with target_info from the
			// same resource.
			p := NewPrometheus(PromOptions{Store: rig.store, Journal: rig.j, Resource: res})
			fams, body := scrape(t, p)
			wantValue(t, fams, "culprit_findings_exported_total", map[string]string{"result": "exported"}, dto.MetricType_COUNTER, 3)
			wantValue(t, fams, "culprit_findings_exported_total", map[string]string{"result": "failed"}, dto.MetricType_COUNTER, 0)
			wantValue(t, fams, "target_info", map[string]string{"service_name": comm, "k8s_pod_name": "web-7d9c-x2k", "k8s_namespace_name": "shop",
				"k8s_node_name": "node-a", "k8s_container_name": "web", "service_instance_id": "shop.web-7d9c-x2k.web"}, dto.MetricType_GAUGE, 1)
			promtoolCheck(t, body)
		})
	}
}

// waitCounts waits for the export counters to settle at want.
func waitCounts(t *testing.T, f *FindingsLogs, want map[string]float64) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		got := f.Counts()
		same := true
		for k, v := range want {
			same = same && got[k] == v
		}
		if same {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("export counts %v, want %v", got, want)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// The collector stops mid-way: events recorded while it is down wait
// (bounded) and arrive after it returns, within findings.otlp_timeout;
// nothing is lost, nothing is counted failed, and recording never waits.
func TestFindingsLogsCollectorRestart(t *testing.T) {
	for _, protocol := range []string{OTLPProtocolGRPC, OTLPProtocolHTTP} {
		t.Run(strings.ReplaceAll(protocol, "/", "_"), func(t *testing.T) {
			c := testcollector.Start(t)
			rig := startLogs(t, FindingsLogsOptions{
				Endpoint: endpointFor(c, protocol), Protocol: protocol,
				Interval: 50 * time.Millisecond, Timeout: 30 * time.Second,
			}, 64)
			rig.j.Record(rules.EventOpened, testFinding("f-1", rules.SeverityCritical), time.Now())
			c.WaitFor(t, 10*time.Second, "before the stop", bySequence(1))

			c.Stop()
			var slowest time.Duration
			for i := 2; i <= 6; i++ {
				start := time.Now()
				rig.j.Record(rules.EventOpened, testFinding(fmt.Sprintf("f-%d", i), rules.SeverityWarning), time.Now())
				slowest = max(slowest, time.Since(start))
			}
			// Appending is a mutex and a copy (microseconds); the bound
			// only leaves room for a loaded CI machine, far below the
			// seconds an append waiting on the exporter would take.
			if slowest > 200*time.Millisecond {
				t.Errorf("recording an event took %s with the collector down: the journal waited for the exporter", slowest)
			}
			// Long enough for several failed attempts (backoff from 500ms).
			time.Sleep(2 * time.Second)
			if got := rig.f.Counts(); got["failed"] != 0 || got["exported"] != 1 {
				t.Fatalf("while the collector is down and within the retry bound: counts %v, want 1 exported and nothing failed", got)
			}
			if sample, ok := rig.store.Latest(signals.FindingsExportQueue, nil); !ok || sample.V != 5 {
				t.Errorf("queue gauge %v %v, want the 5 records waiting", sample, ok)
			}

			down := time.Now()
			c.Restart(t)
			for i := int64(2); i <= 6; i++ {
				c.WaitFor(t, 15*time.Second, fmt.Sprintf("sequence %d after the restart", i), bySequence(i))
			}
			t.Logf("%s: the records held while the collector was down arrived %s after it restarted", protocol, time.Since(down).Round(time.Millisecond))
			waitCounts(t, rig.f, map[string]float64{"exported": 6, "failed": 0, "lost": 0, "dropped": 0})
			recs, err := c.Records()
			if err != nil {
				t.Fatal(err)
			}
			seen := map[any]int{}
			for _, r := range recs {
				seen[r.Attributes["culprit.finding.sequence"]]++
			}
			if len(seen) != 6 {
				t.Errorf("the collector holds sequences %v, want 1 to 6", seen)
			}
		})
	}
}

// With no collector at all the exporter holds at most findings.otlp_queue
// records; the journal keeps the rest until it overwrites them (counted
// lost), each batch is given up after findings.otlp_timeout (counted
// failed), and the writer never waits. Every event ends up counted once.
func TestFindingsLogsCollectorDown(t *testing.T) {
	const queue, events, history = 4, 40, 16
	rig := startLogs(t, FindingsLogsOptions{
		Endpoint: freeAddr(t), Protocol: OTLPProtocolGRPC,
		Queue: queue, Batch: 2, Interval: 20 * time.Millisecond, Timeout: time.Second,
	}, history)
	start := time.Now()
	for i := 1; i <= events; i++ {
		rig.j.Record(rules.EventOpened, testFinding(fmt.Sprintf("f-%d", i), rules.SeverityWarning), time.Now())
	}
	if took := time.Since(start); took > 500*time.Millisecond {
		t.Errorf("recording %d events took %s with no collector", events, took)
	}
	deadline := time.Now().Add(3 * time.Second)
	for time.Now().Before(deadline) {
		rig.f.mu.Lock()
		q := rig.f.queued
		rig.f.mu.Unlock()
		if q > queue {
			t.Fatalf("%d records held, more than findings.otlp_queue = %d", q, queue)
		}
		time.Sleep(10 * time.Millisecond)
	}
	got := rig.f.Counts()
	if got["failed"] < 2 || got["exported"] != 0 {
		t.Errorf("after 3 s with no collector and a 1 s bound: counts %v, want batches failed", got)
	}
	if got["lost"] == 0 {
		t.Errorf("counts %v: the journal (%d events) overwrote events the exporter had not read, want them counted lost", got, history)
	}
	rig.f.Close(500 * time.Millisecond)
	deadline = time.Now().Add(5 * time.Second)
	for {
		got = rig.f.Counts()
		if got["failed"]+got["lost"]+got["dropped"] == events {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("after Close: counts %v do not add up to the %d events", got, events)
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Logf("no collector: %v", got)
	p := NewPrometheus(PromOptions{Store: rig.store, Journal: rig.j})
	fams, body := scrape(t, p)
	wantValue(t, fams, "culprit_findings_exported_total", map[string]string{"result": "lost"}, dto.MetricType_COUNTER, got["lost"])
	promtoolCheck(t, body)
}

// A record larger than findings.otlp_queue_bytes could never be queued: it
// is dropped and counted, and the events after it still go out.
func TestFindingsLogsRecordTooLarge(t *testing.T) {
	c := testcollector.Start(t)
	rig := startLogs(t, FindingsLogsOptions{
		Endpoint: c.GRPCAddr, QueueBytes: 64 << 10, Interval: 20 * time.Millisecond, Timeout: 10 * time.Second,
	}, 64)
	big := testFinding("big", rules.SeverityWarning)
	big.Remediation = strings.Repeat("x", 70<<10)
	rig.j.Record(rules.EventOpened, big, time.Now())
	rig.j.Record(rules.EventOpened, testFinding("small", rules.SeverityWarning), time.Now())
	c.WaitFor(t, 10*time.Second, "after the oversized one", bySequence(2))
	waitCounts(t, rig.f, map[string]float64{"exported": 1, "dropped": 1})
	recs, err := c.Records()
	if err != nil {
		t.Fatal(err)
	}
	if slices.ContainsFunc(recs, bySequence(1)) {
		t.Error("the oversized record reached the collector")
	}
}

func TestNewFindingsLogsRejects(t *testing.T) {
	j := rules.NewJournal(16)
	for _, tc := range []struct {
		o    FindingsLogsOptions
		want string
	}{
		{FindingsLogsOptions{Journal: j}, "findings.otlp_endpoint is empty"},
		{FindingsLogsOptions{Journal: j, Endpoint: "collector"}, "findings.otlp_endpoint"},
		{FindingsLogsOptions{Journal: j, Endpoint: "c:4317", Protocol: "thrift"}, "findings.otlp_protocol"},
		{FindingsLogsOptions{Journal: j, Endpoint: "c:4317", Environ: []string{"OTEL_EXPORTER_OTLP_LOGS_PROTOCOL=http/json"}}, "OTEL_EXPORTER_OTLP_LOGS_PROTOCOL"},
		{FindingsLogsOptions{Journal: j, Endpoint: "c:4317", Queue: -1}, "findings.otlp_queue"},
		{FindingsLogsOptions{Endpoint: "c:4317"}, "no journal"},
	} {
		if _, err := NewFindingsLogs(tc.o); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%+v: err = %v, want %q", tc.o, err, tc.want)
		}
	}
}

// freeAddr is a loopback port nothing listens on.
func freeAddr(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	return addr
}
