package probes

//go:generate go tool bpf2go -tags linux -target bpfel -type sample_key -type sample_event cpuProfile ../bpf/cpu_profile.c -- -I../bpf/headers -I/usr/include -Wall -Werror -O2

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"runtime"
	"strconv"
	"sync"
	"time"
	"unsafe"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"golang.org/x/sys/unix"

	"github.com/culprit-dev/culprit/signals"
	"github.com/culprit-dev/culprit/symbolize"
	"github.com/culprit-dev/culprit/workload"
)

const (
	// DefaultStackBytes is how much user stack a CPU sample carries when
	// CPUProfileOptions.StackBytes is 0. Measured with node 20 spinning in
	// crypto.pbkdf2Sync: with 4 KiB copied, half of the samples reached the
	// JavaScript function that called it; with 6 KiB, 98% (OpenSSL's
	// SHA-512, node's crypto binding and V8's C++ and builtins lie between).
	// 16 KiB leaves room for deeper callers; the sample costs the target
	// about 12 µs with the copy, 2.3-2.8 µs without
	// (BenchmarkCPUProfileSample).
	DefaultStackBytes = 16 << 10
	// MaxStackBytes is the most a sample can carry (STACK_COPY_MAX of
	// bpf/cpu_profile.c).
	MaxStackBytes = 32 << 10
	// stackRingSamples is how many samples with a full stack copy the ring
	// buffer holds: room for a burst on every CPU while Go unwinds.
	stackRingSamples = 32
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
	// The drained counts go to Options.Samples.
	// StackBytes is how much of the user stack each sample copies, for Go
	// to unwind by CFI what the frame-pointer walk cannot (0:
	// DefaultStackBytes; at most MaxStackBytes; negative: none, samples
	// are frame-pointer walks only).
	StackBytes int
	// Symbolizer unwinds the copies (its maps and CFI); nil: the probe
	// makes its own.
	Symbolizer *symbolize.Symbolizer
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
	changes *changes // samples counted into each generation's maps
	// flushed: readSamples has read every sample the drain's flush made
	// it return (samples come without waking it: bpf/cpu_profile.c).
	flushed chan struct{}
	total   uint64
	names   threadNames // for the current target
	rd      *ringReader

	// unwound are the samples read from the ring buffer since the last
	// drain, by thread and stack; at most MaxStacks of them.
	umu      sync.Mutex
	unwound  map[string]*signals.StackSample
	nUnwound uint64        // samples unwound, ever
	tooMany  uint64        // samples whose stack did not fit in unwound
	unwindT  time.Duration // spent unwinding, ever
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
	if o.StackBytes == 0 {
		o.StackBytes = DefaultStackBytes
	}
	o.StackBytes = min(o.StackBytes, MaxStackBytes)
	if o.MaxStacks == 0 {
		o.MaxStacks = 4096 // as compiled into the maps
	}
	if o.Symbolizer == nil && o.StackBytes > 0 {
		o.Symbolizer = symbolize.New(symbolize.Options{Log: o.Log})
	}
	return &CPUProfile{o: o, names: threadNames{}, unwound: map[string]*signals.StackSample{}, flushed: make(chan struct{}, 1)}
}

func (*CPUProfile) Name() string { return signals.ProbeCPUProfile }

// Start loads the program and opens one software CPU-clock event per CPU.
func (p *CPUProfile) Start(ctx context.Context, tracker *workload.Tracker, store *signals.Store) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.started {
		return errors.New("cpu_profile: already started")
	}
	spec, err := loadCpuProfile()
	if err != nil {
		return fmt.Errorf("cpu_profile: load spec: %w", err)
	}
	cpus, err := ebpf.PossibleCPU()
	if err != nil {
		return fmt.Errorf("cpu_profile: possible CPUs: %w", err)
	}
	resize(spec, map[string]uint32{"counts0": p.o.MaxStacks, "counts1": p.o.MaxStacks, "stacks0": p.o.MaxStacks, "stacks1": p.o.MaxStacks,
		"scratch": uint32(cpus), "samples": ringBytes(p.o.RingBufferBytes, p.o.StackBytes)})
	if err := spec.Variables["copy_bytes"].Set(uint32(max(p.o.StackBytes, 0))); err != nil {
		return fmt.Errorf("cpu_profile: set copy_bytes: %w", err)
	}
	objs := &cpuProfileObjects{}
	if err := load("cpu_profile", spec, objs); err != nil {
		return err
	}
	p.objs = objs
	if p.rd, err = newRingReader(objs.Samples); err != nil {
		p.closeLocked()
		return fmt.Errorf("cpu_profile: ring buffer reader: %w", err)
	}
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
	p.wg.Add(2)
	go func() { defer p.wg.Done(); p.run(ctx, objs, tracker, store) }()
	rd := p.rd
	go func() { defer p.wg.Done(); p.readSamples(rd) }()
	return nil
}

// ringBytes sizes the samples ring: the agent's ring_buffer_bytes, or
// room for stackRingSamples samples with a full copy if that is more, as
// a power of two (the kernel's rule).
func ringBytes(configured uint32, stackBytes int) uint32 {
	need := uint64(stackRingSamples) * uint64(sampleHeaderBytes+max(stackBytes, 0))
	n := uint64(max(configured, 4096))
	for n < need {
		n <<= 1
	}
	return uint32(min(n, 1<<30))
}

// The layout of struct sample_event (bpf/cpu_profile.c), as bpf2go
// generated it. Records are read in place rather than decoded whole: all
// but the bytes copied are left off the ring.
var (
	sampleHeaderBytes = int(unsafe.Offsetof(cpuProfileSampleEvent{}.Stack))
	sampleTidOff      = int(unsafe.Offsetof(cpuProfileSampleEvent{}.Tid))
	sampleTgidOff     = int(unsafe.Offsetof(cpuProfileSampleEvent{}.Tgid))
	sampleIPOff       = int(unsafe.Offsetof(cpuProfileSampleEvent{}.Ip))
	sampleSPOff       = int(unsafe.Offsetof(cpuProfileSampleEvent{}.Sp))
	sampleBPOff       = int(unsafe.Offsetof(cpuProfileSampleEvent{}.Bp))
	sampleUserLenOff  = int(unsafe.Offsetof(cpuProfileSampleEvent{}.UserLen))
	sampleKernLenOff  = int(unsafe.Offsetof(cpuProfileSampleEvent{}.KernelLen))
	sampleStackLenOff = int(unsafe.Offsetof(cpuProfileSampleEvent{}.StackLen))
	sampleRedzoneOK   = int(unsafe.Offsetof(cpuProfileSampleEvent{}.RedzoneOk))
	sampleRedzoneOff  = int(unsafe.Offsetof(cpuProfileSampleEvent{}.Redzone))
	sampleUserOff     = int(unsafe.Offsetof(cpuProfileSampleEvent{}.User))
	sampleKernelOff   = int(unsafe.Offsetof(cpuProfileSampleEvent{}.Kernel))
	sampleMaxFrames   = len(cpuProfileSampleEvent{}.User)
)

// readSamples unwinds each sample the ring buffer brings and adds it to
// unwound, until the reader is closed.
func (p *CPUProfile) readSamples(rd *ringReader) {
	// Reused: a copy is up to MaxStackBytes, and samples come one at a time.
	words := make([]uint64, 0, (MaxStackBytes+sampleHeaderBytes-sampleRedzoneOff)/8)
	var user, kernel []uint64
	readRingFlushed(p.Name(), rd, p.o.Log, func(raw []byte) {
		if len(raw) < sampleHeaderBytes {
			p.o.Log.Warn("cpu_profile: short sample", "len", len(raw))
			return
		}
		le := binary.LittleEndian
		tid, pid := le.Uint32(raw[sampleTidOff:]), le.Uint32(raw[sampleTgidOff:])
		ip, sp, bp := le.Uint64(raw[sampleIPOff:]), le.Uint64(raw[sampleSPOff:]), le.Uint64(raw[sampleBPOff:])
		ulen, klen := int(le.Uint32(raw[sampleUserLenOff:])), int(le.Uint32(raw[sampleKernLenOff:]))
		slen := int(le.Uint32(raw[sampleStackLenOff:]))
		user = addrs(user[:0], raw[sampleUserOff:], ulen)
		kernel = addrs(kernel[:0], raw[sampleKernelOff:], klen)
		// The red zone and the stack are the memory from sp-128 up.
		from, base := sampleHeaderBytes, sp
		if le.Uint64(raw[sampleRedzoneOK:]) != 0 {
			from, base = sampleRedzoneOff, sp-uint64(sampleHeaderBytes-sampleRedzoneOff)
		}
		words = words[:0]
		for off := from; off+8 <= min(len(raw), sampleHeaderBytes+slen); off += 8 {
			words = append(words, le.Uint64(raw[off:]))
		}
		if len(user) == 0 && ip != 0 {
			user = append(user, ip)
		}
		stack := user
		start := time.Now()
		if len(user) > 0 && slen > 0 && p.o.Symbolizer != nil {
			stack = p.o.Symbolizer.RecoverLeafAt(int(pid), user, sp, bp, base, words)
		}
		p.addUnwound(int(pid), int(tid), stack, kernel, time.Since(start))
	}, func() {
		select {
		case p.flushed <- struct{}{}:
		default:
		}
	})
}

// addrs appends to dst the n bytes of addresses at b (a bpf_get_stack
// buffer), up to the first zero.
func addrs(dst []uint64, b []byte, n int) []uint64 {
	n = min(n, 8*sampleMaxFrames, len(b))
	for off := 0; off+8 <= n; off += 8 {
		a := binary.LittleEndian.Uint64(b[off:])
		if a == 0 {
			break
		}
		dst = append(dst, a)
	}
	return dst
}

// addUnwound counts one unwound sample under its thread and stacks.
func (p *CPUProfile) addUnwound(pid, tid int, user, kernel []uint64, took time.Duration) {
	key := make([]byte, 0, 16+8*(len(user)+len(kernel)))
	key = strconv.AppendInt(key, int64(pid), 10)
	key = append(key, '/')
	key = strconv.AppendInt(key, int64(tid), 10)
	key = append(key, '/')
	for _, a := range user {
		key = binary.LittleEndian.AppendUint64(key, a)
	}
	key = append(key, '/')
	for _, a := range kernel {
		key = binary.LittleEndian.AppendUint64(key, a)
	}
	p.umu.Lock()
	defer p.umu.Unlock()
	p.nUnwound++
	p.unwindT += took
	if s, ok := p.unwound[string(key)]; ok {
		s.Count++
		return
	}
	if len(p.unwound) >= int(p.o.MaxStacks) {
		p.tooMany++
		return
	}
	p.unwound[string(key)] = &signals.StackSample{Pid: pid, Tid: tid,
		User: append([]uint64(nil), user...), Kernel: append([]uint64(nil), kernel...), Count: 1}
}

// unwoundStats is what unwinding has done, ever.
type unwoundStats struct {
	samples, tooMany uint64
	took             time.Duration
}

// takeUnwound returns the unwound samples since the last call.
func (p *CPUProfile) takeUnwound() (map[string]*signals.StackSample, unwoundStats) {
	p.umu.Lock()
	defer p.umu.Unlock()
	u := p.unwound
	if len(u) == 0 {
		return nil, unwoundStats{p.nUnwound, p.tooMany, p.unwindT}
	}
	p.unwound = make(map[string]*signals.StackSample, len(u))
	return u, unwoundStats{p.nUnwound, p.tooMany, p.unwindT}
}

const unixPerfEventAttrSize = 136 // PERF_ATTR_SIZE_VER8; the kernel accepts any known version

func (p *CPUProfile) run(ctx context.Context, objs *cpuProfileObjects, tracker *workload.Tracker, store *signals.Store) {
	tick := signals.NewTicker(p.o.Drain) // on the shared clock
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
	changed, err := p.group.update(objs.TargetTgids, pid, now)
	if changed {
		clear(p.names)
		if p.o.StackBytes > 0 {
			// Parse the target's executable (its CFI) now: samples wait in
			// the ring buffer while the first one is unwound, and a big
			// binary (node's 98 MB) takes longer than the ring holds.
			if pc, ok := textStart(pid); ok {
				go p.o.Symbolizer.User(pid, []uint64{pc})
			}
		}
	}
	return err
}

// drain flips the generation the program writes to, then moves the other
// generation's counts into Samples and empties its maps.
//
// A drain costs, when the target ran: the flip, 2 ms of waiting, a walk of
// the old generation's counts map and its stacks; the unwound samples the
// ring buffer brought are moved too. When the change counter of the
// current generation did not move (no sample was counted into the maps:
// the target slept, or every sample came with its stack copy through the
// ring), there is nothing to flip or walk.
func (p *CPUProfile) drain(objs *cpuProfileObjects, pid int, store *signals.Store, now time.Time) error {
	if p.changes == nil {
		p.changes = newChanges(objs.Changes, 2)
	}
	if !p.changes.moved(int(p.gen)) {
		return p.drained(objs, store, nil, now)
	}
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
	return p.drained(objs, store, out, now)
}

// drained adds out and the unwound samples to Samples and writes the
// profiler's counters.
func (p *CPUProfile) drained(objs *cpuProfileObjects, store *signals.Store, out []signals.StackSample, now time.Time) error {
	// The samples with stack copies wait in the ring (they wake nobody
	// until it is half full): have readSamples unwind them now.
	// Under mu: Close closes the reader under it, and a flush racing the
	// close reads the ring Close unmaps.
	p.mu.Lock()
	pending := flushPending(p.rd)
	p.mu.Unlock()
	if pending {
		select {
		case <-p.flushed:
		case <-time.After(900 * time.Millisecond): // the rest comes with the next drain
		}
	}
	unwound, us := p.takeUnwound()
	for _, s := range unwound {
		if !p.group.has(uint32(s.Pid)) {
			continue // a previous target's, read late
		}
		p.total += uint64(s.Count)
		s.T, s.Thread = now, p.names.get(s.Pid, s.Tid)
		out = append(out, *s)
	}
	p.o.Samples.Add(out)
	self := signals.L("probe", p.Name())
	store.Put(signals.ProfileCPUSamplesTotal, nil, float64(p.total), now)
	store.Put(signals.ProbeEventsTotal, self, float64(p.total), now)
	store.Put(signals.ProfileCPUSamplesUnwoundTotal, nil, float64(us.samples), now)
	store.Put(signals.ProfileCPUUnwindSecondsTotal, nil, us.took.Seconds(), now)
	store.Put(signals.ProfileCPUStackCopiesLostTotal, signals.L("reason", "too_many_stacks"), float64(us.tooMany), now)
	for i, reason := range []string{"map_full", "no_stack", "ring_full"} {
		var lost uint64
		if err := objs.Lost.Lookup(uint32(i), &lost); err != nil {
			continue
		}
		if reason == "ring_full" {
			store.Put(signals.ProfileCPUStackCopiesLostTotal, signals.L("reason", reason), float64(lost), now)
			continue
		}
		store.Put(signals.ProfileCPUSamplesLostTotal, signals.L("reason", reason), float64(lost), now)
	}
	return nil
}

// SetStackBytes changes how much user stack each sample copies from now
// on (0 or negative: none), for benchmarks that compare the two in one
// run. At most the StackBytes the probe started with.
func (p *CPUProfile) SetStackBytes(n int) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.objs == nil {
		return errors.New("cpu_profile: not started")
	}
	if err := p.objs.CopyBytes.Set(uint32(min(max(n, 0), max(p.o.StackBytes, 0)))); err != nil {
		return fmt.Errorf("cpu_profile: set copy_bytes: %w", err)
	}
	return nil
}

// Close detaches the program and closes the perf events.
func (p *CPUProfile) Close() error {
	p.mu.Lock()
	if p.cancel != nil {
		p.cancel()
	}
	var err error
	if p.rd != nil {
		err = p.rd.Close() // unblocks readSamples
		p.rd = nil
	}
	p.mu.Unlock()
	p.wg.Wait()
	p.mu.Lock()
	defer p.mu.Unlock()
	return errors.Join(err, p.closeLocked())
}

func (p *CPUProfile) closeLocked() error {
	errs := []error{closeLinks(p.links)}
	p.links = nil
	if p.rd != nil {
		errs = append(errs, p.rd.Close())
		p.rd = nil
	}
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
