package profiles

import (
	"encoding/binary"
	"errors"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"time"

	"github.com/google/pprof/profile"

	"github.com/culprit-dev/culprit/rules"
	"github.com/culprit-dev/culprit/signals"
	"github.com/culprit-dev/culprit/symbolize"
)

// CPU turns the profiler's raw samples into what rules and the gRPC API
// need: the hottest functions of one thread, or a pprof profile of a
// window. Symbolization happens here, on demand, because most samples are
// never looked at.
type CPU struct {
	samples *signals.CPUSamples
	symbols *symbolize.Symbolizer
	drain   time.Duration
}

// NewCPU reads samples, names their addresses with symbols, and knows
// that a sample reaches samples up to drain (profiling.drain_interval)
// after it was taken.
func NewCPU(samples *signals.CPUSamples, symbols *symbolize.Symbolizer, drain time.Duration) CPU {
	return CPU{samples: samples, symbols: symbols, drain: drain}
}

// The sources the rules read CPU samples through.
var (
	_ rules.HotFrames = CPU{}
	_ rules.HotStacks = CPU{}
)

// Settle is how long samples take to reach memory.
func (c CPU) Settle() time.Duration { return c.drain }

var errNoSamples = errors.New("no CPU samples of the target in that window (is profiling enabled, and is the target running?)")

// HotFrames is the functions with the most self samples of thread tid,
// leaf user frame first (the kernel leaf when the thread was sampled in
// the kernel without a user stack).
func (c CPU) HotFrames(tid int, from, to time.Time, n int) []rules.FrameShare {
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

// HotStacks is thread tid's distinct user stacks, whole, most samples
// first, at most n (rules.HotStacks): busy_worker names the app's function
// the hot leaves ran for from them. Samples of the window as HotFrames
// takes them; stacks are cut where no code is (UserStack).
func (c CPU) HotStacks(tid int, from, to time.Time, n int) []rules.StackShare {
	type stack struct {
		rules.StackShare
		count int64
	}
	// The same addresses come back drain after drain: each distinct stack
	// is symbolized once.
	type raw struct {
		pid   int
		user  []uint64
		count int64
	}
	byAddr := map[string]*raw{}
	var total int64
	for _, s := range c.samples.Range(from, to.Add(c.drain)) {
		if s.Tid != tid {
			continue
		}
		total += s.Count
		key := make([]byte, 0, 8*(len(s.User)+1))
		key = binary.LittleEndian.AppendUint64(key, uint64(s.Pid))
		for _, a := range s.User {
			key = binary.LittleEndian.AppendUint64(key, a)
		}
		r := byAddr[string(key)]
		if r == nil {
			r = &raw{pid: s.Pid, user: s.User}
			byAddr[string(key)] = r
		}
		r.count += s.Count
	}
	raws := make([]*raw, 0, len(byAddr))
	for _, r := range byAddr {
		raws = append(raws, r)
	}
	frames := c.userStacks(len(raws), func(i int) (int, []uint64) { return raws[i].pid, raws[i].user })
	by := map[string]*stack{}
	for i, r := range raws {
		fs := frames[i]
		if len(fs) == 0 {
			continue // in the kernel only: counted, no function of the app
		}
		names := make([]string, len(fs))
		lib := make([]bool, len(fs))
		for i, f := range fs {
			names[i] = f.String()
			lib[i] = sharedLibrary(f.Module)
		}
		key := strings.Join(names, "\n")
		st := by[key]
		if st == nil {
			st = &stack{StackShare: rules.StackShare{Frames: names, Library: lib}}
			by[key] = st
		}
		st.count += r.count
	}
	out := make([]*stack, 0, len(by))
	for _, st := range by {
		st.Share = float64(st.count) / float64(total)
		out = append(out, st)
	}
	sort.Slice(out, func(i, j int) bool {
		if out[i].count != out[j].count {
			return out[i].count > out[j].count
		}
		return strings.Join(out[i].Frames, "\n") < strings.Join(out[j].Frames, "\n")
	})
	res := make([]rules.StackShare, 0, min(n, len(out)))
	for _, st := range out[:min(n, len(out))] {
		res = append(res, st.StackShare)
	}
	return res
}

// userStacks symbolizes many user stacks as UserStack does, each cut at
// the first address where no code is. The return addresses of all stacks
// of a process are looked up in one call: an address in no mapping (the
// V8 bytecode an interpreted JavaScript frame is named by, through the
// perf map) makes the symbolizer read the process's maps again, once per
// call.
func (c CPU) userStacks(n int, stack func(i int) (int, []uint64)) [][]symbolize.Frame {
	byPid := map[int][]uint64{}
	at := make([]int, n) // where stack i's return addresses are in byPid[pid]
	out := make([][]symbolize.Frame, n)
	for i := range n {
		pid, addrs := stack(i)
		if len(addrs) == 0 {
			continue
		}
		// A leaf is resolved at its own address, a return address at the
		// one before it: leaves one by one.
		out[i] = c.symbols.User(pid, addrs[:1])
		if len(byPid[pid]) == 0 {
			byPid[pid] = []uint64{0} // a leaf that resolves to nothing
		}
		at[i] = len(byPid[pid])
		byPid[pid] = append(byPid[pid], addrs[1:]...)
	}
	resolved := make(map[int][]symbolize.Frame, len(byPid))
	for pid, addrs := range byPid {
		resolved[pid] = c.symbols.User(pid, addrs)
	}
	for i := range n {
		pid, addrs := stack(i)
		if len(addrs) == 0 {
			continue
		}
		fs := append(out[i], resolved[pid][at[i]:at[i]+len(addrs)-1]...)
		// Code is what a mapping holds or the perf map names: the first
		// frame that is neither ends the stack (UserStack's rule).
		for j, f := range fs {
			if f.Module == "" && !f.JIT {
				fs = fs[:j]
				break
			}
		}
		out[i] = fs
	}
	return out
}

// sharedLibrary reports whether module (a mapped file's path) is a shared
// library (libc.so.6, libcrypto.so.3, ld-linux-x86-64.so.2) rather than
// the program itself: frames there are what the program called.
func sharedLibrary(module string) bool {
	base := filepath.Base(module)
	return strings.HasSuffix(base, ".so") || strings.Contains(base, ".so.")
}

// Profile builds a CPU profile of the samples taken in (from, to], of
// the threads tids (all when empty).
func (c CPU) Profile(from, to time.Time, tids []int) (*profile.Profile, error) {
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
