package exporters

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"log/slog"
	"sort"
	"sync"
	"time"

	culpritv1 "github.com/culprit-dev/culprit/proto/culprit/v1"
	"github.com/culprit-dev/culprit/rules"
	"github.com/culprit-dev/culprit/signals"
	"github.com/culprit-dev/culprit/workload"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/reflection"
	"google.golang.org/grpc/status"
)

// DefaultMaxBatch is how many journal events one watcher copies per read
// when GRPCOptions.MaxBatch is not set.
const DefaultMaxBatch = 256

// GRPCOptions configures NewGRPC.
type GRPCOptions struct {
	Journal *rules.Journal
	Store   *signals.Store
	Tracker *workload.Tracker // may be nil: the snapshot then has no target
	Version string
	Log     *slog.Logger
	// MaxBatch bounds the events a watcher copies out of the journal at
	// once, so a watcher far behind holds the journal lock briefly.
	MaxBatch int
	// Profiles serves CaptureProfile; nil when the profiler does not run.
	Profiles ProfileSource
	// MaxCapture bounds what CaptureProfile may be asked for.
	MaxCapture time.Duration
	// InstanceID names this run of the agent in every event, so a
	// watcher's cursor (a sequence, which restarts with the process) is
	// never taken for another run's. Empty: a random one.
	InstanceID string
}

// GRPCServer serves culprit.v1.Diagnostics from the journal and the signal
// store. It keeps no per-client state but a cursor, so a slow client only
// falls behind (and resynchronises) without holding anything up.
type GRPCServer struct {
	culpritv1.UnimplementedDiagnosticsServer

	journal    *rules.Journal
	store      *signals.Store
	tracker    *workload.Tracker
	version    string
	log        *slog.Logger
	maxBatch   int
	health     *health.Server
	profiles   ProfileSource
	maxCapture time.Duration
	instance   string

	stopOnce sync.Once
	stopping chan struct{}
}

var _ culpritv1.DiagnosticsServer = (*GRPCServer)(nil)

// NewGRPC returns the Diagnostics service. A missing journal or store is
// replaced by an empty one, so a partly wired agent serves empty answers
// instead of crashing on the first call.
func NewGRPC(o GRPCOptions) *GRPCServer {
	log := o.Log
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if o.Journal == nil {
		log.Warn("gRPC service has no journal; findings will be empty")
		o.Journal = rules.NewJournal(1)
	}
	if o.Store == nil {
		log.Warn("gRPC service has no signal store; snapshots will be empty")
		o.Store = signals.New(2, 1)
	}
	if o.MaxBatch <= 0 {
		o.MaxBatch = DefaultMaxBatch
	}
	if o.MaxCapture <= 0 {
		o.MaxCapture = time.Minute
	}
	if o.InstanceID == "" {
		o.InstanceID = NewInstanceID()
	}
	return &GRPCServer{
		journal:    o.Journal,
		store:      o.Store,
		tracker:    o.Tracker,
		version:    o.Version,
		log:        log,
		maxBatch:   o.MaxBatch,
		health:     health.NewServer(),
		profiles:   o.Profiles,
		maxCapture: o.MaxCapture,
		instance:   o.InstanceID,
		stopping:   make(chan struct{}),
	}
}

// NewInstanceID returns a random id for one run of the agent: 64 bits, so
// two runs never share one in practice.
func NewInstanceID() string {
	var b [8]byte
	rand.Read(b[:]) // never fails on Linux (getrandom)
	return hex.EncodeToString(b[:])
}

// InstanceID is the id of this run, as sent in every event.
func (g *GRPCServer) InstanceID() string { return g.instance }

// Register adds Diagnostics, grpc.health.v1 and server reflection to s, so
// that `grpcurl -plaintext host:port list` works with no proto files.
func (g *GRPCServer) Register(s *grpc.Server) {
	culpritv1.RegisterDiagnosticsServer(s, g)
	g.health.SetServingStatus("", healthpb.HealthCheckResponse_SERVING)
	g.health.SetServingStatus(culpritv1.Diagnostics_ServiceDesc.ServiceName, healthpb.HealthCheckResponse_SERVING)
	healthpb.RegisterHealthServer(s, g.health)
	reflection.Register(s)
}

// Shutdown marks every service NOT_SERVING and ends open WatchFindings
// streams with codes.Unavailable, which clients treat as "retry from my
// cursor". Call it before grpc.Server.GracefulStop: a watch stream never
// ends by itself, so GracefulStop would otherwise wait for every watcher.
func (g *GRPCServer) Shutdown() {
	g.stopOnce.Do(func() {
		g.health.Shutdown()
		close(g.stopping)
	})
}

// errShuttingDown tells a watcher to reconnect and resume from its cursor.
var errShuttingDown = status.Error(codes.Unavailable, "agent shutting down; resume from your last sequence")

// filter is a request's min_severity and rules.
type filter struct {
	min   rules.Severity
	rules map[string]bool
}

func newFilter(min culpritv1.Severity, names []string) (filter, error) {
	sev, ok := severityFromProto(min)
	if !ok {
		return filter{}, status.Errorf(codes.InvalidArgument, "min_severity %d is not a known severity", int32(min))
	}
	f := filter{min: sev}
	if len(names) > 0 {
		f.rules = make(map[string]bool, len(names))
		for _, n := range names {
			f.rules[n] = true
		}
	}
	return f, nil
}

func (f filter) match(fd rules.Finding) bool {
	if f.min != 0 && fd.Severity < f.min {
		return false
	}
	return f.rules == nil || f.rules[fd.Rule]
}

// WatchFindings streams finding events as the proto describes. The cursor
// always advances past events the filter drops, so a resumed stream never
// re-reads them.
func (g *GRPCServer) WatchFindings(req *culpritv1.WatchRequest, stream grpc.ServerStreamingServer[culpritv1.FindingEvent]) error {
	flt, err := newFilter(req.GetMinSeverity(), req.GetRules())
	if err != nil {
		return err
	}
	ctx := stream.Context()
	log := g.log.With("peer", peerAddr(ctx), "since", req.GetSinceSequence(), "since_instance", req.GetInstanceId())
	log.Debug("watcher connected")
	defer log.Debug("watcher left")

	// Subscribe before the first read, so that an event appended between
	// that read and the first wait still leaves a token.
	tokens, unsubscribe := g.journal.Subscribe()
	defer unsubscribe()

	cursor := req.GetSinceSequence()
	switch since := req.GetInstanceId(); {
	case cursor == 0:
		cursor, err = g.sendCurrent(stream, flt)
	case since != "" && since != g.instance:
		// Sequences restart with the process: the cursor counts another
		// run's events, and following it would replay this run's from
		// an unrelated number.
		log.Info("watcher resumes from another run of the agent; telling it so", "instance", g.instance)
		cursor, err = g.restarted(stream, flt, fmt.Sprintf("the agent restarted: sequence %d was issued by run %s, this is run %s", cursor, since, g.instance))
	case cursor > g.journal.Sequence():
		// A cursor from the future without an instance id was handed
		// out by an earlier run too; what it knew is gone.
		log.Info("watcher resumes from a sequence this agent never issued; resynchronising", "journal_sequence", g.journal.Sequence())
		cursor, err = g.restarted(stream, flt, fmt.Sprintf("sequence %d was never issued by this run of the agent (%s): it restarted", cursor, g.instance))
	}
	if err != nil {
		return err
	}
	for {
		// A watcher that never idles must still notice shutdown.
		select {
		case <-g.stopping:
			return g.flush(stream, flt, cursor)
		default:
		}
		evs, gap := g.journal.After(cursor, g.maxBatch)
		if gap {
			log.Info("watcher fell behind the journal; resynchronising", "cursor", cursor)
			if cursor, err = g.resync(stream, flt, cursor, fmt.Sprintf("events after sequence %d left the journal (findings.history) before this client read them", cursor)); err != nil {
				return err
			}
			continue
		}
		if len(evs) == 0 {
			select {
			case <-ctx.Done():
				return nil
			case <-g.stopping:
				return g.flush(stream, flt, cursor)
			case <-tokens:
			}
			continue
		}
		for _, ev := range evs {
			cursor = ev.Sequence
			if !flt.match(ev.Finding) {
				continue
			}
			if err := stream.Send(g.event(ev)); err != nil {
				return sendErr(ctx, err)
			}
		}
	}
}

// flush sends the watcher what the journal holds after its cursor (the
// engine has stopped, so this is the final state), then ends the stream
// with Unavailable so the client resumes from the last sequence at the
// next agent.
func (g *GRPCServer) flush(stream grpc.ServerStreamingServer[culpritv1.FindingEvent], flt filter, cursor uint64) error {
	for range 1024 { // bounded: the journal is, but never loop on a bug
		evs, gap := g.journal.After(cursor, g.maxBatch)
		if gap || len(evs) == 0 {
			break
		}
		for _, ev := range evs {
			cursor = ev.Sequence
			if !flt.match(ev.Finding) {
				continue
			}
			if err := stream.Send(g.event(ev)); err != nil {
				return errShuttingDown
			}
		}
	}
	return errShuttingDown
}

// sendCurrent sends one CURRENT event per open finding and returns the
// sequence they are current as of. Each carries its finding's own last
// sequence and they go out lowest first: a client that keeps the highest
// sequence it saw and resumes from it after a break anywhere in this burst
// replays the remaining findings' events instead of losing them.
func (g *GRPCServer) sendCurrent(stream grpc.ServerStreamingServer[culpritv1.FindingEvent], flt filter) (uint64, error) {
	open, seq := g.journal.Open()
	sort.SliceStable(open, func(a, b int) bool { return open[a].Sequence < open[b].Sequence })
	for _, f := range open {
		if !flt.match(f) {
			continue
		}
		ev := &culpritv1.FindingEvent{
			Type:       culpritv1.FindingEvent_TYPE_CURRENT,
			Sequence:   f.Sequence,
			Time:       timestamp(f.LastSeen),
			Finding:    FindingToProto(f),
			InstanceId: g.instance,
		}
		if err := stream.Send(ev); err != nil {
			return 0, sendErr(stream.Context(), err)
		}
	}
	return seq, nil
}

// event converts a journal event of this run for the stream.
func (g *GRPCServer) event(ev rules.Event) *culpritv1.FindingEvent {
	pe := EventToProto(ev)
	pe.InstanceId = g.instance
	return pe
}

// resync tells the client it missed this run's events after cursor, then
// sends what is open now.
func (g *GRPCServer) resync(stream grpc.ServerStreamingServer[culpritv1.FindingEvent], flt filter, cursor uint64, why string) (uint64, error) {
	if err := g.sendGap(stream, cursor+1, why); err != nil { // cursor+1: the first event the client will never see
		return 0, err
	}
	return g.sendCurrent(stream, flt)
}

// restarted tells a client whose cursor came from another run that what
// followed it is lost. It then gets this run from its first event when
// the journal still holds them all (so not even a finding that opened
// and resolved meanwhile is missed), else the open findings as CURRENT.
// The returned cursor is where the stream goes on.
func (g *GRPCServer) restarted(stream grpc.ServerStreamingServer[culpritv1.FindingEvent], flt filter, why string) (uint64, error) {
	if err := g.sendGap(stream, 0, why); err != nil {
		return 0, err
	}
	if _, gap := g.journal.After(0, 1); !gap {
		return 0, nil // the loop replays from sequence 1
	}
	return g.sendCurrent(stream, flt)
}

func (g *GRPCServer) sendGap(stream grpc.ServerStreamingServer[culpritv1.FindingEvent], seq uint64, why string) error {
	ev := &culpritv1.FindingEvent{
		Type:       culpritv1.FindingEvent_TYPE_GAP,
		Sequence:   seq,
		Time:       timestamp(time.Now()),
		InstanceId: g.instance,
		Detail:     why,
	}
	if err := stream.Send(ev); err != nil {
		return sendErr(stream.Context(), err)
	}
	return nil
}

// sendErr keeps a client that went away from looking like a server fault.
func sendErr(ctx context.Context, err error) error {
	if ctx.Err() != nil {
		return status.FromContextError(ctx.Err()).Err()
	}
	if _, ok := status.FromError(err); ok {
		return err
	}
	return status.Errorf(codes.Unavailable, "send finding event: %v", err)
}

func peerAddr(ctx context.Context) string {
	if p, ok := peer.FromContext(ctx); ok && p.Addr != nil {
		return p.Addr.String()
	}
	return "unknown"
}

// ListFindings returns the open findings (and recently resolved ones if
// asked) with the sequence they are current as of.
func (g *GRPCServer) ListFindings(_ context.Context, req *culpritv1.ListRequest) (*culpritv1.ListResponse, error) {
	flt, err := newFilter(req.GetMinSeverity(), req.GetRules())
	if err != nil {
		return nil, err
	}
	open, seq := g.journal.Open()
	resp := &culpritv1.ListResponse{Sequence: seq, InstanceId: g.instance}
	seen := make(map[string]int, len(open)) // id -> index in resp.Findings
	for _, f := range open {
		if flt.match(f) {
			seen[f.ID] = len(resp.Findings)
			resp.Findings = append(resp.Findings, FindingToProto(f))
		}
	}
	if req.GetIncludeResolved() {
		// Open and Resolved are two reads: a finding resolved in between
		// is in both, and the state with the higher sequence is the newer
		// word.
		for _, f := range g.journal.Resolved() {
			if !flt.match(f) {
				continue
			}
			if i, ok := seen[f.ID]; ok {
				if f.Sequence > resp.Findings[i].GetSequence() {
					resp.Findings[i] = FindingToProto(f)
				}
				continue
			}
			resp.Findings = append(resp.Findings, FindingToProto(f))
		}
	}
	return resp, nil
}

// GetFinding returns one open or recently resolved finding.
func (g *GRPCServer) GetFinding(_ context.Context, req *culpritv1.GetFindingRequest) (*culpritv1.Finding, error) {
	if req.GetId() == "" {
		return nil, status.Error(codes.InvalidArgument, "finding id is empty")
	}
	f, ok := g.journal.Get(req.GetId())
	if !ok {
		return nil, status.Errorf(codes.NotFound, "finding %q is neither open nor recently resolved", req.GetId())
	}
	return FindingToProto(f), nil
}

// GetSnapshot returns every current signal, the target and the state of
// each collector and probe.
func (g *GRPCServer) GetSnapshot(context.Context, *culpritv1.SnapshotRequest) (*culpritv1.Snapshot, error) {
	cur := g.store.Snapshot()
	sts := g.store.Statuses()
	snap := &culpritv1.Snapshot{
		Time:       timestamp(time.Now()),
		Target:     targetToProto(g.tracker),
		Signals:    make([]*culpritv1.Signal, 0, len(cur)),
		Components: make([]*culpritv1.ComponentStatus, 0, len(sts)),
		Sequence:   g.journal.Sequence(),
		Version:    g.version,
		InstanceId: g.instance,
	}
	for _, c := range cur {
		snap.Signals = append(snap.Signals, SignalToProto(c))
	}
	for _, s := range sts {
		snap.Components = append(snap.Components, StatusToProto(s))
	}
	return snap, nil
}
