package probes

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/cilium/ebpf/ringbuf"
	"github.com/cilium/ebpf/rlimit"

	"github.com/culprit-dev/culprit/signals"
	"github.com/culprit-dev/culprit/target"
)

// load loads spec into objs (a bpf2go Objects struct). A kernel or
// privilege problem comes back as an error naming the probe.
func load(probe string, spec *ebpf.CollectionSpec, objs any) error {
	// Kernels before 5.11 charge BPF memory to RLIMIT_MEMLOCK; later ones
	// to the cgroup, where this is a no-op.
	if err := rlimit.RemoveMemlock(); err != nil {
		return fmt.Errorf("%s: remove memlock limit: %w", probe, err)
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
	rd      *ringbuf.Reader
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
		if r.rd, err = ringbuf.NewReader(events()); err != nil {
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
	errs = append(errs, closeLinks(r.links))
	r.links = nil
	if r.objs != nil {
		errs = append(errs, r.objs.Close())
		r.objs = nil
	}
	return errors.Join(errs...)
}

// readRing calls handle with each record of rd until rd is closed.
func readRing(probe string, rd *ringbuf.Reader, log interface{ Warn(string, ...any) }, handle func([]byte)) {
	var rec ringbuf.Record
	for {
		if err := rd.ReadInto(&rec); err != nil {
			if errors.Is(err, ringbuf.ErrClosed) {
				return
			}
			log.Warn(probe+": read ring buffer", "err", err)
			continue
		}
		handle(rec.RawSample)
	}
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

// every calls f every interval (100 ms if unset) until ctx ends.
func every(ctx context.Context, interval time.Duration, f func(now time.Time)) {
	if interval <= 0 {
		interval = 100 * time.Millisecond
	}
	tick := time.NewTicker(interval)
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

// putProbeCounters writes the probe's event count and its ring buffer's
// losses (the lost array of ringbuf.h).
func putProbeCounters(store *signals.Store, probe string, events float64, lost *ebpf.Map, now time.Time) {
	self := signals.L("probe", probe)
	store.Put(sigProbeEvents, self, events, now)
	var n uint64
	if err := lost.Lookup(uint32(0), &n); err == nil {
		store.Put(sigProbeLost, self, float64(n), now)
	}
}

// retarget keeps a `targets` map (tgid -> 1) to the one process watched:
// it reports whether *cur changed to pid.
func retarget(m *ebpf.Map, cur *uint32, pid uint32) (bool, error) {
	if *cur == pid {
		return false, nil
	}
	if *cur != 0 {
		if err := m.Delete(*cur); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			return false, fmt.Errorf("delete old target %d: %w", *cur, err)
		}
	}
	if err := m.Put(pid, uint8(1)); err != nil {
		return false, fmt.Errorf("add target %d: %w", pid, err)
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
// Kept in the BPF targets map, refreshed every groupRefresh.
type group struct {
	pid     int
	members map[uint32]bool
	at      time.Time
}

const (
	groupRefresh = 2 * time.Second
	maxChildren  = 15 // the targets map holds 16
)

// update mirrors pid and its children into m; it reports whether the
// target itself changed.
func (g *group) update(m *ebpf.Map, pid int, now time.Time) (bool, error) {
	changed := pid != g.pid
	if !changed && now.Sub(g.at) < groupRefresh {
		return false, nil
	}
	want := map[uint32]bool{uint32(pid): true}
	for _, c := range target.Children("/proc", pid, maxChildren) {
		want[uint32(c)] = true
	}
	for p := range g.members {
		if !want[p] {
			if err := m.Delete(p); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
				return changed, fmt.Errorf("delete old target %d: %w", p, err)
			}
		}
	}
	for p := range want {
		if !g.members[p] {
			if err := m.Put(p, uint8(1)); err != nil {
				return changed, fmt.Errorf("add target %d: %w", p, err)
			}
		}
	}
	g.pid, g.members, g.at = pid, want, now
	return changed, nil
}

func (g *group) has(tgid uint32) bool { return g.members[tgid] }
