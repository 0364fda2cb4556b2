package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/pprof"
	"os"
	"runtime"
	"strconv"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/culprit-dev/culprit/internal/faults"
)

// cmdDemo runs a small HTTP service with fault switches: the target
// `make run` watches on a fresh machine. The service listens with a small
// backlog so its accept queue can really overflow; the control endpoints
// listen apart so they keep working while the service stops accepting.
func cmdDemo(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("culprit demo", flag.ContinueOnError)
	fs.SetOutput(stderr)
	addr := fs.String("addr", demoAddr, "service listener")
	control := fs.String("control", demoControl, "fault-switch listener")
	backlog := fs.Int("backlog", 8, "listen backlog of the service (small, so bursts overflow it)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	d, err := newDemo(*addr, *backlog)
	if err != nil {
		return err
	}
	cl, err := net.Listen("tcp", *control)
	if err != nil {
		d.l.Close()
		return fmt.Errorf("control listener: %w", err)
	}
	ctrl := &http.Server{Handler: d.controlMux(), ReadHeaderTimeout: 5 * time.Second}
	go ctrl.Serve(cl)
	fmt.Fprintf(stdout, "demo: serving http://%s (backlog %d), fault switches on http://%s\n", d.addr, *backlog, cl.Addr())
	err = d.serve(ctx)
	sctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	ctrl.Shutdown(sctx)
	return err
}

type demo struct {
	l    *net.TCPListener
	addr string
	gate *faults.Gate
	srv  *http.Server

	mu      sync.Mutex
	reopen  *time.Timer
	loadCtx context.Context
	// The running worker faults by name: each is a group of its own on the
	// pool, so faults overlap, and starting one again replaces only it.
	faultRuns map[string]*faults.Group

	// An async runtime's worker pool (worker-0..3) for the scheduler faults.
	workers *faults.Workers

	// Held on purpose by the memory and FD faults.
	leakMu   sync.Mutex
	leaked   [][]byte
	retained [][]byte
	fds      []*os.File
}

func newDemo(addr string, backlog int) (*demo, error) {
	l, err := faults.ListenTCP(addr, backlog)
	if err != nil {
		return nil, fmt.Errorf("demo service: %w", err)
	}
	d := &demo{l: l, addr: l.Addr().String(), gate: faults.NewGate(), loadCtx: context.Background(),
		workers: faults.StartWorkers(4, "worker"), faultRuns: map[string]*faults.Group{}}
	mux := http.NewServeMux()
	mux.HandleFunc("/", func(w http.ResponseWriter, _ *http.Request) {
		fmt.Fprintln(w, "hello from the culprit demo")
	})
	d.srv = &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second, IdleTimeout: 30 * time.Second}
	return d, nil
}

// gatedListener pauses Accept while the gate is closed: the kernel keeps
// completing handshakes into the accept queue, exactly as behind a blocked
// accept loop.
type gatedListener struct {
	net.Listener
	ctx  context.Context
	gate *faults.Gate
}

func (g gatedListener) Accept() (net.Conn, error) {
	if err := g.gate.Wait(g.ctx); err != nil {
		return nil, net.ErrClosed
	}
	return g.Listener.Accept()
}

func (d *demo) serve(ctx context.Context) error {
	go func() {
		<-ctx.Done()
		sctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		d.srv.Shutdown(sctx)
	}()
	err := d.srv.Serve(gatedListener{Listener: d.l, ctx: ctx, gate: d.gate})
	if errors.Is(err, http.ErrServerClosed) || ctx.Err() != nil {
		return nil
	}
	return err
}

func intParam(r *http.Request, name string, def, max int) (int, error) {
	s := r.URL.Query().Get(name)
	if s == "" {
		return def, nil
	}
	n, err := strconv.Atoi(s)
	if err != nil || n < 0 || n > max {
		return 0, fmt.Errorf("%s must be an integer from 0 to %d", name, max)
	}
	return n, nil
}

func (d *demo) controlMux() *http.ServeMux {
	mux := http.NewServeMux()
	mux.HandleFunc("/", func(w http.ResponseWriter, _ *http.Request) {
		fmt.Fprintf(w, `culprit demo fault switches (service on %s):
  POST /fault/stop-accepting?seconds=15&load=64   stop accepting for N s, and open M connections to itself
  POST /fault/burst?conns=300&rounds=5            bursts of short connections against the small backlog
  POST /fault/accept                              accept again now
  POST /fault/leak-heap?mb=8&every=1s&for=60s     grow the live heap (a leak the heap profile shows)
  POST /fault/retain?mb=512                       resident memory outside the heap (allocator retention)
  POST /fault/spike?mb=512                        allocate a large heap, then free it: RSS stays behind
                                                  while the heap shrinks (run the demo with GODEBUG=madvdontneed=0)
  POST /fault/leak-fds?n=10&every=1s&for=60s      open pipes and never close them
  GET  /fault/held                                what the leaks hold now
  POST /fault/release                             free all of it, and stop the worker faults
  (the worker faults want GODEBUG=asyncpreemptoff=1 and GOMAXPROCS above 4, as "culprit agent" sets;
   they run together, each for its own time from when it starts on a worker)
  POST /fault/block-worker?ms=800&for=20s         worker-1 makes a blocking call (nanosleep) every 50 ms
  POST /fault/spin-worker?for=10s                 worker-2 runs CPU work without yielding
  POST /fault/imbalance?for=20s                   worker-0 does all the work of the pool in short runs
  GET  /debug/pprof/heap                          the demo's heap profile (pprof.heap_url)
`, d.addr)
	})
	mux.HandleFunc("GET /debug/pprof/", pprof.Index)
	mux.HandleFunc("POST /fault/leak-heap", func(w http.ResponseWriter, r *http.Request) {
		d.repeat(w, r, "mb", 8, 1024, func(n int) { d.leakHeap(n) }, "MiB of heap leaked")
	})
	mux.HandleFunc("POST /fault/leak-fds", func(w http.ResponseWriter, r *http.Request) {
		d.repeat(w, r, "n", 10, 10000, func(n int) { d.leakFDs(n) }, "pipes leaked")
	})
	mux.HandleFunc("POST /fault/retain", func(w http.ResponseWriter, r *http.Request) {
		mb, err := intParam(r, "mb", 512, 16384)
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		if err := d.retain(mb); err != nil {
			http.Error(w, err.Error(), http.StatusInternalServerError)
			return
		}
		fmt.Fprintf(w, "%d MiB resident outside the Go heap\n", mb)
	})
	mux.HandleFunc("POST /fault/spike", func(w http.ResponseWriter, r *http.Request) {
		mb, err := intParam(r, "mb", 512, 16384)
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		spike(mb)
		fmt.Fprintf(w, "allocated and freed %d MiB of heap\n", mb)
	})
	mux.HandleFunc("POST /fault/block-worker", func(w http.ResponseWriter, r *http.Request) {
		d.workerFault(w, r, "block-worker", 20*time.Second, func(g *faults.Group) {
			ms, _ := intParam(r, "ms", 800, 60000)
			g.Loop(1, func() { faults.BlockingCall(time.Duration(ms) * time.Millisecond); time.Sleep(50 * time.Millisecond) })
		}, "worker-1 blocks in nanosleep")
	})
	mux.HandleFunc("POST /fault/spin-worker", func(w http.ResponseWriter, r *http.Request) {
		d.workerFault(w, r, "spin-worker", 10*time.Second, func(g *faults.Group) { g.HotLoopUntilStop(2) }, "worker-2 spins in faults.hotLoop")
	})
	mux.HandleFunc("POST /fault/imbalance", func(w http.ResponseWriter, r *http.Request) {
		d.workerFault(w, r, "imbalance", 20*time.Second, func(g *faults.Group) {
			g.Duty(0, 80)
			for i := 1; i < d.workers.Len(); i++ {
				g.Duty(i, 3)
			}
		}, "worker-0 busy 80%, its peers 3%")
	})
	mux.HandleFunc("GET /fault/held", func(w http.ResponseWriter, _ *http.Request) {
		d.leakMu.Lock()
		defer d.leakMu.Unlock()
		fmt.Fprintf(w, "%d MiB of heap leaked, %d pipes leaked\n", len(d.leaked), len(d.fds)/2)
	})
	mux.HandleFunc("POST /fault/release", func(w http.ResponseWriter, _ *http.Request) {
		d.workers.Stop()
		d.release()
		fmt.Fprintln(w, "released heap, retained memory and FDs")
	})
	mux.HandleFunc("POST /fault/stop-accepting", func(w http.ResponseWriter, r *http.Request) {
		secs, err := intParam(r, "seconds", 15, 3600)
		if err == nil {
			var load int
			if load, err = intParam(r, "load", 0, 2000); err == nil {
				d.stopAccepting(time.Duration(secs)*time.Second, load)
				fmt.Fprintf(w, "not accepting on %s for %ds; opening %d connections\n", d.addr, secs, load)
				return
			}
		}
		http.Error(w, err.Error(), http.StatusBadRequest)
	})
	mux.HandleFunc("POST /fault/accept", func(w http.ResponseWriter, _ *http.Request) {
		d.gate.Set(true)
		fmt.Fprintf(w, "accepting on %s\n", d.addr)
	})
	mux.HandleFunc("POST /fault/burst", func(w http.ResponseWriter, r *http.Request) {
		conns, err := intParam(r, "conns", 300, 5000)
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		rounds, err := intParam(r, "rounds", 5, 100)
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		est := 0
		for i := 0; i < rounds; i++ {
			est += faults.Burst(r.Context(), d.addr, conns, 5*time.Second)
		}
		fmt.Fprintf(w, "%d bursts of %d connections against %s: %d established\n", rounds, conns, d.addr, est)
	})
	return mux
}

// repeat runs f(n) every `every` for `for`, in the background, so a leak
// grows the way a real one does: steadily.
func (d *demo) repeat(w http.ResponseWriter, r *http.Request, param string, def, max int, f func(int), what string) {
	n, err := intParam(r, param, def, max)
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	every, err := durParam(r, "every", time.Second)
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	total, err := durParam(r, "for", 0)
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	start := time.Now()
	f(n)
	if total > 0 {
		// On a schedule (the k-th call at start + k*every), not a sleep
		// between calls: the time f itself takes would slow the rate
		// (seen: 4 MiB every 500 ms, each taking ~150 ms under -race,
		// leaked at 372 MiB/min, not 480).
		go func() {
			for k := 1; ; k++ {
				at := start.Add(time.Duration(k) * every)
				if at.Sub(start) > total {
					return
				}
				time.Sleep(time.Until(at))
				f(n)
			}
		}()
	}
	fmt.Fprintf(w, "%d %s, every %s for %s\n", n, what, every, total)
}

func durParam(r *http.Request, name string, def time.Duration) (time.Duration, error) {
	s := r.URL.Query().Get(name)
	if s == "" {
		return def, nil
	}
	v, err := time.ParseDuration(s)
	if err != nil || v < 0 || v > 24*time.Hour {
		return 0, fmt.Errorf("%s must be a duration like 1s", name)
	}
	if name == "every" && v < 10*time.Millisecond {
		return 0, fmt.Errorf("every must be at least 10ms")
	}
	return v, nil
}

// leakHeap keeps n MiB reachable. Its own function, never inlined, so the
// heap profile names it as the allocation site.
//
//go:noinline
func (d *demo) leakHeap(n int) {
	d.leakMu.Lock()
	defer d.leakMu.Unlock()
	for i := 0; i < n; i++ {
		b := make([]byte, 1<<20)
		for j := 0; j < len(b); j += 4096 {
			b[j] = 1 // resident, not just reserved
		}
		d.leaked = append(d.leaked, b)
	}
}

// spike allocates mb MiB of heap, touches it, drops it and collects: the
// live heap is small again, but the runtime keeps the pages (with
// MADV_FREE, GODEBUG=madvdontneed=0, they stay resident until the kernel
// needs them): the "memory does not return after spikes" of seed 000.
//
//go:noinline
func spike(mb int) {
	spikeHeld = make([][]byte, 0, mb)
	for i := 0; i < mb; i++ {
		b := make([]byte, 1<<20)
		for j := 0; j < len(b); j += 4096 {
			b[j] = 1
		}
		spikeHeld = append(spikeHeld, b)
	}
	spikeHeld = nil
	runtime.GC()
}

// spikeHeld keeps a spike's chunks reachable until all are allocated, so
// the heap really reaches the spike's size before it is freed.
var spikeHeld [][]byte

// retain maps memory outside the Go heap and touches it: resident, but no
// heap profile accounts for it — what an allocator keeping freed arenas
// looks like from outside.
func (d *demo) retain(mb int) error {
	b, err := unix.Mmap(-1, 0, mb<<20, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		return fmt.Errorf("mmap %d MiB: %w", mb, err)
	}
	for i := 0; i < len(b); i += 4096 {
		b[i] = 1
	}
	d.leakMu.Lock()
	d.retained = append(d.retained, b)
	d.leakMu.Unlock()
	return nil
}

func (d *demo) leakFDs(n int) {
	d.leakMu.Lock()
	defer d.leakMu.Unlock()
	for i := 0; i < n; i++ {
		r, w, err := os.Pipe()
		if err != nil {
			return // EMFILE: the fault has done its work
		}
		d.fds = append(d.fds, r, w)
	}
}

// workerFault starts the fault name on the demo's worker pool, in a group
// of its own that stops after the "for" parameter (default def) counted
// from when its first task begins. Other worker faults go on; the same
// fault started again replaces the running one.
func (d *demo) workerFault(w http.ResponseWriter, r *http.Request, name string, def time.Duration, start func(*faults.Group), what string) {
	total, err := durParam(r, "for", def)
	if err == nil {
		_, err = intParam(r, "ms", 800, 60000)
	}
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	g := d.workers.NewGroup(total)
	d.mu.Lock()
	if old := d.faultRuns[name]; old != nil {
		old.Stop()
	}
	d.faultRuns[name] = g
	d.mu.Unlock()
	start(g)
	fmt.Fprintf(w, "%s for %s\n", what, total)
}

func (d *demo) release() {
	d.leakMu.Lock()
	defer d.leakMu.Unlock()
	d.leaked = nil
	for _, b := range d.retained {
		unix.Munmap(b)
	}
	d.retained = nil
	for _, f := range d.fds {
		f.Close()
	}
	d.fds = nil
}

// stopAccepting closes the gate for dur, then opens it again; load opens
// that many client connections so the queue really overflows.
func (d *demo) stopAccepting(dur time.Duration, load int) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.gate.Set(false)
	if d.reopen != nil {
		d.reopen.Stop()
	}
	d.reopen = time.AfterFunc(dur, func() { d.gate.Set(true) })
	if load > 0 {
		go func() {
			// Hold them a little past the stall so the queue stays full,
			// then let them go.
			conns := faults.Dial(d.loadCtx, d.addr, load, dur+5*time.Second)
			time.Sleep(time.Second)
			for _, c := range conns {
				c.Close()
			}
		}()
	}
}
