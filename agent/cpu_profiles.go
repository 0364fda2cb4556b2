package main

import (
	"errors"
	"slices"
	"sort"
	"time"

	"github.com/google/pprof/profile"

	"github.com/culprit-dev/culprit/rules"
	"github.com/culprit-dev/culprit/signals"
	"github.com/culprit-dev/culprit/symbolize"
)

// cpuProfiles turns the profiler's raw samples into what rules and the
// gRPC API need: the hottest functions of one thread, or a pprof profile
// of a window. Symbolization happens here, on demand, because most samples
// are never looked at.
type cpuProfiles struct {
	samples *signals.CPUSamples
	symbols *symbolize.Symbolizer
	drain   time.Duration
}

// Settle is how long samples take to reach memory.
func (c cpuProfiles) Settle() time.Duration { return c.drain }

var errNoSamples = errors.New("no CPU samples of the target in that window (is profiling enabled, and is the target running?)")

// HotFrames is the functions with the most self samples of thread tid,
// leaf user frame first (the kernel leaf when the thread was sampled in
// the kernel without a user stack).
func (c cpuProfiles) HotFrames(tid int, from, to time.Time, n int) []rules.FrameShare {
	// A sample stamped T was taken in (T-drain, T]: the run's samples are
	// those stamped in [from, to+drain]. Reaching back a drain before from
	// pulled in the thread's idle wait before its run ("epoll_pwait 100%").
	ss := c.samples.Range(from, to.Add(c.drain))
	counts := map[string]int64{}
	var total int64
	for _, s := range ss {
		if s.Tid != tid {
			continue
		}
		var name string
		var user []symbolize.Frame
		if len(s.User) > 0 {
			// Empty when no code is at the leaf any more (the process
			// exited): then the kernel leaf, if any, names the sample.
			user = c.symbols.UserStack(s.Pid, s.User[:1])
		}
		switch {
		case len(user) > 0:
			name = user[0].String()
		case len(s.Kernel) > 0:
			name = c.symbols.Kernel(s.Kernel[:1])[0].String()
		default:
			continue
		}
		counts[name] += s.Count
		total += s.Count
	}
	out := make([]rules.FrameShare, 0, len(counts))
	for f, k := range counts {
		out = append(out, rules.FrameShare{Func: f, Share: float64(k) / float64(total)})
	}
	sort.Slice(out, func(i, j int) bool {
		if out[i].Share != out[j].Share {
			return out[i].Share > out[j].Share
		}
		return out[i].Func < out[j].Func
	})
	if len(out) > n {
		out = out[:n]
	}
	return out
}

// Profile builds a CPU profile of the samples taken in (from, to], of
// the threads tids (all when empty).
func (c cpuProfiles) Profile(from, to time.Time, tids []int) (*profile.Profile, error) {
	var in []symbolize.Sample
	for _, s := range c.samples.Range(from, to) {
		if len(tids) > 0 && !slices.Contains(tids, s.Tid) {
			continue
		}
		in = append(in, symbolize.Sample{Pid: s.Pid, Tid: s.Tid, Thread: s.Thread, User: s.User, Kernel: s.Kernel, Count: s.Count})
	}
	if len(in) == 0 {
		return nil, errNoSamples
	}
	return c.symbols.CPUProfile(in, symbolize.ProfileOptions{Period: c.samples.Period(), Start: from, Duration: to.Sub(from)})
}
