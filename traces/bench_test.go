package traces

import (
	"bytes"
	"context"
	"fmt"
	"testing"
	"time"

	collectorpb "go.opentelemetry.io/proto/otlp/collector/trace/v1"
	commonpb "go.opentelemetry.io/proto/otlp/common/v1"
	tracepb "go.opentelemetry.io/proto/otlp/trace/v1"
	"google.golang.org/protobuf/proto"

	"github.com/culprit-dev/culprit/signals"
)

// sdkBatch is an export as an SDK's batch processor sends it: 512 spans,
// 128 traces of a server span and three children.
func sdkBatch(seq int) []byte {
	now := uint64(time.Now().UnixNano())
	ss := &tracepb.ScopeSpans{}
	for i := range 512 {
		tid := []byte(fmt.Sprintf("%016x", seq*128+i/4))
		sp := &tracepb.Span{TraceId: tid, SpanId: []byte(fmt.Sprintf("%08x", seq*512+i+1)), Name: "GET /orders/:id", Kind: tracepb.Span_SPAN_KIND_SERVER,
			StartTimeUnixNano: now - 20e6, EndTimeUnixNano: now, Status: &tracepb.Status{},
			Attributes: []*commonpb.KeyValue{{Key: "http.route", Value: str("/orders/:id")}, {Key: "http.request.method", Value: str("GET")},
				{Key: "http.response.status_code", Value: &commonpb.AnyValue{Value: &commonpb.AnyValue_IntValue{IntValue: 200}}}}}
		if i%4 != 0 {
			sp.ParentSpanId = []byte(fmt.Sprintf("%08x", seq*512+i/4*4+1))
			sp.Kind, sp.Name = tracepb.Span_SPAN_KIND_CLIENT, "SELECT orders"
			sp.Attributes = []*commonpb.KeyValue{{Key: "db.system.name", Value: str("postgresql")}, {Key: "server.address", Value: str("db")}}
		}
		ss.Spans = append(ss.Spans, sp)
	}
	b, _ := proto.Marshal(&collectorpb.ExportTraceServiceRequest{ResourceSpans: []*tracepb.ResourceSpans{{ScopeSpans: []*tracepb.ScopeSpans{ss}}}})
	return b
}

// BenchmarkExport is a 512-span protobuf export through the receiver into
// a full span store: check and price, decode, convert, keep.
func BenchmarkExport(b *testing.B) {
	spans := signals.NewSpans(65536)
	r := NewReceiver(Options{Spans: spans, Store: signals.New(16, 100)})
	bodies := make([][]byte, 256) // distinct traces; 131072 spans fill the store
	for i := range bodies {
		bodies[i] = sdkBatch(i)
	}
	for _, body := range bodies {
		h := &hold{b: r.budget}
		r.export(context.Background(), signalTraces, "grpc", bytes.Clone(body), false, h)
		h.release()
	}
	b.ReportAllocs()
	for i := 0; b.Loop(); i++ {
		h := &hold{b: r.budget}
		if out := r.export(context.Background(), signalTraces, "grpc", bodies[i%len(bodies)], false, h); out.result != "ok" {
			b.Fatal(out.msg)
		}
		h.release()
	}
	b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N*512), "ns/span")
}
