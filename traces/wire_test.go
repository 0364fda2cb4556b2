package traces

import (
	"bytes"
	"encoding/base64"
	"encoding/hex"
	"runtime"
	"strings"
	"testing"

	metricspb "go.opentelemetry.io/proto/otlp/collector/metrics/v1"
	collectorpb "go.opentelemetry.io/proto/otlp/collector/trace/v1"
	commonpb "go.opentelemetry.io/proto/otlp/common/v1"
	mpb "go.opentelemetry.io/proto/otlp/metrics/v1"
	tracepb "go.opentelemetry.io/proto/otlp/trace/v1"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"
)

func str(s string) *commonpb.AnyValue {
	return &commonpb.AnyValue{Value: &commonpb.AnyValue_StringValue{StringValue: s}}
}

// shapes are trace exports of about size bytes, each the worst of its
// kind for decoding: many small messages, many attributes, deep nesting.
func shapes(size int) map[string]*collectorpb.ExportTraceServiceRequest {
	fill := func(mk func(i int) *tracepb.Span) *collectorpb.ExportTraceServiceRequest {
		ss := &tracepb.ScopeSpans{}
		for n, i := 0, 0; n < size; i++ {
			sp := mk(i)
			ss.Spans = append(ss.Spans, sp)
			n += proto.Size(sp) + 3
		}
		return &collectorpb.ExportTraceServiceRequest{ResourceSpans: []*tracepb.ResourceSpans{{ScopeSpans: []*tracepb.ScopeSpans{ss}}}}
	}
	nested := func(depth int) *commonpb.AnyValue {
		v := str("leaf")
		for range depth {
			v = &commonpb.AnyValue{Value: &commonpb.AnyValue_KvlistValue{KvlistValue: &commonpb.KeyValueList{Values: []*commonpb.KeyValue{{Key: "k", Value: v}}}}}
		}
		return v
	}
	return map[string]*collectorpb.ExportTraceServiceRequest{
		"empty spans": fill(func(int) *tracepb.Span { return &tracepb.Span{} }),
		"empty attributes": fill(func(int) *tracepb.Span {
			sp := &tracepb.Span{}
			for range 100 {
				sp.Attributes = append(sp.Attributes, &commonpb.KeyValue{})
			}
			return sp
		}),
		"int attributes": fill(func(i int) *tracepb.Span {
			sp := &tracepb.Span{}
			for j := range 50 {
				sp.Attributes = append(sp.Attributes, &commonpb.KeyValue{Value: &commonpb.AnyValue{Value: &commonpb.AnyValue_IntValue{IntValue: int64(i + j)}}})
			}
			return sp
		}),
		"realistic": fill(func(i int) *tracepb.Span {
			return &tracepb.Span{TraceId: bytes.Repeat([]byte{1}, 16), SpanId: bytes.Repeat([]byte{2}, 8), ParentSpanId: bytes.Repeat([]byte{3}, 8),
				Name: "GET /orders", Kind: 2, StartTimeUnixNano: 1, EndTimeUnixNano: 2, Status: &tracepb.Status{},
				Attributes: []*commonpb.KeyValue{{Key: "http.route", Value: str("/orders")}, {Key: "http.method", Value: str("GET")},
					{Key: "http.status_code", Value: &commonpb.AnyValue{Value: &commonpb.AnyValue_IntValue{IntValue: 200}}}},
				Events: []*tracepb.Span_Event{{Name: "e", TimeUnixNano: 3}}, Links: []*tracepb.Span_Link{{TraceId: bytes.Repeat([]byte{4}, 16)}}}
		}),
		"nested values": fill(func(int) *tracepb.Span {
			return &tracepb.Span{Attributes: []*commonpb.KeyValue{{Key: "deep", Value: nested(40)}}}
		}),
		"long strings": fill(func(i int) *tracepb.Span {
			return &tracepb.Span{Name: strings.Repeat("n", 1000+i%7), Attributes: []*commonpb.KeyValue{{Key: "k", Value: str(strings.Repeat("v", 3000))}}}
		}),
	}
}

// allocated is the bytes f allocates.
func allocated(f func()) uint64 {
	runtime.GC()
	var a, b runtime.MemStats
	runtime.ReadMemStats(&a)
	f()
	runtime.ReadMemStats(&b)
	return b.TotalAlloc - a.TotalAlloc
}

// The cost estimate is what the budget charges for decoding; it must not
// be below what decoding really allocates, for protobuf and JSON, for
// every shape (garbage included).
func TestDecodeCostBoundsTheHeap(t *testing.T) {
	for name, req := range shapes(256 << 10) {
		wire, err := proto.Marshal(req)
		if err != nil {
			t.Fatal(err)
		}
		est, err := wireCost(wire, signalTraces.request)
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		got := allocated(func() {
			if err := proto.Unmarshal(wire, &collectorpb.ExportTraceServiceRequest{}); err != nil {
				t.Fatal(err)
			}
		})
		t.Logf("%-16s protobuf %7d B: decoding allocates %9d B (x%.1f), estimated %9d (x%.1f)", name, len(wire), got, float64(got)/float64(len(wire)), est, float64(est)/float64(len(wire)))
		if uint64(est) < got {
			t.Errorf("%s: protobuf estimate %d below the %d bytes decoding allocates", name, est, got)
		}
		js, err := protojson.Marshal(req)
		if err != nil {
			t.Fatal(err)
		}
		n := len(js)
		js, sh, err := prepareJSON(js)
		if err != nil {
			t.Fatal(err)
		}
		jest := jsonCost(n, sh)
		got = allocated(func() {
			if err := (protojson.UnmarshalOptions{DiscardUnknown: true}).Unmarshal(js, &collectorpb.ExportTraceServiceRequest{}); err != nil {
				t.Fatal(err)
			}
		})
		t.Logf("%-16s JSON     %7d B: decoding allocates %9d B (x%.1f), estimated %9d (x%.1f)", name, n, got, float64(got)/float64(n), jest, float64(jest)/float64(n))
		if uint64(jest) < got {
			t.Errorf("%s: JSON estimate %d below the %d bytes decoding allocates", name, jest, got)
		}
	}
	// Metrics go through protojson too (JSON exports are decoded to be
	// forwarded as protobuf).
	m := &metricspb.ExportMetricsServiceRequest{ResourceMetrics: []*mpb.ResourceMetrics{{ScopeMetrics: []*mpb.ScopeMetrics{{}}}}}
	for range 3000 {
		sm := m.ResourceMetrics[0].ScopeMetrics[0]
		sm.Metrics = append(sm.Metrics, &mpb.Metric{Name: "m", Data: &mpb.Metric_Histogram{Histogram: &mpb.Histogram{DataPoints: []*mpb.HistogramDataPoint{{
			BucketCounts: make([]uint64, 16), ExplicitBounds: make([]float64, 15), Attributes: []*commonpb.KeyValue{{Key: "a", Value: str("b")}}}}}}})
	}
	js, _ := protojson.Marshal(m)
	n := len(js)
	js, sh, _ := prepareJSON(js)
	got := allocated(func() { _ = protojson.Unmarshal(js, &metricspb.ExportMetricsServiceRequest{}) })
	if est := jsonCost(n, sh); uint64(est) < got {
		t.Errorf("metrics JSON: estimate %d below the %d bytes decoding allocates", est, got)
	}
}

// wireCost accepts what proto.Unmarshal accepts and refuses the rest, on
// hand-made edge cases (the fuzzer below explores further).
func TestWireCostAgreesWithUnmarshal(t *testing.T) {
	valid, _ := proto.Marshal(validRequest())
	cases := map[string][]byte{
		"valid":            valid,
		"empty":            {},
		"truncated":        valid[:len(valid)-3],
		"unknown field":    protowire.AppendBytes(protowire.AppendTag(nil, 99, protowire.BytesType), []byte("x")),
		"wrong wire type":  protowire.AppendVarint(protowire.AppendTag(nil, 1, protowire.VarintType), 5),
		"field number 0":   {0x02, 0x00},
		"bad utf-8":        mustMarshal(&collectorpb.ExportTraceServiceRequest{ResourceSpans: []*tracepb.ResourceSpans{{SchemaUrl: "ok"}}}, func(b []byte) []byte { return bytes.Replace(b, []byte("ok"), []byte{0xff, 0xfe}, 1) }),
		"end group at top": protowire.AppendTag(nil, 1, protowire.EndGroupType),
		"overlong varint":  append(protowire.AppendTag(nil, 1, protowire.VarintType), bytes.Repeat([]byte{0xff}, 11)...),
		"length past end":  append(protowire.AppendTag(nil, 1, protowire.BytesType), 0x7f),
	}
	for name, b := range cases {
		_, errScan := wireCost(b, signalTraces.request)
		errDecode := proto.Unmarshal(b, &collectorpb.ExportTraceServiceRequest{})
		if (errScan == nil) != (errDecode == nil) {
			t.Errorf("%s: wireCost says %v, proto.Unmarshal says %v", name, errScan, errDecode)
		}
	}
	deep := str("leaf")
	for range maxNesting + 5 {
		deep = &commonpb.AnyValue{Value: &commonpb.AnyValue_ArrayValue{ArrayValue: &commonpb.ArrayValue{Values: []*commonpb.AnyValue{deep}}}}
	}
	b, _ := proto.Marshal(&collectorpb.ExportTraceServiceRequest{ResourceSpans: []*tracepb.ResourceSpans{{ScopeSpans: []*tracepb.ScopeSpans{{Spans: []*tracepb.Span{{Attributes: []*commonpb.KeyValue{{Key: "d", Value: deep}}}}}}}}})
	if _, err := wireCost(b, signalTraces.request); err == nil || !strings.Contains(err.Error(), "nested deeper") {
		t.Errorf("%d levels of nesting: %v", maxNesting+5, err)
	}
}

func mustMarshal(m proto.Message, edit func([]byte) []byte) []byte {
	b, err := proto.Marshal(m)
	if err != nil {
		panic(err)
	}
	return edit(b)
}

// Whatever the bytes, wireCost does not panic, and when it accepts them
// proto.Unmarshal does too.
func FuzzWireCost(f *testing.F) {
	valid, _ := proto.Marshal(validRequest())
	f.Add(valid)
	for _, req := range shapes(100) {
		b, _ := proto.Marshal(req)
		f.Add(b)
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		_, errScan := wireCost(b, signalTraces.request)
		if errScan == nil {
			if err := proto.Unmarshal(b, &collectorpb.ExportTraceServiceRequest{}); err != nil {
				t.Fatalf("wireCost accepted what proto.Unmarshal refuses: %v", err)
			}
		}
	})
}

// Hex ids become base64 in place; base64 ids, other strings and
// look-alike values stay as they were.
func TestPrepareJSON(t *testing.T) {
	tid, sid := "5B8EFFF798038103D269B633813FC60C", "eee19b7ec3c1b174"
	b64 := func(h string) string { r, _ := hex.DecodeString(h); return base64.StdEncoding.EncodeToString(r) }
	in := `{"resourceSpans":[{"scopeSpans":[{"spans":[{"traceId": "` + tid + `","spanId":"` + sid + `","parentSpanId":"","name":"traceId","links":[{"trace_id":"` + strings.ToLower(tid) + `","spanId":"` + b64(sid) + `"}],` +
		`"attributes":[{"key":"spanId","value":{"stringValue":"` + sid + `"}}]}]}]}]}`
	want := `{"resourceSpans":[{"scopeSpans":[{"spans":[{"traceId": "` + b64(tid) + `","spanId":"` + b64(sid) + `","parentSpanId":"","name":"traceId","links":[{"trace_id":"` + b64(tid) + `","spanId":"` + b64(sid) + `"}],` +
		`"attributes":[{"key":"spanId","value":{"stringValue":"` + sid + `"}}]}]}]}]}`
	out, sh, err := prepareJSON([]byte(in))
	if err != nil || string(out) != want {
		t.Fatalf("prepareJSON:\n got %s (%v)\nwant %s", out, err, want)
	}
	if sh.hexIDs != 3 || sh.objects != 7 || sh.arrays != 5 {
		t.Errorf("shape %+v", sh)
	}
	if _, _, err := prepareJSON([]byte(`{"traceId":"abc`)); err == nil {
		t.Error("an unterminated string was accepted")
	}
}

// Whatever the bytes, prepareJSON does not panic, never grows its input,
// and leaves a body without ids as it was.
func FuzzPrepareJSON(f *testing.F) {
	f.Add([]byte(`{"traceId":"5b8efff798038103d269b633813fc60c","spanId":"eee19b7ec3c1b174"}`))
	f.Add([]byte(`{"a":"\"traceId\":","spanId" : "0123456789abcdef"}`))
	f.Add([]byte(`["spanId","0123456789abcdef"]`))
	f.Fuzz(func(t *testing.T, b []byte) {
		orig := string(b)
		out, sh, err := prepareJSON(b)
		if err != nil {
			return
		}
		if len(out) > len(orig) {
			t.Fatalf("output grew: %d > %d", len(out), len(orig))
		}
		if sh.hexIDs == 0 && string(out) != orig {
			t.Fatalf("rewrote a body without hex ids:\n%q\n%q", orig, out)
		}
	})
}
