package collectors

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"maps"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"golang.org/x/sys/unix"

	"github.com/culprit-dev/culprit/internal/testenv"
	"github.com/culprit-dev/culprit/probes"
	"github.com/culprit-dev/culprit/signals"
	"github.com/culprit-dev/culprit/sockdiag"
	"github.com/culprit-dev/culprit/workload"
)

func key(addr string, port uint16) listenerKey {
	return listenerKey{netip.MustParseAddr(addr), port}
}

func TestAttribute(t *testing.T) {
	a, b, c := key("0.0.0.0", 80), key("0.0.0.0", 8080), key("127.0.0.1", 9000)
	for _, tc := range []struct {
		name             string
		delta            uint64
		cands            []candidate
		want             []uint64
		wantUnattributed uint64
	}{
		{name: "nothing to share", delta: 0,
			cands: []candidate{{Key: a, Score: 1}}, want: []uint64{0}},
		{name: "one full listener gets all", delta: 7,
			cands: []candidate{{Key: a, Score: 1, Ratio: 1.5}, {Key: b, Ratio: 0.2}},
			want:  []uint64{7, 0}},
		{name: "two scored listeners split by score", delta: 10,
			cands: []candidate{{Key: a, Score: 1}, {Key: b, Score: 4}, {Key: c}},
			want:  []uint64{2, 8, 0}},
		{name: "remainder to the top scorer", delta: 10,
			cands: []candidate{{Key: a, Score: 1}, {Key: b, Score: 1}, {Key: c, Score: 2}},
			want:  []uint64{2, 2, 6}},
		{name: "ties go to the first", delta: 3,
			cands: []candidate{{Key: a, Score: 1}, {Key: b, Score: 1}},
			want:  []uint64{2, 1}},
		{name: "nobody scored: fullest queue", delta: 5,
			cands: []candidate{{Key: a, Ratio: 0.5}, {Key: b, Ratio: 0.9}, {Key: c}},
			want:  []uint64{0, 5, 0}},
		{name: "no queue held anything: most arrivals", delta: 6,
			cands: []candidate{{Key: a, Arrivals: 2}, {Key: b, Arrivals: 40}, {Key: c}},
			want:  []uint64{0, 6, 0}},
		{name: "a held queue beats arrivals", delta: 6,
			cands: []candidate{{Key: a, Ratio: 0.1}, {Key: b, Arrivals: 40}},
			want:  []uint64{6, 0}},
		{name: "no candidates: unattributed", delta: 4,
			cands: []candidate{{Key: a}, {Key: b}},
			want:  []uint64{0, 0}, wantUnattributed: 4},
		{name: "no listeners at all", delta: 4, want: []uint64{}, wantUnattributed: 4},
		{name: "large counts stay exact", delta: 1<<40 + 1,
			cands: []candidate{{Key: a, Score: 3}, {Key: b, Score: 3}, {Key: c, Score: 3}},
			want:  []uint64{366503875927, 366503875925, 366503875925}}, // floor(delta/3) each, the 2 left over to the first top scorer
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, un := attribute(tc.delta, tc.cands)
			if diff := cmp.Diff(tc.want, got); diff != "" {
				t.Errorf("shares (-want +got):\n%s", diff)
			}
			if un != tc.wantUnattributed {
				t.Errorf("unattributed = %d, want %d", un, tc.wantUnattributed)
			}
			var sum uint64
			for _, s := range got {
				sum += s
			}
			if sum+un != tc.delta {
				t.Errorf("shares+unattributed = %d, want delta %d", sum+un, tc.delta)
			}
		})
	}
}

func TestCounterDelta(t *testing.T) {
	for _, tc := range []struct{ prev, cur, want uint64 }{
		{10, 15, 5},
		{10, 10, 0},
		{10, 3, 3}, // reset: counting restarted from zero
	} {
		if got := counterDelta(tc.prev, tc.cur); got != tc.want {
			t.Errorf("counterDelta(%d, %d) = %d, want %d", tc.prev, tc.cur, got, tc.want)
		}
	}
}

func TestParseListenCounters(t *testing.T) {
	var buf []byte
	fixture, err := readProcFile(&buf, "testdata/proc/7275/net/netstat")
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name             string
		in               string
		overflows, drops uint64
		wantErr          bool
	}{
		{name: "fixture", in: string(fixture), overflows: 32, drops: 32},
		{name: "minimal", in: "TcpExt: A ListenDrops ListenOverflows\nTcpExt: 1 20 18446744073709551615\n",
			overflows: 18446744073709551615, drops: 20},
		{name: "after IpExt", in: "IpExt: X\nIpExt: 1\nTcpExt: ListenOverflows ListenDrops\nTcpExt: 3 4\n", overflows: 3, drops: 4},
		{name: "no value line", in: "TcpExt: ListenOverflows ListenDrops\n", wantErr: true},
		{name: "field missing", in: "TcpExt: ListenOverflows\nTcpExt: 3\n", wantErr: true},
		{name: "short value line", in: "TcpExt: A ListenOverflows ListenDrops\nTcpExt: 1 2\n", wantErr: true},
		{name: "bad number", in: "TcpExt: ListenOverflows ListenDrops\nTcpExt: 3 -4\n", wantErr: true},
		{name: "overflowing number", in: "TcpExt: ListenOverflows ListenDrops\nTcpExt: 18446744073709551616 1\n", wantErr: true},
		{name: "empty", in: "", wantErr: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			o, d, err := parseListenCounters([]byte(tc.in))
			if (err != nil) != tc.wantErr {
				t.Fatalf("err = %v, want error %v", err, tc.wantErr)
			}
			if o != tc.overflows || d != tc.drops {
				t.Errorf("got (%d, %d), want (%d, %d)", o, d, tc.overflows, tc.drops)
			}
		})
	}
	if n := testing.AllocsPerRun(100, func() { parseListenCounters(fixture) }); n != 0 {
		t.Errorf("parseListenCounters allocates %v times per call, want 0", n)
	}
}

// diagMsg builds the fixed part of an inet_diag_msg as the kernel sends it.
func diagMsg(family, state uint8, addr netip.Addr, port uint16, rq, wq, inode uint32) []byte {
	b := make([]byte, inetDiagMsgLen+8) // trailing attributes are ignored
	b[0], b[1] = family, state
	binary.BigEndian.PutUint16(b[4:6], port)
	binary.BigEndian.PutUint16(b[6:8], 40000)
	a := addr.AsSlice()
	copy(b[8:24], a)
	binary.NativeEndian.PutUint32(b[56:60], rq)
	binary.NativeEndian.PutUint32(b[60:64], wq)
	binary.NativeEndian.PutUint32(b[64:68], 0) // uid
	binary.NativeEndian.PutUint32(b[68:72], inode)
	return b
}

func TestParseInetDiagMsg(t *testing.T) {
	for _, tc := range []struct {
		name    string
		in      []byte
		want    diagSocket
		wantErr bool
	}{
		{name: "v4 listener",
			in:   diagMsg(unix.AF_INET, tcpListen, netip.MustParseAddr("127.0.0.1"), 8080, 3, 2, 4242),
			want: diagSocket{Family: unix.AF_INET, State: tcpListen, Addr: netip.MustParseAddr("127.0.0.1"), Port: 8080, RQueue: 3, WQueue: 2, Inode: 4242, Remote: netip.IPv4Unspecified()}},
		{name: "v6 syn_recv",
			in:   diagMsg(unix.AF_INET6, tcpSynRecv, netip.MustParseAddr("2001:db8::1"), 443, 0, 0, 0),
			want: diagSocket{Family: unix.AF_INET6, State: tcpSynRecv, Addr: netip.MustParseAddr("2001:db8::1"), Port: 443, Remote: netip.IPv6Unspecified()}},
		{name: "short", in: make([]byte, 40), wantErr: true},
		{name: "unknown family", in: diagMsg(unix.AF_UNIX, tcpListen, netip.MustParseAddr("127.0.0.1"), 1, 0, 0, 0), wantErr: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := parseInetDiagMsg(tc.in)
			if (err != nil) != tc.wantErr {
				t.Fatalf("err = %v, want error %v", err, tc.wantErr)
			}
			if diff := cmp.Diff(tc.want, got, cmp.Comparer(func(a, b netip.Addr) bool { return a == b })); diff != "" {
				t.Errorf("(-want +got):\n%s", diff)
			}
		})
	}
}

func TestSummarizeListeners(t *testing.T) {
	v4 := func(s string) netip.Addr { return netip.MustParseAddr(s) }
	socks := []diagSocket{
		// The target's listener on 8080, full: 3 queued over a backlog of 2.
		{Family: unix.AF_INET, State: tcpListen, Addr: v4("127.0.0.1"), Port: 8080, RQueue: 3, WQueue: 2, Inode: 1},
		// An SO_REUSEPORT pair on 0.0.0.0:80, one member full.
		{Family: unix.AF_INET, State: tcpListen, Addr: v4("0.0.0.0"), Port: 80, RQueue: 0, WQueue: 4, Inode: 2},
		{Family: unix.AF_INET, State: tcpListen, Addr: v4("0.0.0.0"), Port: 80, RQueue: 5, WQueue: 4, Inode: 3},
		// A dual-stack listener on [::]:443, not the target's.
		{Family: unix.AF_INET6, State: tcpListen, Addr: v4("::"), Port: 443, RQueue: 1, WQueue: 128, Inode: 4},
		{Family: unix.AF_INET, State: tcpSynRecv, Addr: v4("127.0.0.1"), Port: 8080, Remote: v4("127.0.0.1")},
		{Family: unix.AF_INET, State: tcpSynRecv, Addr: v4("10.0.0.1"), Port: 80, Remote: v4("192.0.2.7")},
		{Family: unix.AF_INET, State: tcpSynRecv, Addr: v4("10.0.0.1"), Port: 443, Remote: v4("192.0.2.7")}, // v4 to a [::] listener
		{Family: unix.AF_INET6, State: tcpSynRecv, Addr: v4("::ffff:10.0.0.1"), Port: 443, Remote: v4("::ffff:192.0.2.8")},
		{Family: unix.AF_INET, State: tcpSynRecv, Addr: v4("10.0.0.1"), Port: 9999}, // no listener (closed)
	}
	got := summarizeListeners(socks, map[uint32]bool{1: true, 3: true})
	want := map[listenerKey]listenerSample{
		key("127.0.0.1", 8080): {Queue: 3, Backlog: 2, Full: true, SynRecv: 1, SynRecvSources: 1, Owned: true},
		key("0.0.0.0", 80):     {Queue: 5, Backlog: 8, Full: true, SynRecv: 1, SynRecvSources: 1, Owned: true},
		key("::", 443):         {Queue: 1, Backlog: 128, SynRecv: 2, SynRecvSources: 2},
	}
	if diff := cmp.Diff(want, got, cmp.Comparer(func(a, b netip.Addr) bool { return a == b })); diff != "" {
		t.Errorf("(-want +got):\n%s", diff)
	}
}

// TestAcceptQueueForget checks that a listener that closed loses its
// series, and only its series.
func TestAcceptQueueForget(t *testing.T) {
	c, err := newAcceptQueueCollector(Options{})
	if err != nil {
		t.Fatal(err)
	}
	store := signals.New(4, 100)
	now := time.Now()
	a, b := key("127.0.0.1", 1000), key("127.0.0.1", 2000)
	gone := c.write(store, now, map[listenerKey]listenerSample{a: {Owned: true}, b: {Owned: true}})
	c.forget(store, gone)
	gone = c.write(store, now.Add(time.Second), map[listenerKey]listenerSample{a: {Owned: true}, b: {Owned: false}})
	c.forget(store, gone)
	for _, name := range []*signals.Desc{signals.ListenQueueLength, signals.ListenBacklog, signals.ListenQueueFull, signals.ListenSynRecv, signals.ListenOverflowsTotal} {
		if got := store.Select(name); len(got) != 1 || got[0].Get("port") != "1000" {
			t.Errorf("%s series after port 2000 went away: %v", name, got)
		}
	}
}

// TestAcceptQueueLateEvidence drives the collector's accounting with
// fixture samples 100 ms apart, as the fast loop takes them, and a store
// into which the tcplisten probe's per-port counts are published when the
// probe would poll: drops read at one sample whose evidence comes later
// wait for it (up to attributionGrace), are written at the sample that
// attributes them (never before), and are unattributed only after the
// grace; a neighbour's listener without evidence is never blamed.
func TestAcceptQueueLateEvidence(t *testing.T) {
	target, neighbour, opened := key("127.0.0.1", 8080), key("127.0.0.1", 9000), key("127.0.0.1", 7000)
	const step = 100 * time.Millisecond
	t0 := time.Unix(1700000000, 0)
	at := func(i int) time.Time { return t0.Add(time.Duration(i) * step) }
	// publish is the probe's poll after sample i: a count of port's.
	type publish struct {
		after  int // published 30 ms after sample after
		d      *signals.Desc
		port   uint16
		v      float64
		before bool // published 30 ms before the sample instead
	}
	type sample struct {
		overflows uint64
		full      []listenerKey // queues seen full at this sample
		extra     []listenerKey // owned listeners that exist only from this sample on
	}
	// drops: 20 at sample 1, read with no evidence anywhere.
	herd := []sample{{overflows: 100}, {overflows: 120}, {overflows: 120}, {overflows: 120}, {overflows: 120}, {overflows: 120}, {overflows: 120}, {overflows: 120}}
	withFull := func(ss []sample, i int, k listenerKey) []sample {
		out := append([]sample(nil), ss...)
		out[i].full = []listenerKey{k}
		return out
	}
	withExtra := func(ss []sample, from int, k listenerKey) []sample {
		out := append([]sample(nil), ss...)
		for i := from; i < len(out); i++ {
			out[i].extra = []listenerKey{k}
		}
		return out
	}
	for _, tc := range []struct {
		name     string
		samples  []sample
		probe    []publish
		want     float64 // the target's listen_overflows_total at the end
		wantAt   int     // the sample at which it first rose (-1: never)
		wantUn   float64 // listen_overflows_unattributed_total at the end
		wantUnAt int     // the sample at which it first rose (-1: never)
	}{
		{name: "handshakes published after the read: the target's one sample later",
			samples: herd,
			probe:   []publish{{after: 0, d: signals.TCPListenHandshakesTotal, port: 8080, v: 0}, {after: 1, d: signals.TCPListenHandshakesTotal, port: 8080, v: 5}},
			want:    20, wantAt: 2, wantUnAt: -1},
		{name: "handshakes published two samples later",
			samples: herd,
			probe:   []publish{{after: 0, d: signals.TCPListenHandshakesTotal, port: 8080, v: 0}, {after: 2, d: signals.TCPListenHandshakesTotal, port: 8080, v: 5}},
			want:    20, wantAt: 3, wantUnAt: -1},
		{name: "queue seen full at the next sample",
			samples: withFull(herd, 2, target),
			want:    20, wantAt: 2, wantUnAt: -1},
		{name: "no evidence within the grace: unattributed after it, the neighbour not blamed",
			samples: herd,
			wantAt:  -1, wantUn: 20, wantUnAt: 6},
		{name: "evidence after the grace comes too late",
			samples: herd,
			probe:   []publish{{after: 0, d: signals.TCPListenHandshakesTotal, port: 8080, v: 0}, {after: 6, d: signals.TCPListenHandshakesTotal, port: 8080, v: 5}},
			wantAt:  -1, wantUn: 20, wantUnAt: 6},
		{name: "handshakes published before the interval are not its evidence",
			samples: herd,
			probe:   []publish{{after: 0, d: signals.TCPListenHandshakesTotal, port: 8080, v: 5, before: true}},
			wantAt:  -1, wantUn: 20, wantUnAt: 6},
		{name: "the neighbour's handshakes published late: the neighbour's, not the target's",
			samples: herd,
			probe:   []publish{{after: 0, d: signals.TCPListenHandshakesTotal, port: 9000, v: 0}, {after: 1, d: signals.TCPListenHandshakesTotal, port: 9000, v: 5}},
			wantAt:  -1, wantUnAt: -1},
		{name: "a queue full after the next sample says nothing of the drops",
			samples: withFull(herd, 3, target),
			wantAt:  -1, wantUn: 20, wantUnAt: 6},
		{name: "a listener opened after the drops is not blamed",
			samples: withExtra(withFull(herd, 2, opened), 2, opened),
			probe:   []publish{{after: 0, d: signals.TCPListenHandshakesTotal, port: 7000, v: 0}, {after: 1, d: signals.TCPListenHandshakesTotal, port: 7000, v: 5}},
			wantAt:  -1, wantUn: 20, wantUnAt: 6},
		{name: "the probe's own drop counts published late score",
			samples: herd,
			probe: []publish{{after: 0, d: signals.TCPListenHandshakesTotal, port: 9000, v: 0}, {after: 1, d: signals.TCPListenHandshakesTotal, port: 9000, v: 40},
				{after: 0, d: signals.TCPListenOverflowDropsTotal, port: 8080, v: 0}, {after: 1, d: signals.TCPListenOverflowDropsTotal, port: 8080, v: 20}},
			want: 20, wantAt: 2, wantUnAt: -1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c, err := newAcceptQueueCollector(Options{})
			if err != nil {
				t.Fatal(err)
			}
			store := signals.New(64, 100)
			for i, smp := range tc.samples {
				now := at(i)
				for _, p := range tc.probe {
					if p.after == i && p.before {
						store.Put(p.d, signals.L("port", strconv.Itoa(int(p.port))), p.v, now.Add(-30*time.Millisecond))
					}
				}
				cur := map[listenerKey]listenerSample{target: {Backlog: 4, Owned: true}, neighbour: {Backlog: 128}}
				for _, k := range smp.extra {
					cur[k] = listenerSample{Backlog: 4, Owned: true}
				}
				for _, k := range smp.full {
					l := cur[k]
					l.Queue, l.Full = l.Backlog+1, true
					cur[k] = l
				}
				c.record(store, cur, smp.overflows, 0, now)
				for _, p := range tc.probe {
					if p.after == i && !p.before {
						store.Put(p.d, signals.L("port", strconv.Itoa(int(p.port))), p.v, now.Add(30*time.Millisecond))
					}
				}
			}
			rose := func(d *signals.Desc, ls signals.Labels) (float64, int) {
				first, last := -1, 0.0
				for _, s := range store.Range(d, ls, time.Time{}) {
					if s.V > 0 && first < 0 {
						first = int(s.T.Sub(t0) / step)
					}
					last = s.V
				}
				return last, first
			}
			got, gotAt := rose(signals.ListenOverflowsTotal, target.labels())
			if got != tc.want || gotAt != tc.wantAt {
				t.Errorf("listen_overflows_total = %v, first risen at sample %d; want %v at %d", got, gotAt, tc.want, tc.wantAt)
			}
			un, unAt := rose(signals.ListenOverflowsUnattributedTotal, nil)
			if un != tc.wantUn || unAt != tc.wantUnAt {
				t.Errorf("listen_overflows_unattributed_total = %v, first risen at sample %d; want %v at %d", un, unAt, tc.wantUn, tc.wantUnAt)
			}
			if len(c.pending) != 0 {
				t.Errorf("%d samples' drops still pending after the grace: %+v", len(c.pending), c.pending)
			}
		})
	}
}

// TestAcceptQueuePendingBounded: drops read every sample with no evidence
// ever wait in bounded room, and every one of them is counted once.
func TestAcceptQueuePendingBounded(t *testing.T) {
	c, err := newAcceptQueueCollector(Options{})
	if err != nil {
		t.Fatal(err)
	}
	store := signals.New(256, 100)
	t0 := time.Unix(1700000000, 0)
	cur := map[listenerKey]listenerSample{key("127.0.0.1", 8080): {Backlog: 4, Owned: true}}
	// Samples 10 ms apart (a grace of 50 of them), 3 drops each.
	const n = 100
	for i := 0; i <= n; i++ {
		c.record(store, maps.Clone(cur), uint64(3*i), 0, t0.Add(time.Duration(i)*10*time.Millisecond))
		if len(c.pending) > maxPending {
			t.Fatalf("sample %d: %d samples' drops pending, bound %d", i, len(c.pending), maxPending)
		}
		var waiting uint64
		for _, p := range c.pending {
			waiting += p.n
		}
		if got := c.unattributed + waiting; got != uint64(3*i) {
			t.Fatalf("sample %d: unattributed %d + pending %d = %d, want the %d read", i, c.unattributed, waiting, got, 3*i)
		}
	}
}

// kernelListenOverflows reads ListenOverflows of pid's namespace the plain
// way, independently of the collector's parser.
func kernelListenOverflows(t *testing.T, pid int) uint64 {
	t.Helper()
	n := readNetSNMP(t, filepath.Join("/proc", strconv.Itoa(pid), "net", "netstat"))
	v, ok := n["TcpExt.ListenOverflows"]
	if !ok {
		t.Fatal("no TcpExt ListenOverflows")
	}
	return uint64(v)
}

type aqHarness struct {
	t     *testing.T
	c     *acceptQueueCollector
	store *signals.Store
	tgt   workload.Process
	port  signals.Labels
}

func newAQHarness(t *testing.T, s *testenv.Server) *aqHarness {
	t.Helper()
	c, err := newAcceptQueueCollector(Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return &aqHarness{t: t, c: c, store: signals.New(256, 1000), tgt: resolve(t, s.PID),
		port: signals.L("addr", "127.0.0.1", "port", strconv.Itoa(s.Port))}
}

func (h *aqHarness) collect() {
	h.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	if err := h.c.Collect(ctx, h.tgt, h.store); err != nil {
		h.t.Fatalf("Collect: %v", err)
	}
}

func (h *aqHarness) get(d *signals.Desc, ls signals.Labels) float64 {
	h.t.Helper()
	s, ok := h.store.Latest(d, ls)
	if !ok {
		h.t.Fatalf("%s%s not written", d, ls)
	}
	return s.V
}

// poll collects every 100 ms, as the agent's fast loop does, until cond
// holds or 5 s pass.
func (h *aqHarness) poll(what string, cond func() bool) {
	h.t.Helper()
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(100 * time.Millisecond) {
		h.collect()
		if cond() {
			return
		}
		if time.Now().After(deadline) {
			h.t.Fatalf("after 5 s: %s never happened; queue %v backlog %v full %v", what,
				h.get(signals.ListenQueueLength, h.port), h.get(signals.ListenBacklog, h.port), h.get(signals.ListenQueueFull, h.port))
		}
	}
}

// collectQuiet collects at a moment the kernel counter does not move, so
// that the collector's reading equals the one the test takes around it.
func (h *aqHarness) collectQuiet(pid int) uint64 {
	h.t.Helper()
	for i := 0; i < 50; i++ {
		before := kernelListenOverflows(h.t, pid)
		h.collect()
		if after := kernelListenOverflows(h.t, pid); after == before {
			return after
		}
		time.Sleep(20 * time.Millisecond)
	}
	h.t.Fatal("ListenOverflows never held still across one Collect")
	return 0
}

// TestAcceptQueueOverflow fills a real listener's accept queue (backlog 2,
// accept loop paused) in a private network namespace, where it is the only
// listener, so every ListenOverflows increment is its own.
func TestAcceptQueueOverflow(t *testing.T) {
	s := testenv.Start(t, testenv.Options{Backlog: 2, Accept: false})
	h := newAQHarness(t, s)

	k0 := kernelListenOverflows(t, s.PID)
	h.collect() // baseline: nothing dials yet, so it reads k0 too
	if got := h.get(signals.TCPExtListenOverflowsSampledTotal, nil); uint64(got) != k0 {
		t.Fatalf("sampled ListenOverflows %v, kernel %d", got, k0)
	}

	s.MustDo(t, "dialasync 20")
	h.poll("queue full at backlog+1 and overflows counted", func() bool {
		return h.get(signals.ListenQueueFull, h.port) == 1 && h.get(signals.ListenQueueLength, h.port) == 3 &&
			kernelListenOverflows(t, s.PID) > k0
	})
	if got := h.get(signals.ListenBacklog, h.port); got != 2 {
		t.Errorf("listen_backlog = %v, want 2", got)
	}
	t.Logf("listen_syn_recv = %v", h.get(signals.ListenSynRecv, h.port))

	k1 := h.collectQuiet(s.PID)
	t.Logf("kernel ListenOverflows grew by %d while the queue was full", k1-k0)
	if got, want := h.get(signals.ListenOverflowsTotal, h.port), float64(k1-k0); got != want {
		t.Errorf("listen_overflows_total = %v, kernel ListenOverflows grew by %v", got, want)
	}
	if got := h.get(signals.ListenOverflowsUnattributedTotal, nil); got != 0 {
		t.Errorf("listen_overflows_unattributed_total = %v, want 0", got)
	}
	if got := h.get(signals.TCPExtListenOverflowsSampledTotal, nil); uint64(got) != k1 {
		t.Errorf("tcp_ext_listen_overflows_sampled_total = %v, kernel %d", got, k1)
	}

	// Reopening the accept loop drains the queue.
	s.MustDo(t, "accept on")
	h.poll("queue drained", func() bool {
		return h.get(signals.ListenQueueLength, h.port) == 0 && h.get(signals.ListenQueueFull, h.port) == 0
	})
	// Every overflow is accounted for, blamed or not.
	k2 := h.collectQuiet(s.PID)
	blamed := h.get(signals.ListenOverflowsTotal, h.port) + h.get(signals.ListenOverflowsUnattributedTotal, nil)
	if blamed != float64(k2-k0) {
		t.Errorf("attributed+unattributed = %v, kernel ListenOverflows grew by %d", blamed, k2-k0)
	}
}

// TestAcceptQueueHealthy: a server that accepts promptly with a roomy
// backlog overflows nothing, and the collector must not say otherwise.
func TestAcceptQueueHealthy(t *testing.T) {
	s := testenv.Start(t, testenv.Options{Backlog: 128, Accept: true})
	h := newAQHarness(t, s)
	k0 := kernelListenOverflows(t, s.PID)
	h.collect()
	if ans := s.MustDo(t, "burst 50"); ans != "ok 50 established" {
		t.Fatalf("burst: %s", ans)
	}
	for i := 0; i < 5; i++ {
		h.collect()
		time.Sleep(100 * time.Millisecond)
	}
	if got := h.get(signals.ListenOverflowsTotal, h.port); got != 0 {
		t.Errorf("listen_overflows_total = %v, want 0", got)
	}
	if got := h.get(signals.ListenBacklog, h.port); got != 128 {
		t.Errorf("listen_backlog = %v, want 128", got)
	}
	if k := kernelListenOverflows(t, s.PID); k != k0 {
		t.Errorf("kernel ListenOverflows grew by %d on a healthy server", k-k0)
	}
}

// TestAcceptQueueNoListener: a target without listeners is ErrNoData, not a failure.
func TestAcceptQueueNoListener(t *testing.T) {
	c, err := newAcceptQueueCollector(Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	store := signals.New(4, 100)
	err = c.Collect(context.Background(), resolve(t, os.Getpid()), store)
	if !errors.Is(err, ErrNoData) {
		t.Fatalf("Collect for a process without listeners: %v, want ErrNoData", err)
	}
	if _, ok := store.Latest(signals.TCPExtListenOverflowsSampledTotal, nil); !ok {
		t.Error("namespace counters not written")
	}
}

// TestAcceptQueueSynRecv makes real half-open connections: with
// TCP_DEFER_ACCEPT the server ignores the client's bare final ACK, so each
// connection stays SYN_RECV on the server while the client considers it
// established. It checks that the state-filtered dump returns them (the
// kernel keeps them as TCP_NEW_SYN_RECV request sockets).
func TestAcceptQueueSynRecv(t *testing.T) {
	s := testenv.Start(t, testenv.Options{Backlog: 16, Accept: true})
	if err := unix.SetsockoptInt(s.ListenerFD(t), unix.IPPROTO_TCP, unix.TCP_DEFER_ACCEPT, 30); err != nil {
		t.Fatalf("TCP_DEFER_ACCEPT: %v", err)
	}
	h := newAQHarness(t, s)
	if ans := s.MustDo(t, "dial 5"); ans != "ok 5 established" {
		t.Fatalf("dial: %s", ans)
	}
	h.poll("5 half-open connections", func() bool { return h.get(signals.ListenSynRecv, h.port) == 5 })
	if got := h.get(signals.ListenQueueLength, h.port); got != 0 {
		t.Errorf("listen_queue_length = %v, want 0 (nothing completed on the server side)", got)
	}
}

// TestAcceptQueueSynRecvWalkFollowsActivity: a walk for half-open
// connections (the established hash, bucket by bucket) that found none is
// not repeated while the listen activity counter stands still; once it
// moves, the next walk counts them, and walks go on each second while any
// remain. The counter here stands in for the tcplisten probe's, which
// moves at a half-open connection's first SYN-ACK retransmission (1 s);
// TestSYNFloodFinding runs the real one.
func TestAcceptQueueSynRecvWalkFollowsActivity(t *testing.T) {
	s := testenv.Start(t, testenv.Options{Backlog: 16, Accept: true})
	if err := unix.SetsockoptInt(s.ListenerFD(t), unix.IPPROTO_TCP, unix.TCP_DEFER_ACCEPT, 30); err != nil {
		t.Fatalf("TCP_DEFER_ACCEPT: %v", err)
	}
	h := newAQHarness(t, s)
	var act atomic.Uint64
	h.store.SetActivity(signals.ListenActivity(h.tgt.NetnsIno), act.Load)
	h.collect() // the first walk: nothing half-open
	w0 := h.c.synRecvWalks
	if ans := s.MustDo(t, "dial 5"); ans != "ok 5 established" {
		t.Fatalf("dial: %s", ans)
	}
	for range 15 {
		h.collect()
		time.Sleep(100 * time.Millisecond)
	}
	if w := h.c.synRecvWalks - w0; w != 0 {
		t.Errorf("%d walks in 1.5 s while the counter stood still after one that found nothing", w)
	}
	if got := h.get(signals.ListenSynRecv, h.port); got != 0 {
		t.Errorf("listen_syn_recv = %v before the counter moved, want the last walk's 0", got)
	}
	act.Add(1)
	h.poll("5 half-open connections once the counter moved", func() bool { return h.get(signals.ListenSynRecv, h.port) == 5 })
	w1 := h.c.synRecvWalks
	for range 15 {
		h.collect()
		time.Sleep(100 * time.Millisecond)
	}
	if h.c.synRecvWalks == w1 {
		t.Error("no walk in 1.5 s while half-open connections remained")
	}
}

// TestAcceptQueueHalfOpenCounterSparesWalks: with the listeners' own
// count of half-open connections (the real listenqueue iterator), a walk
// of the established hash is due only while some listener holds one. The
// activity counter moves at every cycle here, as under a busy server's
// handshakes, which without the counter means a walk each second.
func TestAcceptQueueHalfOpenCounterSparesWalks(t *testing.T) {
	s := testenv.Start(t, testenv.Options{Backlog: 16, Accept: true})
	q, err := probes.NewListenQueues()
	if err != nil {
		t.Fatalf("load the listenqueue iterator (root, this kernel has it): %v", err)
	}
	t.Cleanup(func() { q.Close() })
	h := newAQHarness(t, s)
	h.c.halfOpen = q
	var act atomic.Uint64
	h.store.SetActivity(signals.ListenActivity(h.tgt.NetnsIno), act.Load)
	if ans := s.MustDo(t, "dial 20"); ans != "ok 20 established" {
		t.Fatalf("dial: %s", ans)
	}
	// Until the server has each client's final ACK (a moment, under load)
	// they are half-open, and walked for rightly.
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		n := -1
		if err := sockdiag.InTargetNetns("/proc", s.PID, h.tgt.NetnsIno, func() (err error) { n, err = q.HalfOpen(); return err }); err != nil {
			t.Fatal(err)
		}
		if n == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d half-open connections 5 s after the dials", n)
		}
	}
	walks0 := h.c.synRecvWalks
	for range 25 {
		act.Add(1)
		h.collect()
		time.Sleep(100 * time.Millisecond)
	}
	if w := h.c.synRecvWalks - walks0; w != 0 || h.c.walksSpared < 2 {
		t.Errorf("%d walks and %d spared in 2.5 s with nothing half-open, want 0 and at least 2", w, h.c.walksSpared)
	}
	if got := h.get(signals.ListenSynRecv, h.port); got != 0 {
		t.Errorf("listen_syn_recv = %v, want 0", got)
	}
	if err := unix.SetsockoptInt(s.ListenerFD(t), unix.IPPROTO_TCP, unix.TCP_DEFER_ACCEPT, 30); err != nil {
		t.Fatalf("TCP_DEFER_ACCEPT: %v", err)
	}
	if ans := s.MustDo(t, "dial 5"); ans != "ok 5 established" {
		t.Fatalf("dial: %s", ans)
	}
	h.poll("5 half-open connections, walked", func() bool { act.Add(1); return h.get(signals.ListenSynRecv, h.port) == 5 })
	if h.c.synRecvWalks == 0 {
		t.Error("the half-open connections were counted without a walk")
	}
	if got := h.get(signals.ListenSynRecvSources, h.port); got != 1 {
		t.Errorf("listen_syn_recv_sources = %v, want 1 (all from 127.0.0.1)", got)
	}
}

// BenchmarkAcceptQueueCollect measures one fast sample of a listener in
// another network namespace: two state-filtered dumps, net/netstat, and
// the store writes.
func BenchmarkAcceptQueueCollect(b *testing.B) {
	s := testenv.Start(b, testenv.Options{Backlog: 128, Accept: true})
	s.MustDo(b, "dial 200") // ESTABLISHED sockets the state filter skips
	r, err := workload.NewResolver("/proc")
	if err != nil {
		b.Fatal(err)
	}
	tgt, err := r.Resolve(workload.Selector{PID: s.PID})
	if err != nil {
		b.Fatal(err)
	}
	c, err := newAcceptQueueCollector(Options{})
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	store := signals.New(64, 1000)
	ctx := context.Background()
	b.ReportAllocs()
	for b.Loop() {
		if err := c.Collect(ctx, tgt, store); err != nil {
			b.Fatal(err)
		}
	}
}

// The app's accepts are wanted (Store.QueueFilling: the sockcalls probe
// counts them, at a cost to every system call of the host) once a queue of
// the target is half full, not while it merely holds a few connections,
// as a busy healthy server's does at most samples; the pollers are hurried
// from the first connection queued.
func TestAcceptQueueFillingWantsAccepts(t *testing.T) {
	s := testenv.Start(t, testenv.Options{Backlog: 8, Accept: false})
	h := newAQHarness(t, s)
	h.collect()
	if h.store.Hurried(time.Now()) || h.store.QueueFilling(time.Now()) {
		t.Fatal("an empty queue hurried the pollers or asked for accepts")
	}
	for _, queued := range []float64{2, 4} {
		if ans := s.MustDo(t, "dial 2"); ans != "ok 2 established" {
			t.Fatalf("dial: %s", ans)
		}
		h.poll(fmt.Sprintf("%v connections queued", queued), func() bool { return h.get(signals.ListenQueueLength, h.port) == queued })
		if !h.store.Hurried(time.Now()) {
			t.Errorf("%v queued connections did not hurry the pollers", queued)
		}
		// Half of the backlog of 8 wants them.
		if filling := h.store.QueueFilling(time.Now()); filling != (queued >= 4) {
			t.Errorf("%v connections in a queue of 8: accepts wanted = %v", queued, filling)
		}
	}
}
