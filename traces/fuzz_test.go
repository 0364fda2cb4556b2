package traces

import (
	"bytes"
	"net/http"
	"net/http/httptest"
	"testing"

	collectorpb "go.opentelemetry.io/proto/otlp/collector/trace/v1"
	"google.golang.org/protobuf/proto"

	"github.com/culprit-dev/culprit/signals"
)

// Any OTLP/HTTP body is answered 200, 400 or 413, and every span of a
// decoded request is either kept or counted as rejected; never a panic.
func FuzzOTLPHTTP(f *testing.F) {
	valid, _ := proto.Marshal(validRequest())
	f.Add(valid, false)
	f.Add([]byte(`{"resourceSpans":[{"scopeSpans":[{"spans":[{"traceId":"0102","name":"x"}]}]}]}`), true)
	f.Add([]byte("\x0a\x05garbage"), false)
	f.Fuzz(func(t *testing.T, body []byte, asJSON bool) {
		spans := signals.NewSpans(64)
		r := NewReceiver(Options{Spans: spans, Store: signals.New(4, 32), MaxRequestBytes: 1 << 16})
		ct := "application/x-protobuf"
		if asJSON {
			ct = "application/json"
		}
		req := httptest.NewRequest(http.MethodPost, "/v1/traces", bytes.NewReader(body))
		req.Header.Set("Content-Type", ct)
		w := httptest.NewRecorder()
		r.serveHTTP(signalTraces, w, req)
		switch w.Code {
		case 200, 400, 413:
		default:
			t.Fatalf("status %d", w.Code)
		}
		msg := &collectorpb.ExportTraceServiceRequest{}
		if ct == "application/x-protobuf" && w.Code == 200 && proto.Unmarshal(body, msg) == nil {
			total := 0
			for _, rs := range msg.GetResourceSpans() {
				for _, ss := range rs.GetScopeSpans() {
					total += len(ss.GetSpans())
				}
			}
			c := converter{maxString: DefaultMaxStringBytes}
			kept, rejected, _ := c.convert(msg.GetResourceSpans())
			if len(kept)+rejected != total {
				t.Fatalf("%d kept + %d rejected != %d spans", len(kept), rejected, total)
			}
		}
	})
}
