package traces

import (
	"bytes"
	"context"
	"io"
	"log/slog"
	"net/http"
	"testing"
	"time"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/exporters/otlp/otlptrace/otlptracegrpc"
	"go.opentelemetry.io/otel/exporters/otlp/otlptrace/otlptracehttp"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/trace"
	collectorpb "go.opentelemetry.io/proto/otlp/collector/trace/v1"
	tracepb "go.opentelemetry.io/proto/otlp/trace/v1"
	"google.golang.org/genproto/googleapis/rpc/status"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	grpcstatus "google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/culprit-dev/culprit/signals"
)

func startReceiver(t *testing.T, o Options) (*Receiver, *signals.Spans, *signals.Store) {
	t.Helper()
	if o.Spans == nil {
		o.Spans = signals.NewSpans(1024)
	}
	if o.Store == nil {
		o.Store = signals.New(16, 100)
	}
	o.GRPCAddr, o.HTTPAddr = "127.0.0.1:0", "127.0.0.1:0"
	r := NewReceiver(o)
	if err := r.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { r.Stop(context.Background()) })
	return r, o.Spans, o.Store
}

// sendWithSDK emits one server span with a DB child through the real
// OpenTelemetry SDK and its OTLP exporter.
func sendWithSDK(t *testing.T, exp sdktrace.SpanExporter) trace.SpanContext {
	t.Helper()
	tp := sdktrace.NewTracerProvider(sdktrace.WithSyncer(exp))
	tr := tp.Tracer("test")
	ctx, root := tr.Start(context.Background(), "GET /orders", trace.WithSpanKind(trace.SpanKindServer),
		trace.WithAttributes(attribute.String("http.route", "/orders"), attribute.Int("thread.id", 4242)))
	_, db := tr.Start(ctx, "SELECT orders", trace.WithSpanKind(trace.SpanKindClient), trace.WithAttributes(attribute.String("db.system.name", "postgresql")))
	time.Sleep(10 * time.Millisecond)
	db.End()
	root.End()
	if err := tp.Shutdown(context.Background()); err != nil {
		t.Fatalf("flush: %v", err)
	}
	return root.SpanContext()
}

func TestReceiverTakesSDKExports(t *testing.T) {
	r, spans, st := startReceiver(t, Options{})
	for _, tc := range []struct {
		name string
		exp  func() (sdktrace.SpanExporter, error)
	}{
		{"grpc", func() (sdktrace.SpanExporter, error) {
			return otlptracegrpc.New(context.Background(), otlptracegrpc.WithEndpoint(r.GRPCAddr), otlptracegrpc.WithInsecure())
		}},
		{"http", func() (sdktrace.SpanExporter, error) {
			return otlptracehttp.New(context.Background(), otlptracehttp.WithEndpoint(r.HTTPAddr), otlptracehttp.WithInsecure())
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			exp, err := tc.exp()
			if err != nil {
				t.Fatal(err)
			}
			sc := sendWithSDK(t, exp)
			var root, db *signals.Span
			for _, s := range spans.Overlapping(time.Now().Add(-time.Minute), time.Now()) {
				if s.TraceID != sc.TraceID().String() {
					continue
				}
				switch s.Kind {
				case signals.SpanServer:
					root = &s
				case signals.SpanClient:
					db = &s
				}
			}
			if root == nil || db == nil {
				t.Fatalf("trace %s not stored whole: root %v db %v", sc.TraceID(), root, db)
			}
			if root.Route != "/orders" || root.ThreadID != 4242 || db.DBSystem != "postgresql" || db.ParentID != root.SpanID || db.Duration() < 10*time.Millisecond {
				t.Errorf("root %+v\ndb %+v", *root, *db)
			}
			if v, _ := st.Latest(signals.OTLPRequestsTotal, traceLabels(tc.name, "ok")); v.V < 1 {
				t.Errorf("request not counted: %v", v)
			}
		})
	}
}

// traceLabels are otlp_requests_total's labels for a trace export.
func traceLabels(transport, result string) signals.Labels {
	return signals.L("transport", transport, "signal", "traces", "result", result)
}

func validRequest() *collectorpb.ExportTraceServiceRequest {
	now := uint64(time.Now().UnixNano())
	return &collectorpb.ExportTraceServiceRequest{ResourceSpans: []*tracepb.ResourceSpans{{ScopeSpans: []*tracepb.ScopeSpans{{Spans: []*tracepb.Span{
		{TraceId: bytes.Repeat([]byte{1}, 16), SpanId: bytes.Repeat([]byte{2}, 8), Name: "ok", StartTimeUnixNano: now - 1e6, EndTimeUnixNano: now},
		{TraceId: []byte{1, 2, 3}, SpanId: bytes.Repeat([]byte{3}, 8), Name: "short trace id", StartTimeUnixNano: now - 1e6, EndTimeUnixNano: now},
		{TraceId: bytes.Repeat([]byte{1}, 16), SpanId: bytes.Repeat([]byte{4}, 8), Name: "ends before it starts", StartTimeUnixNano: now, EndTimeUnixNano: now - 1},
	}}}}}}
}

// Bad input is rejected with OTLP's status and counted; nothing crashes
// and the valid spans of a request are kept.
func TestReceiverRejectsBadInput(t *testing.T) {
	r, spans, st := startReceiver(t, Options{MaxRequestBytes: 64 << 10})
	post := func(ct string, body []byte) (int, *status.Status) {
		resp, err := http.Post("http://"+r.HTTPAddr+"/v1/traces", ct, bytes.NewReader(body))
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		s := &status.Status{}
		_ = proto.Unmarshal(b, s)
		return resp.StatusCode, s
	}
	if code, s := post("application/x-protobuf", []byte("\xff\xff\xff not protobuf")); code != 400 || codes.Code(s.Code) != codes.InvalidArgument {
		t.Errorf("garbage: %d %v", code, s)
	}
	if code, _ := post("application/x-protobuf", make([]byte, 100<<10)); code != 413 {
		t.Errorf("oversized: %d", code)
	}
	if code, _ := post("text/plain", []byte("hi")); code != 415 {
		t.Errorf("wrong content type: %d", code)
	}
	b, _ := proto.Marshal(validRequest())
	resp, err := http.Post("http://"+r.HTTPAddr+"/v1/traces", "application/x-protobuf", bytes.NewReader(b))
	if err != nil {
		t.Fatal(err)
	}
	rb, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	out := &collectorpb.ExportTraceServiceResponse{}
	if err := proto.Unmarshal(rb, out); err != nil || resp.StatusCode != 200 || out.GetPartialSuccess().GetRejectedSpans() != 2 {
		t.Errorf("partial: %d %v %v", resp.StatusCode, out, err)
	}
	if n := len(spans.Overlapping(time.Now().Add(-time.Minute), time.Now())); n != 1 {
		t.Errorf("%d spans kept, want the 1 valid one", n)
	}

	// gRPC: bytes that are not a request, and an oversized one.
	conn, err := grpc.NewClient(r.GRPCAddr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	err = conn.Invoke(context.Background(), collectorpb.TraceService_Export_FullMethodName, rawBytes("\xff\xff\xff"), &collectorpb.ExportTraceServiceResponse{}, grpc.ForceCodecV2(rawCodec{}))
	if grpcstatus.Code(err) != codes.InvalidArgument {
		t.Errorf("malformed gRPC: %v", err)
	}
	big := validRequest()
	big.ResourceSpans[0].ScopeSpans[0].Spans[0].Name = string(make([]byte, 100<<10))
	_, err = collectorpb.NewTraceServiceClient(conn).Export(context.Background(), big)
	if grpcstatus.Code(err) != codes.ResourceExhausted {
		t.Errorf("oversized gRPC: %v", err)
	}
	for _, l := range []signals.Labels{
		traceLabels("http", "malformed"), traceLabels("http", "too_large"),
		traceLabels("http", "unsupported"), traceLabels("http", "partial"),
		traceLabels("grpc", "malformed"), traceLabels("grpc", "too_large"),
	} {
		if v, ok := st.Latest(signals.OTLPRequestsTotal, l); !ok || v.V != 1 {
			t.Errorf("otlp_requests_total%s = %v (%v), want 1", l, v.V, ok)
		}
	}
	if v, _ := st.Latest(signals.OTLPSpansRejectedTotal, nil); v.V != 2 {
		t.Errorf("rejected spans %v, want 2", v.V)
	}
}

// Forwarding: what the sidecar receives reaches the pod's collector.
func TestReceiverForwards(t *testing.T) {
	upstream, upSpans, _ := startReceiver(t, Options{})
	fw, err := NewForwarderOptions(ForwardOptions{Endpoint: upstream.GRPCAddr, Queue: 8, Log: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	r, _, _ := startReceiver(t, Options{Forward: fw})
	exp, err := otlptracegrpc.New(context.Background(), otlptracegrpc.WithEndpoint(r.GRPCAddr), otlptracegrpc.WithInsecure())
	if err != nil {
		t.Fatal(err)
	}
	sc := sendWithSDK(t, exp)
	r.Stop(context.Background())
	if err := fw.Close(); err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, s := range upSpans.Overlapping(time.Now().Add(-time.Minute), time.Now()) {
		if s.TraceID == sc.TraceID().String() {
			n++
		}
	}
	if n != 2 {
		t.Errorf("upstream got %d spans of the trace, want 2", n)
	}
}
