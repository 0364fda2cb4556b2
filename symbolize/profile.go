package symbolize

import (
	"errors"
	"fmt"
	"time"

	"github.com/google/pprof/profile"
)

// Sample is one aggregated stack as the eBPF side reports it.
type Sample struct {
	Pid, Tid int
	Thread   string   // thread name (comm)
	User     []uint64 // leaf first, as bpf_get_stackid returns them
	Kernel   []uint64 // leaf first
	Count    int64    // number of samples
}

// ProfileOptions describes how the samples were taken.
type ProfileOptions struct {
	Period   time.Duration // sampling period, e.g. 1s/49
	Start    time.Time
	Duration time.Duration
}

// CPUProfile builds a pprof CPU profile: sample types samples/count and
// cpu/nanoseconds (Count*Period). Each sample's locations are its kernel
// frames then its user frames, leaf first, with labels "thread", "tid" and
// "pid". Zero addresses (unused stack slots) are skipped.
func (s *Symbolizer) CPUProfile(samples []Sample, o ProfileOptions) (*profile.Profile, error) {
	if o.Period <= 0 {
		return nil, errors.New("cpu profile: period must be positive")
	}
	p := &profile.Profile{
		SampleType: []*profile.ValueType{
			{Type: "samples", Unit: "count"},
			{Type: "cpu", Unit: "nanoseconds"},
		},
		PeriodType:    &profile.ValueType{Type: "cpu", Unit: "nanoseconds"},
		Period:        o.Period.Nanoseconds(),
		DurationNanos: o.Duration.Nanoseconds(),
	}
	if !o.Start.IsZero() {
		p.TimeNanos = o.Start.UnixNano()
	}
	b := newProfileBuilder(p)
	st := &callState{now: s.now()}
	var ks *kallsyms
	for _, smp := range samples {
		if len(smp.Kernel) > 0 {
			ks = s.kernelSyms()
			break
		}
	}
	for _, smp := range samples {
		if smp.Count <= 0 {
			continue
		}
		ps := &profile.Sample{
			Value:    []int64{smp.Count, smp.Count * o.Period.Nanoseconds()},
			NumLabel: map[string][]int64{"tid": {int64(smp.Tid)}, "pid": {int64(smp.Pid)}},
		}
		if smp.Thread != "" {
			ps.Label = map[string][]string{"thread": {smp.Thread}}
		}
		leaf := true
		for _, a := range smp.Kernel {
			if a == 0 {
				continue
			}
			ps.Location = append(ps.Location, b.kernelLocation(ks, a, leaf))
			leaf = false
		}
		for _, a := range smp.User {
			if a == 0 {
				continue
			}
			// Under a kernel stack the user "leaf" is the return address of
			// the syscall instruction, so it is a return address too.
			l := b.userLocation(s, smp.Pid, a, leaf, st)
			if l == nil {
				break // no code there: the walk left the stack (see UserStack)
			}
			ps.Location = append(ps.Location, l)
			leaf = false
		}
		p.Sample = append(p.Sample, ps)
	}
	b.finish()
	if err := p.CheckValid(); err != nil {
		return nil, fmt.Errorf("cpu profile: %w", err)
	}
	return p, nil
}

type locKey struct {
	pid    int // -1 for the kernel
	addr   uint64
	leaf   bool
	kernel bool
}

type mapKey struct {
	pid                int
	start, end, offset uint64
	file               string
}

type funcKey struct {
	name, file string
}

type profileBuilder struct {
	p         *profile.Profile
	locs      map[locKey]*profile.Location
	maps      map[mapKey]*profile.Mapping
	funcs     map[funcKey]*profile.Function
	kernelMap *profile.Mapping
	// complete tracks whether every location of a mapping has a function,
	// which is when pprof may skip its own symbolization of the mapping.
	complete map[*profile.Mapping]bool
}

func newProfileBuilder(p *profile.Profile) *profileBuilder {
	return &profileBuilder{
		p:        p,
		locs:     make(map[locKey]*profile.Location),
		maps:     make(map[mapKey]*profile.Mapping),
		funcs:    make(map[funcKey]*profile.Function),
		complete: make(map[*profile.Mapping]bool),
	}
}

func (b *profileBuilder) userLocation(s *Symbolizer, pid int, addr uint64, leaf bool, st *callState) *profile.Location {
	k := locKey{pid: pid, addr: addr, leaf: leaf}
	if l, ok := b.locs[k]; ok {
		return l
	}
	r := s.resolveUser(pid, addr, leaf, st)
	if !r.code {
		b.locs[k] = nil // remembered, so the next sample skips the lookup
		return nil
	}
	var m *profile.Mapping
	if r.mapped {
		mk := mapKey{pid: pid, start: r.mapStart, end: r.mapEnd, offset: r.mapOffset, file: r.Module}
		if m = b.maps[mk]; m == nil {
			m = &profile.Mapping{
				ID:      uint64(len(b.p.Mapping) + 1),
				Start:   r.mapStart,
				Limit:   r.mapEnd,
				Offset:  r.mapOffset,
				File:    r.Module,
				BuildID: r.buildID,
			}
			b.maps[mk] = m
			b.p.Mapping = append(b.p.Mapping, m)
			b.complete[m] = true
		}
	}
	return b.location(k, r.Frame, m)
}

// kernelLocation puts every kernel frame in one mapping spanning the
// addresses seen: pprof needs a mapping to attribute them, and kallsyms says
// nothing about segment bounds.
func (b *profileBuilder) kernelLocation(ks *kallsyms, addr uint64, leaf bool) *profile.Location {
	k := locKey{pid: -1, addr: addr, leaf: leaf, kernel: true}
	if l, ok := b.locs[k]; ok {
		return l
	}
	pc := lookupAddr(addr, leaf)
	if b.kernelMap == nil {
		b.kernelMap = &profile.Mapping{ID: uint64(len(b.p.Mapping) + 1), File: kernelModule, Start: pc, Limit: pc + 1}
		b.p.Mapping = append(b.p.Mapping, b.kernelMap)
		b.complete[b.kernelMap] = true
	}
	b.kernelMap.Start = min(b.kernelMap.Start, pc)
	b.kernelMap.Limit = max(b.kernelMap.Limit, pc+1)
	return b.location(k, kernelFrame(ks, addr, leaf), b.kernelMap)
}

func (b *profileBuilder) location(k locKey, f Frame, m *profile.Mapping) *profile.Location {
	l := &profile.Location{
		ID:      uint64(len(b.p.Location) + 1),
		Mapping: m,
		// pprof's own perf converters store return addresses minus one, so
		// that address-level views point into the call instruction.
		Address: lookupAddr(f.Addr, k.leaf),
	}
	if f.Func != "" {
		fk := funcKey{name: f.Func, file: f.File}
		fn := b.funcs[fk]
		if fn == nil {
			fn = &profile.Function{ID: uint64(len(b.p.Function) + 1), Name: f.Func, SystemName: f.Func, Filename: f.File}
			b.funcs[fk] = fn
			b.p.Function = append(b.p.Function, fn)
		}
		l.Line = []profile.Line{{Function: fn, Line: int64(f.Line)}}
	} else if m != nil {
		b.complete[m] = false
	}
	b.locs[k] = l
	b.p.Location = append(b.p.Location, l)
	return l
}

func (b *profileBuilder) finish() {
	for m, ok := range b.complete {
		m.HasFunctions = ok
		if m != b.kernelMap {
			m.HasFilenames = ok
			m.HasLineNumbers = ok
		}
	}
}
