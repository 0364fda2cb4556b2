package traces

import (
	"context"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/encoding"
	_ "google.golang.org/grpc/encoding/gzip" // SDKs may compress OTLP/gRPC exports with gzip
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/mem"
	"google.golang.org/grpc/peer"
	grpcstatus "google.golang.org/grpc/status"
	"google.golang.org/grpc/tap"
)

const (
	// maxConnectionAge closes any gRPC connection after this long (with a
	// GOAWAY first; SDKs reconnect): the last bound on a connection that
	// keeps one slow stream or another open forever.
	maxConnectionAge = 10 * time.Minute
	// keepaliveTime: the server pings a connection silent this long, and
	// closes it if the ping is not answered within WriteTimeout.
	keepaliveTime = time.Minute
	// pingMinTime is the least interval between a client's pings; more
	// often is a ping flood and the connection is closed. SDK exporters
	// ping far less often (or not at all).
	pingMinTime = 10 * time.Second
)

// newGRPCServer is OTLP/gRPC, bounded before any handler runs: header
// lists of MaxHeaderBytes, GRPCMaxStreams per connection, a message of
// MaxRequestBytes, the HTTP/2 preface within HeaderTimeout, idle
// connections closed after IdleTimeout, and a stream admitted only when
// the in-flight budget can hold a request of the largest size (tap).
func (r *Receiver) newGRPCServer() *grpc.Server {
	o := r.o
	s := grpc.NewServer(
		grpc.MaxRecvMsgSize(o.MaxRequestBytes),
		grpc.MaxHeaderListSize(uint32(o.MaxHeaderBytes)),
		grpc.MaxConcurrentStreams(uint32(o.GRPCMaxStreams)),
		grpc.ConnectionTimeout(o.HeaderTimeout),
		grpc.KeepaliveParams(keepalive.ServerParameters{
			MaxConnectionIdle:     o.IdleTimeout,
			MaxConnectionAge:      maxConnectionAge,
			MaxConnectionAgeGrace: o.ReadTimeout + o.WriteTimeout,
			Time:                  keepaliveTime,
			Timeout:               o.WriteTimeout,
		}),
		grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{MinTime: pingMinTime, PermitWithoutStream: true}),
		// Fixed flow-control windows: with the default dynamic ones a
		// connection may have up to 16 MB sent to it before anything
		// reads; these bound what waits unread per stream and connection.
		grpc.InitialWindowSize(256<<10),
		grpc.InitialConnWindowSize(1<<20),
		grpc.InTapHandle(r.tap),
		grpc.ForceServerCodecV2(serverCodec{proto: encoding.GetCodecV2("proto")}),
	)
	for _, k := range allSignals {
		s.RegisterService(r.serviceDesc(k), r)
	}
	return s
}

// serviceDesc is k's Export service with a handler that takes the request
// as its encoded bytes (wireMessage): the receiver checks and prices them
// before decoding, and forwards them as they came.
func (r *Receiver) serviceDesc(k *signalKind) *grpc.ServiceDesc {
	return &grpc.ServiceDesc{
		ServiceName: k.service,
		HandlerType: (*any)(nil),
		Methods: []grpc.MethodDesc{{
			MethodName: "Export",
			Handler: func(_ any, ctx context.Context, dec func(any) error, _ grpc.UnaryServerInterceptor) (any, error) {
				return r.exportGRPC(ctx, k, dec)
			},
		}},
	}
}

type holdKey struct{}

// tap runs for every new stream, before gRPC reads its message. An export
// stream is admitted only if the budget can hold a request of the largest
// size (refused with UNAVAILABLE, which OTLP clients retry, otherwise),
// and gets a deadline: a message trickling in a byte a second is cut.
// The tap runs on the connection's reader and must not block, so it
// never waits for the budget.
func (r *Receiver) tap(ctx context.Context, info *tap.Info) (context.Context, error) {
	if p, ok := peer.FromContext(ctx); ok && r.grpcList != nil && p.Addr != nil {
		r.grpcList.markBusy(p.Addr.String()) // a connection with streams is an SDK's, not to evict
	}
	var k *signalKind
	for _, s := range allSignals {
		if info.FullMethodName == s.method() {
			k = s
		}
	}
	if k == nil {
		return ctx, nil // gRPC answers Unimplemented
	}
	if !r.budget.tryAcquire(int64(r.o.MaxRequestBytes)) {
		r.count("grpc", k, "busy")
		return nil, grpcstatus.Error(codes.Unavailable, errBusy.Error()+"; retry later")
	}
	h := &hold{b: r.budget, held: int64(r.o.MaxRequestBytes)}
	ctx, cancel := context.WithTimeout(ctx, r.o.ReadTimeout+r.o.InflightWait+r.o.WriteTimeout)
	// The stream's end (or the deadline) gives the bytes back if no
	// handler took them over: a stream reset early, or an unknown method.
	context.AfterFunc(ctx, func() {
		cancel()
		h.abandon()
	})
	return context.WithValue(ctx, holdKey{}, h), nil
}

// exportGRPC is one OTLP/gRPC export.
func (r *Receiver) exportGRPC(ctx context.Context, k *signalKind, dec func(any) error) (any, error) {
	h, _ := ctx.Value(holdKey{}).(*hold)
	if h == nil || !h.claim() {
		r.count("grpc", k, "busy")
		return nil, grpcstatus.Error(codes.Unavailable, errBusy.Error()+"; retry later")
	}
	defer h.release()
	var in wireMessage
	if err := dec(&in); err != nil {
		switch grpcstatus.Code(err) {
		case codes.ResourceExhausted: // larger than MaxRecvMsgSize: gRPC's 413
			r.count("grpc", k, "too_large")
		case codes.DeadlineExceeded, codes.Canceled:
			r.count("grpc", k, "timeout")
		default:
			r.count("grpc", k, "malformed")
		}
		return nil, err
	}
	out := r.export(ctx, k, "grpc", in.b, false, h)
	r.count("grpc", k, out.result)
	if out.resp == nil {
		return nil, grpcstatus.Error(out.code, out.msg)
	}
	return out.resp, nil
}

// wireMessage is a request as its encoded bytes.
type wireMessage struct{ b []byte }

// serverCodec is the proto codec, except that a wireMessage gets the
// message's bytes undecoded. (It never fails for one: grpc-go would answer
// a decode error with INTERNAL, where OTLP wants INVALID_ARGUMENT, which
// export gives.)
type serverCodec struct{ proto encoding.CodecV2 }

func (c serverCodec) Marshal(v any) (mem.BufferSlice, error) { return c.proto.Marshal(v) }

func (c serverCodec) Unmarshal(data mem.BufferSlice, v any) error {
	if m, ok := v.(*wireMessage); ok {
		m.b = data.Materialize() // a copy: gRPC reuses its buffers
		return nil
	}
	return c.proto.Unmarshal(data, v)
}

func (c serverCodec) Name() string { return c.proto.Name() }
