package testenv

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/pprof"
	"os"
	"os/exec"
	"runtime"
	"runtime/debug"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// child is the plumbing every re-executed test child shares: the test
// writes one command line to its stdin and reads one answer line, "ok ..."
// or an error, from its stdout.
type child struct {
	pid int
	cmd *exec.Cmd
	in  io.WriteCloser
	out *bufio.Reader
	mu  sync.Mutex
}

// startChild re-executes the test binary in role, with env added, in a new
// network namespace unless sharedNetns. It returns the child and its first
// line of output (the greeting), and stops the child when the test ends.
func startChild(t testing.TB, role string, sharedNetns bool, env ...string) (*child, string) {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(append(os.Environ(), roleEnv+"="+role), env...)
	if !sharedNetns {
		cmd.SysProcAttr = &syscall.SysProcAttr{Cloneflags: syscall.CLONE_NEWNET}
	}
	cmd.Stderr = os.Stderr
	in, err := cmd.StdinPipe()
	if err != nil {
		t.Fatalf("testenv: stdin: %v", err)
	}
	outp, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatalf("testenv: stdout: %v", err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatalf("testenv: start %s child (a network namespace needs root): %v", role, err)
	}
	c := &child{pid: cmd.Process.Pid, cmd: cmd, in: in, out: bufio.NewReader(outp)}
	t.Cleanup(c.Close)
	greeting, err := c.read()
	if err != nil {
		t.Fatalf("testenv: %s child did not start: %v", role, err)
	}
	return c, greeting
}

func (c *child) read() (string, error) {
	type res struct {
		l   string
		err error
	}
	ch := make(chan res, 1)
	go func() {
		l, err := c.out.ReadString('\n')
		ch <- res{strings.TrimSpace(l), err}
	}()
	select {
	case r := <-ch:
		return r.l, r.err
	case <-time.After(30 * time.Second):
		return "", fmt.Errorf("no answer from child %d in 30s", c.pid)
	}
}

// Do sends one command and returns the child's answer; an answer that is
// not "ok ..." is returned with an error.
func (c *child) Do(cmd string) (string, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if _, err := fmt.Fprintln(c.in, cmd); err != nil {
		return "", fmt.Errorf("send %q: %w", cmd, err)
	}
	ans, err := c.read()
	if err != nil {
		return "", fmt.Errorf("%q: %w", cmd, err)
	}
	if !strings.HasPrefix(ans, "ok") {
		return ans, fmt.Errorf("%q: %s", cmd, ans)
	}
	return ans, nil
}

// MustDo is Do that fails the test on error.
func (c *child) MustDo(t testing.TB, cmd string) string {
	t.Helper()
	ans, err := c.Do(cmd)
	if err != nil {
		t.Fatalf("testenv: %v", err)
	}
	return ans
}

// Close stops the child: it exits when its stdin closes, or is killed
// after 5s.
func (c *child) Close() {
	c.in.Close()
	done := make(chan struct{})
	go func() { c.cmd.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		c.cmd.Process.Kill()
		<-done
	}
}

// Leaker is a child process that leaks on command: live Go heap, file
// descriptors, or resident memory outside the Go heap (what an allocator
// keeping freed memory looks like). It serves net/http/pprof on loopback,
// so tests see real heap profiles of a real leak. Its commands (Do):
//
//	leakheap N   allocate N MiB in leakHeapSlowly and keep it reachable
//	leakfds N    open N file descriptors (pipe ends) and keep them
//	retain N     mmap N MiB of anonymous memory, touch every page, keep it mapped
//	heaprate N   from now on leak N MiB of heap a second, in the background
//	fdrate N     from now on leak N file descriptors a second, in the background
//	nofile N     set its own RLIMIT_NOFILE soft limit to N
//	stop         stop the background leaks, keep what they leaked
//	held         say what is held
//	release      stop, and free, close and unmap all of the above
//
// They answer with what is held after them: "ok 32 MiB heap held",
// "ok 10 fds held", "ok 64 MiB mapped", "ok released"; held answers
// "ok 32 MiB heap held, 10 fds held". The heap profile served right after
// an answer already shows the change (the child runs a GC after each
// command, and records every allocation). A background leak is paced by
// the clock (what it has leaked is rate × time since it began, to within
// one 100 ms tick) and runs a GC after every tick, so the heap profile,
// which is as of the last GC, follows the leak at its real pace.
type Leaker struct {
	PID int
	// PprofURL is the child's heap profile,
	// http://127.0.0.1:PORT/debug/pprof/heap. With PrivateNetns it is on
	// the child's own loopback and the test cannot reach it.
	PprofURL string
	*child
}

// LeakerOptions for StartLeaker. The leaker shares the test's network
// namespace by default, unlike Start's server: a test fetches its heap
// profile on 127.0.0.1, and no kernel counter of the namespace matters
// here.
type LeakerOptions struct {
	// PrivateNetns runs the leaker in a new network namespace with lo up,
	// as Start does (needs root).
	PrivateNetns bool
	// SharedNetns is the default; it may be set to say so. Setting both
	// fails the test.
	SharedNetns bool
}

const leakerNetnsEnv = "CULPRIT_TESTENV_PRIVATE_NETNS"

// StartLeaker runs a leaker child and waits until it serves its profile.
func StartLeaker(t testing.TB, o LeakerOptions) *Leaker {
	t.Helper()
	if o.PrivateNetns && o.SharedNetns {
		t.Fatal("testenv: LeakerOptions: PrivateNetns and SharedNetns both set")
	}
	c, greeting := startChild(t, "leaker", !o.PrivateNetns, leakerNetnsEnv+"="+strconv.FormatBool(o.PrivateNetns))
	var port int
	if _, err := fmt.Sscanf(greeting, "pprof %d", &port); err != nil {
		t.Fatalf("testenv: unexpected greeting %q", greeting)
	}
	return &Leaker{
		PID:      c.pid,
		PprofURL: "http://127.0.0.1:" + strconv.Itoa(port) + "/debug/pprof/heap",
		child:    c,
	}
}

// What the leaker child holds. Globals, so that nothing but release can
// make them unreachable; the command loop and the background leaks touch
// them under leakMu.
var (
	leakMu       sync.Mutex
	leakedHeap   [][]byte
	leakedFDs    []*os.File
	retainedMaps [][]byte
	stopLeaks    = func() {} // stops the background leaks
)

const (
	mib = 1 << 20
	// leakChunk is the size of each leaked allocation: a leak is usually
	// many medium objects (cache entries, buffers), not one huge one.
	leakChunk = 64 << 10
)

// leakHeapSlowly keeps n more leakChunks of Go heap reachable. It is its
// own function, never inlined, so the heap profile names it as the
// allocation site.
//
//go:noinline
func leakHeapSlowly(chunks int) {
	for i := 0; i < chunks; i++ {
		b := make([]byte, leakChunk)
		touch(b)
		leakedHeap = append(leakedHeap, b)
	}
}

// leakInBackground leaks at perSecond units a second from now on, calling
// leak with how many units are due, every tick, until stopLeaks.
func leakInBackground(perSecond float64, leak func(n int) error) {
	done := make(chan struct{})
	prev := stopLeaks
	stopLeaks = func() { prev(); close(done) }
	start := time.Now()
	go func() {
		tick := time.NewTicker(100 * time.Millisecond)
		defer tick.Stop()
		leaked := 0
		for {
			select {
			case <-done:
				return
			case now := <-tick.C:
				due := int(perSecond*now.Sub(start).Seconds()) - leaked
				if due <= 0 {
					continue
				}
				leakMu.Lock()
				select {
				case <-done: // stopped while waiting for the lock
					leakMu.Unlock()
					return
				default:
				}
				err := leak(due)
				leakMu.Unlock()
				if err != nil {
					fmt.Fprintln(os.Stderr, "testenv: background leak:", err)
					return
				}
				leaked += due
				runtime.GC() // the heap profile is as of the last GC
			}
		}
	}()
}

// touch writes one byte per page, so the memory is resident rather than
// only reserved, as a leak that is used would be.
func touch(b []byte) {
	for i := 0; i < len(b); i += os.Getpagesize() {
		b[i] = 1
	}
}

// leakFDs keeps n more descriptors open: pipes give two each, and for an
// odd n the last pipe's write end is closed, so the count is exact.
func leakFDs(n int) error {
	for n > 0 {
		r, w, err := os.Pipe()
		if err != nil {
			return fmt.Errorf("pipe: %w", err)
		}
		leakedFDs = append(leakedFDs, r)
		if n == 1 {
			w.Close()
			break
		}
		leakedFDs = append(leakedFDs, w)
		n -= 2
	}
	return nil
}

// retain maps n MiB outside the Go heap and makes it resident: RSS grows,
// the heap profile does not.
func retain(n int) error {
	b, err := unix.Mmap(-1, 0, n*mib, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		return fmt.Errorf("mmap %d MiB: %w", n, err)
	}
	touch(b)
	retainedMaps = append(retainedMaps, b)
	return nil
}

func release() error {
	stopLeaks()
	stopLeaks = func() {}
	var errs []error
	for _, b := range retainedMaps {
		errs = append(errs, unix.Munmap(b))
	}
	for _, f := range leakedFDs {
		errs = append(errs, f.Close())
	}
	leakedHeap, leakedFDs, retainedMaps = nil, nil, nil
	debug.FreeOSMemory() // so RSS falls back too, not only the heap profile
	return errors.Join(errs...)
}

func heldMiB(bs [][]byte) int {
	n := 0
	for _, b := range bs {
		n += len(b)
	}
	return n / mib
}

// leakerCommands are the leaker child's commands; each returns its answer
// after "ok". They run under leakMu.
var leakerCommands = map[string]func(n int) (string, error){
	"leakheap": func(n int) (string, error) {
		leakHeapSlowly(n * mib / leakChunk)
		return fmt.Sprintf("%d MiB heap held", heldMiB(leakedHeap)), nil
	},
	"heaprate": func(n int) (string, error) {
		leakInBackground(float64(n*mib/leakChunk), func(chunks int) error { leakHeapSlowly(chunks); return nil })
		return fmt.Sprintf("leaking %d MiB of heap a second", n), nil
	},
	"fdrate": func(n int) (string, error) {
		leakInBackground(float64(n), leakFDs)
		return fmt.Sprintf("leaking %d fds a second", n), nil
	},
	"nofile": func(n int) (string, error) {
		var lim syscall.Rlimit
		if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
			return "", fmt.Errorf("getrlimit: %w", err)
		}
		lim.Cur = uint64(n)
		if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
			return "", fmt.Errorf("setrlimit: %w", err)
		}
		return fmt.Sprintf("nofile %d", n), nil
	},
	"stop": func(int) (string, error) {
		stopLeaks()
		stopLeaks = func() {}
		return "stopped", nil
	},
	"held": func(int) (string, error) {
		return fmt.Sprintf("%d MiB heap held, %d fds held", heldMiB(leakedHeap), len(leakedFDs)), nil
	},
	"leakfds": func(n int) (string, error) {
		err := leakFDs(n)
		return fmt.Sprintf("%d fds held", len(leakedFDs)), err
	},
	"retain": func(n int) (string, error) {
		err := retain(n)
		return fmt.Sprintf("%d MiB mapped", heldMiB(retainedMaps)), err
	},
	"release": func(int) (string, error) {
		return "released", release()
	},
}

// leakerNoArg are the commands that take no count.
var leakerNoArg = map[string]bool{"release": true, "stop": true, "held": true}

func leakerMain() int {
	if private, _ := strconv.ParseBool(os.Getenv(leakerNetnsEnv)); private {
		lo, err := netlink.LinkByName("lo")
		if err == nil {
			err = netlink.LinkSetUp(lo)
		}
		if err != nil {
			fmt.Fprintln(os.Stderr, "testenv: lo up:", err)
			return 1
		}
	}
	// Record every allocation: at the default rate (one sample per 512
	// KiB) a 32 MiB leak is estimated within several MiB, too loose for
	// tests that assert how much leaked.
	runtime.MemProfileRate = 1
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		fmt.Fprintln(os.Stderr, "testenv:", err)
		return 1
	}
	mux := http.NewServeMux()
	mux.HandleFunc("/debug/pprof/", pprof.Index) // serves /debug/pprof/heap
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	go srv.Serve(l)
	defer srv.Close()
	fmt.Printf("pprof %d\n", l.Addr().(*net.TCPAddr).Port)

	sc := bufio.NewScanner(os.Stdin)
	for sc.Scan() {
		verb, arg, _ := strings.Cut(strings.TrimSpace(sc.Text()), " ")
		if verb == "" {
			continue
		}
		f, ok := leakerCommands[verb]
		if !ok {
			fmt.Printf("error unknown command %q\n", verb)
			continue
		}
		n, err := strconv.Atoi(strings.TrimSpace(arg))
		if !leakerNoArg[verb] && (err != nil || n <= 0) {
			fmt.Printf("error %s wants a positive count, got %q\n", verb, arg)
			continue
		}
		leakMu.Lock()
		ans, err := f(n)
		leakMu.Unlock()
		// The heap profile is as of the last completed GC: without one,
		// an idle child would serve a profile from before the command.
		runtime.GC()
		if err != nil {
			fmt.Printf("error %s: %v (%s)\n", verb, err, ans)
			continue
		}
		fmt.Printf("ok %s\n", ans)
	}
	return 0
}
