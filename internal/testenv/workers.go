package testenv

import (
	"bufio"
	"fmt"
	"net"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/vishvananda/netlink"

	"github.com/culprit-dev/culprit/internal/faults"
)

// Workers is a child process shaped like an async runtime: N worker
// threads named "worker-0" ... "worker-N-1", each a locked OS thread that
// runs the tasks sent to it and sleeps in futex between them (the idle
// wait of an event loop). Its commands (Do):
//
//	block I MS        worker I makes one blocking call: nanosleep for MS ms
//	blockloop I MS    worker I blocks MS ms, then idles 50 ms, until stop
//	spin I MS         worker I runs hotLoop for MS ms without yielding
//	spinloop I        worker I runs hotLoop until stop, never yielding
//	duty I PCT        worker I is busy PCT% of every 10 ms (short runs, yielding), until stop
//	stop              end every loop
//	listen B          listen on 127.0.0.1 with backlog B; worker 0 accepts, one
//	                  connection per task (its event loop): answers "ok port N"
//	dial N            open N connections to that listener in the background and keep them
//	upstream N        start an upstream listener and hold N connections to it
//	                  (a connection pool of N, all busy: the upstream never answers)
//	pool MS           from now on, each accepted connection waits MS ms for a slot of
//	                  a bounded pool before the next accept (a Go channel: futex)
//
// All answer "ok" at once; the work goes on in the worker. TIDs lists the
// worker threads' ids, in order.
type Workers struct {
	PID  int
	TIDs []int
	*child
}

const workersEnv = "CULPRIT_TESTENV_WORKERS"

// StartWorkers runs a workers child with n workers in the test's network
// namespace.
func StartWorkers(t testing.TB, n int) *Workers {
	t.Helper()
	return startWorkers(t, n, true)
}

// StartWorkersNetns runs a workers child with n workers in a network
// namespace of its own (lo up), so that its listener's namespace-wide
// counters (ListenOverflows) are its own.
func StartWorkersNetns(t testing.TB, n int) *Workers {
	t.Helper()
	return startWorkers(t, n, false)
}

func startWorkers(t testing.TB, n int, sharedNetns bool) *Workers {
	t.Helper()
	c, greeting := startChild(t, "workers", sharedNetns, workersEnv+"="+strconv.Itoa(n), "GODEBUG=asyncpreemptoff=1",
		// A worker in hotLoop holds its P until done: enough Ps that the
		// clock and the command loop always have one.
		"GOMAXPROCS=64")
	f := strings.Fields(greeting)
	if len(f) != n+1 || f[0] != "workers" {
		t.Fatalf("testenv: unexpected greeting %q", greeting)
	}
	w := &Workers{PID: c.pid, child: c}
	for _, s := range f[1:] {
		tid, err := strconv.Atoi(s)
		if err != nil {
			t.Fatalf("testenv: unexpected greeting %q", greeting)
		}
		w.TIDs = append(w.TIDs, tid)
	}
	return w
}

// poolDelay is how long each accepted connection waits for a pool slot.
var poolDelay atomic.Int64

func workersMain() int {
	n, err := strconv.Atoi(os.Getenv(workersEnv))
	if err != nil || n < 1 {
		fmt.Fprintln(os.Stderr, "testenv: bad", workersEnv)
		return 1
	}
	if lo, err := netlink.LinkByName("lo"); err == nil && lo.Attrs().Flags&net.FlagUp == 0 {
		if err := netlink.LinkSetUp(lo); err != nil {
			fmt.Fprintln(os.Stderr, "testenv: lo up:", err)
			return 1
		}
	}
	var (
		ln   *net.TCPListener
		mu   sync.Mutex
		kept []net.Conn
	)
	keep := func(c net.Conn) {
		mu.Lock()
		kept = append(kept, c)
		mu.Unlock()
	}
	pool := faults.StartWorkers(n, "worker")
	tids := make([]string, n)
	for i, t := range pool.TIDs {
		tids[i] = strconv.Itoa(t)
	}
	fmt.Println("workers " + strings.Join(tids, " "))

	sc := bufio.NewScanner(os.Stdin)
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) == 0 {
			continue
		}
		args := make([]int, len(f)-1)
		bad := false
		for j, s := range f[1:] {
			if args[j], err = strconv.Atoi(s); err != nil || args[j] < 0 {
				bad = true
			}
		}
		if bad || (len(args) > 0 && args[0] >= n && f[0] != "listen" && f[0] != "dial" && f[0] != "pool" && f[0] != "upstream") {
			fmt.Printf("error bad arguments %q\n", sc.Text())
			continue
		}
		ms := func(j int) time.Duration { return time.Duration(args[j]) * time.Millisecond }
		switch {
		case f[0] == "block" && len(args) == 2:
			pool.Submit(args[0], func() { faults.BlockingCall(ms(1)) })
		case f[0] == "blockloop" && len(args) == 2:
			d := ms(1)
			pool.Loop(args[0], func() { faults.BlockingCall(d); time.Sleep(50 * time.Millisecond) })
		case f[0] == "spin" && len(args) == 2:
			d := ms(1)
			pool.Submit(args[0], func() { faults.Sink.Add(faults.HotLoop(d)) })
		case f[0] == "spinloop" && len(args) == 1:
			pool.HotLoopUntilStop(args[0])
		case f[0] == "duty" && len(args) == 2 && args[1] <= 100:
			pool.Duty(args[0], args[1])
		case f[0] == "stop" && len(args) == 0:
			pool.Stop()
		case f[0] == "listen" && len(args) == 1 && ln == nil:
			if ln, err = faults.ListenTCP("127.0.0.1:0", args[0]); err != nil {
				fmt.Printf("error listen: %v\n", err)
				continue
			}
			l := ln
			var acceptOne func()
			acceptOne = func() {
				_ = l.SetDeadline(time.Now().Add(20 * time.Millisecond))
				if c, err := l.Accept(); err == nil {
					keep(c)
					if d := poolDelay.Load(); d > 0 {
						faults.WaitForPoolSlot(time.Duration(d))
					}
				}
				pool.Submit(0, acceptOne)
			}
			pool.Submit(0, acceptOne)
			fmt.Printf("ok port %d\n", l.Addr().(*net.TCPAddr).Port)
			continue
		case f[0] == "upstream" && len(args) == 1:
			up, err := net.Listen("tcp", "127.0.0.1:0")
			if err != nil {
				fmt.Printf("error upstream: %v\n", err)
				continue
			}
			go func() {
				for {
					c, err := up.Accept()
					if err != nil {
						return
					}
					keep(c)
				}
			}()
			for range args[0] {
				c, err := net.Dial("tcp", up.Addr().String())
				if err != nil {
					fmt.Printf("error dial upstream: %v\n", err)
					break
				}
				keep(c)
			}
			fmt.Printf("ok upstream %s\n", up.Addr())
			continue
		case f[0] == "pool" && len(args) == 1:
			poolDelay.Store(int64(ms(0)))
		case f[0] == "dial" && len(args) == 1 && ln != nil:
			addr := ln.Addr().String()
			for range args[0] {
				go func() {
					if c, err := net.DialTimeout("tcp", addr, 30*time.Second); err == nil {
						keep(c)
					}
				}()
			}
		default:
			fmt.Printf("error unknown command %q\n", sc.Text())
			continue
		}
		fmt.Println("ok")
	}
	return 0
}
