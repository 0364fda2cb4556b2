package probes

//go:generate go tool bpf2go -tags linux -target bpfel -type sample_key cpuProfile ../bpf/cpu_profile.c -- -I../bpf/headers -I/usr/include -Wall -Werror -O2

import (
	"context"
	"errors"
	"fmt"
	"runtime"
	"sync"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"golang.org/x/sys/unix"

	"github.com/culprit-dev/culprit/signals"
	"github.com/culprit-dev/culprit/target"
)

var (
	sigProfileSamples = &signals.Desc{Name: "profile_cpu_samples_total", Kind: signals.Counter,
		Help: "CPU samples of the target taken by the profiler (software CPU clock)."}
	sigProfileLost = &signals.Desc{Name: "profile_cpu_samples_lost_total", Kind: signals.Counter,
		Help: "CPU samples not counted: reason map_full (profiling.max_stacks too small) or no_stack."}
)

// CPUProfileOptions configure the profiler ([profiling] in agent.conf).
type CPUProfileOptions struct {
	Options
	// Frequency is samples per second per CPU.
	Frequency int
	// MaxStacks bounds the distinct (thread, stack) pairs counted between
	// two drains, and the stack maps.
	MaxStacks uint32
	// Drain is how often counts are moved from the kernel to Samples.
	Drain time.Duration
	// Samples receives the drained counts.
	Samples *signals.CPUSamples
}

// CPUProfile samples the target's on-CPU stacks: see bpf/cpu_profile.c.
type CPUProfile struct {
	o CPUProfileOptions

	mu      sync.Mutex
	objs    *cpuProfileObjects
	links   []link.Link
	perfFDs []int
	wg      sync.WaitGroup
	cancel  context.CancelFunc
	started bool
	group   group // the target and its children
	gen     uint32
	total   uint64
	names   threadNames // for the current target
}

// NewCPUProfile returns the profiler, not yet loaded.
func NewCPUProfile(o CPUProfileOptions) *CPUProfile {
	if o.Frequency <= 0 {
		o.Frequency = 49
	}
	if o.Drain <= 0 {
		o.Drain = time.Second
	}
	if o.Samples == nil {
		o.Samples = signals.NewCPUSamples(4096)
	}
	return &CPUProfile{o: o, names: threadNames{}}
}

func (*CPUProfile) Name() string { return "cpu_profile" }

func (*CPUProfile) Lost() []string {
	return []string{
		"cpu_bound_worker: the hottest functions of the busy thread",
		"CaptureProfile: CPU profiles of the target",
	}
}

// Start loads the program and opens one software CPU-clock event per CPU.
func (p *CPUProfile) Start(ctx context.Context, tracker *target.Tracker, store *signals.Store) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.started {
		return errors.New("cpu_profile: already started")
	}
	spec, err := loadCpuProfile()
	if err != nil {
		return fmt.Errorf("cpu_profile: load spec: %w", err)
	}
	resize(spec, map[string]uint32{"counts0": p.o.MaxStacks, "counts1": p.o.MaxStacks, "stacks0": p.o.MaxStacks, "stacks1": p.o.MaxStacks})
	objs := &cpuProfileObjects{}
	if err := load("cpu_profile", spec, objs); err != nil {
		return err
	}
	p.objs = objs
	for cpu := 0; cpu < runtime.NumCPU(); cpu++ {
		attr := unix.PerfEventAttr{
			Type:   unix.PERF_TYPE_SOFTWARE,
			Config: unix.PERF_COUNT_SW_CPU_CLOCK,
			Size:   uint32(unixPerfEventAttrSize),
			Sample: uint64(p.o.Frequency),
			Bits:   unix.PerfBitFreq,
		}
		fd, err := unix.PerfEventOpen(&attr, -1, cpu, -1, unix.PERF_FLAG_FD_CLOEXEC)
		if err != nil {
			if errors.Is(err, unix.ENODEV) || errors.Is(err, unix.ENOENT) {
				continue // CPU offline
			}
			p.closeLocked()
			return fmt.Errorf("cpu_profile: perf_event_open on CPU %d (needs CAP_PERFMON): %w", cpu, err)
		}
		p.perfFDs = append(p.perfFDs, fd)
		l, err := link.AttachRawLink(link.RawLinkOptions{Target: fd, Program: objs.CulpritCpuSample, Attach: ebpf.AttachPerfEvent})
		if err != nil {
			p.closeLocked()
			return fmt.Errorf("cpu_profile: attach to the perf event of CPU %d: %w", cpu, err)
		}
		p.links = append(p.links, l)
	}
	if len(p.links) == 0 {
		p.closeLocked()
		return errors.New("cpu_profile: no online CPU accepted a perf event")
	}
	p.o.Samples.SetPeriod(time.Second / time.Duration(p.o.Frequency))
	p.started = true
	ctx, p.cancel = context.WithCancel(ctx)
	p.wg.Add(1)
	go func() { defer p.wg.Done(); p.run(ctx, objs, tracker, store) }()
	return nil
}

const unixPerfEventAttrSize = 136 // PERF_ATTR_SIZE_VER8; the kernel accepts any known version

func (p *CPUProfile) run(ctx context.Context, objs *cpuProfileObjects, tracker *target.Tracker, store *signals.Store) {
	tick := time.NewTicker(p.o.Drain)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		tgt, ok := tracker.Current()
		if !ok {
			continue
		}
		if err := p.setTarget(objs, tgt.PID, time.Now()); err != nil {
			p.o.Log.Warn("cpu_profile: set target", "err", err)
			continue
		}
		if err := p.drain(objs, tgt.PID, store, time.Now()); err != nil {
			p.o.Log.Warn("cpu_profile: drain", "err", err)
		}
	}
}

func (p *CPUProfile) setTarget(objs *cpuProfileObjects, pid int, now time.Time) error {
	changed, err := p.group.update(objs.Targets, pid, now)
	if changed {
		clear(p.names)
	}
	return err
}

// drain flips the generation the program writes to, then moves the other
// generation's counts into Samples and empties its maps.
func (p *CPUProfile) drain(objs *cpuProfileObjects, pid int, store *signals.Store, now time.Time) error {
	old := p.gen
	p.gen ^= 1
	if err := objs.Gen.Put(uint32(0), p.gen); err != nil {
		return fmt.Errorf("flip generation: %w", err)
	}
	// A program that read the old generation just before the flip is still
	// finishing; they run for microseconds.
	time.Sleep(2 * time.Millisecond)
	counts, stacks := objs.Counts0, objs.Stacks0
	if old == 1 {
		counts, stacks = objs.Counts1, objs.Stacks1
	}
	var (
		key   cpuProfileSampleKey
		n     uint64
		keys  []cpuProfileSampleKey
		out   []signals.StackSample
		cache = map[int32][]uint64{}
	)
	stackOf := func(id int32) []uint64 {
		if id < 0 {
			return nil
		}
		if s, ok := cache[id]; ok {
			return s
		}
		s := readStack(stacks, id)
		cache[id] = s
		return s
	}
	it := counts.Iterate()
	for it.Next(&key, &n) {
		keys = append(keys, key)
		if !p.group.has(key.Tgid) {
			continue
		}
		p.total += n
		out = append(out, signals.StackSample{
			T: now, Pid: int(key.Tgid), Tid: int(key.Tid), Thread: p.names.get(int(key.Tgid), int(key.Tid)),
			User: stackOf(key.Ustack), Kernel: stackOf(key.Kstack), Count: int64(n),
		})
	}
	if err := it.Err(); err != nil {
		return fmt.Errorf("iterate counts: %w", err)
	}
	for _, k := range keys {
		_ = counts.Delete(k) // the map is only ours until the next flip
	}
	for id := range cache {
		_ = stacks.Delete(uint32(id))
	}
	p.o.Samples.Add(out)
	self := signals.L("probe", p.Name())
	store.Put(sigProfileSamples, nil, float64(p.total), now)
	store.Put(sigProbeEvents, self, float64(p.total), now)
	for i, reason := range []string{"map_full", "no_stack"} {
		var lost uint64
		if err := objs.Lost.Lookup(uint32(i), &lost); err == nil {
			store.Put(sigProfileLost, signals.L("reason", reason), float64(lost), now)
		}
	}
	return nil
}

// Close detaches the program and closes the perf events.
func (p *CPUProfile) Close() error {
	p.mu.Lock()
	if p.cancel != nil {
		p.cancel()
	}
	p.mu.Unlock()
	p.wg.Wait()
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.closeLocked()
}

func (p *CPUProfile) closeLocked() error {
	errs := []error{closeLinks(p.links)}
	p.links = nil
	for _, fd := range p.perfFDs {
		errs = append(errs, unix.Close(fd))
	}
	p.perfFDs = nil
	if p.objs != nil {
		errs = append(errs, p.objs.Close())
		p.objs = nil
	}
	return errors.Join(errs...)
}
