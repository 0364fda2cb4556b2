package testenv

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptrace"
	"os"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

// proberEnv gives the prober child its target: "ADDR PATH,PATH".
const proberEnv = "CULPRIT_TESTENV_PROBER"

// SynRetransmitWait is a connect long enough to have waited for the
// kernel's first SYN retransmission (initial RTO 1 s).
const SynRetransmitWait = 900 * time.Millisecond

// Prober is a child process that GETs an HTTP server's paths with a fresh
// connection every 100 ms, as a kubelet's probes do, and keeps the worst
// latency and the failures. It is a process of its own because a kubelet
// does not share one with an attacker: in an attacker's busy (-race)
// process a probe's request can come well after its connect, and a server
// that evicts its longest-silent connection at a cap then evicts the
// probe's. It shares the test's network namespace.
//
// It also parts each probe's time into the connect and the rest. A connect
// that waits SynRetransmitWait or more had its SYN dropped and sent again
// after Linux's initial RTO (1 s): the listener's accept queue was full
// when it came.
type Prober struct{ c *child }

// ProberResult is what a Prober saw, from its start to Finish.
type ProberResult struct {
	N           int           // probes made
	Worst       time.Duration // the worst latency
	WorstServed time.Duration // the worst time past the connect
	SynRetried  int           // probes whose connect waited for a SYN retransmission
	Fails       []string      // "PATH: error or status"
}

// StartProber starts a Prober of the paths at addr (host:port) and returns
// once it probes. It stops with the test.
func StartProber(t testing.TB, addr string, paths ...string) *Prober {
	t.Helper()
	// A -race binary sleeps a second at exit (atexit_sleep_ms) for reports
	// from goroutines still running; the prober has none to wait for.
	c, greeting := startChild(t, "prober", true, proberEnv+"="+addr+" "+strings.Join(paths, ","),
		"GORACE="+strings.TrimSpace(os.Getenv("GORACE")+" atexit_sleep_ms=0"))
	if greeting != "ready" {
		t.Fatalf("testenv: prober child said %q, not ready", greeting)
	}
	return &Prober{c: c}
}

// Finish stops the probing and returns what the prober saw.
func (p *Prober) Finish() (ProberResult, error) {
	var r ProberResult
	ans, err := p.c.Do("stop")
	if err != nil {
		return r, fmt.Errorf("prober child %d: %w", p.c.pid, err)
	}
	if err := json.Unmarshal([]byte(strings.TrimSpace(strings.TrimPrefix(ans, "ok"))), &r); err != nil {
		return r, fmt.Errorf("prober child %d answered %q: %w", p.c.pid, ans, err)
	}
	return r, nil
}

// proberMain probes until its stdin says "stop" (then answers "ok" and its
// ProberResult as JSON) or ends.
func proberMain() int {
	addr, list, _ := strings.Cut(os.Getenv(proberEnv), " ")
	paths := strings.FieldsFunc(list, func(r rune) bool { return r == ',' })
	stop := make(chan struct{})
	go func() {
		defer close(stop)
		sc := bufio.NewScanner(os.Stdin)
		for sc.Scan() && strings.TrimSpace(sc.Text()) != "stop" {
		}
	}()
	fmt.Println("ready")
	var r ProberResult
	client := &http.Client{Transport: &http.Transport{DisableKeepAlives: true}, Timeout: 2 * time.Second}
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	for {
		for _, path := range paths {
			// The dial runs on the transport's goroutine, which can
			// outlive a failed request.
			var connStart, connDone atomic.Int64
			trace := &httptrace.ClientTrace{
				ConnectStart: func(string, string) { connStart.Store(time.Now().UnixNano()) },
				ConnectDone:  func(string, string, error) { connDone.Store(time.Now().UnixNano()) },
			}
			req, _ := http.NewRequestWithContext(httptrace.WithClientTrace(context.Background(), trace), http.MethodGet, "http://"+addr+path, nil)
			start := time.Now()
			resp, err := client.Do(req)
			d := time.Since(start)
			var connect time.Duration
			if s, e := connStart.Load(), connDone.Load(); s != 0 && e >= s {
				connect = time.Duration(e - s)
			}
			r.N++
			r.Worst = max(r.Worst, d)
			r.WorstServed = max(r.WorstServed, d-connect)
			if connect >= SynRetransmitWait {
				r.SynRetried++
			}
			if err != nil {
				r.Fails = append(r.Fails, fmt.Sprintf("%s: %v", path, err))
			} else {
				io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
				if resp.StatusCode != http.StatusOK {
					r.Fails = append(r.Fails, fmt.Sprintf("%s: %s", path, resp.Status))
				}
			}
		}
		select {
		case <-stop:
			b, err := json.Marshal(r)
			if err != nil {
				fmt.Println("error", err)
				return 1
			}
			fmt.Printf("ok %s\n", b)
			return 0
		case <-tick.C:
		}
	}
}
