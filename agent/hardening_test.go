package main

import (
	"bufio"
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"io"
	"math/big"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/mem"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/culprit-dev/culprit/exporters"
	"github.com/culprit-dev/culprit/exporters/rawh2"
	"github.com/culprit-dev/culprit/internal/testenv"
	culpritv1 "github.com/culprit-dev/culprit/proto/culprit/v1"
)

// The attacks of the hardening issue, each run against the real binary as
// an unprivileged neighbour in the pod would (over loopback), with the
// bound the agent must hold. `make reliability` runs them.

// memKiB reads VmRSS and VmHWM (peak RSS) of pid.
func memKiB(t *testing.T, pid int) (rss, hwm int) {
	t.Helper()
	rss, hwm, ok := tryMemKiB(pid, "")
	if !ok {
		t.Fatalf("read the status of %d", pid)
	}
	return rss, hwm
}

// tryMemKiB is memKiB for a process that may have exited, or, when name
// is given, not yet exec'd it (then it reports nothing).
func tryMemKiB(pid int, name string) (rss, hwm int, ok bool) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil || (name != "" && !bytes.Contains(b, []byte("Name:\t"+name+"\n"))) {
		return 0, 0, false
	}
	for _, l := range strings.Split(string(b), "\n") {
		f := strings.Fields(l)
		if len(f) < 2 {
			continue
		}
		switch f[0] {
		case "VmRSS:":
			rss, _ = strconv.Atoi(f[1])
		case "VmHWM:":
			hwm, _ = strconv.Atoi(f[1])
		}
	}
	return rss, hwm, rss > 0
}

func openFDs(pid int) int {
	ents, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	if err != nil {
		return -1
	}
	return len(ents)
}

// prober hits /healthz and /readyz with a fresh connection every 100 ms,
// as the kubelet does, from a process of its own (testenv.Prober), and
// keeps the worst latency and the failures.
//
// A connect that waits a second or more had its SYN dropped and sent again
// after Linux's initial RTO (1 s): the listener's accept queue was full
// when it came. That is the kernel's bound on a flood that dials faster
// than the agent accepts, which no server on the same two cores can rule
// out; the rest is the agent's answer, which it owns.
type prober struct {
	*testenv.Prober
	worstServed time.Duration // the worst time past the connect, set by finish
	synRetried  int           // probes whose connect waited for a SYN retransmission, set by finish
}

func startProber(t *testing.T, addr string, paths ...string) *prober {
	return &prober{Prober: testenv.StartProber(t, addr, paths...)}
}

// finish stops the prober and returns its count of probes, the worst
// latency and the failures; the child's own failure comes first among them.
func (p *prober) finish() (n int, worst time.Duration, fails []string) {
	r, err := p.Finish()
	if err != nil {
		r.Fails = append([]string{err.Error()}, r.Fails...)
	}
	p.worstServed, p.synRetried = r.WorstServed, r.SynRetried
	return r.N, r.Worst, r.Fails
}

const hardeningToken = "0123456789abcdef-hardening"

func writeToken(t *testing.T) string {
	t.Helper()
	f := filepath.Join(t.TempDir(), "token")
	if err := os.WriteFile(f, []byte(hardeningToken+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	return f
}

func secureClient(t *testing.T, addr string, sec exporters.ClientSecurity) culpritv1.DiagnosticsClient {
	t.Helper()
	opts, err := sec.DialOptions()
	if err != nil {
		t.Fatal(err)
	}
	cc, err := grpc.NewClient(addr, opts...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cc.Close() })
	return culpritv1.NewDiagnosticsClient(cc)
}

// Peak RSS may grow by this much under an attack (the agent idles at
// 30-80 MiB). Before the fix, the header attack took it from 87 MB to
// 1244 MB and the profile attack to 567 MB.
const attackRSSBudgetKiB = 64 << 10

// 20 gRPC calls carrying a 15 MB authorization header and no valid token:
// each is refused at the header's length prefix, the agent's peak RSS
// stays within the budget and /healthz keeps answering within a second.
func TestHardeningHugeAuthorizationHeader(t *testing.T) {
	sleeper := startNamed(t, fmt.Sprintf("culprit-hardening-%d", os.Getpid()))
	a := testenv.StartAgent(t, testenv.AgentOptions{Bin: culpritBinary(t), Args: []string{"--pid", strconv.Itoa(sleeper.Process.Pid), "--set", "agent.token_file=" + writeToken(t)}})
	time.Sleep(2 * time.Second) // past start-up allocations (kallsyms, symbols)
	rss0, hwm0 := memKiB(t, a.PID)
	p := startProber(t, a.HTTPAddr, "/healthz")
	var wg sync.WaitGroup
	results := make([]rawh2.Result, 20)
	errs := make([]error, 20)
	for i := range results {
		wg.Add(1)
		go func() {
			defer wg.Done()
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			results[i], errs[i] = rawh2.SendHugeHeader(ctx, a.GRPCAddr, culpritv1.Diagnostics_ListFindings_FullMethodName, "authorization", 15<<20)
		}()
	}
	wg.Wait()
	time.Sleep(300 * time.Millisecond)
	n, worst, fails := p.finish()
	rss1, hwm1 := memKiB(t, a.PID)
	var sent int64
	for i, r := range results {
		if errs[i] != nil {
			t.Fatalf("attacker %d: %v", i, errs[i])
		}
		if !r.ServerClosed {
			t.Errorf("attacker %d: the agent took the whole 15 MB header (%d bytes)", i, r.Written)
		}
		sent += r.Written
	}
	t.Logf("20 x 15 MB authorization headers: %d KiB got into sockets before the agent closed them; RSS %d -> %d MiB, peak %d -> %d MiB; /healthz worst %s over %d probes",
		sent>>10, rss0>>10, rss1>>10, hwm0>>10, hwm1>>10, worst.Round(time.Millisecond), n)
	if hwm1-hwm0 > attackRSSBudgetKiB {
		t.Errorf("peak RSS grew by %d MiB under the attack (budget %d MiB)", (hwm1-hwm0)>>10, attackRSSBudgetKiB>>10)
	}
	if len(fails) > 0 || worst > time.Second {
		t.Errorf("/healthz during the attack: worst %s, failures %v", worst, fails)
	}
	// A client with the token is served.
	if _, err := secureClient(t, a.GRPCAddr, exporters.ClientSecurity{Token: hardeningToken}).ListFindings(context.Background(), &culpritv1.ListRequest{}); err != nil {
		t.Errorf("ListFindings with the token after the attack: %v", err)
	}
}

// 50 unauthenticated CaptureProfile calls of 3 MB each: all refused on
// their headers, before a message is read or decoded.
func TestHardeningUnauthenticatedLargeProfileRequests(t *testing.T) {
	sleeper := startNamed(t, fmt.Sprintf("culprit-hardening-%d", os.Getpid()))
	a := testenv.StartAgent(t, testenv.AgentOptions{Bin: culpritBinary(t), Args: []string{"--pid", strconv.Itoa(sleeper.Process.Pid), "--set", "agent.token_file=" + writeToken(t)}})
	time.Sleep(2 * time.Second)
	rss0, hwm0 := memKiB(t, a.PID)
	req := &culpritv1.CaptureProfileRequest{Lookback: durationpb.New(time.Second)}
	for len(req.Tids)*5 < 3<<20 {
		req.Tids = append(req.Tids, 1<<30) // 5 bytes each: 3 MB
	}
	wire, err := proto.Marshal(req)
	if err != nil {
		t.Fatal(err)
	}
	p := startProber(t, a.HTTPAddr, "/healthz")
	var wg sync.WaitGroup
	got := make([]error, 50)
	for i := range got {
		wg.Add(1)
		go func() {
			defer wg.Done()
			// A connection each, as 50 separate neighbours would.
			cc, err := grpc.NewClient(a.GRPCAddr, grpc.WithTransportCredentials(insecure.NewCredentials()))
			if err != nil {
				got[i] = err
				return
			}
			defer cc.Close()
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()
			got[i] = cc.Invoke(ctx, culpritv1.Diagnostics_CaptureProfile_FullMethodName, preEncoded(wire), new(culpritv1.CaptureProfileResponse), grpc.ForceCodecV2(preEncodedCodec{}))
		}()
	}
	wg.Wait()
	n, worst, fails := p.finish()
	rss1, hwm1 := memKiB(t, a.PID)
	for i, err := range got {
		if status.Code(err) != codes.Unauthenticated {
			t.Fatalf("call %d: %v, want Unauthenticated", i, err)
		}
	}
	t.Logf("50 x 3 MB unauthenticated CaptureProfile: all Unauthenticated; RSS %d -> %d MiB, peak %d -> %d MiB; /healthz worst %s over %d probes",
		rss0>>10, rss1>>10, hwm0>>10, hwm1>>10, worst.Round(time.Millisecond), n)
	if hwm1-hwm0 > attackRSSBudgetKiB {
		t.Errorf("peak RSS grew by %d MiB (budget %d MiB): requests were read before the token was checked", (hwm1-hwm0)>>10, attackRSSBudgetKiB>>10)
	}
	if len(fails) > 0 || worst > time.Second {
		t.Errorf("/healthz during the attack: worst %s, failures %v", worst, fails)
	}
}

// 19,920 idle keep-alive connections to the metrics port, with the agent
// at a 20,000 file descriptor limit: the agent holds at most its caps
// (it keeps the rest of its descriptors for itself), /healthz and /readyz
// answer within a second throughout, gRPC answers, no collector fails and
// the target is never "gone".
func TestHardeningIdleConnectionFlood(t *testing.T) {
	sleeper := startNamed(t, fmt.Sprintf("culprit-hardening-%d", os.Getpid()))
	// Both limits at 20,000, as in the pod of the report.
	a := testenv.StartAgent(t, testenv.AgentOptions{Bin: culpritBinary(t), Args: []string{"--pid", strconv.Itoa(sleeper.Process.Pid)}, Wrap: []string{"prlimit", "--nofile=20000:20000", "--"}})
	c := client(t, a.GRPCAddr)
	time.Sleep(2 * time.Second)
	fd0 := openFDs(a.PID)
	rss0, hwm0 := memKiB(t, a.PID)
	snap0, err := c.GetSnapshot(context.Background(), &culpritv1.SnapshotRequest{})
	if err != nil {
		t.Fatal(err)
	}
	healthy := map[string]bool{}
	for _, cs := range snap0.Components {
		healthy[cs.Name] = cs.State == "running"
	}

	// The attacker has as many descriptors as this test process can give.
	var rl syscall.Rlimit
	syscall.Getrlimit(syscall.RLIMIT_NOFILE, &rl)
	conns := min(19920, int(rl.Cur)-openFDs(os.Getpid())-64)
	if conns < 15000 {
		t.Fatalf("the test process can open only %d connections (RLIMIT_NOFILE %d)", conns, rl.Cur)
	}

	p := startProber(t, a.HTTPAddr, "/healthz", "/readyz")
	var (
		mu     sync.Mutex
		held   []net.Conn
		dialEr int
		fdMax  int
		wg     sync.WaitGroup
	)
	t.Cleanup(func() {
		for _, c := range held {
			c.Close()
		}
	})
	stopFD := make(chan struct{})
	fdDone := make(chan struct{})
	go func() { // the agent's descriptors, sampled through the attack
		defer close(fdDone)
		for {
			mu.Lock()
			fdMax = max(fdMax, openFDs(a.PID))
			mu.Unlock()
			select {
			case <-stopFD:
				return
			case <-time.After(50 * time.Millisecond):
			}
		}
	}()
	start := time.Now()
	per := conns / 32
	for w := range 32 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			// Eight source addresses, each picking ports only at
			// connect (IP_BIND_ADDRESS_NO_PORT): from one address the
			// kernel's search for a free port among 20,000 connected
			// ones takes most of the attacker's CPU, which is its cost,
			// not the agent's, and slows the test.
			d := net.Dialer{Timeout: 5 * time.Second, LocalAddr: &net.TCPAddr{IP: net.IPv4(127, 0, 0, byte(2+w%8))},
				Control: func(_, _ string, rc syscall.RawConn) error {
					return rc.Control(func(fd uintptr) {
						syscall.SetsockoptInt(int(fd), syscall.IPPROTO_IP, unix.IP_BIND_ADDRESS_NO_PORT, 1)
					})
				}}
			for i := range per {
				cn, err := d.Dial("tcp", a.HTTPAddr)
				if err != nil {
					mu.Lock()
					dialEr++
					mu.Unlock()
					continue
				}
				if (w+i)%2 == 0 { // half make a request and keep the connection alive
					io.WriteString(cn, "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
				}
				mu.Lock()
				held = append(held, cn)
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	opened := time.Since(start)
	// Hold them a while, as an attacker would.
	var grpcWorst time.Duration
	for range 10 {
		s := time.Now()
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		_, err := c.GetSnapshot(ctx, &culpritv1.SnapshotRequest{})
		cancel()
		if err != nil {
			t.Errorf("GetSnapshot during the flood: %v", err)
		}
		grpcWorst = max(grpcWorst, time.Since(s))
		time.Sleep(300 * time.Millisecond)
	}
	n, worst, fails := p.finish()
	close(stopFD)
	<-fdDone
	rss1, hwm1 := memKiB(t, a.PID)
	snap1, err := c.GetSnapshot(context.Background(), &culpritv1.SnapshotRequest{})
	if err != nil {
		t.Fatal(err)
	}
	served, synRetried := p.worstServed, p.synRetried
	t.Logf("%d connections opened in %s (%d dials failed); agent FDs %d before, at most %d during; RSS %d -> %d MiB, peak %d -> %d MiB; /healthz+/readyz worst %s over %d probes (%d failed), worst past the connect %s, %d waited for a SYN retransmission; GetSnapshot worst %s",
		len(held), opened.Round(time.Millisecond), dialEr, fd0, fdMax, rss0>>10, rss1>>10, hwm0>>10, hwm1>>10, worst.Round(time.Millisecond), n, len(fails), served.Round(time.Millisecond), synRetried, grpcWorst.Round(time.Millisecond))

	// The listeners' caps (HTTP 256, gRPC 64) and slack for the agent's
	// own churn; far from the 20,000 limit.
	if fdMax > fd0+256+64+64 {
		t.Errorf("the agent held %d descriptors during the flood (%d before): the listener is not capped", fdMax, fd0)
	}
	// The flood dials faster than the agent accepts (measured: ~12k
	// connects/s against ~7.5k accepts/s on two cores it shares with the
	// attacker), so the accept queue fills for a few milliseconds now and
	// then and the kernel drops the SYNs that come then; a probe among them
	// waits Linux's 1 s SYN retransmission (prober). The agent's part is
	// held to the kubelet's default 1 s timeout; the whole probe to one
	// retransmission more, for at most a few probes.
	if len(fails) > 0 || served > time.Second {
		t.Errorf("/healthz, /readyz during the flood: worst %s past the connect, %d failures: %v", served, len(fails), fails[:min(len(fails), 5)])
	}
	if worst > time.Second+testenv.SynRetransmitWait+time.Second || (worst > time.Second && synRetried == 0) || synRetried > 3 {
		t.Errorf("/healthz, /readyz during the flood: worst %s, %d probes waited for a SYN retransmission (at most 3, one each, allowed)", worst, synRetried)
	}
	if grpcWorst > 2*time.Second {
		t.Errorf("GetSnapshot took %s during the flood", grpcWorst)
	}
	if hwm1-hwm0 > attackRSSBudgetKiB {
		t.Errorf("peak RSS grew by %d MiB during the flood (budget %d MiB)", (hwm1-hwm0)>>10, attackRSSBudgetKiB>>10)
	}
	for _, cs := range snap1.Components {
		if healthy[cs.Name] && cs.State != "running" {
			t.Errorf("%s %s during the flood: %s", cs.Kind, cs.State, cs.Detail)
		}
	}
	if snap1.GetTarget().GetFound() != true {
		t.Errorf("target lost during the flood: %s", snap1.GetTarget().GetReason())
	}
	for _, bad := range []string{"target gone", "collector failed", "too many open files"} {
		if n := len(a.LogLines(bad)); n > 0 {
			t.Errorf("the agent logged %q %d times during the flood", bad, n)
		}
	}
}

// preEncoded is a request message already in wire form: 50 attackers
// sending one 3 MB request each must not spend the test's CPU encoding it
// 50 times (under -race that starved the agent it measures).
type preEncoded []byte

// preEncodedCodec sends preEncoded as it is and decodes replies as proto.
type preEncodedCodec struct{}

func (preEncodedCodec) Marshal(v any) (mem.BufferSlice, error) {
	return mem.BufferSlice{mem.SliceBuffer(v.(preEncoded))}, nil
}
func (preEncodedCodec) Unmarshal(data mem.BufferSlice, v any) error {
	return proto.Unmarshal(data.Materialize(), v.(proto.Message))
}
func (preEncodedCodec) Name() string { return "proto" }

// The agent restarts under a watcher. A watcher resuming with a cursor
// from the old run (below the new run's sequence) gets a GAP and then the
// new run's first OPENED; `culprit findings --follow` keeps the instance id
// with its sequence and shows the same across the restart.
func TestHardeningResumeAcrossAgentRestart(t *testing.T) {
	bin := culpritBinary(t)
	s := testenv.Start(t, testenv.Options{Backlog: 4, Accept: false, SharedNetns: true})
	grpcAddr := freeAddr(t)
	args := []string{"--pid", strconv.Itoa(s.PID), "--grpc-addr", grpcAddr}
	run1 := testenv.StartAgent(t, testenv.AgentOptions{Bin: bin, Args: args})
	waitWatching(t, client(t, grpcAddr), s.Port)

	// The CLI follows from the start, through the restart.
	cli := exec.Command(bin, "findings", "--follow", "--json", "--addr", grpcAddr)
	out, err := cli.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cli.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cli.Process.Signal(os.Interrupt); cli.Wait() })
	cliEvents := make(chan *culpritv1.FindingEvent, 1024)
	go func() {
		defer close(cliEvents)
		sc := bufio.NewScanner(out)
		sc.Buffer(make([]byte, 1<<20), 4<<20)
		for sc.Scan() {
			ev := &culpritv1.FindingEvent{}
			if err := protojson.Unmarshal(sc.Bytes(), ev); err != nil {
				t.Errorf("CLI printed a line that is not an event: %v: %s", err, sc.Text())
				continue
			}
			cliEvents <- ev
		}
	}()

	s.MustDo(t, "dialasync 20")
	opened1, _ := next(t, cliEvents, 10*time.Second, isAcceptOverflow("", culpritv1.FindingEvent_TYPE_OPENED))
	inst1, cursor := opened1.GetInstanceId(), opened1.GetSequence()
	if inst1 == "" {
		t.Fatal("events carry no instance_id")
	}
	run1.Stop(t)

	run2 := testenv.StartAgent(t, testenv.AgentOptions{Bin: bin, Args: args})
	c2 := client(t, grpcAddr)
	s.MustDo(t, "dialasync 20")
	// Wait until the new run has gone past the old cursor: the case where
	// the old code replayed silently from the old number.
	deadline := time.Now().Add(20 * time.Second)
	for {
		snap, err := c2.GetSnapshot(context.Background(), &culpritv1.SnapshotRequest{})
		if err == nil && snap.Sequence > cursor {
			if snap.InstanceId == inst1 {
				t.Fatalf("the restarted agent kept instance %s", inst1)
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the new run never went past sequence %d: %v", cursor, err)
		}
		time.Sleep(100 * time.Millisecond)
	}

	// A watcher resuming with the old run's cursor.
	events, _ := watch2(t, c2, &culpritv1.WatchRequest{SinceSequence: cursor, InstanceId: inst1})
	gap, _ := next(t, events, 5*time.Second, func(*culpritv1.FindingEvent) bool { return true })
	if gap.Type != culpritv1.FindingEvent_TYPE_GAP || !strings.Contains(gap.Detail, "restarted") {
		t.Fatalf("first event for an old run's cursor: %v, want GAP saying the agent restarted", gap)
	}
	first, _ := next(t, events, 5*time.Second, func(*culpritv1.FindingEvent) bool { return true })
	if first.Type != culpritv1.FindingEvent_TYPE_OPENED || first.Sequence != 1 {
		t.Fatalf("after the GAP: %v, want the new run's OPENED #1", first)
	}

	// The CLI: a GAP from the new run, then its OPENED #1, never an event
	// of the new run skipped.
	var sawGap bool
	for !sawGap {
		ev, _ := next(t, cliEvents, 20*time.Second, func(ev *culpritv1.FindingEvent) bool { return ev.InstanceId != inst1 })
		if ev.Type != culpritv1.FindingEvent_TYPE_GAP {
			t.Fatalf("CLI: first event of the new run %v, want GAP", ev)
		}
		sawGap = true
	}
	ev, skipped := next(t, cliEvents, 10*time.Second, func(ev *culpritv1.FindingEvent) bool { return ev.Type == culpritv1.FindingEvent_TYPE_OPENED })
	if ev.Sequence != 1 || len(skipped) > 0 {
		t.Fatalf("CLI after the GAP: OPENED #%d after %d other events, want the new run's OPENED #1 first", ev.Sequence, len(skipped))
	}
	_ = run2
}

// watch2 is watch with a full request.
func watch2(t *testing.T, c culpritv1.DiagnosticsClient, req *culpritv1.WatchRequest) (<-chan *culpritv1.FindingEvent, context.CancelFunc) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	stream, err := c.WatchFindings(ctx, req)
	if err != nil {
		cancel()
		t.Fatalf("WatchFindings: %v", err)
	}
	ch := make(chan *culpritv1.FindingEvent, 256)
	go func() {
		defer close(ch)
		for {
			ev, err := stream.Recv()
			if err != nil {
				return
			}
			ch <- ev
		}
	}()
	t.Cleanup(cancel)
	return ch, cancel
}

// TLS without client authentication is not protection: the agent refuses
// to put such an API beyond loopback, naming agent.grpc_addr. With
// allow_non_local it starts and serves findings, but GetSnapshot and
// CaptureProfile stay refused without a token or mTLS. An exposed metrics
// port without allow_non_local is refused naming agent.http_addr.
func TestHardeningTLSWithoutClientAuthIsNotProtection(t *testing.T) {
	bin := culpritBinary(t)
	sleeper := startNamed(t, fmt.Sprintf("culprit-hardening-%d", os.Getpid()))
	pid := strconv.Itoa(sleeper.Process.Pid)
	ca, crt, key := serverPKI(t)
	port := strings.TrimPrefix(freeAddr(t), "127.0.0.1:")
	tlsArgs := []string{"--pid", pid, "--grpc-addr", "0.0.0.0:" + port, "--set", "agent.tls_cert_file=" + crt, "--set", "agent.tls_key_file=" + key}

	refused := func(args ...string) string {
		t.Helper()
		cmd := exec.Command(bin, append([]string{"agent"}, args...)...)
		done := make(chan struct{})
		var out []byte
		var err error
		go func() { out, err = cmd.CombinedOutput(); close(done) }()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			cmd.Process.Kill()
			t.Fatalf("agent %v started; want it refused", args)
		}
		if err == nil {
			t.Fatalf("agent %v exited 0; want it refused", args)
		}
		return string(out)
	}
	msg := refused(append(tlsArgs, "--http-addr", freeAddr(t))...)
	if !strings.Contains(msg, "agent.grpc_addr") || !strings.Contains(msg, "TLS alone") {
		t.Errorf("TLS-only API on 0.0.0.0: the error does not name agent.grpc_addr or say TLS alone is not enough:\n%s", msg)
	}
	msg = refused("--pid", pid, "--http-addr", "0.0.0.0:"+strings.TrimPrefix(freeAddr(t), "127.0.0.1:"), "--grpc-addr", freeAddr(t),
		"--set", "agent.token_file="+writeToken(t))
	if !strings.Contains(msg, "agent.http_addr") {
		t.Errorf("metrics on 0.0.0.0 without allow_non_local: the error does not name agent.http_addr:\n%s", msg)
	}

	a := testenv.StartAgent(t, testenv.AgentOptions{Bin: bin, Args: append(tlsArgs, "--set", "agent.allow_non_local=true")})
	if len(a.LogLines("GetSnapshot and CaptureProfile are refused")) != 1 {
		t.Errorf("the agent does not warn once that snapshots and profiles are refused:\n%s", a.Log())
	}
	c := secureClient(t, "127.0.0.1:"+port, exporters.ClientSecurity{CAFile: ca, ServerName: "127.0.0.1"})
	if _, err := c.ListFindings(context.Background(), &culpritv1.ListRequest{}); err != nil {
		t.Errorf("ListFindings (allow_non_local): %v", err)
	}
	_, err := c.GetSnapshot(context.Background(), &culpritv1.SnapshotRequest{})
	if status.Code(err) != codes.PermissionDenied || !strings.Contains(err.Error(), "agent.grpc_addr") {
		t.Errorf("GetSnapshot over TLS without authentication: %v, want PermissionDenied naming agent.grpc_addr", err)
	}
	if _, err := c.CaptureProfile(context.Background(), &culpritv1.CaptureProfileRequest{Lookback: durationpb.New(time.Second)}); status.Code(err) != codes.PermissionDenied {
		t.Errorf("CaptureProfile over TLS without authentication: %v, want PermissionDenied", err)
	}
}

// serverPKI writes a CA and a server certificate for 127.0.0.1, PEM.
func serverPKI(t *testing.T) (ca, crt, key string) {
	t.Helper()
	dir := t.TempDir()
	write := func(name, typ string, der []byte) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	caTmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "culprit test CA"}, NotBefore: time.Now().Add(-time.Hour),
		NotAfter: time.Now().Add(time.Hour), IsCA: true, KeyUsage: x509.KeyUsageCertSign, BasicConstraintsValid: true}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	caCert, _ := x509.ParseCertificate(caDER)
	k, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(2), Subject: pkix.Name{CommonName: "agent"}, NotBefore: time.Now().Add(-time.Hour),
		NotAfter: time.Now().Add(time.Hour), ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}, IPAddresses: []net.IP{net.IPv4(127, 0, 0, 1)}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, caCert, &k.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	kder, _ := x509.MarshalECPrivateKey(k)
	return write("ca.crt", "CERTIFICATE", caDER), write("agent.crt", "CERTIFICATE", der), write("agent.key", "EC PRIVATE KEY", kder)
}

// When the target cannot be found or read, the agent says why, once in
// its log, in GetSnapshot and on /readyz: missing CAP_SYS_PTRACE (an
// unprivileged agent cannot read root's /proc/PID/fd), another PID
// namespace, or no such process.
func TestHardeningTargetUnreadableSaysWhy(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to run the agent as another user and in another PID namespace")
	}
	s := testenv.Start(t, testenv.Options{Backlog: 4, Accept: true, SharedNetns: true})
	// nobody must be able to run the binary: a copy in a world-readable
	// directory (test temp directories are 0700).
	dir := t.TempDir()
	for _, d := range []string{filepath.Dir(dir), dir} {
		if err := os.Chmod(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	bin := filepath.Join(dir, "culprit")
	src, err := os.ReadFile(culpritBinary(t))
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(bin, src, 0o755); err != nil {
		t.Fatal(err)
	}
	port := strconv.Itoa(s.Port)
	cases := []struct {
		name string
		wrap []string
		cred *syscall.Credential
		args []string
		want string
	}{
		{"another user, no CAP_SYS_PTRACE", nil, &syscall.Credential{Uid: 65534, Gid: 65534}, []string{"--port", port}, "missing CAP_SYS_PTRACE"},
		{"another PID namespace", []string{"unshare", "--pid", "--fork", "--mount-proc", "--kill-child=SIGTERM"}, nil, []string{"--port", port}, "another PID namespace"},
		{"no such process", nil, nil, []string{"--pid", "4000000"}, "no such process"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			a := testenv.StartAgent(t, testenv.AgentOptions{Bin: bin, Args: tc.args, Wrap: tc.wrap, Cred: tc.cred})
			c := client(t, a.GRPCAddr)
			deadline := time.Now().Add(10 * time.Second)
			var reason string
			for reason == "" {
				snap, err := c.GetSnapshot(context.Background(), &culpritv1.SnapshotRequest{})
				if err != nil {
					t.Fatal(err)
				}
				if snap.Target.GetFound() {
					t.Fatalf("target found (pid %d): want it unreadable", snap.Target.Pid)
				}
				reason = snap.Target.GetReason()
				if time.Now().After(deadline) {
					t.Fatal("GetSnapshot never gave a reason")
				}
				time.Sleep(100 * time.Millisecond)
			}
			if !strings.Contains(reason, tc.want) {
				t.Errorf("GetSnapshot reason %q, want it to say %q", reason, tc.want)
			}
			resp, err := http.Get("http://" + a.HTTPAddr + "/readyz")
			if err != nil {
				t.Fatal(err)
			}
			body, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode != http.StatusServiceUnavailable || !strings.Contains(string(body), tc.want) {
				t.Errorf("/readyz: %s %q, want 503 saying %q", resp.Status, body, tc.want)
			}
			time.Sleep(1500 * time.Millisecond) // three more refind intervals
			if n := len(a.LogLines("target cannot be watched")); n != 1 {
				t.Errorf("the reason was logged %d times, want once:\n%s", n, a.Log())
			}
			t.Logf("%s: %s", tc.name, reason)
		})
	}
}

// Who may listen beyond loopback: an authenticated gRPC API (a token or
// mTLS); TLS alone is not authentication. allow_non_local opens any
// address. Each refusal names its listener.
func TestCheckLocalWantsAuthenticationNotTLS(t *testing.T) {
	for _, tc := range []struct {
		name string
		set  func(*Config)
		want string // "" when it must start
	}{
		{"TLS only", func(c *Config) { c.Agent.TLSCertFile, c.Agent.TLSKeyFile = "/tls/tls.crt", "/tls/tls.key" }, "agent.grpc_addr"},
		{"token", func(c *Config) { c.Agent.TokenFile = "/run/secrets/token" }, ""},
		{"mTLS", func(c *Config) {
			c.Agent.TLSCertFile, c.Agent.TLSKeyFile, c.Agent.TLSClientCAFile = "/tls/tls.crt", "/tls/tls.key", "/tls/ca.crt"
		}, ""},
		{"nothing, allow_non_local", func(c *Config) { c.Agent.AllowNonLocal = true }, ""},
		{"token, metrics on 0.0.0.0", func(c *Config) { c.Agent.TokenFile = "/t"; c.Agent.HTTPAddr = "0.0.0.0:9461" }, "agent.http_addr"},
		{"empty host listens everywhere", func(c *Config) { c.Agent.GRPCAddr = ":9462" }, "agent.grpc_addr"},
		{"not host:port", func(c *Config) { c.Agent.GRPCAddr = "9462"; c.Agent.AllowNonLocal = true }, "agent.grpc_addr"},
	} {
		cfg := DefaultConfig()
		cfg.Agent.GRPCAddr = "0.0.0.0:9462"
		tc.set(&cfg)
		err := checkLocal(cfg)
		switch {
		case tc.want == "" && err != nil:
			t.Errorf("%s: refused: %v", tc.name, err)
		case tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want)):
			t.Errorf("%s: %v, want an error naming %s", tc.name, err, tc.want)
		}
	}
	// allow_non_local lets an unauthenticated API out, but marks it
	// exposed: the gate then refuses snapshots and profiles.
	cfg := DefaultConfig()
	cfg.Agent.GRPCAddr, cfg.Agent.AllowNonLocal = "0.0.0.0:9462", true
	if sec := security(cfg); !sec.Exposed || sec.Protected() {
		t.Errorf("0.0.0.0 without a token: exposed %v, protected %v; want exposed and unprotected", sec.Exposed, sec.Protected())
	}
	if sec := security(DefaultConfig()); sec.Exposed {
		t.Error("the default loopback address counts as exposed")
	}
}

// The listeners' caps leave the agent its reserve of descriptors, at any
// limit: 20,000 (the pod of the report) keeps the caps, a small limit
// scales them down.
func TestPlanFDsLeavesAReserve(t *testing.T) {
	for _, limit := range []int{1 << 20, 20000, 4096, 1024, 600, 300} {
		p := planFDs(limit, 64, 256, 2*DefaultConfig().Traces.MaxConnections)
		used := p.GRPC + p.HTTP + p.OTLP + 2*exporters.ConnCloseQueue
		t.Logf("RLIMIT_NOFILE %d: reserve %d, gRPC %d, HTTP %d, OTLP %d (scaled %v)", limit, p.Reserve, p.GRPC, p.HTTP, p.OTLP, p.Scaled)
		if p.Reserve < minFDReserve || p.Reserve < limit/4 {
			t.Errorf("limit %d: reserve %d, want at least max(%d, limit/4)", limit, p.Reserve, minFDReserve)
		}
		if used+p.Reserve > limit && p.GRPC > 4 {
			t.Errorf("limit %d: listeners may hold %d + reserve %d", limit, used, p.Reserve)
		}
		if limit >= 4096 && (p.Scaled || p.GRPC != 64 || p.HTTP != 256) {
			t.Errorf("limit %d: caps scaled to %d/%d without need", limit, p.GRPC, p.HTTP)
		}
	}
}
