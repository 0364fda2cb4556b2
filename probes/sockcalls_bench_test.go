package probes

import (
	"context"
	"net"
	"os"
	"os/exec"
	"strconv"
	"syscall"
	"testing"
	"time"

	"github.com/cilium/ebpf/link"

	"github.com/culprit-dev/culprit/signals"
	"github.com/culprit-dev/culprit/workload"
)

// BenchmarkSockCallsSyscall measures what the sys_exit hook costs every
// process of the host: one op is one getppid, a system call that does
// nearly nothing, with the probe watching another process (every system
// call then takes the kernel's traced exit path and runs the number test).
// See alternate for the metrics.
func BenchmarkSockCallsSyscall(b *testing.B) {
	other := otherProcess(b)
	alternate(b, func() func() { return startBenchSockCalls(b, other) }, func() { syscall.Getppid() })
}

// BenchmarkSockCallsTCPRoundTrip measures a one-byte request and reply
// over a loopback TCP connection within this process: two writes, two
// reads (sock_recv_length), two arrivals (sk_data_ready) and the
// system calls around them. "other" watches another process (the
// lookups every socket of the host pays), "target" watches this one (its
// sockets are known: atomic updates on each arrival and read).
func BenchmarkSockCallsTCPRoundTrip(b *testing.B) {
	for _, mode := range []string{"other", "target"} {
		b.Run(mode, func(b *testing.B) {
			pid := otherProcess(b)
			if mode == "target" {
				pid = os.Getpid()
			}
			client, server := tcpPair(b)
			go func() {
				buf := make([]byte, 1)
				for {
					if _, err := server.Read(buf); err != nil {
						return
					}
					if _, err := server.Write(buf); err != nil {
						return
					}
				}
			}()
			buf := make([]byte, 1)
			alternate(b, func() func() { return startBenchSockCalls(b, pid) }, func() {
				if _, err := client.Write(buf); err != nil {
					b.Fatal(err)
				}
				if _, err := client.Read(buf); err != nil {
					b.Fatal(err)
				}
			})
		})
	}
}

// otherProcess starts a process that makes no system calls (sleep) for
// the probe to watch instead of this one.
func otherProcess(b *testing.B) int {
	b.Helper()
	cmd := exec.Command("sleep", "3600")
	if err := cmd.Start(); err != nil {
		b.Fatalf("start sleep: %v", err)
	}
	b.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
	return cmd.Process.Pid
}

// alternate runs op b.N times in rounds, without the probe and then with
// it (start loads it and returns its stop), so that the rest of the
// machine's load, which varies, weighs on both alike. It reports the
// ns/op of each (base-ns/op, probe-ns/op) and their ratio (x-baseline);
// the framework's own ns/op is their mean.
func alternate(b *testing.B, start func() func(), op func()) {
	const rounds = 4
	per := max(b.N/(2*rounds), 1)
	for range 1000 {
		op()
	}
	timed := func() time.Duration {
		b.StartTimer()
		t0 := time.Now()
		for range per {
			op()
		}
		d := time.Since(t0)
		b.StopTimer()
		return d
	}
	b.StopTimer()
	var without, with time.Duration
	for range rounds {
		without += timed()
		stop := start()
		with += timed()
		stop()
	}
	n := float64(per * rounds)
	b.ReportMetric(float64(without.Nanoseconds())/n, "base-ns/op")
	b.ReportMetric(float64(with.Nanoseconds())/n, "probe-ns/op")
	b.ReportMetric(float64(with)/float64(without), "x-baseline")
}

// BenchmarkSockCallsPoll measures one poll (accept and connect counts, the
// walk of the socket map) when the target holds 2000 TCP sockets (1000
// connections to its own listener), a tenth of them with data waiting, for several
// sizes of the socket map (the walk visits every bucket, used or not).
func BenchmarkSockCallsPoll(b *testing.B) {
	for _, size := range []uint32{4096, 16384, 65536} {
		b.Run("max_sockets="+strconv.Itoa(int(size)), func(b *testing.B) {
			p, tr := newBenchSockCalls(b, os.Getpid(), size)
			l, err := net.Listen("tcp", "127.0.0.1:0")
			if err != nil {
				b.Fatal(err)
			}
			b.Cleanup(func() { l.Close() })
			for i := range 1000 {
				c, s := dialAccept(b, l)
				// A read marks the accepted side as the target's, as an
				// event loop's first read does.
				_ = s.SetReadDeadline(time.Now().Add(time.Millisecond))
				_, _ = s.Read(make([]byte, 1))
				if i%10 == 0 {
					if _, err := c.Write([]byte("x")); err != nil {
						b.Fatal(err)
					}
				}
			}
			p.mu.Lock()
			objs := p.objs.(*sockCallsObjects)
			// A second reader of the same kernel objects: the probe's own
			// poll goroutine keeps its state to itself.
			r := NewSockCalls(p.o)
			p.mu.Unlock()
			// The probe's hooks are attached (UnreadAlways): the reader
			// reads as if it had attached them, without attaching more.
			r.unreadLinks, r.watchedFrom = []link.Link{}, time.Now()
			st := signals.New(64, 4096)
			r.writeTo(st)
			time.Sleep(150 * time.Millisecond) // "waiting" is longer than a poll interval
			b.ResetTimer()
			for range b.N {
				r.poll(objs, tr, st, time.Now())
			}
			b.StopTimer()
			var n int
			keys, vals := make([]uint64, 256), make([]sockCallsOwnedSock, 256)
			if err := batchEach(objs.Owned, keys, vals, func(*uint64, *sockCallsOwnedSock) { n++ }); err != nil {
				b.Fatal(err)
			}
			b.ReportMetric(float64(n), "sockets")
			if v := value(st, signals.ProcessUnreadSockets, nil); v != 100 {
				b.Fatalf("%v sockets waiting, want the 100 written to", v)
			}
		})
	}
}

// tcpPair returns both ends of a loopback connection, closed when b ends.
func tcpPair(b *testing.B) (client, server net.Conn) {
	b.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	defer l.Close()
	return dialAccept(b, l)
}

// dialAccept connects to l and accepts; both ends are closed when b ends.
func dialAccept(b *testing.B, l net.Listener) (client, server net.Conn) {
	b.Helper()
	client, err := net.Dial("tcp", l.Addr().String())
	if err != nil {
		b.Fatal(err)
	}
	server, err = l.Accept()
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { client.Close(); server.Close() })
	return client, server
}

// startBenchSockCalls starts the probe on pid and returns its stop,
// once its first poll has set the target.
func startBenchSockCalls(b *testing.B, pid int) func() {
	b.Helper()
	res, err := workload.NewResolver("/proc")
	if err != nil {
		b.Fatal(err)
	}
	tr := workload.NewTracker(res, workload.Selector{PID: pid}, time.Second, testLog)
	tr.Refresh()
	// The socket hooks attached all the time: their cost is measured.
	p := NewSockCalls(SockCallsOptions{Options: Options{Log: testLog, PollInterval: 100 * time.Millisecond, MaxEntries: 4096}, MaxSockets: 16384, UnreadAlways: true})
	st := signals.New(64, 4096)
	ctx, cancel := context.WithCancel(context.Background())
	if err := p.Start(ctx, tr, st); err != nil {
		cancel()
		if os.Geteuid() == 0 {
			b.Fatalf("sockcalls probe does not load as root: %v", err)
		}
		b.Skipf("SKIP: sockcalls probe needs CAP_BPF+CAP_PERFMON (not root): %v", err)
	}
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(5 * time.Millisecond) {
		if _, ok := st.Latest(signals.ProcessUnreadOldestSeconds, nil); ok {
			break
		}
		if time.Now().After(deadline) {
			b.Fatal("sockcalls: no first poll in 10s")
		}
	}
	return func() {
		cancel()
		if err := p.Close(); err != nil {
			b.Errorf("close sockcalls: %v", err)
		}
	}
}

// newBenchSockCalls starts the probe on pid until b ends and returns it.
func newBenchSockCalls(b *testing.B, pid int, maxSockets uint32) (*SockCalls, *workload.Tracker) {
	b.Helper()
	res, err := workload.NewResolver("/proc")
	if err != nil {
		b.Fatal(err)
	}
	tr := workload.NewTracker(res, workload.Selector{PID: pid}, time.Second, testLog)
	tr.Refresh()
	p := NewSockCalls(SockCallsOptions{Options: Options{Log: testLog, PollInterval: 100 * time.Millisecond, MaxEntries: 4096}, MaxSockets: maxSockets, UnreadAlways: true})
	ctx, cancel := context.WithCancel(context.Background())
	if err := p.Start(ctx, tr, signals.New(64, 4096)); err != nil {
		cancel()
		if os.Geteuid() == 0 {
			b.Fatalf("sockcalls probe does not load as root: %v", err)
		}
		b.Skipf("SKIP: sockcalls probe needs CAP_BPF+CAP_PERFMON (not root): %v", err)
	}
	b.Cleanup(func() { cancel(); p.Close() })
	time.Sleep(300 * time.Millisecond) // the target is set at the first poll
	return p, tr
}
