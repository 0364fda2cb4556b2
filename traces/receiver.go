package traces

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"sync"
	"time"

	logspb "go.opentelemetry.io/proto/otlp/collector/logs/v1"
	metricspb "go.opentelemetry.io/proto/otlp/collector/metrics/v1"
	collectorpb "go.opentelemetry.io/proto/otlp/collector/trace/v1"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"

	"github.com/culprit-dev/culprit/signals"
)

// Options configure the receiver ([traces] in agent.conf). Zero values
// take the defaults below.
type Options struct {
	GRPCAddr, HTTPAddr string // "" turns that transport off
	// MaxRequestBytes bounds one export request (after gzip).
	MaxRequestBytes int
	// MaxInflightBytes bounds what all requests in flight hold together:
	// bodies being read, and the estimated cost of decoding them. At
	// least 4 × MaxRequestBytes.
	MaxInflightBytes int
	// InflightWait is how long a request waits for that budget before it
	// is refused (HTTP 503, gRPC UNAVAILABLE: both retryable).
	InflightWait time.Duration
	// MaxConnections per listener; see limitListener and connectionCap.
	MaxConnections int
	// GRPCMaxStreams: concurrent streams per gRPC connection.
	GRPCMaxStreams int
	// MaxHeaderBytes bounds HTTP request headers and gRPC header lists.
	MaxHeaderBytes int
	// HeaderTimeout: an HTTP request's headers, and a gRPC connection's
	// HTTP/2 preface, must arrive within it.
	HeaderTimeout time.Duration
	// ReadTimeout: an HTTP body, or a gRPC request message, must arrive
	// within it once admitted.
	ReadTimeout time.Duration
	// WriteTimeout bounds writing a response.
	WriteTimeout time.Duration
	// IdleTimeout closes connections idle that long (HTTP keep-alive,
	// gRPC MaxConnectionIdle).
	IdleTimeout time.Duration
	// MaxStringBytes cuts every string a kept span holds.
	MaxStringBytes int

	Spans   *signals.Spans
	Store   *signals.Store
	Forward *Forwarder // may be nil: metrics and logs are then dropped (counted)
	Log     *slog.Logger
}

// Defaults of Options, as agent.conf documents them.
const (
	DefaultMaxRequestBytes  = 4 << 20
	DefaultMaxInflightBytes = 16 << 20 // 4 requests of the default size: the sidecar budget holds it
	DefaultInflightWait     = time.Second
	DefaultMaxConnections   = 64
	DefaultGRPCMaxStreams   = 16
	DefaultMaxHeaderBytes   = 64 << 10
	DefaultHeaderTimeout    = 5 * time.Second
	DefaultReadTimeout      = 10 * time.Second
	DefaultWriteTimeout     = 10 * time.Second
	DefaultIdleTimeout      = 30 * time.Second
	DefaultMaxStringBytes   = 256
)

func (o *Options) defaults() {
	setDefault(&o.MaxRequestBytes, DefaultMaxRequestBytes)
	setDefault(&o.MaxInflightBytes, max(DefaultMaxInflightBytes, 4*o.MaxRequestBytes))
	setDefault(&o.InflightWait, DefaultInflightWait)
	setDefault(&o.MaxConnections, DefaultMaxConnections)
	setDefault(&o.GRPCMaxStreams, DefaultGRPCMaxStreams)
	setDefault(&o.MaxHeaderBytes, DefaultMaxHeaderBytes)
	setDefault(&o.HeaderTimeout, DefaultHeaderTimeout)
	setDefault(&o.ReadTimeout, DefaultReadTimeout)
	setDefault(&o.WriteTimeout, DefaultWriteTimeout)
	setDefault(&o.IdleTimeout, DefaultIdleTimeout)
	setDefault(&o.MaxStringBytes, DefaultMaxStringBytes)
	if o.Log == nil {
		o.Log = slog.New(slog.DiscardHandler)
	}
}

func setDefault[T int | time.Duration](v *T, d T) {
	if *v <= 0 {
		*v = d
	}
}

// signalKind is one OTLP signal the receiver takes.
type signalKind struct {
	name    string // traces, metrics, logs
	path    string // OTLP/HTTP path
	service string // OTLP/gRPC service
	request protoreflect.MessageDescriptor
	newReq  func() proto.Message
	newResp func() proto.Message
}

func (k *signalKind) method() string { return "/" + k.service + "/Export" }

var (
	signalTraces = &signalKind{name: "traces", path: "/v1/traces", service: "opentelemetry.proto.collector.trace.v1.TraceService",
		request: (&collectorpb.ExportTraceServiceRequest{}).ProtoReflect().Descriptor(),
		newReq:  func() proto.Message { return &collectorpb.ExportTraceServiceRequest{} },
		newResp: func() proto.Message { return &collectorpb.ExportTraceServiceResponse{} }}
	signalMetrics = &signalKind{name: "metrics", path: "/v1/metrics", service: "opentelemetry.proto.collector.metrics.v1.MetricsService",
		request: (&metricspb.ExportMetricsServiceRequest{}).ProtoReflect().Descriptor(),
		newReq:  func() proto.Message { return &metricspb.ExportMetricsServiceRequest{} },
		newResp: func() proto.Message { return &metricspb.ExportMetricsServiceResponse{} }}
	signalLogs = &signalKind{name: "logs", path: "/v1/logs", service: "opentelemetry.proto.collector.logs.v1.LogsService",
		request: (&logspb.ExportLogsServiceRequest{}).ProtoReflect().Descriptor(),
		newReq:  func() proto.Message { return &logspb.ExportLogsServiceRequest{} },
		newResp: func() proto.Message { return &logspb.ExportLogsServiceResponse{} }}
	allSignals = []*signalKind{signalTraces, signalMetrics, signalLogs}
)

// Receiver serves OTLP exports: traces are kept for the rules (and
// forwarded), metrics and logs only forwarded, so an app can point its
// whole SDK at the sidecar.
type Receiver struct {
	o      Options
	budget *budget

	grpcSrv  *grpc.Server
	httpSrv  *http.Server
	grpcList *limitListener
	httpList *limitListener
	wg       sync.WaitGroup

	mu                         sync.Mutex
	counts                     map[string]float64 // by series key
	spans, rejected, truncated float64

	GRPCAddr, HTTPAddr string // bound addresses
}

// NewReceiver returns a receiver, not yet listening.
func NewReceiver(o Options) *Receiver {
	o.defaults()
	return &Receiver{o: o, budget: newBudget(int64(o.MaxInflightBytes)), counts: map[string]float64{}}
}

// Start binds the listeners and serves until Stop.
func (r *Receiver) Start() error {
	if 4*int64(r.o.MaxRequestBytes) > int64(r.o.MaxInflightBytes) {
		return fmt.Errorf("traces.max_inflight_bytes (%d) must be at least 4 × traces.max_request_bytes (%d): a request of the largest size, read and decoded, must fit",
			r.o.MaxInflightBytes, r.o.MaxRequestBytes)
	}
	conns, why := connectionCap(r.o.MaxConnections)
	if why != "" {
		r.o.Log.Warn("OTLP connections capped to keep file descriptors for the agent", "detail", why)
	}
	if r.o.GRPCAddr != "" {
		l, err := net.Listen("tcp", r.o.GRPCAddr)
		if err != nil {
			return fmt.Errorf("OTLP gRPC listener (traces.grpc_addr): %w", err)
		}
		r.GRPCAddr = l.Addr().String()
		r.grpcList = newLimitListener(l, conns, func(reason string) { r.countConn("grpc", reason) })
		r.grpcSrv = r.newGRPCServer()
		r.wg.Add(1)
		go func() { defer r.wg.Done(); _ = r.grpcSrv.Serve(r.grpcList) }()
	}
	if r.o.HTTPAddr != "" {
		l, err := net.Listen("tcp", r.o.HTTPAddr)
		if err != nil {
			r.Stop(context.Background())
			return fmt.Errorf("OTLP HTTP listener (traces.http_addr): %w", err)
		}
		r.HTTPAddr = l.Addr().String()
		r.httpList = newLimitListener(l, conns, func(reason string) { r.countConn("http", reason) })
		r.httpSrv = r.newHTTPServer()
		r.wg.Add(1)
		go func() { defer r.wg.Done(); _ = r.httpSrv.Serve(r.httpList) }()
	}
	return nil
}

// Stop stops both servers, letting requests in flight finish until ctx ends.
func (r *Receiver) Stop(ctx context.Context) {
	if r.grpcSrv != nil {
		done := make(chan struct{})
		go func() { r.grpcSrv.GracefulStop(); close(done) }()
		select {
		case <-done:
		case <-ctx.Done():
			r.grpcSrv.Stop()
		}
	}
	if r.httpSrv != nil {
		if err := r.httpSrv.Shutdown(ctx); err != nil {
			_ = r.httpSrv.Close()
		}
	}
	r.wg.Wait()
}

// outcome is how one export ends, for either transport.
type outcome struct {
	result   string // the otlp_requests_total result
	resp     proto.Message
	httpCode int
	code     codes.Code
	msg      string
}

func failed(result string, httpCode int, code codes.Code, format string, args ...any) outcome {
	return outcome{result: result, httpCode: httpCode, code: code, msg: fmt.Sprintf(format, args...)}
}

func (r *Receiver) tooLarge() outcome {
	return failed("too_large", http.StatusRequestEntityTooLarge, codes.ResourceExhausted,
		"request larger than traces.max_request_bytes (%d)", r.o.MaxRequestBytes)
}

func busy(err error) outcome {
	return failed("busy", http.StatusServiceUnavailable, codes.Unavailable, "%v; retry later", err)
}

// export handles one request body, already read and held in h: it checks
// and prices it, takes its decoding cost from the budget, then ingests it
// (traces), forwards it, and says how it went.
func (r *Receiver) export(ctx context.Context, k *signalKind, transport string, body []byte, isJSON bool, h *hold) outcome {
	var cost int64
	if isJSON {
		var sh jsonShape
		var err error
		if body, sh, err = prepareJSON(body); err != nil {
			return failed("malformed", http.StatusBadRequest, codes.InvalidArgument, "not an OTLP/JSON %s request: %v", k.name, err)
		}
		cost = jsonCost(len(body), sh)
		if r.o.Forward != nil {
			cost += int64(len(body)) // re-encoded as protobuf to forward
		}
	} else {
		c, err := wireCost(body, k.request)
		if err != nil {
			return failed("malformed", http.StatusBadRequest, codes.InvalidArgument, "not an OTLP %s request (%s): %v", k.name, k.request.FullName(), err)
		}
		if k == signalTraces {
			cost = c // metrics and logs are checked, never decoded
		}
	}
	switch err := h.resize(ctx, int64(len(body))+cost, r.o.InflightWait); {
	case errors.Is(err, errOverBudget):
		return failed("too_large", http.StatusRequestEntityTooLarge, codes.ResourceExhausted,
			"decoding this request would take about %d bytes, more than traces.max_inflight_bytes (%d) allows", int64(len(body))+cost, r.o.MaxInflightBytes)
	case err != nil:
		return busy(err)
	}
	var msg proto.Message
	if isJSON || k == signalTraces {
		msg = k.newReq()
		var err error
		if isJSON {
			err = protojson.UnmarshalOptions{DiscardUnknown: true}.Unmarshal(body, msg)
		} else {
			err = proto.Unmarshal(body, msg)
		}
		if err != nil {
			return failed("malformed", http.StatusBadRequest, codes.InvalidArgument, "not an OTLP %s request: %v", k.name, err)
		}
	}
	if k == signalTraces {
		return r.ingest(transport, msg.(*collectorpb.ExportTraceServiceRequest), body, isJSON)
	}
	if r.o.Forward == nil {
		// What a collector with no pipeline for this signal would do
		// from the SDK's point of view: take it and say nothing.
		return outcome{result: "dropped", resp: k.newResp()}
	}
	// The body is this request's own buffer (read for it, or copied out
	// of gRPC's): the queue can keep it.
	payload := body
	if isJSON {
		b, err := proto.Marshal(msg)
		if err != nil {
			return failed("malformed", http.StatusBadRequest, codes.InvalidArgument, "re-encode %s request: %v", k.name, err)
		}
		payload = b
	}
	r.o.Forward.enqueue(k.name, k.method(), payload)
	return outcome{result: "ok", resp: k.newResp()}
}

// ingest keeps a trace export's spans and forwards it.
func (r *Receiver) ingest(transport string, req *collectorpb.ExportTraceServiceRequest, body []byte, isJSON bool) outcome {
	c := converter{maxString: r.o.MaxStringBytes}
	spans, rejected, err := c.convert(req.GetResourceSpans())
	if r.o.Spans != nil {
		r.o.Spans.Add(spans)
	}
	if r.o.Forward != nil {
		payload := body // the request's own buffer; decoding did not alias it
		if isJSON {
			payload, _ = proto.Marshal(req) // decoded from it: it encodes
		}
		r.o.Forward.enqueue("traces", signalTraces.method(), payload)
	}
	resp := &collectorpb.ExportTraceServiceResponse{}
	result := "ok"
	if rejected > 0 {
		result = "partial"
		resp.PartialSuccess = &collectorpb.ExportTracePartialSuccess{RejectedSpans: int64(rejected), ErrorMessage: err.Error()}
		r.o.Log.Debug("OTLP spans rejected", "transport", transport, "rejected", rejected, "first", err)
	}
	r.countSpans(len(spans), rejected, c.truncated)
	return outcome{result: result, resp: resp}
}

func (r *Receiver) count(transport string, k *signalKind, result string) {
	ls := signals.L("transport", transport, "signal", k.name, "result", result)
	key := ls.String()
	// Published under the lock: two requests counting at once must not
	// store their totals out of order.
	r.mu.Lock()
	defer r.mu.Unlock()
	r.counts[key]++
	if st := r.o.Store; st != nil {
		now := time.Now()
		st.Put(signals.OTLPRequestsTotal, ls, r.counts[key], now)
		st.Put(signals.OTLPInflightBytes, nil, float64(r.budget.inUse()), now)
	}
}

func (r *Receiver) countSpans(spans, rejected, truncated int) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.spans += float64(spans)
	r.rejected += float64(rejected)
	r.truncated += float64(truncated)
	st := r.o.Store
	if st == nil {
		return
	}
	now := time.Now()
	st.Put(signals.OTLPSpansReceivedTotal, nil, r.spans, now)
	st.Put(signals.OTLPSpansRejectedTotal, nil, r.rejected, now)
	st.Put(signals.OTLPSpanStringsTruncatedTotal, nil, r.truncated, now)
	if r.o.Spans != nil {
		ss := r.o.Spans.Stats()
		st.Put(signals.OTLPSpansEvictedTotal, signals.L("reason", "count"), float64(ss.EvictedByCount), now)
		st.Put(signals.OTLPSpansEvictedTotal, signals.L("reason", "bytes"), float64(ss.EvictedByBytes), now)
		st.Put(signals.OTLPSpansEvictedTotal, signals.L("reason", "too_large"), float64(ss.TooLarge), now)
		st.Put(signals.OTLPSpanStoreBytes, nil, float64(ss.Bytes), now)
		st.Put(signals.OTLPSpanStoreSpans, nil, float64(ss.Spans), now)
	}
}

func (r *Receiver) countConn(transport, reason string) {
	ls := signals.L("transport", transport, "reason", reason)
	key := "conn" + ls.String()
	r.mu.Lock()
	defer r.mu.Unlock()
	r.counts[key]++
	if st := r.o.Store; st != nil {
		st.Put(signals.OTLPConnectionsClosedTotal, ls, r.counts[key], time.Now())
	}
}

// Connections is how many connections each listener holds now.
func (r *Receiver) Connections() (grpcConns, httpConns int) {
	if r.grpcList != nil {
		grpcConns = r.grpcList.open()
	}
	if r.httpList != nil {
		httpConns = r.httpList.open()
	}
	return grpcConns, httpConns
}
