package main

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"os"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/culprit-dev/culprit/exporters"
	"github.com/culprit-dev/culprit/internal/testenv"
	"github.com/culprit-dev/culprit/rules"
	"github.com/culprit-dev/culprit/tools/otelcol/testcollector"
)

// startFindingsLogs exports a running agent's findings to a collector as
// the agent does when findings.otlp_endpoint is set: its journal, store,
// tracker and instance id, the [findings] otlp_* defaults, and the pod's
// downward-API variables in environ.
func startFindingsLogs(t *testing.T, a *Agent, endpoint, protocol string, environ []string) *exporters.FindingsLogs {
	t.Helper()
	res, err := exporters.NewResource(environ, a.Tracker)
	if err != nil {
		t.Fatal(err)
	}
	var w io.Writer = io.Discard
	if testing.Verbose() {
		w = os.Stderr
	}
	fl, err := exporters.NewFindingsLogs(exporters.FindingsLogsOptions{
		Journal: a.Journal, Store: a.Store, Resource: res, InstanceID: a.grpcSvc.InstanceID(), Version: version,
		Endpoint: endpoint, Protocol: protocol, Environ: environ,
		Log: slog.New(slog.NewTextHandler(w, nil)).With("component", "otlp_logs"),
	})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Go(func() { fl.Run(ctx) })
	t.Cleanup(func() { cancel(); wg.Wait(); fl.Close(5 * time.Second) })
	return fl
}

func recordOf(rule, event string) func(testcollector.Record) bool {
	return func(r testcollector.Record) bool {
		return r.Attributes["culprit.finding.rule"] == rule && r.Attributes["culprit.finding.event"] == event
	}
}

// A real listener stops accepting and clients pile up: the agent's
// accept_overflow finding reaches a real OpenTelemetry Collector as an
// ERROR log record naming the rule, the cause, the listener and the
// evidence, under the resource of the target's pod. The collector is then
// stopped; the finding resolves while it is down, and the RESOLVED record
// arrives once the collector is back. Over OTLP/gRPC and OTLP/HTTP.
func TestFindingsAsOTLPLogRecords(t *testing.T) {
	for _, protocol := range []string{exporters.OTLPProtocolGRPC, exporters.OTLPProtocolHTTP} {
		t.Run(strings.ReplaceAll(protocol, "/", "_"), func(t *testing.T) {
			col := testcollector.Start(t)
			sc := newScenario(t, testenv.Options{Backlog: 4, Accept: false})
			s, a := sc.s, sc.a
			tgt, ok := a.Tracker.Current()
			if !ok {
				t.Fatal("the agent lost its target")
			}
			endpoint := col.GRPCAddr
			if protocol == exporters.OTLPProtocolHTTP {
				endpoint = "http://" + col.HTTPAddr
			}
			// The protocol comes from the environment, as an SDK's would.
			environ := []string{"OTEL_EXPORTER_OTLP_LOGS_PROTOCOL=" + protocol,
				"K8S_POD_NAME=web-5f7b9-abcde", "K8S_NAMESPACE_NAME=shop", "K8S_NODE_NAME=node-1", "K8S_CONTAINER_NAME=web"}
			fl := startFindingsLogs(t, a, endpoint, "", environ)
			if fl.Protocol() != protocol {
				t.Fatalf("protocol %s, want %s from OTEL_EXPORTER_OTLP_LOGS_PROTOCOL", fl.Protocol(), protocol)
			}

			start := time.Now()
			s.MustDo(t, "dialasync 40")
			opened := col.WaitFor(t, 15*time.Second, "accept_overflow opened", recordOf("accept_overflow", "opened"))
			arrived := time.Since(start)
			t.Logf("%s: first connection to the record in the collector's file: %s; finding event to file: %s (findings.otlp_interval %s, the file exporter flushes every 100ms)",
				protocol, arrived.Round(time.Millisecond), time.Since(opened.Time).Round(time.Millisecond), exporters.DefaultOTLPInterval)

			wantKey := fmt.Sprintf("127.0.0.1:%d", s.Port)
			for k, v := range map[string]any{
				"culprit.finding.cause": "app_not_accepting", "culprit.finding.key": wantKey,
				"culprit.finding.severity": "critical", "culprit.agent.instance_id": a.grpcSvc.InstanceID(),
			} {
				if opened.Attributes[k] != v {
					t.Errorf("%s = %v, want %v", k, opened.Attributes[k], v)
				}
			}
			if opened.SeverityNumber != 17 || opened.SeverityText != "critical" || opened.EventName != "culprit.finding.opened" {
				t.Errorf("severity %d %q, event %q; want 17 (ERROR) critical culprit.finding.opened", opened.SeverityNumber, opened.SeverityText, opened.EventName)
			}
			if body, _ := opened.Body.(string); !strings.Contains(body, wantKey) {
				t.Errorf("body %q does not name the listener", opened.Body)
			}
			evidence, _ := opened.Attributes["culprit.finding.evidence"].([]any)
			signals := ""
			for _, e := range evidence {
				if m, ok := e.(map[string]any); ok {
					signals += fmt.Sprint(m["signal"], "=", m["value"], " ", m["unit"], "; ")
				}
			}
			if !strings.Contains(signals, "listen") {
				t.Errorf("evidence %q lacks the listener's signals", signals)
			}
			for k, v := range map[string]any{
				"service.name": tgt.Comm, "service.instance.id": "shop.web-5f7b9-abcde.web",
				"k8s.pod.name": "web-5f7b9-abcde", "k8s.namespace.name": "shop", "k8s.node.name": "node-1", "k8s.container.name": "web",
			} {
				if opened.Resource[k] != v {
					t.Errorf("resource %s = %v, want %v", k, opened.Resource[k], v)
				}
			}
			id := opened.Attributes["culprit.finding.id"]

			// The collector goes away; the listener recovers and the
			// finding resolves meanwhile.
			col.Stop()
			s.MustDo(t, "accept on")
			resolvedEv := waitResolved(t, a.Journal, fmt.Sprint(id), 30*time.Second)
			time.Sleep(time.Second) // the exporter tries, and keeps the record
			if got := fl.Counts(); got["failed"] != 0 || got["lost"] != 0 || got["dropped"] != 0 {
				t.Fatalf("with the collector down within findings.otlp_timeout: counts %v, want nothing failed or lost", got)
			}
			col.Restart(t)
			back := time.Now()
			resolved := col.WaitFor(t, 20*time.Second, "RESOLVED after the restart", func(r testcollector.Record) bool {
				return r.Attributes["culprit.finding.id"] == id && r.Attributes["culprit.finding.event"] == "resolved"
			})
			t.Logf("%s: resolved %s ago while the collector was down; its record arrived %s after the restart",
				protocol, time.Since(resolvedEv.Time).Round(time.Millisecond), time.Since(back).Round(time.Millisecond))
			// A resolution is INFO; the finding's last severity (it may
			// have eased while the listener recovered) is an attribute.
			if want := resolvedEv.Finding.Severity.String(); resolved.SeverityNumber != 9 || resolved.Attributes["culprit.finding.severity"] != want {
				t.Errorf("RESOLVED at severity %d with culprit.finding.severity %v, want 9 (INFO) and %s", resolved.SeverityNumber, resolved.Attributes["culprit.finding.severity"], want)
			}

			// Every event the journal holds is in the collector, once.
			seq := a.Journal.Sequence()
			recs, err := col.Records()
			if err != nil {
				t.Fatal(err)
			}
			seen := map[int64]int{}
			for _, r := range recs {
				if n, ok := r.Attributes["culprit.finding.sequence"].(int64); ok {
					seen[n]++
				}
			}
			for n := int64(1); n <= int64(seq); n++ {
				if seen[n] == 0 {
					deadline := time.Now().Add(10 * time.Second)
					col.WaitFor(t, time.Until(deadline), fmt.Sprintf("sequence %d", n), func(r testcollector.Record) bool {
						return r.Attributes["culprit.finding.sequence"] == n
					})
				}
			}
			body := scrape(t, a.HTTPAddr)
			if !strings.Contains(body, `culprit_findings_exported_total{result="exported"}`) ||
				!strings.Contains(body, `culprit_findings_exported_total{result="failed"} 0`) {
				t.Errorf("/metrics lacks the export counters:\n%s", grepLines(body, "findings_export"))
			}
			promtoolCheck(t, body)
		})
	}
}

// waitResolved waits for the journal's RESOLVED event of a finding.
func waitResolved(t *testing.T, j *rules.Journal, id string, timeout time.Duration) rules.Event {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		evs, _ := j.After(0, 1<<20)
		for _, ev := range evs {
			if ev.Type == rules.EventResolved && ev.Finding.ID == id {
				return ev
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("finding %s did not resolve within %s of accepting again", id, timeout)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// Requests of a real OTel-instrumented app run on a worker thread that
// makes a blocking call: the blocking_worker finding's record carries the
// first of those requests' trace ids as its trace context, the others as
// an attribute, so a backend links the log record to the slow traces.
// The exporter here is the agent's own, from findings.otlp_endpoint, with
// the service named by OTEL_SERVICE_NAME in the agent's environment.
func TestFindingLogRecordsCarryTraceContext(t *testing.T) {
	col := testcollector.Start(t)
	otlp := freeAddr(t)
	app := testenv.StartTracedApp(t, otlp)
	t.Setenv(exporters.EnvServiceName, "orders")
	cfg := testConfig(t, app.PID)
	cfg.Traces.GRPCAddr = otlp
	cfg.Rules.BlockingWorker.Window = 4 * time.Second
	cfg.Findings.OTLPEndpoint = col.GRPCAddr
	cfg.Findings.OTLPProtocol = exporters.OTLPProtocolGRPC
	a := startAgentConfig(t, cfg)
	if a.logs == nil || a.logs.Endpoint() == "" {
		t.Fatal("findings.otlp_endpoint set, and the agent exports no findings")
	}
	waitSched(t, client(t, a.GRPCAddr))

	var blocked []string
	for range 3 {
		blocked = append(blocked, app.Get(t, "/block?ms=700"))
	}
	r := col.WaitFor(t, 20*time.Second, "blocking_worker with a blocked request's trace id", func(r testcollector.Record) bool {
		return r.Attributes["culprit.finding.rule"] == "blocking_worker" && slices.Contains(blocked, r.TraceID)
	})
	var traces []string
	arts, _ := r.Attributes["culprit.finding.artifacts"].([]any)
	for _, x := range arts {
		if m, ok := x.(map[string]any); ok && m["kind"] == "trace" {
			traces = append(traces, fmt.Sprint(m["value"]))
		}
	}
	if len(traces) == 0 || r.TraceID != traces[0] {
		t.Fatalf("trace context %s, want the first trace artifact of %v", r.TraceID, traces)
	}
	others, _ := r.Attributes["culprit.finding.other_trace_ids"].([]any)
	if len(others) != len(traces)-1 {
		t.Errorf("other_trace_ids %v, want the artifacts after the first: %v", others, traces)
	}
	if r.Resource["service.name"] != "orders" {
		t.Errorf("service.name %v, want OTEL_SERVICE_NAME's orders", r.Resource["service.name"])
	}
	t.Logf("%v: trace %s, others %v", r.Body, r.TraceID, others)
}
