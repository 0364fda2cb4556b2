package main

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/culprit-dev/culprit/internal/testenv"
	culpritv1 "github.com/culprit-dev/culprit/proto/culprit/v1"
	"github.com/culprit-dev/culprit/signals"
)

// podAgent is the real culprit binary running inside a target's network
// namespace, as a sidecar does in a pod: its own API sockets share the
// namespace with the target and its neighbours.
type podAgent struct {
	*testenv.Agent
	c culpritv1.DiagnosticsClient
}

func startPodAgent(t *testing.T, pid int, sets ...string) *podAgent {
	t.Helper()
	args := []string{"--pid", strconv.Itoa(pid)}
	for _, s := range sets {
		args = append(args, "--set", s)
	}
	pa := &podAgent{Agent: testenv.StartAgent(t, testenv.AgentOptions{Bin: culpritBinary(t), Args: args, Netns: testenv.NetnsOf(t, pid)})}
	ns := pa.Netns
	conn, err := grpc.NewClient("passthrough:///"+pa.GRPCAddr, grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithContextDialer(func(ctx context.Context, addr string) (net.Conn, error) { return ns.DialContext(ctx, "tcp", addr) }))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	pa.c = culpritv1.NewDiagnosticsClient(conn)
	deadline := time.Now().Add(20 * time.Second)
	for {
		s, err := pa.c.GetSnapshot(context.Background(), &culpritv1.SnapshotRequest{})
		if err == nil && signalValue(s, signals.TCPSocketsDumped, "", "") != nil {
			return pa
		}
		if time.Now().After(deadline) {
			t.Fatalf("the agent in the namespace never answered with its sockets: %v", err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// scrapeLoop is the agent's own HTTP clients in the namespace (a
// Prometheus scraping, kubelet probes): keep-alive connections that the
// agent closes when idle, at one idle age, which looks like an
// intermediary's idle timeout to anyone who does not know whose they are.
func (pa *podAgent) scrapeLoop(t *testing.T, stop <-chan struct{}) {
	t.Helper()
	client := &http.Client{Transport: &http.Transport{DialContext: pa.Netns.DialContext, MaxIdleConnsPerHost: 8}}
	var wg sync.WaitGroup
	for i := 0; i < 8; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			for {
				for _, path := range []string{"/metrics", "/healthz", "/readyz"} {
					if resp, err := client.Get("http://" + pa.HTTPAddr + path); err == nil {
						io.Copy(io.Discard, resp.Body)
						resp.Body.Close()
					}
				}
				select {
				case <-stop:
					return
				case <-time.After(time.Duration(300+200*i) * time.Millisecond):
				}
			}
		}(i)
	}
	t.Cleanup(wg.Wait)
}

// The pod: one network namespace holding a healthy target, a neighbour
// with a CLOSE_WAIT leak, connections cut at one idle age and a stream of
// resets, and culprit itself with its own API clients (a watcher, idle
// keep-alive scrapes the agent cuts after 2 s). Nothing is wrong with the
// target, so nothing is said about it; nothing is said about the agent's
// own sockets either. Then, told to watch the whole namespace, the agent
// reports the neighbour's leak titled with the neighbour's name, and still
// nothing about itself.
func TestPrecisionNoisyNeighbour(t *testing.T) {
	for _, scope := range []string{"target", "namespace"} {
		t.Run(scope, func(t *testing.T) {
			s := testenv.Start(t, testenv.Options{Backlog: 256, Accept: true})
			pa := startPodAgent(t, s.PID,
				"rules.scope="+scope,
				"rules.close_wait.window=4s", "rules.close_wait.min_increase=10", "rules.close_wait.steady=0.6",
				"rules.idle_timeout.window=10s", "rules.idle_timeout.min_closes=5",
				"rules.rst_storm.recent=2s", "rules.pool_exhaustion.window=3s",
				"agent.http_idle_timeout=2s")
			events, _ := watch(t, pa.c, 0)
			var mu sync.Mutex
			var opened []*culpritv1.Finding
			go func() {
				for ev := range events {
					if ev.Type == culpritv1.FindingEvent_TYPE_OPENED {
						mu.Lock()
						opened = append(opened, ev.Finding)
						mu.Unlock()
					}
				}
			}()
			stop := make(chan struct{})
			var stopOnce sync.Once
			halt := func() { stopOnce.Do(func() { close(stop) }) }
			pa.scrapeLoop(t, stop)
			// Registered after scrapeLoop's cleanup, so it runs first: a
			// test that fails before halt() below (CI once: the neighbour's
			// own CLOSE_WAIT sockets late under load) ends instead of
			// waiting on the scrapers until the package's timeout.
			t.Cleanup(halt)
			// The target's own healthy traffic.
			go func() {
				for {
					select {
					case <-stop:
						return
					case <-time.After(200 * time.Millisecond):
						s.Do("burst 20")
					}
				}
			}()
			leak := testenv.StartNeighbour(t, s.PID)
			cuts := testenv.StartNeighbour(t, s.PID)
			resets := testenv.StartNeighbour(t, s.PID)
			// Neighbours are long-running in a pod: let the agent meet
			// them before they misbehave.
			time.Sleep(3 * time.Second)
			stopResets := resets.StartResets(t, 200)
			cuts.CutIdle(t, 1500*time.Millisecond, 12)
			for i := 0; i < 4; i++ {
				leak.LeakCloseWait(t, 20)
				time.Sleep(time.Second)
			}
			time.Sleep(6 * time.Second)
			refused := stopResets()
			halt()
			if refused < 100 {
				t.Fatalf("the neighbour's resets did not happen: %d refused", refused)
			}
			mu.Lock()
			got := append([]*culpritv1.Finding(nil), opened...)
			mu.Unlock()
			var aboutTarget, aboutAgent, aboutNeighbour []string
			for _, f := range got {
				text := f.Title + " " + f.Symptom + " " + f.RootCause
				switch {
				case strings.Contains(text, pa.GRPCAddr) || strings.Contains(text, pa.HTTPAddr) ||
					strings.Contains(text, "process agent,") || strings.Contains(text, "process culprit"):
					aboutAgent = append(aboutAgent, describe(f))
				case strings.Contains(f.Title, "not the target") || strings.Contains(f.Title, "by the namespace"):
					aboutNeighbour = append(aboutNeighbour, describe(f))
				default:
					aboutTarget = append(aboutTarget, describe(f)+": "+f.RootCause)
				}
			}
			for _, f := range aboutTarget {
				t.Errorf("a neighbour's faults were blamed on the healthy target: %s", f)
			}
			for _, f := range aboutAgent {
				t.Errorf("a finding about culprit's own sockets: %s", f)
			}
			var falses []*culpritv1.Finding
			for _, f := range got {
				if !strings.Contains(f.Title, "not the target") && !strings.Contains(f.Title, "by the namespace") {
					falses = append(falses, f)
				}
			}
			switch scope {
			case "target":
				for _, f := range aboutNeighbour {
					t.Errorf("scope target made a finding about a neighbour: %s", f)
				}
				precisionLine(t, "healthy target beside a noisy neighbour (CLOSE_WAIT leak, idle cuts, 200 resets/s) and culprit's own clients", "nothing", nil, falses)
			case "namespace":
				var leak *culpritv1.Finding
				for _, f := range got {
					if f.Rule == "close_wait" && strings.Contains(f.Title, "not the target") {
						leak = f
					}
				}
				leakSeen := leak != nil
				if !leakSeen {
					snap, _ := pa.c.GetSnapshot(context.Background(), &culpritv1.SnapshotRequest{})
					var cw []string
					for _, sg := range snap.GetSignals() {
						if sg.Name == signals.TCPSockets.Name && strings.Contains(fmt.Sprint(sg.Labels), "CLOSE_WAIT") {
							cw = append(cw, fmt.Sprint(sg.Labels, "=", sg.Value))
						}
					}
					t.Errorf("rules.scope=namespace: the neighbour's CLOSE_WAIT leak was not reported with its owner; opened: %v; CLOSE_WAIT series: %v", aboutNeighbour, cw)
				}
				precisionLine(t, "the same pod, rules.scope = namespace", "the neighbour's CLOSE_WAIT leak, titled with its owner", leak, falses)
			}
		})
	}
}
