package probes

//go:generate go tool bpf2go -tags linux -target bpfel -type thread_stats -type block_event sched ../bpf/sched.c -- -I../bpf/headers -I/usr/include -Wall -Werror -O2

import (
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
	"maps"
	"math"
	"os"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/culprit-dev/culprit/signals"
	"github.com/culprit-dev/culprit/symbolize"
	"github.com/culprit-dev/culprit/workload"
)

// RunqBucketBound is the upper bound, in seconds, of run-queue latency
// bucket i: the BPF program puts a wait of w µs in slot log2(w+1), which
// holds waits below 2^(i+1)-1 µs.
func RunqBucketBound(i int) float64 { return (math.Exp2(float64(i+1)) - 1) / 1e6 }

// RunqBuckets is how many run-queue latency buckets there are.
const RunqBuckets = len(schedThreadStats{}.RunqSlots)

// SchedOptions configure the sched probe ([sched] in agent.conf).
type SchedOptions struct {
	Options
	// MinBlock: sleeps at least this long become block episodes.
	MinBlock time.Duration
	// BusyAfter: runs without sleeping at least this long become busy episodes.
	BusyAfter time.Duration
	// BusyGap: a sleep shorter than this does not end a busy run.
	BusyGap time.Duration
	// MaxThreads bounds the per-thread BPF map (and the series per thread).
	MaxThreads uint32
	// MaxStacks bounds the stack map.
	MaxStacks uint32
	// StackMapLife is how often the stack map is emptied (10 min if unset).
	StackMapLife time.Duration
	// Symbolizer names the stacks of the episodes (Options.Episodes).
	Symbolizer *symbolize.Symbolizer
	// NotifyBlock and NotifyBusy wake the rule engine (Store.Notify) when
	// an episode going on reaches them (the rules' own thresholds): an
	// idle engine then judges it at once rather than at its idle tick.
	// Zero: no such wake-up. A sleep in one of QuietCalls (the workers'
	// idle waits) wakes it neither then nor when it ends: the engine sees
	// it at its next tick, and an event loop's idle wait every half
	// second keeps it from ever idling otherwise.
	NotifyBlock, NotifyBusy time.Duration
	QuietCalls              []string
}

// Sched watches the scheduler for the target's threads: see bpf/sched.c.
type Sched struct {
	o SchedOptions
	running
	objs   *schedObjects
	group  group // the target and its children, in target_tgids
	events uint64

	// monoToWall converts bpf_ktime_get_ns (CLOCK_MONOTONIC) to wall time.
	// It is fixed at start so an episode's start, and so its identity, does
	// not jitter between polls.
	monoToWall time.Duration
	// stacks remembers the symbolized stack of each ongoing episode: the
	// stack map may reuse an id while a thread sleeps for long.
	stacks map[episodeID]stackText
	busy   map[int]signals.Episode // ongoing busy episode per tid
	names  freshNames              // names of threads not yet seen by the kernel side
	// sighted is the last sleep of each thread whose stack was read to
	// learn what the thread is (sight).
	sighted map[int]sightMark
	// deepLeft is how many stacks this poll may still read in full from
	// the target's memory (deepStack).
	deepLeft int
	// lastRunq is the run-queue histogram at the previous poll.
	lastRunq [RunqBuckets]float64
	// stacksReset is when the stack map was last emptied; resetReq asks
	// the poller to empty it now (tests).
	stacksReset time.Time
	stackGen    uint64 // bumped at each emptying (bpf/sched.c STACK_GEN)
	resetReq    chan chan struct{}

	// Per poll state, reused: the threads' series by tid, the group's
	// threads as last listed, batch buffers.
	series            map[int]*threadSeries
	stale             []string
	poll              uint32
	busyNow           map[int]bool
	taskMap           map[int]int
	tasksAt, tasksGen time.Time
	tasksChanged      bool
	lastSleep         map[int]sleepTexts // per thread: where its last symbolized sleeps began
	// The same for finished blocks, by (pid, tid); read and written by
	// readBlocks' goroutine only.
	lastBlock map[[2]uint32]sleepTexts
	store     *signals.Store
	// Episodes going on that woke the engine (NotifyBlock, NotifyBusy),
	// by kind; the poll goroutine's.
	notified           map[notifiedID]bool
	deepBuf            []byte
	deepWords          []uint64
	changes            *changes
	entries            []threadEntry // the map's entries of the group, as last read
	entriesStale       bool          // read them again at the next poll
	walkedAt           time.Time
	tkeys              []uint32
	tvals              []schedThreadStats
	runqSum, runqCount cachedSeries
	runqP50, runqP99   cachedSeries
	counters           *probeCounters
}

type episodeID struct {
	tid   int
	start int64
}

type stackText struct {
	frames []string
	kernel int
	libc   int // user frames at the leaf in the C library
}

// NewSched returns the probe, not yet loaded.
func NewSched(o SchedOptions) *Sched {
	if o.MinBlock <= 0 {
		o.MinBlock = 100 * time.Millisecond
	}
	if o.BusyAfter <= 0 {
		o.BusyAfter = 200 * time.Millisecond
	}
	if o.BusyGap <= 0 {
		o.BusyGap = time.Millisecond
	}
	if o.Episodes == nil {
		o.Episodes = signals.NewEpisodes(256)
	}
	if o.MaxThreads > 0 {
		o.Episodes.LimitThreads(int(o.MaxThreads))
	}
	return &Sched{o: o, stacks: map[episodeID]stackText{}, busy: map[int]signals.Episode{}, names: freshNames{}, sighted: map[int]sightMark{},
		resetReq: make(chan chan struct{}, 1), series: map[int]*threadSeries{}, busyNow: map[int]bool{}, lastSleep: map[int]sleepTexts{}, lastBlock: map[[2]uint32]sleepTexts{}, notified: map[notifiedID]bool{}}
}

func (*Sched) Name() string { return signals.ProbeSched }

// Start loads and attaches the programs.
func (p *Sched) Start(ctx context.Context, tracker *workload.Tracker, store *signals.Store) error {
	p.mu.Lock()
	defer p.mu.Unlock()

	spec, err := schedSpec("", p.o)
	if err != nil {
		return err
	}
	objs := &schedObjects{}
	ctx, err = p.start(ctx, "sched", spec, objs, func() []tracingProg {
		return []tracingProg{
			{"tp_btf/sched_switch", objs.CulpritSchedSwitch},
			{"tp_btf/sched_wakeup", objs.CulpritSchedWakeup},
			{"tp_btf/sched_wakeup_new", objs.CulpritSchedWakeupNew},
		}
	}, func() *ebpf.Map { return objs.Blocks })
	if err != nil {
		return err
	}
	p.objs = objs
	p.monoToWall = time.Duration(time.Now().UnixNano() - monotonicNow())
	if p.o.Symbolizer != nil {
		// Reading kallsyms takes a few hundred ms: do it now rather than
		// on the first long block, which would then be reported late.
		go p.o.Symbolizer.Kernel([]uint64{0})
	}
	if err := p.startWakes("sched", objs.Wakes, p.o.Log, nil); err != nil {
		p.release()
		return err
	}
	rd := p.rd
	p.spawn(func() { p.readBlocks(rd, store) })
	p.spawn(func() { p.pollLoop(ctx, objs, tracker, store, rd) })
	return nil
}

// schedSpec is bpf/sched.c's spec as o sets it before loading (map sizes,
// thresholds, the idle calls): the build compiled into the agent, or, for
// scripts/schedab, the object file at path.
func schedSpec(path string, o SchedOptions) (*ebpf.CollectionSpec, error) {
	var spec *ebpf.CollectionSpec
	var err error
	if path == "" {
		spec, err = loadSched()
	} else {
		spec, err = ebpf.LoadCollectionSpec(path)
	}
	if err != nil {
		return nil, fmt.Errorf("sched: load spec: %w", err)
	}
	resize(spec, map[string]uint32{"threads": o.MaxThreads, "stacks": o.MaxStacks, "blocks": o.RingBufferBytes})
	if err := spec.Variables["min_block_ns"].Set(uint64(o.MinBlock)); err != nil {
		return nil, fmt.Errorf("sched: set min_block_ns: %w", err)
	}
	if err := spec.Variables["busy_gap_ns"].Set(uint64(o.BusyGap)); err != nil {
		return nil, fmt.Errorf("sched: set busy_gap_ns: %w", err)
	}
	if err := spec.Variables["quiet_calls"].Set(quietBitmap(o.QuietCalls)); err != nil {
		return nil, fmt.Errorf("sched: set quiet_calls: %w", err)
	}
	// A timed sleep shorter than an episode cannot become one: it wakes
	// nobody either.
	if err := spec.Variables["short_sleep_ns"].Set(uint64(o.MinBlock)); err != nil {
		return nil, fmt.Errorf("sched: set short_sleep_ns: %w", err)
	}
	return spec, nil
}

// LoadSchedBuild loads (does not attach) the build of bpf/sched.c at path
// as the agent would load its own under o, watching tgids: for
// scripts/schedab, which compares two builds under one load. The caller
// closes the collection.
func LoadSchedBuild(path string, o SchedOptions, tgids []uint32) (*ebpf.Collection, error) {
	spec, err := schedSpec(path, o)
	if err != nil {
		return nil, err
	}
	if err := setTargets(spec.Variables["target_tgids"], tgids); err != nil {
		return nil, fmt.Errorf("sched: %w", err)
	}
	if err := prepareLoad("sched", spec); err != nil {
		return nil, err
	}
	coll, err := ebpf.NewCollection(spec)
	if err != nil {
		return nil, fmt.Errorf("sched: load %s: %w", path, err)
	}
	return coll, nil
}

// quietBitmap is the quiet_calls bitmap of bpf/sched.c: a bit per x86-64
// system call number of names. Names it does not know, and every name on
// other architectures, are left out: sleeps in them wake the process, as
// any sleep that may be a blocking call does.
func quietBitmap(names []string) [8]uint64 {
	var out [8]uint64
	if runtime.GOARCH != "amd64" {
		return out
	}
	for _, n := range names {
		if nr, ok := amd64Syscalls[n]; ok && nr < 512 {
			out[nr/64] |= 1 << (nr % 64)
		}
	}
	return out
}

// amd64Syscalls are the x86-64 numbers of the system calls workers idle in
// (rules.workers.idle_syscalls' defaults and their relatives).
var amd64Syscalls = map[string]int{
	"poll": 7, "select": 23, "pause": 34, "rt_sigtimedwait": 128, "rt_sigsuspend": 130, "futex": 202,
	"epoll_wait": 232, "pselect6": 270, "ppoll": 271, "epoll_pwait": 281, "io_uring_enter": 426,
	"epoll_pwait2": 441, "futex_waitv": 449, "nanosleep": 35, "clock_nanosleep": 230, "wait4": 61,
	"accept": 43, "accept4": 288, "read": 0, "recvfrom": 45, "recvmsg": 47, "msgrcv": 70, "semop": 65,
}

func monotonicNow() int64 {
	var ts unix.Timespec
	_ = unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts) // cannot fail for CLOCK_MONOTONIC
	return ts.Nano()
}

func (p *Sched) wall(ktime uint64) time.Time { return time.Unix(0, int64(ktime)+int64(p.monoToWall)) }

// quietStopped is the block event's quiet bit that marks a stop
// (bpf/sched.c thread_stats.stopped).
const quietStopped = 2

// stoppedOffCPU: a thread switched out stopped (by SIGSTOP, a job-control
// signal or a tracer) waits for nothing of its own. It stops wherever it
// was, often inside a system call (redis stopped in the middle of its
// cron's /proc read was told "get_proc_stat_ll makes a blocking call on
// the event loop"), so its time off-CPU is no block episode and its stack
// no idle wait: the probe drops both, and the threads collector's states
// tell the stop (rules/stopped.go).

// readBlocks turns each finished long sleep into a block episode.
func (p *Sched) readBlocks(rd *ringReader, store *signals.Store) {
	var ev schedBlockEvent
	readRingFlushed("sched", rd, p.o.Log, func(raw []byte) {
		if !copyRecord(&ev, raw) {
			p.o.Log.Warn("sched: malformed block event", "len", len(raw))
			return
		}
		p.mu.Lock()
		p.events++
		id := episodeID{int(ev.Tid), int64(ev.StartNs)}
		st, ok := p.stacks[id]
		delete(p.stacks, id)
		objs := p.objs
		p.mu.Unlock()
		if ev.Quiet&quietStopped != 0 {
			return // a stop, not a sleep: no block (stoppedOffCPU)
		}
		if !ok && objs != nil {
			// The thread is awake again: only what the probe copied when
			// it went to sleep is left of its stack. A thread that blocks
			// where it blocked last time (a loop's timed wait) reuses that
			// text, as sleepingText does.
			k := sleepKey{ev.Ustack, ev.Kstack, ev.Sp, ev.Bp, ev.Ip}
			who := [2]uint32{ev.Tgid, ev.Tid}
			last := p.lastBlock[who]
			if txt, hit := last.find(k); hit {
				st = txt
			} else {
				st = p.stackText(objs, int(ev.Tgid), ev.Ustack, ev.Kstack, userRegs{ev.Sp, ev.Bp, ev.Ip, ev.Scan[:]})
				if len(p.lastBlock) >= int(max(p.o.MaxThreads, 64)) {
					clear(p.lastBlock)
				}
				last.put(k, st)
				p.lastBlock[who] = last
			}
		}
		start := p.wall(ev.StartNs)
		name := comm(ev.Comm[:])
		e := signals.Episode{
			Kind: signals.EpisodeBlock, Pid: int(ev.Tgid), Tid: int(ev.Tid), Thread: name,
			Start: start, Duration: time.Duration(ev.DurNs),
			Stack: st.frames, KernelFrames: st.kernel, LibcFrames: st.libc, Waker: int(ev.WakerTid),
		}
		p.o.Episodes.Put(e)
		if !ok {
			p.o.Episodes.Observe(signals.ThreadSight{Pid: int(ev.Tgid), Tid: int(ev.Tid), Name: name, Start: start,
				Stack: st.frames, KernelFrames: st.kernel, LibcFrames: st.libc, At: time.Now()})
		}
		if !p.quiet(e) {
			store.Notify()
		}
	}, nil)
}

func comm(c []int8) string {
	b := make([]byte, 0, len(c))
	for _, x := range c {
		if x == 0 {
			break
		}
		b = append(b, byte(x))
	}
	return string(b)
}

// userRegs is what the probe copied of the user side when the thread went
// to sleep: sp, bp and the stack words from sp up (sp 0: no copy).
type userRegs struct {
	sp, bp, ip uint64
	words      []uint64
}

// deepStackBytes is how much of a sleeping thread's stack is read from its
// memory to unwind it. The probe's own copy (256 bytes) recovers the C
// library's wrapper; code built without frame pointers (Node.js, redis,
// most distributions' C) needs more: libuv's uv__io_poll alone keeps 12 KiB
// of epoll events on its stack, and the frames that tell a nested loop
// (execSync) from the main one, or the command that blocked redis, are
// above it.
const deepStackBytes = 32 << 10

// maxDeepPerPoll bounds the stacks read from the target's memory per poll.
const maxDeepPerPoll = 16

// deepStack reads the top of a sleeping thread's stack from /proc/PID/mem,
// as words from sp up; nil if it cannot (no ptrace access: the probe's own
// copy is then all there is). The caller checks the thread still sleeps the
// same sleep after the read: the words are then that sleep's.
func (p *Sched) deepStack(pid int, sp uint64) []uint64 {
	if sp == 0 || p.deepLeft <= 0 {
		return nil
	}
	p.deepLeft--
	f, err := os.Open("/proc/" + strconv.Itoa(pid) + "/mem")
	if err != nil {
		return nil
	}
	defer f.Close()
	// The buffers are the poll goroutine's, reused: the words are only
	// read while this stack is symbolized.
	if p.deepBuf == nil {
		p.deepBuf, p.deepWords = make([]byte, deepStackBytes), make([]uint64, deepStackBytes/8)
	}
	// A short read is the end of the stack's mapping: what came is good.
	n, _ := f.ReadAt(p.deepBuf, int64(sp))
	words := p.deepWords[:n/8]
	for i := range words {
		words[i] = binary.LittleEndian.Uint64(p.deepBuf[8*i:])
	}
	return words
}

// stillAsleep reports whether thread tid still sleeps the sleep that began
// at since (bpf_ktime_get_ns).
func stillAsleep(objs *schedObjects, tid int, since uint64) bool {
	var st schedThreadStats
	return objs.Threads.Lookup(uint32(tid), &st) == nil && st.OffcpuSince == since
}

// sleepingText symbolizes the stack of a sleep going on now: the thread's
// memory still holds its whole stack, so it is read deeper than the
// probe's copy when it can be.
//
// A thread that goes to sleep again where it slept before (an event loop's
// idle wait, every time) is not read and unwound again (a 32 KiB read of
// its memory and a CFI unwind: about a millisecond): the last text of each
// thread is kept with what identified its sleep, both stack ids (the
// frame-pointer walk's hash, and the kernel's) and the user registers, and
// reused when all match. The words near sp are left out: they hold the
// sleeping function's locals, which differ at every call.
func (p *Sched) sleepingText(objs *schedObjects, pid, tid int, st schedThreadStats) stackText {
	k := sleepKey{st.OffUstack, st.OffKstack, st.OffSp, st.OffBp, st.OffIp}
	last, ok := p.lastSleep[tid]
	if txt, hit := last.find(k); hit {
		return txt
	}
	txt := p.readSleepingText(objs, pid, tid, st)
	if ok || len(p.lastSleep) < int(max(p.o.MaxThreads, 64)) {
		last.put(k, txt)
		p.lastSleep[tid] = last
	}
	return txt
}

// sleepKey identifies where a sleep began.
type sleepKey struct {
	ustack, kstack int32
	sp, bp, ip     uint64
}

type sleepText struct {
	key  sleepKey
	text stackText
	set  bool
}

// sleepTexts are the texts of a thread's latest sleep sites, the newest
// first. More than one: an idle loop often sleeps in a few places by
// turns (python's http.server, in poll, through kernel paths whose stack
// ids went 6376, 6232, 6376, ..., and a third now and then), and with one
// kept every other sleep was read from the target's memory and unwound
// again, which also kept the symbol tables in use, and in memory.
type sleepTexts [4]sleepText

// find returns the text kept for k.
func (t *sleepTexts) find(k sleepKey) (stackText, bool) {
	for _, e := range t {
		if e.set && e.key == k {
			return e.text, true
		}
	}
	return stackText{}, false
}

// put keeps the text of k as the newest, dropping the oldest.
func (t *sleepTexts) put(k sleepKey, txt stackText) {
	copy(t[1:], t[:len(t)-1])
	t[0] = sleepText{k, txt, true}
}

func (p *Sched) readSleepingText(objs *schedObjects, pid, tid int, st schedThreadStats) stackText {
	regs := userRegs{st.OffSp, st.OffBp, st.OffIp, st.OffScan[:]}
	if p.o.Symbolizer != nil && st.OffUstack >= 0 {
		if w := p.deepStack(pid, st.OffSp); len(w) > len(regs.words) && stillAsleep(objs, tid, st.OffcpuSince) {
			regs.words = w
		}
	}
	return p.stackText(objs, pid, st.OffUstack, st.OffKstack, regs)
}

// stackText reads and symbolizes one (user, kernel) stack pair. The user
// stack gets back, from regs, the leaf frames the frame-pointer walk
// skipped.
func (p *Sched) stackText(objs *schedObjects, pid int, ustack, kstack int32, regs userRegs) stackText {
	var out stackText
	if kstack >= 0 {
		addrs := readStack(objs.Stacks, kstack)
		if !allKernel(addrs) {
			// The id was reused (BPF_F_REUSE_STACKID) by a user stack:
			// no kernel stack is better than another thread's.
			addrs = nil
		}
		names := frameNames(p.o.Symbolizer, 0, addrs, true)
		// The stack was taken inside the tracepoint: drop the probe's own
		// frames so it starts where the thread went to sleep.
		for len(names) > 1 && (strings.HasPrefix(names[0], "bpf_") || strings.HasPrefix(names[0], "__bpf_trace") || strings.HasPrefix(names[0], "__traceiter_")) {
			names = names[1:]
		}
		out.frames = append(out.frames, names...)
		out.kernel = len(out.frames)
	}
	if ustack >= 0 {
		addrs := readStack(objs.Stacks, ustack)
		if len(addrs) > 0 && ((regs.ip != 0 && addrs[0] != regs.ip) || addrs[0] >= kernelHalf) {
			// The id now holds another stack: what the thread is, and
			// the function a finding names, must not come from it.
			addrs = nil
		}
		if p.o.Symbolizer != nil && regs.sp != 0 && len(addrs) > 0 {
			addrs = p.o.Symbolizer.RecoverLeaf(pid, addrs, regs.sp, regs.bp, regs.words)
		}
		names, libc := userFrames(p.o.Symbolizer, pid, addrs)
		out.frames = append(out.frames, names...)
		out.libc = libc
	}
	return out
}

// kernelHalf: kernel addresses have the top bit set (x86-64, arm64), user
// addresses never.
const kernelHalf = 1 << 63

func allKernel(addrs []uint64) bool {
	for _, a := range addrs {
		if a < kernelHalf {
			return false
		}
	}
	return true
}

// readStack returns the addresses of a stack id, leaf first, or nil.
func readStack(m *ebpf.Map, id int32) []uint64 {
	var raw [127]uint64
	if err := m.Lookup(uint32(id), &raw); err != nil {
		return nil
	}
	n := 0
	for n < len(raw) && raw[n] != 0 {
		n++
	}
	return append([]uint64(nil), raw[:n]...)
}

// userFrames names a user stack and counts its leaf frames that are the C
// library's.
func userFrames(s *symbolize.Symbolizer, pid int, addrs []uint64) (names []string, libc int) {
	if s == nil || len(addrs) == 0 {
		return frameNames(s, pid, addrs, false), 0
	}
	// Cut at the first address no code is mapped at: a frame-pointer walk
	// through code that uses rbp otherwise (assembly, libc) reads garbage.
	fs := s.UserStack(pid, addrs)
	names = make([]string, len(fs))
	for i, f := range fs {
		names[i] = f.String()
	}
	for libc < len(fs) && symbolize.IsCLibrary(fs[libc].Module) {
		libc++
	}
	return names, libc
}

func frameNames(s *symbolize.Symbolizer, pid int, addrs []uint64, kernel bool) []string {
	if len(addrs) == 0 {
		return nil
	}
	out := make([]string, len(addrs))
	if s == nil {
		for i, a := range addrs {
			out[i] = "0x" + strconv.FormatUint(a, 16)
		}
		return out
	}
	var fs []symbolize.Frame
	if kernel {
		fs = s.Kernel(addrs)
	} else {
		fs = s.User(pid, addrs)
	}
	for i, f := range fs {
		out[i] = f.String()
	}
	return out
}

// pollLoop polls every probes.poll_interval (see readThreads for why it
// is not paced, and what a cycle costs).
func (p *Sched) pollLoop(ctx context.Context, objs *schedObjects, tracker *workload.Tracker, store *signals.Store, blocks *ringReader) {
	p.store = store
	p.counters = newProbeCounters(store, p.Name())
	p.changes = newChanges(objs.Changes, 1)
	p.runqSum = cachedSeries{h: store.Handle(signals.ProcessRunqWaitSecondsTotal, nil)}
	p.runqCount = cachedSeries{h: store.Handle(signals.ProcessRunqWaitsTotal, nil)}
	p.runqP50 = cachedSeries{h: store.Handle(signals.ProcessRunqLatencyP50Seconds, nil)}
	p.runqP99 = cachedSeries{h: store.Handle(signals.ProcessRunqLatencyP99Seconds, nil)}
	every(ctx, p.o.PollInterval, func(now time.Time) {
		p.mu.Lock()
		events := p.events
		p.mu.Unlock()
		p.counters.put(float64(events), objs.Lost, now)
		// Block events of idle waits come without a wake-up: read them now.
		p.flushRing(blocks)
		tgt, ok := tracker.Current()
		if !ok {
			return
		}
		// While the clock idles, a sleep that may be a blocking call wakes
		// it (bpf/sched.c quiet_calls); armed before the map is read.
		p.changes.arm(1)
		p.deepLeft = maxDeepPerPoll
		if err := p.setTarget(objs, tgt.PID, now); err != nil {
			p.o.Log.Warn("sched: set target", "err", err)
			return
		}
		if err := p.readThreads(objs, tgt.PID, store, now); err != nil {
			p.o.Log.Warn("sched: read threads", "err", err)
		}
		force := false
		var done chan struct{}
		select {
		case done = <-p.resetReq:
			force = true
		default:
		}
		p.resetStacks(objs, now, force)
		if done != nil {
			close(done)
		}
	})
}

// setTarget keeps target_tgids to the process watched (and its children), and drops
// the per-thread state of the previous one.
func (p *Sched) setTarget(objs *schedObjects, pid int, now time.Time) error {
	changed, err := p.group.update(objs.TargetTgids, pid, now)
	if !changed {
		return err
	}
	p.mu.Lock()
	clear(p.stacks)
	clear(p.busy)
	clear(p.names)
	clear(p.sighted)
	p.lastRunq = [RunqBuckets]float64{}
	p.taskMap = nil
	clear(p.lastSleep)
	p.mu.Unlock()
	p.o.Episodes.KeepThreads(func(int, int) bool { return false })
	if p.o.Symbolizer != nil {
		// Parse the target's executable now, not on its first long block.
		if pc, ok := textStart(int(pid)); ok {
			go p.o.Symbolizer.User(int(pid), []uint64{pc})
		}
	}
	return nil
}

// threadSeries are the series of one thread (one tid under one name),
// through handles.
type threadSeries struct {
	name                                   string
	oncpu, runqWait, runqWaits, vol, invol cachedSeries
	offcpu, longBlocks, blocked, busy      cachedSeries
	seen                                   uint32
}

func newThreadSeries(store *signals.Store, tid int, name string) *threadSeries {
	ls := signals.L("tid", strconv.Itoa(tid), "thread", name)
	h := func(d *signals.Desc) cachedSeries { return cachedSeries{h: store.Handle(d, ls)} }
	return &threadSeries{name: name,
		oncpu: h(signals.ThreadCPUSecondsTotal), runqWait: h(signals.ThreadRunqWaitSecondsTotal), runqWaits: h(signals.ThreadRunqWaitsTotal),
		vol: h(signals.ThreadVoluntarySwitchesTotal), invol: h(signals.ThreadInvoluntarySwitchesTotal), offcpu: h(signals.ThreadOffCPUSecondsTotal),
		longBlocks: h(signals.ThreadLongBlocksTotal), blocked: h(signals.ThreadBlockedSeconds), busy: h(signals.ThreadBusySeconds)}
}

// threadsBatch is how many thread entries one batch read returns.
const threadsBatch = 64

// tasksLife is how long the list of the group's threads (a directory read
// per process) is trusted: a thread the kernel side reports that it does
// not hold makes it read again at once, so only exits are seen this late.
const tasksLife = time.Second

// Reading the thread map: while the change counter stands still the
// entries read last are still the map's; when it moved, a target of up to
// lookupThreads threads is read by one lookup per thread (only their
// buckets are touched), a bigger one by a walk of the map. A full walk
// every walkEvery also drops the entries of threads that exited.
const (
	lookupThreads = 64
	walkEvery     = 10 * time.Second
)

// threadEntry is one thread's entry of the map, as last read.
type threadEntry struct {
	tid uint32
	st  schedThreadStats
}

// readThreads is one poll of the thread map, every probes.poll_interval:
// sleeps are reported as block episodes once they pass sched.min_block,
// and only a poll can see that, since no event marks it. A cycle is a
// memory read of the change counter and, when it moved, one map lookup per
// thread (or a batch walk); then arithmetic per thread and ring writes of
// the values that changed. The threads' directories are listed once a
// second, and symbolizing happens only for a sleep that became long or is
// due to be sighted.
func (p *Sched) readThreads(objs *schedObjects, pid int, store *signals.Store, now time.Time) error {
	nowMono := uint64(monotonicNow())
	var (
		runq      [RunqBuckets]float64
		runqSum   float64
		sights    []sighting
		maxSeries = int(p.o.MaxThreads)
		written   = 0
	)
	tasks, err := p.tasks(now, false)
	if err != nil {
		return err
	}
	if err := p.readEntries(objs, tasks, now); err != nil {
		return err
	}
	tasks = p.taskMap // read again if the map held threads it did not know
	p.poll++
	clear(p.busyNow)
	for i := range p.entries {
		tid, st := p.entries[i].tid, &p.entries[i].st
		for i, c := range st.RunqSlots {
			runq[i] += float64(c)
		}
		runqSum += float64(st.RunqNs) / 1e9
		if maxSeries > 0 && written >= maxSeries {
			continue
		}
		written++
		name := comm(st.Comm[:])
		ts := p.seriesOf(store, int(tid), name)
		oncpu := float64(st.OncpuNs)
		if st.OncpuSince != 0 && nowMono > st.OncpuSince {
			oncpu += float64(nowMono - st.OncpuSince)
		}
		var waits uint64
		for _, c := range st.RunqSlots {
			waits += c
		}
		ts.oncpu.put(oncpu/1e9, now)
		ts.runqWait.put(float64(st.RunqNs)/1e9, now)
		ts.runqWaits.put(float64(waits), now)
		ts.vol.put(float64(st.Voluntary), now)
		ts.invol.put(float64(st.Involuntary), now)
		ts.offcpu.put(float64(st.OffcpuNs)/1e9, now)
		ts.longBlocks.put(float64(st.LongBlocks), now)
		blocked, busy := 0.0, 0.0
		if st.OffcpuSince != 0 && nowMono > st.OffcpuSince {
			blocked = float64(nowMono-st.OffcpuSince) / 1e9
		}
		// Asleep for longer than the gap: the run has ended, though the
		// kernel side only closes it when the sleep ends.
		asleep := st.OffcpuSince != 0 && nowMono > st.OffcpuSince && time.Duration(nowMono-st.OffcpuSince) >= p.o.BusyGap
		if st.BusySince != 0 && nowMono > st.BusySince && !asleep {
			busy = float64(nowMono-st.BusySince) / 1e9
		}
		ts.blocked.put(blocked, now)
		ts.busy.put(busy, now)

		// A stop is no block, and where the thread stopped is not where
		// it waits for work (stoppedOffCPU): neither is told of it.
		switch d := time.Duration(blocked * 1e9); {
		case st.Stopped != 0:
		case d >= p.o.MinBlock:
			p.ongoingBlock(objs, int(st.Tgid), int(tid), name, *st, d)
		case st.OffcpuSince != 0 && len(sights) < maxSightsPerPoll && p.sightDue(int(tid), st.OffcpuSince, now):
			sights = append(sights, sighting{int(st.Tgid), int(tid), name, *st})
		}
		if d := time.Duration(busy * 1e9); d >= p.o.BusyAfter {
			p.busyNow[int(tid)] = true
			p.ongoingBusy(int(st.Tgid), int(tid), name, st.BusySince, d)
		}
	}
	// Threads that have not run since the probe started are not in the
	// map; an idle worker is still a member of its pool, with no CPU time.
	for t, tgid := range tasks {
		if ts, ok := p.series[t]; (ok && ts.seen == p.poll) || (maxSeries > 0 && written >= maxSeries) {
			continue
		}
		written++
		name := p.names.get(tgid, t, now)
		ts := p.seriesOf(store, t, name)
		for _, c := range []*cachedSeries{&ts.oncpu, &ts.runqWait, &ts.runqWaits, &ts.vol, &ts.invol, &ts.offcpu, &ts.longBlocks, &ts.busy} {
			c.put(0, now)
		}
	}
	p.endBusy(p.busyNow)
	// After the long sleeps: reading these stacks takes time, and the
	// long sleeps' stack ids must be read before they can be reused.
	for _, s := range sights {
		p.sight(objs, s, now)
	}
	if p.tasksChanged {
		p.tasksChanged = false
		for tid := range p.lastSleep {
			if tasks[tid] == 0 {
				delete(p.lastSleep, tid)
			}
		}
		p.names.keep(tasks)
		p.o.Episodes.KeepThreads(func(_, tid int) bool { return tasks[tid] != 0 })
	}
	p.forgetThreads(store)
	count := 0.0
	for i := range runq {
		count += runq[i]
	}
	// Quantiles of the waits since the last poll, from the difference of
	// the cumulative buckets.
	var delta [RunqBuckets]float64
	n := 0.0
	for i := range runq {
		delta[i] = max(0, runq[i]-p.lastRunq[i])
		n += delta[i]
	}
	p.lastRunq = runq
	if n > 0 {
		p.runqP50.h.Put(quantileBound(delta[:], n, 0.5), now)
		p.runqP99.h.Put(quantileBound(delta[:], n, 0.99), now)
	}
	p.runqSum.put(runqSum, now)
	p.runqCount.put(count, now)
	return nil
}

// readEntries brings p.entries to the map's entries of the group's
// threads: kept as they are while the change counter and the thread list
// stand still, else read by lookups or a walk.
func (p *Sched) readEntries(objs *schedObjects, tasks map[int]int, now time.Time) error {
	walk := len(tasks) > lookupThreads || now.Sub(p.walkedAt) >= walkEvery
	if !p.changes.moved(0) && !walk && !p.entriesStale {
		return nil
	}
	p.entriesStale = false
	p.entries = p.entries[:0]
	if !walk {
		// One lookup per thread; a thread not in the map has not run
		// since the probe started (or the LRU let it go).
		for t := range tasks {
			var e threadEntry
			if err := objs.Threads.Lookup(uint32(t), &e.st); err != nil {
				continue
			}
			if !p.group.has(e.st.Tgid) {
				continue
			}
			e.tid = uint32(t)
			p.entries = append(p.entries, e)
		}
		return nil
	}
	p.walkedAt = now
	if p.tkeys == nil {
		p.tkeys, p.tvals = make([]uint32, threadsBatch), make([]schedThreadStats, threadsBatch)
	}
	var gone []uint32
	refreshed := false
	err := batchEach(objs.Threads, p.tkeys, p.tvals, func(tidp *uint32, st *schedThreadStats) {
		tid := *tidp
		if !p.group.has(st.Tgid) {
			gone = append(gone, tid)
			return
		}
		if tasks[int(tid)] == 0 && !refreshed {
			// A thread newer than the list, or one that exited: look again.
			refreshed = true
			if t, err := p.tasks(now, true); err == nil {
				tasks = t
			}
		}
		if tasks[int(tid)] == 0 {
			gone = append(gone, tid)
			return
		}
		p.entries = append(p.entries, threadEntry{tid, *st})
	})
	if err != nil {
		return fmt.Errorf("read threads: %w", err)
	}
	for _, t := range gone {
		_ = objs.Threads.Delete(t) // already gone is fine
		delete(p.sighted, int(t))
	}
	return nil
}

// seriesOf returns the series of thread tid named name, marking them
// written this poll; a thread that renamed itself gets new ones (the old
// name's are forgotten with exited threads').
func (p *Sched) seriesOf(store *signals.Store, tid int, name string) *threadSeries {
	ts, ok := p.series[tid]
	if !ok || ts.name != name {
		if ok {
			p.stale = append(p.stale, seriesKey(strconv.Itoa(tid), ts.name))
		}
		ts = newThreadSeries(store, tid, name)
		p.series[tid] = ts
	}
	ts.seen = p.poll
	return ts
}

// forgetThreads drops the series of threads not written this poll (exited,
// or renamed); nothing is walked when none went.
func (p *Sched) forgetThreads(store *signals.Store) {
	for tid, ts := range p.series {
		if ts.seen != p.poll {
			p.stale = append(p.stale, seriesKey(strconv.Itoa(tid), ts.name))
			delete(p.series, tid)
		}
	}
	if len(p.stale) == 0 {
		return
	}
	gone := make(map[string]bool, len(p.stale))
	for _, k := range p.stale {
		gone[k] = true
	}
	p.stale = p.stale[:0]
	keep := func(ls signals.Labels) bool { return !gone[seriesKey(ls.Get("tid"), ls.Get("thread"))] }
	for _, d := range []*signals.Desc{signals.ThreadCPUSecondsTotal, signals.ThreadRunqWaitSecondsTotal, signals.ThreadRunqWaitsTotal, signals.ThreadVoluntarySwitchesTotal, signals.ThreadInvoluntarySwitchesTotal,
		signals.ThreadOffCPUSecondsTotal, signals.ThreadLongBlocksTotal, signals.ThreadBlockedSeconds, signals.ThreadBusySeconds} {
		store.Forget(d, keep)
	}
}

// tasks maps every thread of the group's processes to its process, read
// again when tasksLife passed, the group changed, or force.
func (p *Sched) tasks(now time.Time, force bool) (map[int]int, error) {
	if !force && p.taskMap != nil && now.Sub(p.tasksAt) < tasksLife && p.tasksGen == p.group.at {
		return p.taskMap, nil
	}
	t, err := groupTasks(&p.group)
	if err != nil {
		return nil, err
	}
	if !maps.Equal(t, p.taskMap) {
		p.tasksChanged = true
		p.entriesStale = true
	}
	p.taskMap, p.tasksAt, p.tasksGen = t, now, p.group.at
	return t, nil
}

// groupTasks maps every thread of the group's processes to its process.
// The target's own must be listable; a child may have just exited.
func groupTasks(g *group) (map[int]int, error) {
	out := map[int]int{}
	for m := range g.members {
		ts, err := taskIDs(int(m))
		if err != nil {
			if int(m) == g.pid {
				return nil, err
			}
			continue
		}
		for t := range ts {
			out[t] = int(m)
		}
	}
	return out, nil
}

// taskIDs lists the threads of pid.
func taskIDs(pid int) (map[int]bool, error) {
	d, err := os.Open("/proc/" + strconv.Itoa(pid) + "/task")
	if err != nil {
		return nil, fmt.Errorf("list threads of %d: %w", pid, err)
	}
	defer d.Close()
	names, err := d.Readdirnames(-1)
	if err != nil {
		return nil, fmt.Errorf("list threads of %d: %w", pid, err)
	}
	out := make(map[int]bool, len(names))
	for _, n := range names {
		if t, err := strconv.Atoi(n); err == nil {
			out[t] = true
		}
	}
	return out, nil
}

// textStart is the start of the process's executable code (startcode in
// /proc/PID/stat), an address inside its main executable.
func textStart(pid int) (uint64, bool) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return 0, false
	}
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return 0, false
	}
	f := bytes.Fields(b[i+1:])
	// startcode is field 26 of stat(5); f[0] is field 3 (state).
	if len(f) < 24 {
		return 0, false
	}
	pc, err := strconv.ParseUint(string(f[23]), 10, 64)
	return pc, err == nil && pc != 0
}

// stackMapLife is how long stack ids live. bpf_get_stackid never evicts:
// a long-running target's distinct sleep stacks would fill the map and new
// ones would fail (episodes without stacks). Ongoing episodes' stacks are
// already symbolized and cached (p.stacks), so emptying the map now and
// then costs at most the stack of a sleep that spans the reset.
const stackMapLife = 10 * time.Minute

// resetStacksNow has the poller empty the stack map at its next poll and
// waits for it.
func (p *Sched) resetStacksNow() {
	done := make(chan struct{})
	p.resetReq <- done
	<-done
}

// A sleep that starts while the map is being emptied may lose its stack:
// a window of milliseconds every StackMapLife.
func (p *Sched) resetStacks(objs *schedObjects, now time.Time, force bool) {
	if p.stacksReset.IsZero() {
		p.stacksReset = now
	}
	life := p.o.StackMapLife
	if life <= 0 {
		life = stackMapLife
	}
	if !force && now.Sub(p.stacksReset) < life {
		return
	}
	p.stacksReset = now
	// Stack ids are about to mean other stacks.
	defer clear(p.lastSleep)
	// Keep the stacks of the sleeps going on now: their ids are about to
	// go, and a sleep may yet become long.
	var tid uint32
	var st schedThreadStats
	current := map[episodeID]bool{}
	threads := objs.Threads.Iterate()
	for threads.Next(&tid, &st) {
		if !p.group.has(st.Tgid) || st.OffcpuSince == 0 {
			continue
		}
		key := episodeID{int(tid), int64(st.OffcpuSince)}
		current[key] = true
		p.mu.Lock()
		_, have := p.stacks[key]
		p.mu.Unlock()
		if !have {
			txt := p.sleepingText(objs, int(st.Tgid), int(tid), st)
			p.mu.Lock()
			if len(p.stacks) < int(max(p.o.MaxThreads, 64)) {
				p.stacks[key] = txt
			}
			p.mu.Unlock()
		}
	}
	// Sleeps that ended without a long-block event leave their cached
	// stacks behind: drop them.
	p.mu.Lock()
	for k := range p.stacks {
		if !current[k] {
			delete(p.stacks, k)
		}
	}
	p.mu.Unlock()
	// A new generation before the map empties: the program reuses a
	// quiet sleep's stack ids only within the generation they were taken
	// in (bpf/sched.c same_site), and ids from before would name
	// emptied, or refilled, buckets.
	if err := setFlag(objs.Changes, stackGenSlot, p.stackGen+1); err != nil {
		// Emptied without a new generation, the map would lose the
		// stacks of idle waits whose ids are reused: kept as it is
		// until the next try.
		p.o.Log.Warn("sched: bump the stack generation; the stack map is not emptied", "err", err)
		return
	}
	p.stackGen++
	emptyMap[uint32](objs.Stacks)
}

// stackGenSlot is the changes entry holding the stack map's generation
// (bpf/sched.c STACK_GEN).
const stackGenSlot = 2

// quantileBound is the upper bound of the bucket holding quantile q of n
// waits distributed over buckets.
func quantileBound(buckets []float64, n, q float64) float64 {
	cum := 0.0
	for i, c := range buckets {
		cum += c
		if cum >= q*n {
			return RunqBucketBound(i)
		}
	}
	return RunqBucketBound(len(buckets) - 1)
}

func (p *Sched) ongoingBlock(objs *schedObjects, pid, tid int, name string, st schedThreadStats, d time.Duration) {
	id := episodeID{tid, int64(st.OffcpuSince)}
	p.mu.Lock()
	txt, ok := p.stacks[id]
	p.mu.Unlock()
	start := p.wall(st.OffcpuSince)
	if !ok {
		txt = p.sleepingText(objs, pid, tid, st)
		p.mu.Lock()
		if len(p.stacks) < int(max(p.o.MaxThreads, 64)) {
			p.stacks[id] = txt
		}
		p.mu.Unlock()
		p.sighted[tid] = sightMark{st.OffcpuSince, time.Now()}
		p.o.Episodes.Observe(signals.ThreadSight{Pid: pid, Tid: tid, Name: name, Start: start,
			Stack: txt.frames, KernelFrames: txt.kernel, LibcFrames: txt.libc, At: time.Now()})
	}
	e := signals.Episode{
		Kind: signals.EpisodeBlock, Pid: pid, Tid: tid, Thread: name,
		Start: start, Duration: d, Ongoing: true,
		Stack: txt.frames, KernelFrames: txt.kernel, LibcFrames: txt.libc,
	}
	p.o.Episodes.Put(e)
	if p.o.NotifyBlock > 0 && d >= p.o.NotifyBlock && !p.quiet(e) {
		p.notify(notifiedID{id, false})
	}
	if p.workMayWait(e) {
		// Until past the next poll, even at the idle clock's pace.
		p.store.BlockedWorker(time.Now().Add(blockedWorkerFor))
	}
}

// blockedWorkerFor is how long one look at a sleep going on keeps the
// store's BlockedWorker in force: past the next poll at the idle clock's
// pace (a second).
const blockedWorkerFor = 2 * time.Second

// workMayWait reports whether the rules judge sleep e by the work that
// waited meanwhile (rules/threads.go judgeBlock): any sleep outside the
// idle calls, and a sleep in one by an event loop that is not where it
// waits for work. A thread meant to block (a blocking pool's, a runtime's
// helper) is never judged so. Unknown threads count for their sleeps
// outside the idle calls only: nginx's master asleep in sigsuspend for
// good must not keep the sockcalls probe's socket hooks attached.
func (p *Sched) workMayWait(e signals.Episode) bool {
	ti, known := p.o.Episodes.Thread(e.Tid)
	if known && (ti.Role == signals.RoleBlockingPool || ti.Role == signals.RoleHelper) {
		return false
	}
	if !p.quiet(e) {
		return true
	}
	return known && ti.Role == signals.RoleEventLoop && !ti.AtHome(e.Syscall(), e.CallerStack(), e.Start)
}

// notifiedID is an episode going on, of either kind.
type notifiedID struct {
	episodeID
	busy bool
}

// notify wakes the engine once per episode.
func (p *Sched) notify(id notifiedID) {
	if p.notified[id] {
		return
	}
	if len(p.notified) >= 256 {
		clear(p.notified) // episodes long ended; at worst one wakes it twice
	}
	p.notified[id] = true
	p.store.Notify()
}

// quiet reports whether a block is a sleep in one of QuietCalls, which
// wakes nobody.
func (p *Sched) quiet(e signals.Episode) bool {
	sc := e.Syscall()
	return sc != "" && slices.Contains(p.o.QuietCalls, sc)
}

// maxSightsPerPoll bounds the short sleeps whose stacks are read per poll
// to learn what their threads are; sightEvery is how often one thread's
// are.
const (
	maxSightsPerPoll = 4
	sightEvery       = time.Second
)

// sightMark is the last sleep of a thread whose stack was read.
type sightMark struct {
	since uint64 // its start (bpf_ktime_get_ns)
	at    time.Time
}

type sighting struct {
	pid, tid int
	name     string
	st       schedThreadStats
}

// sightDue reports whether the stack of thread tid's sleep since since
// should be read now.
func (p *Sched) sightDue(tid int, since uint64, now time.Time) bool {
	m, ok := p.sighted[tid]
	return !ok || (m.since != since && now.Sub(m.at) >= sightEvery)
}

// sight reads the stack of a sleep too short (so far) to be an episode,
// to learn what the thread is: a busy event loop sleeps only briefly
// between bursts, and a thread that is busy later (busy episodes carry no
// stack) or whose blocking call's stack is cut short is told by these.
func (p *Sched) sight(objs *schedObjects, s sighting, now time.Time) {
	p.sighted[s.tid] = sightMark{s.st.OffcpuSince, now}
	txt := p.sleepingText(objs, s.pid, s.tid, s.st)
	p.o.Episodes.Observe(signals.ThreadSight{Pid: s.pid, Tid: s.tid, Name: s.name, Start: p.wall(s.st.OffcpuSince),
		Stack: txt.frames, KernelFrames: txt.kernel, LibcFrames: txt.libc, At: now})
}

func seriesKey(tid, name string) string { return tid + "\x00" + name }

// freshNames reads the names of threads the kernel side has not seen
// run (they sleep since before the probe attached). A name is read again
// after nameLife: a thread can be renamed from outside
// (/proc/PID/task/TID/comm), and a new one renames itself once it runs.
type freshNames map[int]freshName

type freshName struct {
	name string
	at   time.Time
}

const nameLife = time.Second

func (n freshNames) get(pid, tid int, now time.Time) string {
	if c, ok := n[tid]; ok && now.Sub(c.at) < nameLife {
		return c.name
	}
	b, _ := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/task/" + strconv.Itoa(tid) + "/comm")
	name := strings.TrimSpace(string(b))
	n[tid] = freshName{name, now}
	return name
}

// keep forgets threads that are not in tasks.
func (n freshNames) keep(tasks map[int]int) {
	for tid := range n {
		if tasks[tid] == 0 {
			delete(n, tid)
		}
	}
}

func (p *Sched) ongoingBusy(pid, tid int, name string, since uint64, d time.Duration) {
	e := signals.Episode{Kind: signals.EpisodeBusy, Pid: pid, Tid: tid, Thread: name,
		Start: p.wall(since), Duration: d, Ongoing: true}
	p.mu.Lock()
	if prev, ok := p.busy[tid]; ok && !prev.Start.Equal(e.Start) {
		// The previous run ended between two polls; close it.
		prev.Ongoing = false
		p.o.Episodes.Put(prev)
	}
	p.busy[tid] = e
	p.mu.Unlock()
	p.o.Episodes.Put(e)
	if p.o.NotifyBusy > 0 && d >= p.o.NotifyBusy {
		p.notify(notifiedID{episodeID{tid, int64(since)}, true})
	}
}

// endBusy closes the busy episodes of threads that have slept since.
func (p *Sched) endBusy(still map[int]bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	for tid, e := range p.busy {
		if still[tid] {
			continue
		}
		e.Ongoing = false
		p.o.Episodes.Put(e)
		delete(p.busy, tid)
	}
}

// Close detaches the programs and frees their maps. It is safe to call
// before Start and more than once.
func (p *Sched) Close() error {
	err := p.stop()
	p.mu.Lock()
	p.objs = nil
	p.mu.Unlock()
	return err
}
