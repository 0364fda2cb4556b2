package main

import (
	"os"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/culprit-dev/culprit/internal/testenv"
	culpritv1 "github.com/culprit-dev/culprit/proto/culprit/v1"
)

// BenchmarkFaultToFinding measures, per iteration, the time from the first
// connection to a listener that stopped accepting to the app_not_accepting
// finding on a real gRPC stream. The baseline, measured in the same
// iteration, is when the kernel's own ListenOverflows counter first moved,
// polled every millisecond: the ratio says how much of the latency is the
// agent's (sampling, stall_after, rule interval) rather than the kernel's.
func BenchmarkFaultToFinding(b *testing.B) {
	sc := newScenario(b, testenv.Options{Backlog: 4, Accept: true})
	s, c := sc.s, sc.c
	events, _ := watch(b, c, 0)
	var toFinding, toDrop []time.Duration
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		base := listenOverflows(b, s.PID)
		s.MustDo(b, "accept off")
		start := time.Now()
		s.MustDo(b, "dialasync 30")
		firstDrop := make(chan time.Duration, 1)
		go func() {
			for time.Since(start) < 5*time.Second {
				if listenOverflows(b, s.PID) > base {
					firstDrop <- time.Since(start)
					return
				}
				time.Sleep(time.Millisecond)
			}
			firstDrop <- 5 * time.Second
		}()
		next(b, events, 5*time.Second, isAcceptOverflow("app_not_accepting", culpritv1.FindingEvent_TYPE_OPENED))
		toFinding = append(toFinding, time.Since(start))
		toDrop = append(toDrop, <-firstDrop)
		s.MustDo(b, "accept on")
		next(b, events, 30*time.Second, isAcceptOverflow("", culpritv1.FindingEvent_TYPE_RESOLVED))
		s.MustDo(b, "close")
	}
	b.StopTimer()
	f, d := median(toFinding), median(toDrop)
	b.ReportMetric(float64(f.Milliseconds()), "ms-to-finding(median)")
	b.ReportMetric(float64(d.Milliseconds()), "ms-to-first-drop(median)")
	b.ReportMetric(float64(f-d)/float64(time.Millisecond), "ms-agent-latency(median)")
	// The floor the design allows: one fast sample plus stall_after.
	def := DefaultConfig()
	floor := def.Collect.FastInterval + def.Rules.AcceptOverflow.StallAfter
	b.ReportMetric(float64(f)/float64(floor), "x-design-floor")
}

// BenchmarkAgentIdle measures the agent's CPU and RSS while it watches an
// idle target, against the same process without the agent over the same
// time (the baseline), in one run.
func BenchmarkAgentIdle(b *testing.B) {
	s := testenv.Start(b, testenv.Options{Backlog: 128, Accept: true})
	const span = 3 * time.Second
	cpu0, rss0 := procUsage()
	time.Sleep(span)
	cpu1, rss1 := procUsage()
	baseCPU := cpu1 - cpu0

	a := startAgent(b, s.PID)
	c := client(b, a.GRPCAddr)
	waitWatching(b, c, s.Port)
	b.ResetTimer()
	var agentCPU time.Duration
	for i := 0; i < b.N; i++ {
		c0, _ := procUsage()
		time.Sleep(span)
		c1, _ := procUsage()
		agentCPU += c1 - c0
	}
	b.StopTimer()
	_, rss2 := procUsage()
	per := float64(agentCPU) / float64(b.N) / float64(span)
	b.ReportMetric(100*per, "agent-cpu-%")
	b.ReportMetric(100*float64(baseCPU)/float64(span), "baseline-cpu-%")
	b.ReportMetric(float64(rss2)/(1<<20), "agent-rss-MiB")
	b.ReportMetric(float64(rss1)/(1<<20), "baseline-rss-MiB")
	b.ReportMetric(float64(rss2)/float64(rss1), "rss-ratio")
	_ = rss0
}

func procUsage() (cpu time.Duration, rss int64) {
	var ru syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	cpu = time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
	data, _ := os.ReadFile("/proc/self/status")
	for _, l := range strings.Split(string(data), "\n") {
		if strings.HasPrefix(l, "VmRSS:") {
			f := strings.Fields(l)
			kb, _ := strconv.ParseInt(f[1], 10, 64)
			rss = kb << 10
		}
	}
	return cpu, rss
}

// listenOverflows reads the kernel's counter for the child's namespace.
func listenOverflows(b testing.TB, pid int) uint64 {
	data, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/net/netstat")
	if err != nil {
		b.Fatal(err)
	}
	lines := strings.Split(string(data), "\n")
	for i := 0; i+1 < len(lines); i += 2 {
		names, vals := strings.Fields(lines[i]), strings.Fields(lines[i+1])
		if len(names) == 0 || names[0] != "TcpExt:" {
			continue
		}
		for j, n := range names {
			if n == "ListenOverflows" && j < len(vals) {
				v, _ := strconv.ParseUint(vals[j], 10, 64)
				return v
			}
		}
	}
	return 0
}

func median(ds []time.Duration) time.Duration {
	if len(ds) == 0 {
		return 0
	}
	s := append([]time.Duration(nil), ds...)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	return s[len(s)/2]
}

// BenchmarkFaultToFindingByRule measures, for scenarios of other findings,
// the time from injecting the fault to the OPENED event on the gRPC
// stream, and its ratio to the floor the rule's settings allow (its
// threshold plus one sampling interval).
func BenchmarkFaultToFindingByRule(b *testing.B) {
	def := DefaultConfig()
	b.Run("blocking_worker", func(b *testing.B) {
		w := testenv.StartWorkers(b, 2)
		a := startAgent(b, w.PID)
		c := client(b, a.GRPCAddr)
		waitSched(b, c)
		events, _ := watch(b, c, 0)
		var took []time.Duration
		for range b.N {
			start := time.Now()
			w.MustDo(b, "block 1 1500")
			next(b, events, 10*time.Second, openedBy("blocking_worker"))
			took = append(took, time.Since(start))
			next(b, events, 30*time.Second, resolvedBy("blocking_worker"))
		}
		report(b, took, def.Rules.BlockingWorker.MinBlock+def.Probes.PollInterval)
	})
	b.Run("rst_storm", func(b *testing.B) {
		s := testenv.Start(b, testenv.Options{Backlog: 64, Accept: true})
		a := startAgent(b, s.PID)
		c := client(b, a.GRPCAddr)
		waitWatching(b, c, s.Port)
		events, _ := watch(b, c, 0)
		var took []time.Duration
		for range b.N {
			start := time.Now()
			for !opened(events, "rst_storm") && time.Since(start) < 15*time.Second {
				s.MustDo(b, "dialclosed 60")
			}
			took = append(took, time.Since(start))
			next(b, events, 30*time.Second, resolvedBy("rst_storm"))
		}
		// Floor: the resets of one recent window at min_rate, and one
		// netstat sample.
		report(b, took, def.Collect.Interval)
	})
}

func opened(events <-chan *culpritv1.FindingEvent, rule string) bool {
	for {
		select {
		case ev := <-events:
			if ev.Type == culpritv1.FindingEvent_TYPE_OPENED && ev.Finding.Rule == rule {
				return true
			}
		default:
			return false
		}
	}
}

func report(b *testing.B, took []time.Duration, floor time.Duration) {
	m := median(took)
	b.ReportMetric(float64(m.Milliseconds()), "ms-to-finding(median)")
	b.ReportMetric(float64(m)/float64(floor), "x-design-floor")
}
