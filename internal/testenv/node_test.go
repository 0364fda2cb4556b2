package testenv

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	collectorpb "go.opentelemetry.io/proto/otlp/collector/trace/v1"
	"google.golang.org/protobuf/proto"
)

// The real Express + OpenTelemetry app: / answers at once; /exec blocks
// the event loop, so a concurrent / waits for it; /pbkdf2 takes its CPU
// time; and its spans reach an OTLP/HTTP receiver in the test's
// namespace through the relay.
func TestNodeApp(t *testing.T) {
	otlp := newOTLPSink(t)
	start := time.Now()
	a := StartNodeApp(t, NodeOptions{OTLPEndpoint: "http://" + otlp.addr})
	t.Logf("node pid %d, %s, exporting to %s (relayed to %s); ready in %v", a.PID, a.URL, a.OTLPEndpoint, otlp.addr, time.Since(start).Round(time.Millisecond))
	if r := a.MustGet(t, "/"); r.Body != "ok\n" || r.Elapsed > time.Second {
		t.Fatalf("/: %q in %v", r.Body, r.Elapsed)
	}

	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	execDone := make(chan *HTTPResult, 1)
	go func() {
		r, err := a.Get(ctx, "/exec")
		if err != nil {
			t.Error(err)
		}
		execDone <- r
	}()
	// /exec is in execSync once node has a child (sh, sleep).
	waitUntil(t, 5*time.Second, func() error {
		if kids, err := childPIDs(a.PID); err != nil || len(kids) == 0 {
			return fmt.Errorf("node has no child yet (%v)", err)
		}
		return nil
	})
	r, err := a.Get(ctx, "/")
	if err != nil {
		t.Fatal(err)
	}
	ex := <-execDone
	t.Logf("/ during /exec: %v; /exec: %v", r.Elapsed.Round(time.Millisecond), ex.Elapsed.Round(time.Millisecond))
	if ex.Elapsed < 800*time.Millisecond {
		t.Errorf("/exec answered in %v, want at least 800 ms", ex.Elapsed)
	}
	if r.Elapsed < 500*time.Millisecond {
		t.Errorf("/ answered in %v during /exec's 800 ms execSync: the event loop was not blocked", r.Elapsed)
	}

	p := a.MustGet(t, "/pbkdf2")
	t.Logf("/pbkdf2: %v: %s", p.Elapsed.Round(time.Millisecond), strings.TrimSpace(p.Body))
	if p.Elapsed < 500*time.Millisecond || p.Elapsed > 3*time.Second {
		t.Errorf("/pbkdf2 took %v, want about 500 ms", p.Elapsed)
	}
	if r, err := a.Get(ctx, "/pbkdf2?ms=nope"); err != nil || r.Status != http.StatusBadRequest {
		t.Errorf("/pbkdf2?ms=nope: %v, %v", r, err)
	}

	// node --perf-basic-prof names the JS functions.
	perf, err := os.ReadFile(a.PerfMap)
	if err != nil {
		t.Fatal(err)
	}
	for _, fn := range []string{NodeExecFunction, NodeCPUFunction} {
		if !strings.Contains(string(perf), fn) {
			t.Errorf("%s does not name %s", a.PerfMap, fn)
		}
	}

	// Spans, from the app's SDK: its server spans carry the route.
	waitUntil(t, 10*time.Second, func() error { return otlp.has("/exec", "/pbkdf2") })
	if err := a.Stop(); err != nil {
		t.Error(err)
	}
	if _, err := os.Stat(a.PerfMap); !os.IsNotExist(err) {
		t.Errorf("%s left after Stop (%v)", a.PerfMap, err)
	}
}

// otlpSink is an OTLP/HTTP (protobuf) trace receiver on the test's
// loopback that keeps the http.route of every span.
type otlpSink struct {
	addr   string
	mu     sync.Mutex
	routes map[string]int
	bad    error
}

func newOTLPSink(t *testing.T) *otlpSink {
	s := &otlpSink{routes: map[string]int{}}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s.addr = l.Addr().String()
	srv := &http.Server{ReadHeaderTimeout: 5 * time.Second, Handler: http.HandlerFunc(s.serve)}
	go srv.Serve(l)
	t.Cleanup(func() { srv.Close() })
	return s
}

func (s *otlpSink) serve(w http.ResponseWriter, r *http.Request) {
	b, err := io.ReadAll(r.Body)
	req := &collectorpb.ExportTraceServiceRequest{}
	if err == nil {
		err = proto.Unmarshal(b, req)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if err != nil || r.URL.Path != "/v1/traces" || r.Header.Get("Content-Type") != "application/x-protobuf" {
		s.bad = err
		http.Error(w, "bad export", http.StatusBadRequest)
		return
	}
	for _, rs := range req.ResourceSpans {
		for _, ss := range rs.ScopeSpans {
			for _, sp := range ss.Spans {
				if len(sp.TraceId) != 16 {
					continue
				}
				for _, kv := range sp.Attributes {
					if kv.Key == "http.route" {
						s.routes[kv.Value.GetStringValue()]++
					}
				}
			}
		}
	}
	w.Header().Set("Content-Type", "application/x-protobuf")
	resp, _ := proto.Marshal(&collectorpb.ExportTraceServiceResponse{})
	w.Write(resp)
}

func (s *otlpSink) has(routes ...string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, r := range routes {
		if s.routes[r] == 0 {
			return fmt.Errorf("no span with http.route %s; spans by route: %v (a bad export: %v)", r, s.routes, s.bad)
		}
	}
	return nil
}
