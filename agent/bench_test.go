package main

import (
	"context"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
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
		// The 30 clients' SYN retries go on until their 10 s dial timeout
		// and overflow the backlog of 4 as a herd; then the window and the
		// hold-down pass.
		next(b, events, 60*time.Second, isAcceptOverflow("", culpritv1.FindingEvent_TYPE_RESOLVED))
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
	v, err := readListenOverflows(pid)
	if err != nil {
		b.Fatal(err)
	}
	return v
}

// readListenOverflows is the ListenOverflows counter of pid's network
// namespace.
func readListenOverflows(pid int) (uint64, error) {
	data, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/net/netstat")
	if err != nil {
		return 0, err
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
				return v, nil
			}
		}
	}
	return 0, nil
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
		// The storm of TestRSTStormFinding: the target closes its listener
		// on SIGTERM and its clients keep connecting to the port (a restart
		// seen from the clients). Resets on a port the target never
		// listened on are not the target's (rules.scope), so each round
		// takes a fresh target.
		var took []time.Duration
		for range b.N {
			s := testenv.Start(b, testenv.Options{Backlog: 64, Accept: true})
			a := startAgent(b, s.PID)
			c := client(b, a.GRPCAddr)
			waitWatching(b, c, s.Port)
			events, cancel := watch(b, c, 0)
			time.Sleep(1500 * time.Millisecond) // the rule has seen the target listen
			if err := syscall.Kill(s.PID, syscall.SIGTERM); err != nil {
				b.Fatal(err)
			}
			start := time.Now()
			for !opened(events, "rst_storm") && time.Since(start) < 15*time.Second {
				s.MustDo(b, "dial 30")
				time.Sleep(100 * time.Millisecond)
			}
			took = append(took, time.Since(start))
			cancel() // the agent stops with the benchmark's cleanup
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

// BenchmarkFootprint measures the real agent binary as a sidecar runs it
// (in the target's network namespace, default configuration) beside a
// baseline measured in the same run: Debian's prometheus-node-exporter in
// the same namespace, scraped every second, as a monitoring agent people
// already run everywhere. Both run for the whole window; CPU is from
// schedstat (ns), RSS at the end, allocations from each one's own
// go_memstats_alloc_bytes_total.
//
//   - idle: a quiet target, ~1,000 sockets of another process in the
//     namespace;
//   - 40k_sockets: the same with 40,000 established sockets of other
//     processes (held by several processes: RLIMIT_NOFILE).
func BenchmarkFootprint(b *testing.B) {
	bin := benchBinary(b)
	for _, c := range []struct {
		name  string
		conns int // held connections: two sockets each
	}{{"idle", 500}, {"40k_sockets", 20000}} {
		b.Run(c.name, func(b *testing.B) { footprint(b, bin, c.conns) })
	}
	b.Run("nginx_20k_rps", func(b *testing.B) { footprintNginx(b, bin) })
}

// footprintNginx: nginx (2 workers, its static file) under a paced load of
// 20,000 requests a second on 32 keep-alive connections, 10,000 established
// sockets of another process in its namespace, the agent watching nginx's
// master; node_exporter in the same namespace, scraped every second, as
// the baseline.
func footprintNginx(b *testing.B, bin string) {
	requireRoot(b)
	ng := testenv.StartNginx(b, testenv.NginxOptions{})
	nb := testenv.StartNeighbour(b, ng.PID)
	held := nb.HoldEstablished(b, 5000)
	ne := startNodeExporter(b, ng.PID)
	a := testenv.StartAgent(b, sidecarAgent(b, bin, ng.PID, nil, benchSets()...))
	stop := ne.scrapeEvery(time.Second)
	defer stop()
	load := ng.StartLoad(b, testenv.HTTPLoadOptions{Conns: 32, Rate: 20000, Path: "/index.html", Duration: footprintWarmup + footprintWindow*time.Duration(b.N) + time.Minute})
	time.Sleep(footprintWarmup)
	b.ResetTimer()
	var agentCPU, neCPU, wall time.Duration
	for i := 0; i < b.N; i++ {
		profileAgent(b, a, footprintWindow)
		c0, e0, t0 := procCPU(a.PID), procCPU(ne.pid), time.Now()
		time.Sleep(footprintWindow)
		c1, e1, t1 := procCPU(a.PID), procCPU(ne.pid), time.Now()
		agentCPU += c1 - c0
		neCPU += e1 - e0
		wall += t1.Sub(t0)
	}
	b.StopTimer()
	st := load.Stop()
	as, ns := procStatus(a.PID), procStatus(ne.pid)
	pct := func(d time.Duration) float64 { return 100 * float64(d) / float64(wall) }
	b.ReportMetric(float64(2*held), "sockets")
	b.ReportMetric(float64(st.Requests)/st.Elapsed.Seconds(), "requests/s")
	b.ReportMetric(pct(agentCPU), "agent-cpu-%")
	b.ReportMetric(pct(neCPU), "node-exporter-cpu-%")
	b.ReportMetric(mib(as["VmRSS"]), "agent-rss-MiB")
	b.ReportMetric(mib(as["VmHWM"]), "agent-hwm-MiB")
	b.ReportMetric(mib(ns["VmRSS"]), "node-exporter-rss-MiB")
	if st.Errors > 0 {
		b.Errorf("load errors: %v", st)
	}
}

// benchSets is the agent's configuration in the footprint figures: the
// defaults, and /debug/pprof when BENCH_PPROF names a directory for
// the agent's CPU profile of each window (it costs a little CPU itself).
func benchSets() []string {
	sets := []string{"agent.log_level=info"}
	if os.Getenv("BENCH_PPROF") != "" {
		sets = append(sets, "agent.pprof=true")
	}
	return sets
}

// profileAgent saves the agent's CPU profile and its allocations of the
// next d to $BENCH_PPROF/<benchmark>.pb.gz and <benchmark>.allocs.pb.gz (a
// delta profile: the window's allocations alone), in the background;
// nothing without BENCH_PPROF.
func profileAgent(b *testing.B, a *testenv.Agent, d time.Duration) {
	dir := os.Getenv("BENCH_PPROF")
	if dir == "" {
		return
	}
	name := filepath.Join(dir, strings.ReplaceAll(b.Name(), "/", "_"))
	secs := strconv.Itoa(int(d.Seconds()))
	for path, url := range map[string]string{
		name + ".pb.gz":        "/debug/pprof/profile?seconds=" + secs,
		name + ".allocs.pb.gz": "/debug/pprof/allocs?seconds=" + secs,
	} {
		go func() {
			c := a.HTTPClient()
			c.Timeout = d + 30*time.Second
			resp, err := c.Get("http://" + a.HTTPAddr + url)
			if err != nil {
				b.Logf("profile: %v", err)
				return
			}
			defer resp.Body.Close()
			f, err := os.Create(path)
			if err != nil {
				b.Logf("profile: %v", err)
				return
			}
			defer f.Close()
			io.Copy(f, resp.Body)
		}()
	}
}

// footprintWindow is how long one measurement runs, after footprintWarmup.
const (
	footprintWindow = 60 * time.Second
	footprintWarmup = 20 * time.Second
)

func footprint(b *testing.B, bin string, conns int) {
	requireRoot(b)
	pid := startQuietPython(b)
	nb := testenv.StartNeighbour(b, pid)
	held := nb.HoldEstablished(b, conns)
	ne := startNodeExporter(b, pid)
	a := testenv.StartAgent(b, sidecarAgent(b, bin, pid, nil, benchSets()...))
	stop := ne.scrapeEvery(time.Second)
	defer stop()
	time.Sleep(footprintWarmup)
	b.ResetTimer()
	var agentCPU, neCPU time.Duration
	var agentAlloc, neAlloc float64
	var wall time.Duration
	for i := 0; i < b.N; i++ {
		profileAgent(b, a, footprintWindow)
		m0, n0 := agentMetrics(b, a), ne.last()
		c0, e0, t0 := procCPU(a.PID), procCPU(ne.pid), time.Now()
		time.Sleep(footprintWindow)
		c1, e1, t1 := procCPU(a.PID), procCPU(ne.pid), time.Now()
		m1, n1 := agentMetrics(b, a), ne.last()
		agentCPU += c1 - c0
		neCPU += e1 - e0
		wall += t1.Sub(t0)
		agentAlloc += m1["go_memstats_alloc_bytes_total"] - m0["go_memstats_alloc_bytes_total"]
		neAlloc += n1["go_memstats_alloc_bytes_total"] - n0["go_memstats_alloc_bytes_total"]
	}
	b.StopTimer()
	as, ns := procStatus(a.PID), procStatus(ne.pid)
	pct := func(d time.Duration) float64 { return 100 * float64(d) / float64(wall) }
	b.ReportMetric(float64(2*held), "sockets")
	b.ReportMetric(pct(agentCPU), "agent-cpu-%")
	b.ReportMetric(pct(neCPU), "node-exporter-cpu-%")
	b.ReportMetric(mib(as["VmRSS"]), "agent-rss-MiB")
	b.ReportMetric(mib(as["RssAnon"]), "agent-rss-anon-MiB")
	b.ReportMetric(mib(as["VmHWM"]), "agent-hwm-MiB")
	b.ReportMetric(mib(ns["VmRSS"]), "node-exporter-rss-MiB")
	b.ReportMetric(agentAlloc/wall.Seconds()/1024, "agent-alloc-KB/s")
	b.ReportMetric(neAlloc/wall.Seconds()/1024, "node-exporter-alloc-KB/s")
}

// startQuietPython starts the quiet target of the footprint figures:
// python3 -m http.server, serving nothing, in a network namespace of its
// own (as a pod's app has one). Its loop wakes twice a second, in poll.
func startQuietPython(b testing.TB) int {
	b.Helper()
	if _, err := exec.LookPath("python3"); err != nil {
		b.Skip("SKIP: python3 not installed: no quiet target")
	}
	cmd := exec.Command("unshare", "--net", "sh", "-c", `ip link set lo up && exec python3 -m http.server --bind 127.0.0.1 8000`)
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	cmd.Dir = b.TempDir() // it serves an empty directory
	if err := cmd.Start(); err != nil {
		b.Fatalf("start python3: %v", err)
	}
	b.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	// unshare enters its new namespace a moment after it starts: until
	// then /proc/PID/ns/net is still ours.
	deadline := time.Now().Add(20 * time.Second)
	self, _ := os.Readlink("/proc/self/ns/net")
	for {
		if got, err := os.Readlink("/proc/" + strconv.Itoa(cmd.Process.Pid) + "/ns/net"); err == nil && got != self {
			break
		}
		if time.Now().After(deadline) {
			b.Fatalf("python3's shell did not enter its own network namespace within 20 s")
		}
		time.Sleep(10 * time.Millisecond)
	}
	ns := testenv.NetnsOf(b, cmd.Process.Pid)
	for {
		c, err := ns.DialContext(context.Background(), "tcp", "127.0.0.1:8000")
		if err == nil {
			c.Close()
			return cmd.Process.Pid
		}
		if time.Now().After(deadline) {
			b.Fatalf("python3 -m http.server did not listen within 20 s: %v", err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// benchBinary is bin/culprit as make build made it (make bench builds it
// first), else a fresh build.
func benchBinary(b testing.TB) string {
	if p, err := filepath.Abs("../bin/culprit"); err == nil {
		if st, err := os.Stat(p); err == nil && st.Mode().IsRegular() {
			return p
		}
	}
	return culpritBinary(b)
}

// nodeExporter is prometheus-node-exporter in a target's network
// namespace.
type nodeExporter struct {
	pid    int
	addr   string
	ns     *testenv.Netns
	mu     sync.Mutex
	got    map[string]float64 // the last scrape
	client *http.Client
}

func startNodeExporter(b testing.TB, pid int) *nodeExporter {
	b.Helper()
	path, err := exec.LookPath("prometheus-node-exporter")
	if err != nil {
		if path, err = exec.LookPath("node_exporter"); err != nil {
			b.Skip("SKIP: prometheus-node-exporter not installed (apt-get install -y prometheus-node-exporter): no baseline")
		}
	}
	ns := testenv.NetnsOf(b, pid)
	port, err := ns.FreePort()
	if err != nil {
		b.Fatal(err)
	}
	ne := &nodeExporter{ns: ns, addr: "127.0.0.1:" + strconv.Itoa(port)}
	cmd := exec.Command("nsenter", "--net=/proc/"+strconv.Itoa(pid)+"/ns/net", path, "--web.listen-address="+ne.addr)
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		b.Fatalf("start node exporter: %v", err)
	}
	ne.pid = cmd.Process.Pid
	b.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	deadline := time.Now().Add(20 * time.Second)
	for ne.scrape() != nil {
		if time.Now().After(deadline) {
			b.Fatal("node exporter did not answer within 20 s")
		}
		time.Sleep(100 * time.Millisecond)
	}
	return ne
}

func (ne *nodeExporter) scrape() error {
	ne.mu.Lock()
	if ne.client == nil {
		// One keep-alive connection, as Prometheus scrapes.
		ne.client = &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{
			DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
				return ne.ns.DialContext(ctx, network, addr)
			},
		}}
	}
	c := ne.client
	ne.mu.Unlock()
	resp, err := c.Get("http://" + ne.addr + "/metrics")
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	m := parseExposition(resp.Body)
	ne.mu.Lock()
	ne.got = m
	ne.mu.Unlock()
	return nil
}

func (ne *nodeExporter) last() map[string]float64 {
	ne.mu.Lock()
	defer ne.mu.Unlock()
	return ne.got
}

// scrapeEvery scrapes until stop is called, as a Prometheus would.
func (ne *nodeExporter) scrapeEvery(d time.Duration) (stop func()) {
	done := make(chan struct{})
	go func() {
		tk := time.NewTicker(d)
		defer tk.Stop()
		for {
			select {
			case <-done:
				return
			case <-tk.C:
				ne.scrape()
			}
		}
	}()
	return func() { close(done) }
}
