package main

import (
	"context"
	"fmt"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/culprit-dev/culprit/internal/testenv"
	culpritv1 "github.com/culprit-dev/culprit/proto/culprit/v1"
	"github.com/culprit-dev/culprit/signals"
)

// networkConfig makes the network rules judge short windows, so that each
// fault shows within seconds.
func networkConfig(cfg *Config) {
	cfg.Rules.CloseWait.Window = time.Duration(4 * time.Second)
	cfg.Rules.CloseWait.MinIncrease = 10
	cfg.Rules.CloseWait.Steady = 0.6
	cfg.Rules.PortExhaustion.Window = time.Duration(4 * time.Second)
	cfg.Rules.PortExhaustion.MinCount = 20
	cfg.Rules.RSTStorm.Recent = time.Duration(2 * time.Second)
	cfg.Rules.PoolExhaustion.Window = time.Duration(3 * time.Second)
	cfg.Rules.IdleTimeout.Window = time.Duration(10 * time.Second)
	cfg.Rules.ResolveAfter = time.Duration(2 * time.Second)
}

// networkScenario is a server child in its own netns, with a real agent
// tuned by networkConfig watching it.
func networkScenario(t *testing.T, o testenv.Options) (*testenv.Server, <-chan *culpritv1.FindingEvent) {
	t.Helper()
	s := testenv.Start(t, o)
	cfg := testConfig(t, s.PID)
	networkConfig(&cfg)
	a := startAgentConfig(t, cfg)
	c := client(t, a.GRPCAddr)
	waitWatching(t, c, s.Port)
	events, _ := watch(t, c, 0)
	return s, events
}

// repeatFor sends cmd every period, in the background, until d has passed
// or the test ends (which waits for it).
func repeatFor(t *testing.T, s *testenv.Server, d, period time.Duration, cmd string) {
	t.Helper()
	stop, done := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(done)
		for end := time.Now().Add(d); time.Now().Before(end); {
			if _, err := s.Do(cmd); err != nil {
				t.Errorf("%s: %v", cmd, err)
				return
			}
			select {
			case <-stop:
				return
			case <-time.After(period):
			}
		}
	}()
	t.Cleanup(func() { close(stop); <-done })
}

// A server that never closes the connections its clients closed: their
// sockets pile up in CLOSE_WAIT on its port.
func TestCloseWaitLeakFinding(t *testing.T) {
	s, events := networkScenario(t, testenv.Options{Backlog: 128, Accept: true})
	s.MustDo(t, "leakclose on")
	repeatFor(t, s, 6*time.Second, 300*time.Millisecond, "burst 5")
	ev, _ := next(t, events, 12*time.Second, openedBy("close_wait"))
	f := ev.Finding
	t.Logf("%s\n  %s", f.Title, f.Symptom)
	if f.Cause != "close_wait_leak" || !strings.Contains(f.Title, strconv.Itoa(s.Port)) {
		t.Errorf("finding %s: %s", f.Cause, f.Title)
	}
}

// A client that opens a new connection per request and closes it first,
// against a narrow ip_local_port_range with tcp_tw_reuse off: its TIME_WAIT
// sockets toward the server approach the usable ports.
func TestPortExhaustionFinding(t *testing.T) {
	s, events := networkScenario(t, testenv.Options{Backlog: 512, Accept: true})
	s.MustDo(t, "sysctl net.ipv4.ip_local_port_range 40000_40199")
	s.MustDo(t, "sysctl net.ipv4.tcp_tw_reuse 0")
	repeatFor(t, s, 8*time.Second, 250*time.Millisecond, "burst 10")
	ev, _ := next(t, events, 15*time.Second, openedBy("port_exhaustion"))
	f := ev.Finding
	t.Logf("%s\n  %s\n  %s", f.Title, f.Symptom, f.RootCause)
	remote := fmt.Sprintf("127.0.0.1:%d", s.Port)
	if f.Cause != "no_connection_reuse" || !strings.Contains(f.Title, remote) || !strings.Contains(f.Symptom, "40000-40199") {
		t.Errorf("finding %s: %s / %s", f.Cause, f.Title, f.Symptom)
	}
	// The demo is Go: the remedy is Go's own (one shared http.Client).
	if !strings.Contains(f.Remediation, "Reuse connections to "+remote) || !strings.Contains(f.Remediation, "http.Client") {
		t.Errorf("remediation %q", f.Remediation)
	}
}

// The numbers of port exhaustion from real conditions: with tcp_tw_reuse=1
// the kernel reuses TIME_WAIT ports for the target's connects, which keep
// working through a port range smaller than the connects made (no
// forecast of exhaustion: it will not happen); with it off and a range
// too small, connects fail with EADDRNOTAVAIL, and the finding says the
// ports are already exhausted, counting the failed connect() calls, not
// forecasting what already happened.
func TestPortExhaustionTruths(t *testing.T) {
	t.Run("tw_reuse keeps connects working", func(t *testing.T) {
		s, events := networkScenario(t, testenv.Options{Backlog: 512, Accept: true})
		s.MustDo(t, "sysctl net.ipv4.ip_local_port_range 40000_40199")
		s.MustDo(t, "sysctl net.ipv4.tcp_tw_reuse 1")
		asked, made := 0, 0
		for end := time.Now().Add(9 * time.Second); time.Now().Before(end); time.Sleep(250 * time.Millisecond) {
			asked += 10
			made += established(t, s, "burst 10")
			select {
			case ev := <-events:
				if ev.Finding != nil && ev.Finding.Rule == "port_exhaustion" {
					t.Errorf("tcp_tw_reuse=1 and every connect works, yet: %s: %s", ev.Finding.Title, ev.Finding.Symptom)
				}
			default:
			}
		}
		t.Logf("%d connects through 200 ports, %d established", asked, made)
		if asked <= 200 || made != asked {
			t.Fatalf("the condition did not hold: %d of %d connects established through 200 ports", made, asked)
		}
	})
	t.Run("already exhausted", func(t *testing.T) {
		s, events := networkScenario(t, testenv.Options{Backlog: 512, Accept: true})
		s.MustDo(t, "sysctl net.ipv4.ip_local_port_range 40000_40049")
		s.MustDo(t, "sysctl net.ipv4.tcp_tw_reuse 0")
		asked, made := 0, 0
		// The finding may open as a forecast while the first failures are
		// not counted yet (the probe's poll, a tenth of a second); once
		// they are, it says so, and never forecasts again.
		var f *culpritv1.Finding
		for end := time.Now().Add(15 * time.Second); f == nil && time.Now().Before(end); time.Sleep(250 * time.Millisecond) {
			asked += 20
			made += established(t, s, "burst 20")
			for drained := false; !drained; {
				select {
				case ev := <-events:
					if ev.Finding != nil && ev.Finding.Rule == "port_exhaustion" && ev.Type != culpritv1.FindingEvent_TYPE_RESOLVED {
						t.Logf("%s: %s", ev.Type, ev.Finding.Symptom)
						if strings.Contains(ev.Finding.Symptom, "already exhausted") {
							f = ev.Finding
						}
					}
				default:
					drained = true
				}
			}
		}
		if f == nil {
			t.Fatalf("no port_exhaustion finding says already exhausted; %d of %d connects established through 50 ports", made, asked)
		}
		t.Logf("%d connects, %d established\n%s\n%s", asked, made, f.Title, f.Symptom)
		failedDials := asked - made
		if failedDials == 0 {
			t.Fatalf("the condition did not hold: every connect established")
		}
		if !strings.Contains(f.Symptom, "already exhausted") || strings.Contains(f.Symptom, "starts failing in") || f.Severity != culpritv1.Severity_SEVERITY_CRITICAL {
			t.Errorf("%s: %s / %s", f.Severity, f.Title, f.Symptom)
		}
		// The failed connects, once counted, are at most what failed:
		// each failed dial is one connect() or a few (Go's dialer retries
		// EADDRNOTAVAIL); the finding counts connect() calls.
		said := failedConnects(f)
		for end := time.Now().Add(6 * time.Second); said == 0 && time.Now().Before(end); {
			asked += 20
			made += established(t, s, "burst 20")
			select {
			case ev := <-events:
				if ev.Finding != nil && ev.Finding.Id == f.Id {
					if strings.Contains(ev.Finding.Symptom, "starts failing in") {
						t.Errorf("a forecast after the failures were counted: %s", ev.Finding.Symptom)
					}
					said = failedConnects(ev.Finding)
					f = ev.Finding
				}
			case <-time.After(250 * time.Millisecond):
			}
		}
		failedDials = asked - made
		t.Logf("%s\n%s", f.Title, f.Symptom)
		if said < 1 || said > 3*float64(failedDials) || !strings.Contains(f.Title, "exhausted: "+strconv.Itoa(int(said))+" connects failed") {
			t.Errorf("said %v connects failed (%s); the client saw %d dials fail", said, f.Title, failedDials)
		}
	})
}

// failedConnects is the count of failed connects a finding gives.
func failedConnects(f *culpritv1.Finding) float64 {
	for _, e := range f.Evidence {
		if strings.HasPrefix(e.Signal, signals.ProcessConnectErrorsTotal.Name) {
			return e.Value
		}
	}
	return 0
}

// The connections a stalled shutdown holds are the target's ends only:
// 20 clients in another process of the same namespace hold the other 20
// ends, which are not the target's to close (seen: "40 connections still
// open" for a server holding 20).
func TestStalledShutdownCountsTheTargetsEnds(t *testing.T) {
	s, events := stalledShutdownScenario(t)
	ns := testenv.NetnsOf(t, s.PID)
	addr := fmt.Sprintf("127.0.0.1:%d", s.Port)
	for range 20 {
		conn, err := ns.DialContext(context.Background(), "tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { conn.Close() })
	}
	time.Sleep(1500 * time.Millisecond) // the sockets collector and the owner index have them
	if err := syscall.Kill(s.PID, syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	ev, _ := next(t, events, 10*time.Second, openedBy("stalled_shutdown"))
	f := ev.Finding
	t.Logf("%s\n  %s", f.Title, f.Symptom)
	if !strings.Contains(f.Title, "20 connections still open") || !strings.Contains(f.Symptom, fmt.Sprintf("20 on port %d", s.Port)) {
		t.Errorf("the target holds 20 connections; the finding says: %s / %s", f.Title, f.Symptom)
	}
}

// established runs a dial command of the child and returns how many
// connections it established.
func established(t *testing.T, s *testenv.Server, cmd string) int {
	t.Helper()
	out := s.MustDo(t, cmd)
	var n int
	if _, err := fmt.Sscanf(out, "ok %d established", &n); err != nil {
		t.Fatalf("%s: %q: %v", cmd, out, err)
	}
	return n
}

// The target stops listening (a SIGTERM closes its listener, as in a
// restart) while clients keep connecting to its port: the namespace answers
// each SYN with a reset, on the target's own port. (Resets answering SYNs
// to a port the target never listened on are not the target's: see
// TestPrecisionNoisyNeighbour.)
func TestRSTStormFinding(t *testing.T) {
	s, events := networkScenario(t, testenv.Options{Backlog: 128, Accept: true})
	time.Sleep(1500 * time.Millisecond) // the rule has seen the target listen
	if err := syscall.Kill(s.PID, syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	repeatFor(t, s, 4*time.Second, 100*time.Millisecond, "dial 30")
	ev, _ := next(t, events, 10*time.Second, openedBy("rst_storm"))
	f := ev.Finding
	t.Logf("%s\n  %s", f.Title, f.RootCause)
	if f.Cause != "rst_closed_port" || !strings.Contains(f.RootCause, "no_socket") || !strings.Contains(f.Title, "on the target's ports") {
		t.Errorf("finding %s: %s: %s", f.Cause, f.Title, f.RootCause)
	}
}

// The app holds a pool of 4 connections to an upstream that never answers,
// and each request waits for a slot: established connections to the
// upstream stay at 4 while clients queue in the accept queue.
func TestPoolExhaustionFinding(t *testing.T) {
	w := testenv.StartWorkersNetns(t, 2)
	var port int
	if _, err := fmt.Sscanf(w.MustDo(t, "listen 64"), "ok port %d", &port); err != nil {
		t.Fatal(err)
	}
	up := strings.TrimPrefix(w.MustDo(t, "upstream 4"), "ok upstream ")
	cfg := testConfig(t, w.PID)
	networkConfig(&cfg)
	a := startAgentConfig(t, cfg)
	c := client(t, a.GRPCAddr)
	waitWatching(t, c, port)
	events, _ := watch(t, c, 0)
	w.MustDo(t, "pool 500")
	w.MustDo(t, "dial 30")
	ev, _ := next(t, events, 12*time.Second, openedBy("pool_exhaustion"))
	f := ev.Finding
	t.Logf("%s\n  %s", f.Title, f.Symptom)
	if f.Cause != "pool_at_ceiling" || !strings.Contains(f.Title, up) || !strings.Contains(f.Title, "4 connections") {
		t.Errorf("finding %s: %s (upstream %s)", f.Cause, f.Title, up)
	}
	// The 30 queued clients' own connections (flat too, once all are in)
	// are not a pool.
	deadline := time.After(4 * time.Second)
	for {
		select {
		case ev := <-events:
			if ev.Type == culpritv1.FindingEvent_TYPE_OPENED && ev.Finding.Rule == "pool_exhaustion" {
				t.Errorf("second pool finding: %s", ev.Finding.Title)
			}
		case <-deadline:
			return
		}
	}
}

// Silence: clients on kept-alive connections (opened once, then reused),
// with the same short windows, raise none of the network findings.
func TestHealthyKeepAliveRaisesNoNetworkFinding(t *testing.T) {
	s, events := networkScenario(t, testenv.Options{Backlog: 128, Accept: true})
	s.MustDo(t, "sysctl net.ipv4.ip_local_port_range 40000_40199")
	s.MustDo(t, "dial 50")
	deadline := time.After(7 * time.Second)
	for {
		select {
		case ev := <-events:
			if ev.Finding != nil {
				switch ev.Finding.Rule {
				case "close_wait", "port_exhaustion", "rst_storm", "pool_exhaustion", "accept_overflow", "idle_timeout":
					t.Errorf("keep-alive clients raised %s: %s", ev.Finding.Rule, ev.Finding.Title)
				}
			}
		case <-deadline:
			s.MustDo(t, "close")
			return
		}
	}
}

// An intermediary's idle timeout: the target's connections go through
// another namespace (a veth away, as a load balancer or NAT gateway is) to
// something that cuts them once idle for 1.2 s. The target keeps them open
// and sees them cut at that idle age, again and again; the finding names
// the peer and the age.
func TestIdleTimeoutFinding(t *testing.T) {
	s, events := networkScenario(t, testenv.Options{Backlog: 128, Accept: true})
	remote := testenv.StartIdleCutter(t, s.PID, 1200*time.Millisecond)
	repeatFor(t, s, 4*time.Second, time.Second, "dialto "+remote+" 5")
	ev, _ := next(t, events, 10*time.Second, openedBy("idle_timeout"))
	f := ev.Finding
	t.Logf("%s\n  %s\n  %s", f.Title, f.Symptom, f.Remediation)
	if f.Cause != "intermediary_idle_timeout" || !strings.Contains(f.Title, remote) || !strings.Contains(f.Title, "1.2") {
		t.Errorf("finding %s: %s", f.Cause, f.Title)
	}
}

// A SYN flood: 600 SYNs from 200 spoofed addresses, arriving over a veth
// from another namespace, whose handshakes never complete. The SYN queue
// fills, the kernel answers with syncookies, and the finding calls it a
// flood rather than a burst of clients.
func TestSYNFloodFinding(t *testing.T) {
	s := testenv.Start(t, testenv.Options{Backlog: 16, Accept: true, AllInterfaces: true})
	s.MustDo(t, "sysctl net.ipv4.conf.all.rp_filter 0")
	s.MustDo(t, "sysctl net.ipv4.conf.default.rp_filter 0")
	cfg := testConfig(t, s.PID)
	a := startAgentConfig(t, cfg)
	c := client(t, a.GRPCAddr)
	waitWatching(t, c, s.Port)
	events, _ := watch(t, c, 0)
	testenv.SYNFlood(t, s.PID, s.Port, 600, 200)
	ev, _ := next(t, events, 10*time.Second, openedBy("syn_backlog"))
	f := ev.Finding
	t.Logf("%s\n  %s\n  %s", f.Title, f.RootCause, f.Remediation)
	for _, e := range f.Evidence {
		t.Logf("  evidence %s = %v", e.Signal, e.Value)
	}
	if f.Cause != "syn_flood" || !strings.Contains(f.Remediation, "syncookies") {
		t.Errorf("finding %s: %s", f.Cause, f.Title)
	}
}

// A server holding open streams gets SIGTERM, stops accepting, and waits
// for the streams, which never end: after half the grace period the
// finding names the connections still open.
func TestStalledShutdownFinding(t *testing.T) {
	s, events := stalledShutdownScenario(t)
	s.MustDo(t, "dial 5")
	// The procsignals probe takes a (re)found target at once
	// (workload.Tracker.OnChange), not at its next poll, which slows to
	// probes.idle_poll_interval while no signal comes: no wait for it
	// (TestProcSignalsRetargetsAtOnce shows a restart).
	if err := syscall.Kill(s.PID, syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	ev, _ := next(t, events, 10*time.Second, openedBy("stalled_shutdown"))
	f := ev.Finding
	t.Logf("%s\n  %s", f.Title, f.Symptom)
	if f.Cause != "connections_outlive_sigterm" || !strings.Contains(f.Symptom, fmt.Sprintf("5 to 127.0.0.1:%d", s.Port)) {
		t.Errorf("finding %s: %s", f.Cause, f.Symptom)
	}
}

// stalledShutdownScenario is a server that keeps serving after SIGTERM and
// an agent with a 4 s grace period watching it, with a watch stream open.
func stalledShutdownScenario(t *testing.T) (*testenv.Server, <-chan *culpritv1.FindingEvent) {
	t.Helper()
	s := testenv.Start(t, testenv.Options{Backlog: 64, Accept: true})
	cfg := testConfig(t, s.PID)
	cfg.Rules.StalledShutdown.Grace = 4 * time.Second
	a := startAgentConfig(t, cfg)
	c := client(t, a.GRPCAddr)
	waitWatching(t, c, s.Port)
	events, _ := watch(t, c, 0)
	return s, events
}
