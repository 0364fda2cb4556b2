package traces

import (
	"bytes"
	"compress/flate"
	"compress/gzip"
	"context"
	"encoding/hex"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"go.opentelemetry.io/otel/exporters/otlp/otlptrace/otlptracegrpc"
	logspb "go.opentelemetry.io/proto/otlp/collector/logs/v1"
	metricspb "go.opentelemetry.io/proto/otlp/collector/metrics/v1"
	collectorpb "go.opentelemetry.io/proto/otlp/collector/trace/v1"
	commonpb "go.opentelemetry.io/proto/otlp/common/v1"
	lpb "go.opentelemetry.io/proto/otlp/logs/v1"
	mpb "go.opentelemetry.io/proto/otlp/metrics/v1"
	"google.golang.org/genproto/googleapis/rpc/status"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	grpcstatus "google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"

	"github.com/culprit-dev/culprit/signals"
)

// post sends body to path over OTLP/HTTP and returns the status and body.
func post(t *testing.T, addr, path, ct, encoding string, body []byte) (int, []byte) {
	t.Helper()
	req, err := http.NewRequest(http.MethodPost, "http://"+addr+path, bytes.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Content-Type", ct)
	if encoding != "" {
		req.Header.Set("Content-Encoding", encoding)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, b
}

func fixture(t *testing.T, name string) []byte {
	t.Helper()
	b, err := os.ReadFile("testdata/otel-js/" + name)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// The OTel JS SDK's OTLP/JSON (testdata/otel-js, made by its own
// serializer) writes ids in hex, as the OTLP spec says; they were
// refused. The trace arrives whole, with its ids as the SDK made them.
func TestOTelJSJSONWithHexIDs(t *testing.T) {
	r, spans, st := startReceiver(t, Options{})
	code, body := post(t, r.HTTPAddr, "/v1/traces", "application/json", "", fixture(t, "otel-js-traces.json"))
	if code != http.StatusOK {
		t.Fatalf("HTTP %d: %s", code, body)
	}
	resp := &collectorpb.ExportTraceServiceResponse{}
	if err := protojson.Unmarshal(body, resp); err != nil || resp.PartialSuccess != nil {
		t.Fatalf("response %s (%v): want full success", body, err)
	}
	const traceID = "6825d878220ef4efec07314ccac6a409" // as in the fixture
	trace := spans.Trace(traceID)
	if len(trace) != 2 {
		t.Fatalf("trace %s: %d spans kept, want 2", traceID, len(trace))
	}
	db, root := trace[0], trace[1]
	if root.SpanID != "699f30f53d907912" || db.ParentID != root.SpanID || root.Route != "/orders/:id" || root.ThreadID != 7 ||
		root.Service != "checkout-js" || !root.Error || root.Kind != signals.SpanServer ||
		db.DBSystem != "postgresql" || db.Peer != "db.internal" || db.SpanID != "b297a9280c8564e9" || db.Duration() != 66022*time.Nanosecond {
		t.Errorf("root %+v\ndb %+v", *root, *db)
	}
	if v, _ := st.Latest(signals.OTLPRequestsTotal, traceLabels("http", "ok")); v.V != 1 {
		t.Errorf("requests counted %v", v.V)
	}

	// Lenient clients that follow the plain proto3 mapping send base64:
	// still taken.
	b64, _ := protojson.Marshal(validRequest())
	if code, body := post(t, r.HTTPAddr, "/v1/traces", "application/json", "", b64); code != http.StatusOK || !strings.Contains(string(body), `"rejectedSpans":"2"`) {
		t.Errorf("base64 ids: HTTP %d %s", code, body)
	}
	if len(spans.Trace(strings.Repeat("01", 16))) != 1 {
		t.Error("the base64-encoded span was not kept")
	}
	// A hex id one digit short is neither: the span is refused, and why
	// is said.
	short := strings.Replace(string(fixture(t, "otel-js-traces.json")), `"spanId":"699f30f53d907912"`, `"spanId":"699f30f53d90791"`, 1)
	code, body = post(t, r.HTTPAddr, "/v1/traces", "application/json", "", []byte(short))
	t.Logf("a 15-digit span id: HTTP %d %s", code, body)
	if code == http.StatusOK && !strings.Contains(string(body), "span_id must be 8 bytes") {
		t.Errorf("a 15-digit span id: HTTP %d %s", code, body)
	}
}

// OTLP/HTTP takes gzip or no encoding; anything else is refused with 415
// and counted, and nothing else is lost.
func TestContentEncoding(t *testing.T) {
	r, _, st := startReceiver(t, Options{})
	raw, _ := proto.Marshal(validRequest())
	var gz, fl bytes.Buffer
	zw := gzip.NewWriter(&gz)
	_, _ = zw.Write(raw)
	_ = zw.Close()
	fw, _ := flate.NewWriter(&fl, flate.DefaultCompression)
	_, _ = fw.Write(raw)
	_ = fw.Close()
	for _, tc := range []struct {
		encoding string
		body     []byte
		want     int
	}{
		{"", raw, 200}, {"identity", raw, 200}, {"gzip", gz.Bytes(), 200}, {"GZIP", gz.Bytes(), 200},
		{"deflate", fl.Bytes(), 415}, {"br", raw, 415}, {"gzip, deflate", gz.Bytes(), 415},
	} {
		code, body := post(t, r.HTTPAddr, "/v1/traces", "application/x-protobuf", tc.encoding, tc.body)
		if code != tc.want {
			t.Errorf("Content-Encoding %q: HTTP %d, want %d", tc.encoding, code, tc.want)
		}
		if code == 415 {
			s := &status.Status{}
			if err := proto.Unmarshal(body, s); err != nil || !strings.Contains(s.Message, "Content-Encoding") {
				t.Errorf("Content-Encoding %q: the refusal says %q (%v)", tc.encoding, s.Message, err)
			}
		}
	}
	if v, _ := st.Latest(signals.OTLPRequestsTotal, traceLabels("http", "unsupported")); v.V != 3 {
		t.Errorf("unsupported counted %v, want 3", v.V)
	}
	if v, _ := st.Latest(signals.OTLPRequestsTotal, traceLabels("http", "partial")); v.V != 4 {
		t.Errorf("accepted counted %v, want 4", v.V)
	}
}

// fakeCollector is a real OTLP/gRPC collector: it records what it gets.
type fakeCollector struct {
	collectorpb.UnimplementedTraceServiceServer
	addr  string
	block chan struct{} // when set, Export waits on it

	mu      sync.Mutex
	traces  []*collectorpb.ExportTraceServiceRequest
	metrics []*metricspb.ExportMetricsServiceRequest
	logs    []*logspb.ExportLogsServiceRequest
}

func startCollector(t *testing.T, block chan struct{}) *fakeCollector {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	c := &fakeCollector{addr: l.Addr().String(), block: block}
	s := grpc.NewServer()
	collectorpb.RegisterTraceServiceServer(s, c)
	metricspb.RegisterMetricsServiceServer(s, collectorMetrics{c: c})
	logspb.RegisterLogsServiceServer(s, collectorLogs{c: c})
	go func() { _ = s.Serve(l) }()
	t.Cleanup(s.Stop)
	return c
}

func (c *fakeCollector) wait(ctx context.Context) error {
	if c.block == nil {
		return nil
	}
	select {
	case <-c.block:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

func (c *fakeCollector) Export(ctx context.Context, req *collectorpb.ExportTraceServiceRequest) (*collectorpb.ExportTraceServiceResponse, error) {
	c.mu.Lock()
	c.traces = append(c.traces, req)
	c.mu.Unlock()
	return &collectorpb.ExportTraceServiceResponse{}, c.wait(ctx)
}

// The three services share a method name: metrics and logs are served by
// adapters.
type collectorMetrics struct {
	metricspb.UnimplementedMetricsServiceServer
	c *fakeCollector
}

func (m collectorMetrics) Export(ctx context.Context, req *metricspb.ExportMetricsServiceRequest) (*metricspb.ExportMetricsServiceResponse, error) {
	m.c.mu.Lock()
	m.c.metrics = append(m.c.metrics, req)
	m.c.mu.Unlock()
	return &metricspb.ExportMetricsServiceResponse{}, m.c.wait(ctx)
}

type collectorLogs struct {
	logspb.UnimplementedLogsServiceServer
	c *fakeCollector
}

func (l collectorLogs) Export(ctx context.Context, req *logspb.ExportLogsServiceRequest) (*logspb.ExportLogsServiceResponse, error) {
	l.c.mu.Lock()
	l.c.logs = append(l.c.logs, req)
	l.c.mu.Unlock()
	return &logspb.ExportLogsServiceResponse{}, l.c.wait(ctx)
}

func metricsRequest(name string) *metricspb.ExportMetricsServiceRequest {
	return &metricspb.ExportMetricsServiceRequest{ResourceMetrics: []*mpb.ResourceMetrics{{ScopeMetrics: []*mpb.ScopeMetrics{{Metrics: []*mpb.Metric{{
		Name: name, Data: &mpb.Metric_Gauge{Gauge: &mpb.Gauge{DataPoints: []*mpb.NumberDataPoint{{TimeUnixNano: 1, Value: &mpb.NumberDataPoint_AsInt{AsInt: 7}}}}}}}}}}}}
}

func logsRequest(body string) *logspb.ExportLogsServiceRequest {
	return &logspb.ExportLogsServiceRequest{ResourceLogs: []*lpb.ResourceLogs{{ScopeLogs: []*lpb.ScopeLogs{{LogRecords: []*lpb.LogRecord{{
		TimeUnixNano: 1, Body: &commonpb.AnyValue{Value: &commonpb.AnyValue_StringValue{StringValue: body}}}}}}}}}
}

// An app that points its whole SDK at the sidecar sends metrics and logs
// too (the Node.js SDK sends metrics by default) and got 404. They are now
// taken on both transports and forwarded to the collector as they came.
func TestMetricsAndLogsForwarded(t *testing.T) {
	col := startCollector(t, nil)
	st := signals.New(16, 100)
	fw, err := NewForwarderOptions(ForwardOptions{Endpoint: col.addr, Queue: 16, Store: st})
	if err != nil {
		t.Fatal(err)
	}
	r, _, _ := startReceiver(t, Options{Forward: fw, Store: st})

	pm, _ := proto.Marshal(metricsRequest("http.proto"))
	if code, body := post(t, r.HTTPAddr, "/v1/metrics", "application/x-protobuf", "", pm); code != 200 {
		t.Fatalf("metrics over HTTP: %d %s", code, body)
	}
	if code, body := post(t, r.HTTPAddr, "/v1/metrics", "application/json", "", fixture(t, "otel-js-metrics.json")); code != 200 {
		t.Fatalf("JS metrics JSON: %d %s", code, body)
	}
	if code, body := post(t, r.HTTPAddr, "/v1/logs", "application/json", "", fixture(t, "otel-js-logs.json")); code != 200 {
		t.Fatalf("JS logs JSON: %d %s", code, body)
	}
	conn, err := grpc.NewClient(r.GRPCAddr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	if _, err := metricspb.NewMetricsServiceClient(conn).Export(context.Background(), metricsRequest("grpc")); err != nil {
		t.Fatalf("metrics over gRPC: %v", err)
	}
	if _, err := logspb.NewLogsServiceClient(conn).Export(context.Background(), logsRequest("grpc log")); err != nil {
		t.Fatalf("logs over gRPC: %v", err)
	}
	// Garbage is refused as for traces.
	if code, _ := post(t, r.HTTPAddr, "/v1/logs", "application/x-protobuf", "", []byte("\xff\xff not protobuf")); code != 400 {
		t.Errorf("malformed logs: HTTP %d, want 400", code)
	}
	r.Stop(context.Background())
	if err := fw.Close(); err != nil {
		t.Fatal(err)
	}
	col.mu.Lock()
	defer col.mu.Unlock()
	if len(col.metrics) != 3 || len(col.logs) != 2 {
		t.Fatalf("collector got %d metrics and %d logs requests, want 3 and 2", len(col.metrics), len(col.logs))
	}
	if !proto.Equal(col.metrics[0], metricsRequest("http.proto")) || !proto.Equal(col.metrics[2], metricsRequest("grpc")) || !proto.Equal(col.logs[1], logsRequest("grpc log")) {
		t.Errorf("forwarded requests differ from those sent")
	}
	if m := col.metrics[1].GetResourceMetrics()[0].GetScopeMetrics()[0].GetMetrics(); len(m) != 2 || m[0].GetName() != "http.server.requests" {
		t.Errorf("JS metrics forwarded as %v", m)
	}
	// The JSON log record's hex ids arrive as the right bytes.
	lr := col.logs[0].GetResourceLogs()[0].GetScopeLogs()[0].GetLogRecords()[0]
	if hex.EncodeToString(lr.GetTraceId()) != "71269f76cb8053e32bec7b22edc77a1b" || hex.EncodeToString(lr.GetSpanId()) != "8178f67e4b74298d" {
		t.Errorf("log record ids %x %x", lr.GetTraceId(), lr.GetSpanId())
	}
	for _, c := range []struct {
		signal, result string
		want           float64
	}{{"metrics", "ok", 3}, {"logs", "ok", 2}} {
		if v, _ := st.Latest(signals.OTLPForwardedRequestsTotal, signals.L("signal", c.signal, "result", c.result)); v.V != c.want {
			t.Errorf("otlp_forwarded_requests_total{signal=%s,result=%s} = %v, want %v", c.signal, c.result, v.V, c.want)
		}
	}
	if v, _ := st.Latest(signals.OTLPRequestsTotal, signals.L("transport", "http", "signal", "logs", "result", "malformed")); v.V != 1 {
		t.Errorf("malformed logs counted %v", v.V)
	}
}

// Without a forward endpoint, metrics and logs are answered as a
// collector with no pipeline for them would: success, and counted as
// dropped.
func TestMetricsAndLogsDroppedWithoutForwarding(t *testing.T) {
	r, _, st := startReceiver(t, Options{})
	pm, _ := proto.Marshal(metricsRequest("m"))
	code, body := post(t, r.HTTPAddr, "/v1/metrics", "application/x-protobuf", "", pm)
	resp := &metricspb.ExportMetricsServiceResponse{}
	if code != 200 || proto.Unmarshal(body, resp) != nil || resp.PartialSuccess != nil {
		t.Errorf("metrics: HTTP %d %q", code, body)
	}
	if code, body := post(t, r.HTTPAddr, "/v1/logs", "application/json", "", fixture(t, "otel-js-logs.json")); code != 200 || string(body) != "{}" {
		t.Errorf("logs: HTTP %d %s", code, body)
	}
	conn, err := grpc.NewClient(r.GRPCAddr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	if _, err := logspb.NewLogsServiceClient(conn).Export(context.Background(), logsRequest("x")); err != nil {
		t.Errorf("logs over gRPC: %v", err)
	}
	for _, l := range []signals.Labels{
		signals.L("transport", "http", "signal", "metrics", "result", "dropped"),
		signals.L("transport", "http", "signal", "logs", "result", "dropped"),
		signals.L("transport", "grpc", "signal", "logs", "result", "dropped"),
	} {
		if v, _ := st.Latest(signals.OTLPRequestsTotal, l); v.V != 1 {
			t.Errorf("otlp_requests_total%s = %v, want 1", l, v.V)
		}
	}
}

// A collector that stops answering fills the forward queue up to its byte
// bound; what does not fit is dropped and counted, and Close does not
// wait for the stuck collector longer than the forward timeout.
func TestForwardQueueBoundedInBytes(t *testing.T) {
	block := make(chan struct{})
	col := startCollector(t, block)
	store := signals.New(16, 100)
	const queueBytes = 64 << 10
	fw, err := NewForwarderOptions(ForwardOptions{Endpoint: col.addr, Queue: 1000, QueueBytes: queueBytes, Timeout: 500 * time.Millisecond, Store: store, Log: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	big := metricsRequest(strings.Repeat("m", 10<<10))
	payload, _ := proto.Marshal(big)
	sent := 0
	for range 20 {
		if fw.enqueue("metrics", signalMetrics.method(), append([]byte(nil), payload...)) {
			sent++
		}
		fw.mu.Lock()
		if fw.bytes > queueBytes {
			t.Errorf("queue holds %d bytes, bound %d", fw.bytes, queueBytes)
		}
		fw.mu.Unlock()
	}
	if sent > queueBytes/len(payload)+2 || sent == 0 {
		t.Errorf("%d of 20 requests of %d bytes queued under a %d-byte bound", sent, len(payload), queueBytes)
	}
	start := time.Now()
	if err := fw.Close(); err != nil {
		t.Fatal(err)
	}
	if took := time.Since(start); took > 2*time.Second {
		t.Errorf("Close took %v with the collector stuck; its bound is the 500 ms forward timeout", took)
	}
	close(block)
	dropped, _ := store.Latest(signals.OTLPForwardedRequestsTotal, signals.L("signal", "metrics", "result", "dropped"))
	errs, _ := store.Latest(signals.OTLPForwardedRequestsTotal, signals.L("signal", "metrics", "result", "error"))
	t.Logf("%d queued of 20; %v dropped, %v failed against the stuck collector", sent, dropped.V, errs.V)
	if int(dropped.V+errs.V) != 20 {
		t.Errorf("dropped %v + failed %v != 20 requests", dropped.V, errs.V)
	}
}

// gRPC exports the SDK gzips are taken too.
func TestGRPCGzip(t *testing.T) {
	r, spans, _ := startReceiver(t, Options{})
	exp, err := otlptracegrpc.New(context.Background(), otlptracegrpc.WithEndpoint(r.GRPCAddr), otlptracegrpc.WithInsecure(), otlptracegrpc.WithCompressor("gzip"))
	if err != nil {
		t.Fatal(err)
	}
	sc := sendWithSDK(t, exp)
	if n := len(spans.Trace(sc.TraceID().String())); n != 2 {
		t.Errorf("%d spans of the gzipped export kept, want 2", n)
	}
	// An unknown method of a known service is UNIMPLEMENTED, as before.
	conn, _ := grpc.NewClient(r.GRPCAddr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	defer conn.Close()
	err = conn.Invoke(context.Background(), "/opentelemetry.proto.collector.trace.v1.TraceService/Nope", validRequest(), &collectorpb.ExportTraceServiceResponse{})
	if grpcstatus.Code(err) != codes.Unimplemented {
		t.Errorf("unknown method: %v", err)
	}
}
