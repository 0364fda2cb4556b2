package testcollector

import (
	"context"
	"strings"
	"testing"
	"time"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/exporters/otlp/otlplog/otlploghttp"
	otellog "go.opentelemetry.io/otel/log"
	sdklog "go.opentelemetry.io/otel/sdk/log"
	"go.opentelemetry.io/otel/sdk/resource"
	"go.opentelemetry.io/otel/trace"
)

// The collector builds, starts, receives a record over OTLP/HTTP, writes
// it, and the parser reads back what was sent: hex trace ids, 64-bit
// integers written as strings, nested maps and lists, the resource. A
// restarted collector appends to the same file.
func TestCollectorRoundTrip(t *testing.T) {
	start := time.Now()
	bin := Binary(t)
	t.Logf("collector binary %s (ready in %s: built now, or taken from the cache)", bin, time.Since(start).Round(time.Millisecond))
	c := Start(t)
	send := func(seq int64) {
		t.Helper()
		exp, err := otlploghttp.New(context.Background(), otlploghttp.WithEndpoint(c.HTTPAddr), otlploghttp.WithInsecure())
		if err != nil {
			t.Fatal(err)
		}
		lp := sdklog.NewLoggerProvider(
			sdklog.WithResource(resource.NewSchemaless(attribute.String("service.name", "checkout"), attribute.String("k8s.pod.name", "p-1"))),
			sdklog.WithProcessor(sdklog.NewSimpleProcessor(exp)))
		defer lp.Shutdown(context.Background())
		var r otellog.Record
		r.SetEventName("test.event")
		r.SetTimestamp(time.Unix(1700000000, 123))
		r.SetSeverity(otellog.SeverityWarn)
		r.SetSeverityText("warning")
		r.SetBody(attribute.StringValue("hello"))
		r.AddAttributes(
			attribute.Int64("seq", seq),
			attribute.Int64("big", 1<<62),
			attribute.Float64("ratio", 0.25),
			attribute.Bool("ok", true),
			attribute.StringSlice("ids", []string{"a", "b"}),
			attribute.Slice("evidence", attribute.MapValue(attribute.String("signal", "x"), attribute.Float64("value", 3))),
		)
		tid, _ := trace.TraceIDFromHex("4bf92f3577b34da6a3ce929d0e0e4736")
		ctx := trace.ContextWithSpanContext(context.Background(), trace.NewSpanContext(trace.SpanContextConfig{TraceID: tid}))
		lp.Logger("scope-a", otellog.WithInstrumentationVersion("v9")).Emit(ctx, r)
	}
	send(1)
	r := c.WaitFor(t, 10*time.Second, "seq 1", func(r Record) bool { return r.Attributes["seq"] == int64(1) })
	if r.Resource["service.name"] != "checkout" || r.Resource["k8s.pod.name"] != "p-1" || r.Scope != "scope-a" || r.ScopeVersion != "v9" {
		t.Errorf("resource %v scope %s %s", r.Resource, r.Scope, r.ScopeVersion)
	}
	if r.EventName != "test.event" || r.SeverityNumber != 13 || r.SeverityText != "warning" || r.Body != "hello" {
		t.Errorf("record %+v", r)
	}
	if !r.Time.Equal(time.Unix(1700000000, 123)) || r.TraceID != "4bf92f3577b34da6a3ce929d0e0e4736" || r.SpanID != "" {
		t.Errorf("time %s trace %q span %q", r.Time, r.TraceID, r.SpanID)
	}
	if r.Attributes["big"] != int64(1<<62) || r.Attributes["ratio"] != 0.25 || r.Attributes["ok"] != true {
		t.Errorf("scalars %v", r.Attributes)
	}
	ids, _ := r.Attributes["ids"].([]any)
	ev, _ := r.Attributes["evidence"].([]any)
	if len(ids) != 2 || ids[1] != "b" || len(ev) != 1 {
		t.Fatalf("lists %v %v", r.Attributes["ids"], r.Attributes["evidence"])
	}
	if m, _ := ev[0].(map[string]any); m["signal"] != "x" || m["value"] != 3.0 {
		t.Errorf("nested map %v", ev[0])
	}

	c.Stop()
	c.Restart(t)
	send(2)
	c.WaitFor(t, 10*time.Second, "seq 2 after a restart", func(r Record) bool { return r.Attributes["seq"] == int64(2) })
	recs, err := c.Records()
	if err != nil {
		t.Fatal(err)
	}
	if len(recs) != 2 {
		t.Errorf("after a restart the file holds %d records, want both runs' 2:\n%s", len(recs), Summary(recs))
	}
	if !strings.Contains(c.Log(), "--- run 2 ---") {
		t.Errorf("collector log lacks the second run:\n%s", c.Log())
	}
}

func TestParseFileRejectsGarbage(t *testing.T) {
	if _, err := ParseFile(strings.NewReader(`{"resourceLogs":[{"scopeLogs":[{"logRecords":[{"attributes":[{"key":"n","value":{"intValue":"x1"}}]}]}]}]}` + "\n")); err == nil || !strings.Contains(err.Error(), "intValue") {
		t.Errorf("bad intValue: err = %v", err)
	}
	if _, err := ParseFile(strings.NewReader("{not json\n")); err == nil || !strings.Contains(err.Error(), "line 1") {
		t.Errorf("bad line: err = %v", err)
	}
}

// A line the collector has not finished writing is not a record yet.
func TestParseFileLeavesAPartialLine(t *testing.T) {
	whole := `{"resourceLogs":[{"scopeLogs":[{"logRecords":[{"body":{"stringValue":"a"}}]}]}]}`
	recs, err := ParseFile(strings.NewReader(whole + "\n" + whole[:20]))
	if err != nil || len(recs) != 1 || recs[0].Body != "a" {
		t.Errorf("records %v, err %v; want the one complete line", recs, err)
	}
}
