package traces

import (
	"compress/gzip"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"mime"
	"net"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"time"

	collectorpb "go.opentelemetry.io/proto/otlp/collector/trace/v1"
	tracepb "go.opentelemetry.io/proto/otlp/trace/v1"
	"google.golang.org/genproto/googleapis/rpc/status"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/encoding"
	"google.golang.org/grpc/mem"
	grpcstatus "google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"

	"github.com/culprit-dev/culprit/signals"
)

var (
	sigRequests = &signals.Desc{Name: "otlp_requests_total", Kind: signals.Counter,
		Help: "OTLP trace export requests received, by transport (grpc, http) and result (ok, partial, malformed, too_large, unsupported)."}
	sigSpans = &signals.Desc{Name: "otlp_spans_received_total", Kind: signals.Counter,
		Help: "Spans accepted from OTLP exports."}
	sigRejected = &signals.Desc{Name: "otlp_spans_rejected_total", Kind: signals.Counter,
		Help: "Spans rejected from OTLP exports (invalid ids or times)."}
)

// Options configure the receiver ([traces] in agent.conf).
type Options struct {
	GRPCAddr, HTTPAddr string // "" turns that transport off
	// MaxRequestBytes bounds one export request (decompressed, for HTTP).
	MaxRequestBytes int
	Spans           *signals.Spans
	Store           *signals.Store
	Forward         *Forwarder // may be nil
	Log             *slog.Logger
}

// Receiver serves OTLP trace exports.
type Receiver struct {
	collectorpb.UnimplementedTraceServiceServer
	o Options

	grpcSrv *grpc.Server
	httpSrv *http.Server
	wg      sync.WaitGroup

	mu       sync.Mutex
	requests map[[2]string]float64
	spans    float64
	rejected float64

	GRPCAddr, HTTPAddr string // bound addresses
}

// NewReceiver returns a receiver, not yet listening.
func NewReceiver(o Options) *Receiver {
	if o.MaxRequestBytes <= 0 {
		o.MaxRequestBytes = 4 << 20
	}
	if o.Log == nil {
		o.Log = slog.New(slog.DiscardHandler)
	}
	return &Receiver{o: o, requests: map[[2]string]float64{}}
}

// Start binds the listeners and serves until Stop.
func (r *Receiver) Start() error {
	if r.o.GRPCAddr != "" {
		l, err := net.Listen("tcp", r.o.GRPCAddr)
		if err != nil {
			return fmt.Errorf("OTLP gRPC listener (traces.grpc_addr): %w", err)
		}
		r.GRPCAddr = l.Addr().String()
		r.grpcSrv = grpc.NewServer(
			grpc.MaxRecvMsgSize(r.o.MaxRequestBytes),
			grpc.ForceServerCodecV2(countingCodec{inner: encoding.GetCodecV2("proto"), onError: func() { r.count("grpc", "malformed", 0, 0) }}),
		)
		collectorpb.RegisterTraceServiceServer(r.grpcSrv, r)
		r.wg.Add(1)
		go func() { defer r.wg.Done(); _ = r.grpcSrv.Serve(l) }()
	}
	if r.o.HTTPAddr != "" {
		l, err := net.Listen("tcp", r.o.HTTPAddr)
		if err != nil {
			r.Stop(context.Background())
			return fmt.Errorf("OTLP HTTP listener (traces.http_addr): %w", err)
		}
		r.HTTPAddr = l.Addr().String()
		mux := http.NewServeMux()
		mux.HandleFunc("POST /v1/traces", r.serveHTTP)
		r.httpSrv = &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
		r.wg.Add(1)
		go func() { defer r.wg.Done(); _ = r.httpSrv.Serve(l) }()
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
		_ = r.httpSrv.Shutdown(ctx)
	}
	r.wg.Wait()
}

// Export is the OTLP gRPC method.
func (r *Receiver) Export(_ context.Context, req *collectorpb.ExportTraceServiceRequest) (*collectorpb.ExportTraceServiceResponse, error) {
	if rs := req.GetResourceSpans(); len(rs) == 1 && strings.HasPrefix(rs[0].GetSchemaUrl(), malformedMark) {
		return nil, grpcstatus.Error(codes.InvalidArgument, "not an ExportTraceServiceRequest: "+strings.TrimPrefix(rs[0].GetSchemaUrl(), malformedMark))
	}
	return r.ingest("grpc", req), nil
}

func (r *Receiver) ingest(transport string, req *collectorpb.ExportTraceServiceRequest) *collectorpb.ExportTraceServiceResponse {
	spans, rejected, err := convert(req.GetResourceSpans())
	if r.o.Spans != nil {
		r.o.Spans.Add(spans)
	}
	if r.o.Forward != nil {
		r.o.Forward.Enqueue(req)
	}
	resp := &collectorpb.ExportTraceServiceResponse{}
	result := "ok"
	if rejected > 0 {
		result = "partial"
		resp.PartialSuccess = &collectorpb.ExportTracePartialSuccess{RejectedSpans: int64(rejected), ErrorMessage: err.Error()}
		r.o.Log.Debug("OTLP spans rejected", "transport", transport, "rejected", rejected, "first", err)
	}
	r.count(transport, result, len(spans), rejected)
	return resp
}

func (r *Receiver) count(transport, result string, spans, rejected int) {
	now := time.Now()
	r.mu.Lock()
	r.requests[[2]string{transport, result}]++
	r.spans += float64(spans)
	r.rejected += float64(rejected)
	n, s, rj := r.requests[[2]string{transport, result}], r.spans, r.rejected
	r.mu.Unlock()
	if st := r.o.Store; st != nil {
		st.Put(sigRequests, signals.L("transport", transport, "result", result), n, now)
		st.Put(sigSpans, nil, s, now)
		st.Put(sigRejected, nil, rj, now)
	}
}

// serveHTTP is OTLP/HTTP: protobuf or JSON, optionally gzipped; errors
// answer with a google.rpc.Status in the request's encoding.
func (r *Receiver) serveHTTP(w http.ResponseWriter, req *http.Request) {
	ct, _, _ := mime.ParseMediaType(req.Header.Get("Content-Type"))
	if ct != "application/x-protobuf" && ct != "application/json" {
		r.count("http", "unsupported", 0, 0)
		writeStatus(w, "application/x-protobuf", http.StatusUnsupportedMediaType, codes.InvalidArgument, "Content-Type must be application/x-protobuf or application/json")
		return
	}
	var body io.Reader = http.MaxBytesReader(w, req.Body, int64(r.o.MaxRequestBytes))
	if req.Header.Get("Content-Encoding") == "gzip" {
		zr, err := gzip.NewReader(body)
		if err != nil {
			r.count("http", "malformed", 0, 0)
			writeStatus(w, ct, http.StatusBadRequest, codes.InvalidArgument, "bad gzip body: "+err.Error())
			return
		}
		defer zr.Close()
		// The decompressed size is bounded too: a small zip bomb must not
		// become a large allocation.
		body = io.LimitReader(zr, int64(r.o.MaxRequestBytes)+1)
	}
	b, err := io.ReadAll(body)
	var tooLarge *http.MaxBytesError
	if errors.As(err, &tooLarge) || len(b) > r.o.MaxRequestBytes {
		r.count("http", "too_large", 0, 0)
		writeStatus(w, ct, http.StatusRequestEntityTooLarge, codes.ResourceExhausted, "request larger than traces.max_request_bytes ("+strconv.Itoa(r.o.MaxRequestBytes)+")")
		return
	}
	if err != nil {
		r.count("http", "malformed", 0, 0)
		writeStatus(w, ct, http.StatusBadRequest, codes.InvalidArgument, "read body: "+err.Error())
		return
	}
	msg := &collectorpb.ExportTraceServiceRequest{}
	if ct == "application/json" {
		err = protojson.Unmarshal(b, msg)
	} else {
		err = proto.Unmarshal(b, msg)
	}
	if err != nil {
		r.count("http", "malformed", 0, 0)
		writeStatus(w, ct, http.StatusBadRequest, codes.InvalidArgument, "not an ExportTraceServiceRequest: "+err.Error())
		return
	}
	writeMessage(w, ct, http.StatusOK, r.ingest("http", msg))
}

func writeStatus(w http.ResponseWriter, ct string, httpCode int, code codes.Code, msg string) {
	writeMessage(w, ct, httpCode, &status.Status{Code: int32(code), Message: msg})
}

func writeMessage(w http.ResponseWriter, ct string, httpCode int, m proto.Message) {
	var b []byte
	if ct == "application/json" {
		b, _ = protojson.Marshal(m) // a message we built: cannot fail
	} else {
		b, _ = proto.Marshal(m)
	}
	w.Header().Set("Content-Type", ct)
	w.WriteHeader(httpCode)
	_, _ = w.Write(b)
}

// countingCodec is the proto codec, counting requests that do not decode:
// grpc-go answers them itself, before any handler or interceptor sees them.
type countingCodec struct {
	inner   encoding.CodecV2
	onError func()
}

func (c countingCodec) Marshal(v any) (mem.BufferSlice, error) { return c.inner.Marshal(v) }

// Unmarshal does not fail: grpc-go would answer a decode error with
// INTERNAL, and OTLP wants INVALID_ARGUMENT (a client error, not to be
// retried). So a request that does not decode becomes a marked empty one
// that Export refuses.
func (c countingCodec) Unmarshal(data mem.BufferSlice, v any) error {
	err := c.inner.Unmarshal(data, v)
	if err == nil {
		return nil
	}
	req, ok := v.(*collectorpb.ExportTraceServiceRequest)
	if !ok {
		return err
	}
	c.onError()
	proto.Reset(req)
	req.ResourceSpans = []*tracepb.ResourceSpans{{SchemaUrl: malformedMark + err.Error()}}
	return nil
}

// malformedMark prefixes the schema URL of a request that did not decode.
const malformedMark = "culprit:malformed:"

func (c countingCodec) Name() string { return c.inner.Name() }
