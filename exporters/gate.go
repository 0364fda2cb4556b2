package exporters

import (
	"context"
	"crypto/subtle"
	"strings"
	"sync"
	"sync/atomic"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/encoding"
	_ "google.golang.org/grpc/encoding/proto" // registers protoCodecName
	"google.golang.org/grpc/mem"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/stats"
	"google.golang.org/grpc/status"
	"google.golang.org/grpc/tap"

	culpritv1 "github.com/culprit-dev/culprit/proto/culprit/v1"
)

const protoCodecName = "proto"

// Methods that hand out the most (every signal; the target's CPU profile)
// and cost the most to answer.
var heavyMethods = map[string]bool{
	culpritv1.Diagnostics_GetSnapshot_FullMethodName:    true,
	culpritv1.Diagnostics_CaptureProfile_FullMethodName: true,
}

func isHealth(method string) bool { return strings.HasPrefix(method, "/grpc.health.v1.Health/") }

// gate decides, per call, before the call costs anything: the token, the
// exposure policy and the number of heavy calls in progress. It is the tap
// handle (run on the request headers, before a stream exists and before
// any message is read), a stats handler (counting heavy calls), the
// interceptors (the same checks again, and oversized requests) and the
// codec's partner for requests over their method's limit.
type gate struct {
	token         []byte // nil: no token configured
	exposed       bool   // listening beyond loopback
	authenticated bool   // mTLS or a token is required
	maxHeavy      int32
	maxRequest    int

	heavy    atomic.Int32 // heavy calls in progress
	oversize sync.Map     // request message (pointer) -> oversized
}

type oversized struct{ size, limit int }

// check is the whole policy for one call, from its method and metadata.
func (g *gate) check(method string, md metadata.MD) error {
	if isHealth(method) {
		return nil // probes need no secret
	}
	if g.token != nil && !g.tokenOK(md) {
		return status.Error(codes.Unauthenticated, "missing or wrong bearer token (agent.token_file)")
	}
	if heavyMethods[method] && g.exposed && !g.authenticated {
		return status.Errorf(codes.PermissionDenied,
			"%s is refused: agent.grpc_addr listens beyond loopback without client authentication; set agent.token_file or agent.tls_client_ca_file (mTLS). agent.allow_non_local exposes findings, never snapshots or profiles", method)
	}
	return nil
}

func (g *gate) tokenOK(md metadata.MD) bool {
	for _, v := range md.Get("authorization") {
		if got, ok := strings.CutPrefix(v, "Bearer "); ok && subtle.ConstantTimeCompare([]byte(got), g.token) == 1 {
			return true
		}
	}
	return false
}

// tap runs on a new stream's headers, bounded by MaxHeaderListSize, before
// the stream is created: a refused call never gets a message read.
func (g *gate) tap(ctx context.Context, info *tap.Info) (context.Context, error) {
	if err := g.check(info.FullMethodName, info.Header); err != nil {
		return nil, err
	}
	if heavyMethods[info.FullMethodName] && g.heavy.Load() >= g.maxHeavy {
		return nil, status.Errorf(codes.ResourceExhausted, "%d snapshot or profile calls are in progress, the most the agent serves at once; retry shortly", g.maxHeavy)
	}
	return ctx, nil
}

type heavyKey struct{}

// TagRPC marks heavy calls so HandleRPC counts them from Begin to End.
func (g *gate) TagRPC(ctx context.Context, info *stats.RPCTagInfo) context.Context {
	if heavyMethods[info.FullMethodName] {
		return context.WithValue(ctx, heavyKey{}, new(atomic.Bool))
	}
	return ctx
}

func (g *gate) HandleRPC(ctx context.Context, s stats.RPCStats) {
	begun, _ := ctx.Value(heavyKey{}).(*atomic.Bool)
	if begun == nil {
		return
	}
	switch s.(type) {
	case *stats.Begin:
		if begun.CompareAndSwap(false, true) {
			g.heavy.Add(1)
		}
	case *stats.End:
		if begun.CompareAndSwap(true, false) {
			g.heavy.Add(-1)
		}
	}
}

func (*gate) TagConn(ctx context.Context, _ *stats.ConnTagInfo) context.Context { return ctx }
func (*gate) HandleConn(context.Context, stats.ConnStats)                       {}

func (g *gate) unary(ctx context.Context, req any, info *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
	// The codec marked it before anything could decode it; forget it
	// first so an early return below cannot leave it in the map.
	over := g.takeOversize(req)
	md, _ := metadata.FromIncomingContext(ctx)
	if err := g.check(info.FullMethod, md); err != nil {
		return nil, err
	}
	if over != nil {
		return nil, over
	}
	return h(ctx, req)
}

func (g *gate) stream(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, h grpc.StreamHandler) error {
	md, _ := metadata.FromIncomingContext(ss.Context())
	if err := g.check(info.FullMethod, md); err != nil {
		return err
	}
	return h(srv, &limitedStream{ServerStream: ss, g: g})
}

// limitedStream refuses a received message the codec marked oversized.
type limitedStream struct {
	grpc.ServerStream
	g *gate
}

func (s *limitedStream) RecvMsg(m any) error {
	if err := s.ServerStream.RecvMsg(m); err != nil {
		return err
	}
	if err := s.g.takeOversize(m); err != nil {
		return err
	}
	return nil
}

func (g *gate) takeOversize(m any) error {
	v, ok := g.oversize.LoadAndDelete(m)
	if !ok {
		return nil
	}
	o := v.(oversized)
	return status.Errorf(codes.ResourceExhausted, "request %T of %d bytes is over its limit of %d bytes (agent.grpc_max_request_bytes caps every request)", m, o.size, o.limit)
}

// requestLimit is the most a request of v's type may take on the wire:
// requests of most methods are tiny, and a method's limit is checked
// before its request is decoded. 0 means only MaxRequestBytes applies.
func (g *gate) requestLimit(v any) int {
	var n int
	switch v.(type) {
	case *culpritv1.SnapshotRequest:
		n = 256 // empty today; room for fields to come
	case *culpritv1.GetFindingRequest:
		n = 1 << 10 // one id
	case *culpritv1.WatchRequest, *culpritv1.ListRequest:
		n = 4 << 10 // a severity, a cursor and some rule names
	default:
		return 0 // CaptureProfile's tids, health, reflection: MaxRequestBytes
	}
	return min(n, g.maxRequest)
}

// limitCodec is the proto codec with a size check before decoding. A
// request over its method's limit is left empty and marked: the
// interceptor then refuses it with RESOURCE_EXHAUSTED. Failing here would
// reach the client as INTERNAL ("error unmarshalling request"), which
// reads like the agent's fault.
type limitCodec struct {
	base encoding.CodecV2
	g    *gate
}

func (c limitCodec) Marshal(v any) (mem.BufferSlice, error) { return c.base.Marshal(v) }
func (c limitCodec) Name() string                           { return c.base.Name() }

func (c limitCodec) Unmarshal(data mem.BufferSlice, v any) error {
	if lim := c.g.requestLimit(v); lim > 0 && data.Len() > lim {
		c.g.oversize.Store(v, oversized{size: data.Len(), limit: lim})
		return nil
	}
	return c.base.Unmarshal(data, v)
}
