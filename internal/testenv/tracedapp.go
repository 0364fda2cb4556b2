package testenv

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/exporters/otlp/otlptrace/otlptracegrpc"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/trace"

	"github.com/culprit-dev/culprit/internal/faults"
)

// TracedApp is a child process instrumented with the real OpenTelemetry
// Go SDK, exporting its spans over OTLP/gRPC to the address it was given,
// as an app with the SDK's default exporter pointed at the sidecar. It
// serves HTTP on loopback; every answer carries its trace id in the
// X-Trace-Id header. Routes:
//
//	/fast            5 ms of work
//	/block?ms=N      the request runs on worker-1 (threads worker-0..3), which
//	                 makes a blocking call of N ms; the span records thread.id
//	/orders?db=N     a database call (db.system.name=postgresql) of N ms after
//	                 20 ms of the app's own work
//	/proxy?ms=N      an outbound HTTP call (a client span) of N ms
type TracedApp struct {
	PID  int
	URL  string // http://127.0.0.1:PORT
	TIDs []int  // worker threads
	*child
}

const otlpEnv = "CULPRIT_TESTENV_OTLP"

// StartTracedApp runs a traced app exporting to otlpAddr (host:port).
func StartTracedApp(t testing.TB, otlpAddr string) *TracedApp {
	t.Helper()
	c, greeting := startChild(t, "tracedapp", true, otlpEnv+"="+otlpAddr, "GODEBUG=asyncpreemptoff=1", "GOMAXPROCS=64")
	f := strings.Fields(greeting)
	if len(f) < 3 || f[0] != "tracedapp" {
		t.Fatalf("testenv: unexpected greeting %q", greeting)
	}
	a := &TracedApp{PID: c.pid, URL: "http://127.0.0.1:" + f[1], child: c}
	for _, s := range f[2:] {
		tid, err := strconv.Atoi(s)
		if err != nil {
			t.Fatalf("testenv: unexpected greeting %q", greeting)
		}
		a.TIDs = append(a.TIDs, tid)
	}
	return a
}

// Get requests path and returns the trace id the app answered with.
func (a *TracedApp) Get(t testing.TB, path string) string {
	t.Helper()
	resp, err := http.Get(a.URL + path)
	if err != nil {
		t.Errorf("testenv: GET %s: %v", path, err)
		return ""
	}
	resp.Body.Close()
	return resp.Header.Get("X-Trace-Id")
}

func tracedAppMain() int {
	ctx := context.Background()
	exp, err := otlptracegrpc.New(ctx, otlptracegrpc.WithEndpoint(os.Getenv(otlpEnv)), otlptracegrpc.WithInsecure())
	if err != nil {
		fmt.Fprintln(os.Stderr, "testenv: OTLP exporter:", err)
		return 1
	}
	tp := sdktrace.NewTracerProvider(sdktrace.WithBatcher(exp, sdktrace.WithBatchTimeout(100*time.Millisecond)))
	defer tp.Shutdown(ctx)
	tr := tp.Tracer("tracedapp")
	pool := faults.StartWorkers(4, "worker")

	ms := func(r *http.Request, name string) time.Duration {
		n, _ := strconv.Atoi(r.URL.Query().Get(name))
		return time.Duration(n) * time.Millisecond
	}
	route := func(pattern string, h func(ctx context.Context, r *http.Request, span trace.Span)) {
		http.HandleFunc(pattern, func(w http.ResponseWriter, r *http.Request) {
			ctx, span := tr.Start(r.Context(), "GET "+pattern, trace.WithSpanKind(trace.SpanKindServer),
				trace.WithAttributes(attribute.String("http.route", pattern)))
			h(ctx, r, span)
			span.End()
			w.Header().Set("X-Trace-Id", span.SpanContext().TraceID().String())
		})
	}
	route("/fast", func(context.Context, *http.Request, trace.Span) { faults.HotLoop(5 * time.Millisecond) })
	route("/block", func(_ context.Context, r *http.Request, span trace.Span) {
		done := make(chan struct{})
		pool.Submit(1, func() { faults.BlockingCall(ms(r, "ms")); close(done) })
		<-done
		span.SetAttributes(attribute.Int("thread.id", pool.TIDs[1]))
	})
	route("/orders", func(ctx context.Context, r *http.Request, _ trace.Span) {
		time.Sleep(20 * time.Millisecond)
		_, db := tr.Start(ctx, "SELECT orders", trace.WithSpanKind(trace.SpanKindClient),
			trace.WithAttributes(attribute.String("db.system.name", "postgresql"), attribute.String("server.address", "db")))
		time.Sleep(ms(r, "db"))
		db.End()
	})
	route("/proxy", func(ctx context.Context, r *http.Request, _ trace.Span) {
		_, out := tr.Start(ctx, "GET inventory", trace.WithSpanKind(trace.SpanKindClient),
			trace.WithAttributes(attribute.String("server.address", "inventory")))
		time.Sleep(ms(r, "ms"))
		out.End()
	})
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		fmt.Fprintln(os.Stderr, "testenv:", err)
		return 1
	}
	go http.Serve(l, nil)
	tids := make([]string, len(pool.TIDs))
	for i, t := range pool.TIDs {
		tids[i] = strconv.Itoa(t)
	}
	fmt.Printf("tracedapp %d %s\n", l.Addr().(*net.TCPAddr).Port, strings.Join(tids, " "))
	// Serve until stdin closes.
	buf := make([]byte, 64)
	for {
		if _, err := os.Stdin.Read(buf); err != nil {
			return 0
		}
	}
}
