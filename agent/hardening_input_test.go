package main

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	collectorpb "go.opentelemetry.io/proto/otlp/collector/trace/v1"
	commonpb "go.opentelemetry.io/proto/otlp/common/v1"
	resourcepb "go.opentelemetry.io/proto/otlp/resource/v1"
	tracepb "go.opentelemetry.io/proto/otlp/trace/v1"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/culprit-dev/culprit/internal/testenv"
)

// Bad input to the real binary's configuration: each is refused at once,
// with a short error naming the key and its bound in plain numbers, and
// costs the process next to nothing (before the fix: `--config /dev/zero`
// took 1.3 GB in 8 s, a 50 MB bad value came back in a 52 MB error, a ring
// of 2e9 samples ran out of memory, collect.interval = 1ns used 1.33 cores
// and NaN ratios were accepted).
func TestHardeningBadConfigInput(t *testing.T) {
	big := filepath.Join(t.TempDir(), "big.conf")
	if err := os.WriteFile(big, []byte("[signals]\nring_size = \""+strings.Repeat("x", 50<<20)+"\"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	long := filepath.Join(t.TempDir(), "long.conf")
	if err := os.WriteFile(long, []byte("[agent]\ntoken_file = \""+strings.Repeat("y", 200<<10)+"\"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name string
		args []string
		env  string
		want string // in the error
	}{
		{"config /dev/zero", []string{"--config", "/dev/zero"}, "", "larger than 1048576 bytes"},
		{"a 50 MB value", []string{"--config", big}, "", "larger than 1048576 bytes"},
		{"a 200 KiB string", []string{"--config", long}, "", "agent.token_file"},
		{"ring of 2e9 samples", []string{"--set", "signals.ring_size=2000000000"}, "", "signals.ring_size: must be at most 1048576, got 2000000000"},
		{"the same from the environment", nil, "CULPRIT_SIGNALS_RING_SIZE=2000000000", "signals.ring_size: must be at most 1048576"},
		{"collect every 1ns", []string{"--set", "collect.interval=1ns"}, "", "collect.interval: must be at least 10ms, got 1ns"},
		{"a NaN ratio", []string{"--set", "rules.fd_exhaustion.near_ratio=NaN"}, "", "rules.fd_exhaustion.near_ratio"},
		{"an infinite ratio", []string{"--set", "rules.fd_exhaustion.near_ratio=+Inf"}, "", "rules.fd_exhaustion.near_ratio"},
		{"a misspelt variable", nil, "CULPRIT_SIGNALS_RINGSIZE=10", "CULPRIT_SIGNALS_RINGSIZE"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cmd := exec.Command(culpritBinary(t), append([]string{"agent", "--pid", strconv.Itoa(os.Getpid())}, tc.args...)...)
			cmd.Env = os.Environ()
			if tc.env != "" {
				cmd.Env = append(cmd.Env, tc.env)
			}
			var stderr bytes.Buffer
			cmd.Stderr = &stderr
			start := time.Now()
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			// The peak RSS from /proc while it runs: the rusage of a child
			// of this (large) test process counts the test's own pages
			// between fork and exec.
			maxRSS := 0
			done := make(chan error, 1)
			go func() { done <- cmd.Wait() }()
			var err error
			deadline := time.After(10 * time.Second)
		wait:
			for {
				if _, hwm, ok := tryMemKiB(cmd.Process.Pid, "culprit"); ok {
					maxRSS = max(maxRSS, hwm)
				}
				select {
				case err = <-done:
					break wait
				case <-deadline:
					cmd.Process.Kill()
					<-done
					t.Fatalf("still running after 10 s; stderr so far %d bytes", stderr.Len())
				case <-time.After(time.Millisecond):
				}
			}
			took := time.Since(start)
			msg := strings.TrimSpace(stderr.String())
			t.Logf("exit %v after %s, peak RSS %d MiB: %s", err, took.Round(time.Millisecond), maxRSS>>10, msg[:min(len(msg), 300)])
			if err == nil {
				t.Fatal("the agent started")
			}
			if !strings.Contains(msg, tc.want) {
				t.Errorf("the error does not say %q", tc.want)
			}
			if len(msg) > 2048 || strings.Count(msg, "\n") > 2 {
				t.Errorf("an error of %d bytes, %d lines", len(msg), strings.Count(msg, "\n")+1)
			}
			if strings.Contains(msg, "e+") {
				t.Errorf("a number in exponent form: %s", msg)
			}
			if maxRSS > 64<<10 || took > 3*time.Second {
				t.Errorf("refusing it took %s and %d MiB", took, maxRSS>>10)
			}
		})
	}
}

// The OTLP attacks of the hardening issue against the real binary's trace
// receivers: 200 uploads that send all but the last byte of a 4 MB body,
// 1000 connections that send a byte a second, and 100 spans with names of
// 4 MB (less 1 KiB, to fit traces.max_request_bytes). The agent's peak RSS stays within the attack budget, /healthz
// answers within a second throughout, slow connections are cut (the
// descriptors come back), and the kept span names are cut to a bound.
func TestHardeningOTLPAttacks(t *testing.T) {
	sleeper := startNamed(t, fmt.Sprintf("culprit-otlp-hardening-%d", os.Getpid()))
	grpcAddr, httpAddr := freeAddr(t), freeAddr(t)
	a := testenv.StartAgent(t, testenv.AgentOptions{Bin: culpritBinary(t), Args: []string{"--pid", strconv.Itoa(sleeper.Process.Pid),
		"--set", "traces.grpc_addr=" + grpcAddr, "--set", "traces.http_addr=" + httpAddr}})
	time.Sleep(2 * time.Second) // past start-up allocations
	rss0, hwm0 := memKiB(t, a.PID)
	fds0 := openFDs(a.PID)
	p := startProber(t, a.HTTPAddr, "/healthz", "/readyz")

	// 200 slow uploads of 4 MB, all but the last byte.
	const size = 4 << 20
	payload := bytes.Repeat([]byte{0x0a}, size-1)
	var wg sync.WaitGroup
	var mu sync.Mutex
	statuses := map[string]int{}
	for range 200 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			status := "closed"
			defer func() { mu.Lock(); statuses[status]++; mu.Unlock() }()
			c, err := net.Dial("tcp", httpAddr)
			if err != nil {
				status = "refused"
				return
			}
			defer c.Close()
			fmt.Fprintf(c, "POST /v1/traces HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-protobuf\r\nContent-Length: %d\r\n\r\n", size)
			_ = c.SetDeadline(time.Now().Add(25 * time.Second))
			_, _ = c.Write(payload)
			if resp, err := http.ReadResponse(bufio.NewReader(c), nil); err == nil {
				status = resp.Status
				resp.Body.Close()
			}
		}()
	}
	wg.Wait()
	_, hwmUploads := memKiB(t, a.PID)
	t.Logf("200 slow 4 MB uploads: %v; peak RSS %d -> %d MiB", statuses, hwm0>>10, hwmUploads>>10)

	// 1000 connections sending a byte a second.
	stop := make(chan struct{})
	var dribblers sync.WaitGroup
	var cut sync.Map
	for i := range 1000 {
		dribblers.Add(1)
		go func() {
			defer dribblers.Done()
			addr := httpAddr
			if i%2 == 1 {
				addr = grpcAddr
			}
			c, err := net.DialTimeout("tcp", addr, 5*time.Second)
			if err != nil {
				cut.Store(i, true)
				return
			}
			defer c.Close()
			msg := []byte("POST /v1/traces HTTP/1.1\r\nHost: x\r\n")
			for _, b := range msg {
				if _, err := c.Write([]byte{b}); err != nil {
					cut.Store(i, true)
					return
				}
				select {
				case <-stop:
					return
				case <-time.After(time.Second):
				}
			}
		}()
	}
	maxFDs := 0
	for end := time.Now().Add(20 * time.Second); time.Now().Before(end); time.Sleep(250 * time.Millisecond) {
		maxFDs = max(maxFDs, openFDs(a.PID))
	}
	fdsDuring := openFDs(a.PID)
	close(stop)
	dribblers.Wait()
	nCut := 0
	cut.Range(func(any, any) bool { nCut++; return true })
	t.Logf("1000 connections at a byte a second for 20 s: %d cut or refused; agent FDs %d before, at most %d, %d at the end", nCut, fds0, maxFDs, fdsDuring)

	// 100 spans with 4 MB names.
	cc, err := grpc.NewClient(grpcAddr, grpc.WithTransportCredentials(insecure.NewCredentials()), grpc.WithDefaultCallOptions(grpc.MaxCallSendMsgSize(8<<20)))
	if err != nil {
		t.Fatal(err)
	}
	defer cc.Close()
	tc := collectorpb.NewTraceServiceClient(cc)
	now := uint64(time.Now().UnixNano())
	for i := range 100 {
		req := &collectorpb.ExportTraceServiceRequest{ResourceSpans: []*tracepb.ResourceSpans{{
			Resource: &resourcepb.Resource{Attributes: []*commonpb.KeyValue{{Key: "service.name", Value: &commonpb.AnyValue{Value: &commonpb.AnyValue_StringValue{StringValue: "attacker"}}}}},
			ScopeSpans: []*tracepb.ScopeSpans{{Spans: []*tracepb.Span{{
				TraceId: bytes.Repeat([]byte{byte(i + 1)}, 16), SpanId: []byte{byte(i + 1), 2, 3, 4, 5, 6, 7, 8},
				Name: strings.Repeat(string(rune('a'+i%26)), 4<<20-1024), Kind: tracepb.Span_SPAN_KIND_SERVER,
				StartTimeUnixNano: now - 1e6, EndTimeUnixNano: now,
			}}}},
		}}}
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		_, err := tc.Export(ctx, req)
		cancel()
		if err != nil {
			t.Fatalf("export %d: %v", i, err)
		}
	}
	truncated := scrapeValue(t, a.HTTPAddr, "culprit_otlp_span_strings_truncated_total")
	storeBytes := scrapeValue(t, a.HTTPAddr, "culprit_otlp_span_store_bytes")

	n, worst, fails := p.finish()
	rss1, hwm1 := memKiB(t, a.PID)
	t.Logf("100 spans with 4 MB names: %v strings cut, span store %v bytes; RSS %d -> %d MiB, peak %d -> %d MiB; /healthz and /readyz worst %s over %d probes",
		truncated, storeBytes, rss0>>10, rss1>>10, hwm0>>10, hwm1>>10, worst.Round(time.Millisecond), n)
	if hwm1-hwm0 > attackRSSBudgetKiB {
		t.Errorf("peak RSS grew by %d MiB under the attacks (budget %d MiB)", (hwm1-hwm0)>>10, attackRSSBudgetKiB>>10)
	}
	if len(fails) > 0 || worst > time.Second {
		t.Errorf("probes during the attacks: worst %s, failures %v", worst, fails[:min(len(fails), 5)])
	}
	if statuses["200 OK"] > 0 {
		t.Errorf("a truncated upload was accepted: %v", statuses)
	}
	if nCut < 900 || fdsDuring > fds0+100 {
		t.Errorf("slow connections not cut: %d of 1000 cut, agent FDs %d (from %d)", nCut, fdsDuring, fds0)
	}
	if truncated < 100 || storeBytes > 1<<20 {
		t.Errorf("4 MB names kept: %v cut, %v bytes in the span store", truncated, storeBytes)
	}
}

// scrapeValue reads one unlabelled series (or the sum of a name's series)
// from the agent's /metrics.
func scrapeValue(t *testing.T, addr, name string) float64 {
	t.Helper()
	resp, err := (&http.Client{Timeout: 5 * time.Second}).Get("http://" + addr + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	sum, found := 0.0, false
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 64<<10), 4<<20)
	for sc.Scan() {
		line := sc.Text()
		if !strings.HasPrefix(line, name) || (len(line) > len(name) && line[len(name)] != ' ' && line[len(name)] != '{') {
			continue
		}
		f := strings.Fields(line)
		v, err := strconv.ParseFloat(f[len(f)-1], 64)
		if err == nil {
			sum, found = sum+v, true
		}
	}
	if !found {
		t.Fatalf("%s not on /metrics", name)
	}
	return sum
}
