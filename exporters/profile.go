package exporters

import (
	"bytes"
	"context"
	"time"

	"github.com/google/pprof/profile"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/timestamppb"

	culpritv1 "github.com/culprit-dev/culprit/proto/culprit/v1"
)

// ProfileSource builds CPU profiles of the target from samples the
// profiler already took.
type ProfileSource interface {
	// Profile covers the samples taken in (from, to], of the threads in
	// tids (all when empty).
	Profile(from, to time.Time, tids []int) (*profile.Profile, error)
	// Settle is how long after a moment its samples become readable (the
	// profiler's drain interval).
	Settle() time.Duration
}

// CaptureProfile waits for the asked duration (or looks back), then
// returns the target's CPU profile of that window.
func (g *GRPCServer) CaptureProfile(ctx context.Context, req *culpritv1.CaptureProfileRequest) (*culpritv1.CaptureProfileResponse, error) {
	if g.profiles == nil {
		return nil, status.Error(codes.FailedPrecondition, "the CPU profiler does not run (profiling.enabled = false, or the cpu_profile probe could not load: see GetSnapshot's statuses)")
	}
	dur, look := req.GetDuration().AsDuration(), req.GetLookback().AsDuration()
	switch {
	case req.GetDuration() != nil && req.GetLookback() != nil:
		return nil, status.Error(codes.InvalidArgument, "set duration or lookback, not both")
	case dur <= 0 && look <= 0:
		return nil, status.Error(codes.InvalidArgument, "duration or lookback must be positive")
	case max(dur, look) > g.maxCapture:
		return nil, status.Errorf(codes.InvalidArgument, "at most %s may be captured (profiling.max_capture)", g.maxCapture)
	}
	var from, to time.Time
	if dur > 0 {
		from = time.Now()
		to = from.Add(dur)
		// Wait for the window, then for the drain that reads its last samples.
		t := time.NewTimer(dur + g.profiles.Settle())
		defer t.Stop()
		select {
		case <-ctx.Done():
			return nil, status.FromContextError(ctx.Err()).Err()
		case <-t.C:
		}
		to = to.Add(g.profiles.Settle())
	} else {
		to = time.Now()
		from = to.Add(-look)
	}
	tids := make([]int, len(req.GetTids()))
	for i, t := range req.GetTids() {
		tids[i] = int(t)
	}
	p, err := g.profiles.Profile(from, to, tids)
	if err != nil {
		return nil, status.Errorf(codes.NotFound, "no profile: %v", err)
	}
	var buf bytes.Buffer
	if err := p.Write(&buf); err != nil {
		return nil, status.Errorf(codes.Internal, "encode profile: %v", err)
	}
	var n int64
	for _, smp := range p.Sample {
		if len(smp.Value) > 0 {
			n += smp.Value[0]
		}
	}
	return &culpritv1.CaptureProfileResponse{
		Pprof:    buf.Bytes(),
		Start:    timestamppb.New(from),
		Duration: durationpb.New(to.Sub(from)),
		Samples:  n,
		Period:   durationpb.New(time.Duration(p.Period)),
	}, nil
}
