package probes

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"maps"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/cilium/ebpf/ringbuf"
	"github.com/cilium/ebpf/rlimit"

	"github.com/culprit-dev/culprit/signals"
	"github.com/culprit-dev/culprit/workload"
)

// prepareLoad readies the process and spec for loading: the memlock
// limit, and the change counters sized to the CPUs.
func prepareLoad(probe string, spec *ebpf.CollectionSpec) error {
	// Kernels before 5.11 charge BPF memory to RLIMIT_MEMLOCK; later ones
	// to the cgroup, where this is a no-op.
	if err := rlimit.RemoveMemlock(); err != nil {
		return fmt.Errorf("%s: remove memlock limit: %w", probe, err)
	}
	if m, ok := spec.Maps["changes"]; ok {
		// A cache line of counters per CPU (changes.h); without the
		// CPU count, the counters share line 0.
		if cpus, err := ebpf.PossibleCPU(); err == nil {
			m.MaxEntries = changesLine * uint32(1+cpus)
		}
	}
	return nil
}

// load loads spec into objs (a bpf2go Objects struct). A kernel or
// privilege problem comes back as an error naming the probe.
func load(probe string, spec *ebpf.CollectionSpec, objs any) error {
	if err := prepareLoad(probe, spec); err != nil {
		return err
	}
	if err := spec.LoadAndAssign(objs, nil); err != nil {
		var ve *ebpf.VerifierError
		if errors.As(err, &ve) {
			return fmt.Errorf("%s: verifier rejected the programs: %+v", probe, ve)
		}
		return fmt.Errorf("%s: load programs (needs CAP_BPF and CAP_PERFMON): %w", probe, err)
	}
	return nil
}

type tracingProg struct {
	name string // for errors: "tp_btf/sched_switch"
	prog *ebpf.Program
}

// attachTracing attaches tp_btf programs; on error, what was attached is
// detached again.
func attachTracing(probe string, progs ...tracingProg) ([]link.Link, error) {
	var links []link.Link
	for _, p := range progs {
		l, err := link.AttachTracing(link.TracingOptions{Program: p.prog})
		if err != nil {
			closeLinks(links)
			return nil, fmt.Errorf("%s: attach %s: %w", probe, p.name, err)
		}
		links = append(links, l)
	}
	return links, nil
}

func closeLinks(links []link.Link) error {
	var errs []error
	for _, l := range links {
		errs = append(errs, l.Close())
	}
	return errors.Join(errs...)
}

// running is what a started tracing probe owns: its kernel objects, links,
// ring buffer reader and goroutines. stop releases them in order: the
// goroutines end before the maps they read are freed.
type running struct {
	mu      sync.Mutex // also guards the embedding probe's own fields
	objs    io.Closer
	links   []link.Link
	rd      *ringReader
	wakes   *ringReader  // the wakes ring (changes.h), when the probe has one
	wokeAt  atomic.Int64 // when its last record came (Unix ns)
	wg      sync.WaitGroup
	cancel  context.CancelFunc
	started bool
}

// start loads spec into objs, attaches the tp_btf programs progs returns
// (called after loading), and opens a reader on the ring buffer events
// returns, if it returns one. On error nothing stays loaded. The caller
// holds mu; the returned context ends at stop.
func (r *running) start(ctx context.Context, probe string, spec *ebpf.CollectionSpec, objs io.Closer, progs func() []tracingProg, events func() *ebpf.Map) (context.Context, error) {
	if r.started {
		return nil, fmt.Errorf("%s: already started", probe)
	}
	if err := load(probe, spec, objs); err != nil {
		return nil, err
	}
	r.objs = objs
	var err error
	if r.links, err = attachTracing(probe, progs()...); err != nil {
		r.release()
		return nil, err
	}
	if events != nil {
		if r.rd, err = newRingReader(events()); err != nil {
			r.release()
			return nil, fmt.Errorf("%s: ring buffer reader: %w", probe, err)
		}
	}
	r.started = true
	ctx, r.cancel = context.WithCancel(ctx)
	return ctx, nil
}

// spawn runs f in a goroutine that stop waits for.
func (r *running) spawn(f func()) {
	r.wg.Add(1)
	go func() { defer r.wg.Done(); f() }()
}

// stop ends the goroutines, then frees the kernel objects. It is safe to
// call before start and more than once.
func (r *running) stop() error {
	r.mu.Lock()
	if r.cancel != nil {
		r.cancel()
	}
	var errs []error
	if r.rd != nil {
		errs = append(errs, r.rd.Close()) // unblocks the reader
		r.rd = nil
	}
	if r.wakes != nil {
		errs = append(errs, r.wakes.Close())
		r.wakes = nil
	}
	r.mu.Unlock()
	r.wg.Wait()
	r.mu.Lock()
	defer r.mu.Unlock()
	return errors.Join(append(errs, r.release())...)
}

func (r *running) release() error {
	var errs []error
	if r.rd != nil {
		errs = append(errs, r.rd.Close())
		r.rd = nil
	}
	if r.wakes != nil {
		errs = append(errs, r.wakes.Close())
		r.wakes = nil
	}
	errs = append(errs, closeLinks(r.links))
	r.links = nil
	if r.objs != nil {
		errs = append(errs, r.objs.Close())
		r.objs = nil
	}
	return errors.Join(errs...)
}

// readRing calls handle with each record of rd until rd is closed.
func readRing(probe string, rd *ringReader, log interface{ Warn(string, ...any) }, handle func([]byte)) {
	readRingFlushed(probe, rd, log, handle, nil)
}

// readRingFlushed is readRing that also calls flushed (when not nil) after
// the records a Flush made the reader return: records sent without a
// wake-up (BPF_RB_NO_WAKEUP) wait in the ring until the poller flushes it.
// Between drains it waits in the runtime's poller (ringReader).
func readRingFlushed(probe string, rd *ringReader, log interface{ Warn(string, ...any) }, handle func([]byte), flushed func()) {
	flush := false
	for {
		// Every record there is now.
		if err := rd.drain(handle); errors.Is(err, ringbuf.ErrClosed) {
			return
		} else if err != nil {
			log.Warn(probe+": read ring buffer", "err", err)
		}
		if flush && flushed != nil {
			flushed()
		}
		err := rd.wait()
		switch {
		case err == nil:
			flush = false
		case errors.Is(err, os.ErrDeadlineExceeded):
			flush = true
		case errors.Is(err, os.ErrClosed):
			return
		default:
			log.Warn(probe+": wait for the ring buffer", "err", err)
			return
		}
	}
}

// flushRing is flushPending for a goroutine other than stop's: under mu,
// which stop closes the reader under, and only while rd is still the
// probe's reader (a flush racing the close was seen by the race detector
// when the agent stopped).
func (r *running) flushRing(rd *ringReader) {
	r.mu.Lock()
	if r.rd == rd {
		flushPending(rd)
	}
	r.mu.Unlock()
}

// flushPending makes rd's reader return the records that wait in the ring
// without having woken it; nothing when there are none (one atomic load).
func flushPending(rd *ringReader) bool {
	if rd == nil || rd.AvailableBytes() == 0 {
		return false
	}
	return rd.Flush() == nil
}

// startWakes reads the probe's wakes ring (bpf/headers/changes.h
// CULPRIT_WAKES): each record, sent by an event that came while the probe
// had armed it, makes the shared clock hot (the probe and the fast
// collector poll every 100 ms again) and kicks kick. The caller holds r.mu.
func (r *running) startWakes(probe string, m *ebpf.Map, log interface{ Warn(string, ...any) }, kick kicker) error {
	if m == nil {
		return nil
	}
	rd, err := newRingReader(m)
	if err != nil {
		return fmt.Errorf("%s: wakes ring buffer reader: %w", probe, err)
	}
	r.wakes = rd
	r.spawn(func() {
		readRing(probe, rd, log, func([]byte) {
			r.wokeAt.Store(time.Now().UnixNano())
			signals.HotNow()
			if kick != nil {
				kick.Kick()
			}
		})
	})
	return nil
}

// resize sets the max_entries of the named maps of spec; a zero size keeps
// the one compiled in.
func resize(spec *ebpf.CollectionSpec, sizes map[string]uint32) {
	for name, n := range sizes {
		if m, ok := spec.Maps[name]; ok && n > 0 {
			m.MaxEntries = n
		}
	}
}

// every calls f every interval (100 ms if unset) until ctx ends, on the
// process's shared clock (signals.NewTicker): the probes' polls, the fast
// collector and the rules wake the process together.
func every(ctx context.Context, interval time.Duration, f func(now time.Time)) {
	if interval <= 0 {
		interval = 100 * time.Millisecond
	}
	tick := signals.NewTicker(interval)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case now := <-tick.C:
			f(now)
		}
	}
}

// pacer spaces a probe's polls: fast (Options.PollInterval) while what the
// poll reads keeps changing, while the store is hurried (a collector saw a
// listener's queue hold connections) or after a kick (an event on the
// probe's ring buffer); otherwise each quiet poll doubles the interval, up
// to slow (Options.IdlePollInterval). A quiet probe then costs one map read
// a second instead of ten; a change is seen at most slow late, and every
// poll after it comes fast again.
type pacer struct {
	fast, slow time.Duration
	cur        time.Duration
}

func newPacer(o Options) pacer {
	fast := o.PollInterval
	if fast <= 0 {
		fast = 100 * time.Millisecond
	}
	slow := max(o.IdlePollInterval, fast)
	return pacer{fast: fast, slow: slow, cur: fast}
}

// next is the wait before the next poll, given whether the last one saw
// activity.
func (p *pacer) next(active bool) time.Duration {
	if active {
		p.cur = p.fast
	} else {
		p.cur = min(p.slow, 2*p.cur)
	}
	return p.cur
}

// kicker wakes a paced poll loop at once; Kick never blocks.
type kicker chan struct{}

func newKicker() kicker { return make(kicker, 1) }

func (k kicker) Kick() {
	select {
	case k <- struct{}{}:
	default:
	}
}

// paced calls f until ctx ends, spaced by a pacer: f reports whether it
// saw something change. A kick (nil: none) or a Hurry on the store brings
// the next poll forward to the fast interval.
func paced(ctx context.Context, o Options, store *signals.Store, kick kicker, f func(now time.Time) bool) {
	pc := newPacer(o)
	// Ticks of the fast interval on the shared clock (which slows to its
	// idle interval while nothing is hot); a poll is due when its wait has
	// passed.
	tk := signals.NewTicker(pc.fast)
	defer tk.Stop()
	var last time.Time
	wait := pc.fast
	for {
		select {
		case <-ctx.Done():
			return
		case <-kick:
			// An event: poll now, and keep polling fast.
			wait = 0
		case now := <-tk.C:
			if now.Sub(last) < wait-pc.fast/2 {
				continue
			}
		}
		now := time.Now()
		active := f(now)
		active = active || (store != nil && store.Hurried(now))
		last, wait = now, pc.next(active)
	}
}

// changesLine is CULPRIT_CHANGES_LINE (changes.h): the counters of one
// CPU, a cache line.
const changesLine = 8

// changes reads a probe's change counters (bpf/headers/changes.h) through
// the memory mapping of its `changes` array: a memory read per poll, no
// system call. A poll whose counter did not move skips walking the map it
// stands for. Each CPU bumps its own copy of a counter, in a cache line of
// its own; a counter's value is the sum over the lines. Without
// BPF_F_MMAPABLE (kernels before 5.5) every poll walks, as if the counters
// always moved.
type changes struct {
	mm   *ebpf.Memory
	last []uint64
	buf  []byte // the whole array
	mu   sync.Mutex
}

func newChanges(m *ebpf.Map, n int) *changes {
	c := &changes{last: make([]uint64, n)}
	if m != nil {
		if mm, err := m.Memory(); err == nil {
			c.mm = mm
			c.buf = make([]byte, 8*int(m.MaxEntries()))
		}
	}
	for i := range c.last {
		c.last[i] = ^uint64(0) // the first poll walks
	}
	return c
}

// moved reports whether counter i moved since it last did: the caller
// then walks the map. The counter is read before the walk, so a change
// during the walk shows at the next poll.
func (c *changes) moved(i int) bool {
	if c == nil || c.mm == nil {
		return true
	}
	v := c.value(i)
	if v == ^uint64(0) || v != c.last[i] {
		c.last[i] = v
		return true
	}
	return false
}

// value reads counter i as it is now, the sum of every CPU's (^0 when it
// cannot be read). It copies the array once: (1 + CPUs) × 64 bytes.
func (c *changes) value(i int) uint64 {
	if c == nil || c.mm == nil {
		return ^uint64(0)
	}
	c.mu.Lock() // the accept_queue collector reads tcplisten's too
	defer c.mu.Unlock()
	if _, err := c.mm.ReadAt(c.buf, 0); err != nil {
		return ^uint64(0)
	}
	var v uint64
	for off := 8 * i; off+8 <= len(c.buf); off += 8 * changesLine {
		v += binary.NativeEndian.Uint64(c.buf[off:])
	}
	return v
}

// arm sets counter slot to 1 while the shared clock idles: the probe's
// next event wakes the process (changes.h CULPRIT_WAKES). While the clock
// is hot the process polls every 100 ms anyway, and events wake nobody.
// Called before the counters are read, so an event after the read wakes.
func (c *changes) arm(slot int) {
	if c == nil || c.mm == nil || !signals.Idle() {
		return
	}
	var one [8]byte
	binary.NativeEndian.PutUint64(one[:], 1)
	_, _ = c.mm.WriteAt(one[:], int64(8*slot)) // a read-only mapping: no wake-ups, polls stay as they are
}

// setFlag writes v to entry slot of a `changes` array m: a flag or a
// generation the programs read, not a counter. Through a system call, not
// the mapping arm writes through: each of these must be seen before the
// map operations that follow it (the seed after HOOKED, the emptying after
// a new stack generation), and a plain store to the mapping is ordered
// before them only on x86. A late arm costs one poll at most.
func setFlag(m *ebpf.Map, slot int, v uint64) error {
	return m.Update(uint32(slot), v, ebpf.UpdateAny)
}

// emptyMap deletes every entry of hash map m, whose keys are K. The keys
// are read first, without their values (a stack map's are 1 KB each), and
// deleted after: a delete during the walk makes the kernel start it over.
// An entry gone meanwhile is fine.
func emptyMap[K any](m *ebpf.Map) {
	var (
		keys      []K
		cur, next K
		from      any // nil: the first key
	)
	for m.NextKey(from, &next) == nil {
		keys = append(keys, next)
		cur, from = next, &cur
	}
	for _, k := range keys {
		_ = m.Delete(k)
	}
}

// forget makes the next moved(i) report true (a walk is due anyway).
func (c *changes) forget(i int) {
	if c != nil {
		c.last[i] = ^uint64(0)
	}
}

// refreshEvery is how often a series whose value did not change is
// written again, so that rules checking a signal is fresh (a sample in the
// last 2 s) still find one; changes are written when seen.
const refreshEvery = time.Second

// cachedSeries writes one series through a store handle, skipping writes
// of an unchanged value until refreshEvery has passed. A counter's
// increase and a gauge's level read the same as if every poll had written.
type cachedSeries struct {
	h    *signals.Handle
	v    float64
	at   time.Time
	seen uint32 // the poll that last touched it (for forgetting)
	set  bool
}

func (c *cachedSeries) put(v float64, now time.Time) {
	if c.set && c.v == v && now.Sub(c.at) < refreshEvery {
		return
	}
	c.h.Put(v, now)
	c.v, c.at, c.set = v, now, true
}

// seriesSet is a probe's family of series of one signal by a comparable
// key: the handle of each, created at first use. What it costs per poll is
// a map lookup and, when the value changed, one ring write.
type seriesSet[K comparable] struct {
	store *signals.Store
	desc  *signals.Desc
	m     map[K]*cachedSeries
	poll  uint32
	// The times of this read of the map and of the one before (put: a
	// touch reads nothing), for counters born between them.
	cur, prev time.Time
}

// at notes the time of the read a put belongs to.
func (s *seriesSet[K]) at(now time.Time) {
	if !now.Equal(s.cur) {
		s.prev, s.cur = s.cur, now
	}
}

func newSeriesSet[K comparable](store *signals.Store, d *signals.Desc) *seriesSet[K] {
	return &seriesSet[K]{store: store, desc: d, m: map[K]*cachedSeries{}}
}

// put writes v to the series of k; labels builds its labels the first time.
func (s *seriesSet[K]) put(k K, labels func() signals.Labels, v float64, now time.Time) {
	s.at(now)
	c, ok := s.m[k]
	if !ok {
		c = &cachedSeries{h: s.store.Handle(s.desc, labels())}
		s.m[k] = c
		// A counter whose key first appears after the first read counted
		// all of its value since the read before (the eBPF map had no
		// entry for it then): it starts at 0 then, so that an increase
		// over a window counts its first events too (the first connect
		// errors to a new remote, the first drops of a new listener).
		// Reads skipped in between (touch) do not move that time, so the
		// value is never squeezed into a shorter span than it took.
		if s.desc.Kind == signals.Counter && !s.prev.IsZero() && s.prev.Before(now) {
			c.h.Put(0, s.prev)
		}
	}
	c.seen = s.poll
	c.put(v, now)
}

// begin starts a poll: series not put until the matching end are gone.
func (s *seriesSet[K]) begin() { s.poll++ }

// end forgets the series of keys not put since begin, from the store too;
// it reports how many it forgot.
func (s *seriesSet[K]) end() int {
	var gone map[*signals.Handle]bool
	for k, c := range s.m {
		if c.seen != s.poll {
			if gone == nil {
				gone = map[*signals.Handle]bool{}
			}
			gone[c.h] = true
			delete(s.m, k)
		}
	}
	if gone != nil {
		keys := make(map[string]bool, len(gone))
		for h := range gone {
			keys[h.Labels().String()] = true
		}
		s.store.Forget(s.desc, func(ls signals.Labels) bool { return !keys[ls.String()] })
	}
	return len(gone)
}

// touch writes every series again with its last value (a write only when
// refreshEvery passed), marking them put this poll: what a poll does when
// the kernel says nothing changed.
func (s *seriesSet[K]) touch(now time.Time) {
	for _, c := range s.m {
		c.seen = s.poll
		c.put(c.v, now)
	}
}

// reset forgets every series of the set, in the store too.
func (s *seriesSet[K]) reset() {
	if s == nil {
		return // before the first poll made the set
	}
	clear(s.m)
	s.cur, s.prev = time.Time{}, time.Time{}
	s.store.Forget(s.desc, func(signals.Labels) bool { return false })
}

// probeCounters writes a probe's event and loss counters through handles:
// one array lookup and, when they moved (or refreshEvery passed), two ring
// writes.
type probeCounters struct {
	events, lost cachedSeries
}

func newProbeCounters(store *signals.Store, probe string) *probeCounters {
	self := signals.L("probe", probe)
	return &probeCounters{events: cachedSeries{h: store.Handle(signals.ProbeEventsTotal, self)}, lost: cachedSeries{h: store.Handle(signals.ProbeEventsLostTotal, self)}}
}

func (c *probeCounters) put(events float64, lost *ebpf.Map, now time.Time) {
	c.events.put(events, now)
	var n uint64
	if err := lost.Lookup(uint32(0), &n); err == nil {
		c.lost.put(float64(n), now)
	}
}

// maxTargets is the length of target_tgids (bpf/headers/targets.h).
const maxTargets = 16

// setTargets writes tgids (at most maxTargets, the target first) into a
// probe's target_tgids (loaded, or in its spec), zeros after the last.
func setTargets(v interface{ Set(any) error }, tgids []uint32) error {
	var set [maxTargets]uint32
	if len(tgids) > maxTargets {
		return fmt.Errorf("%d processes to watch, room for %d", len(tgids), maxTargets)
	}
	copy(set[:], tgids)
	if err := v.Set(set); err != nil {
		return fmt.Errorf("set target_tgids: %w", err)
	}
	return nil
}

// retarget keeps a probe's target_tgids to the one process watched: it
// reports whether *cur changed to pid.
func retarget(v *ebpf.Variable, cur *uint32, pid uint32) (bool, error) {
	if *cur == pid {
		return false, nil
	}
	if err := setTargets(v, []uint32{pid}); err != nil {
		return false, fmt.Errorf("target %d: %w", pid, err)
	}
	*cur = pid
	return true, nil
}

// threadNames caches thread names (comm) of the current target.
type threadNames map[int]string

// get reads a thread's comm once; at most 4096 are kept.
func (n threadNames) get(pid, tid int) string {
	if name, ok := n[tid]; ok {
		return name
	}
	b, _ := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/task/" + strconv.Itoa(tid) + "/comm")
	name := strings.TrimSpace(string(b))
	if len(n) < 4096 {
		n[tid] = name
	}
	return name
}

// group is the target and its child processes: a prefork server (nginx,
// gunicorn, php-fpm) serves from workers its master forked, and the master
// (which --port finds: it holds the listener) does not run the requests.
// Kept in the probe's target_tgids, refreshed every groupRefresh.
type group struct {
	pid     int
	members map[uint32]bool
	at      time.Time
	gen     uint64 // bumped when the members change
}

const (
	groupRefresh = 2 * time.Second
	maxChildren  = workload.MaxGroupChildren
)

// The target and its children fill target_tgids exactly: a compile error
// (a negative constant converted to uint) if the two drift apart.
const _ = uint(maxTargets-1-maxChildren) + uint(maxChildren-(maxTargets-1))

// update mirrors pid and its children into v (target_tgids); it reports
// whether the target itself changed.
func (g *group) update(v *ebpf.Variable, pid int, now time.Time) (bool, error) {
	changed := pid != g.pid
	if !changed && now.Sub(g.at) < groupRefresh {
		return false, nil
	}
	want := map[uint32]bool{uint32(pid): true}
	tgids := []uint32{uint32(pid)}
	for _, c := range workload.Children("/proc", pid, maxChildren) {
		if !want[uint32(c)] {
			want[uint32(c)] = true
			tgids = append(tgids, uint32(c))
		}
	}
	if changed || !maps.Equal(want, g.members) {
		if err := setTargets(v, tgids); err != nil {
			return changed, fmt.Errorf("target %d and %d children: %w", pid, len(tgids)-1, err)
		}
		g.gen++
	}
	g.pid, g.members, g.at = pid, want, now
	return changed, nil
}

func (g *group) has(tgid uint32) bool { return g.members[tgid] }
