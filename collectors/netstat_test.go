package collectors

import (
	"context"
	"os"
	"regexp"
	"strconv"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"

	"github.com/culprit-dev/culprit/signals"
	"github.com/culprit-dev/culprit/workload"
)

// fixturePID is the process whose /proc files are under testdata/proc. Its
// net/netstat and net/snmp were captured in a private network namespace
// after a listener with backlog 1 overflowed, so the counters the rules
// care about are not all zero.
const fixturePID = 7275

func samplesByName(ss []sample) map[string]float64 {
	out := map[string]float64{}
	for _, s := range ss {
		out[s.Desc.Name+s.Labels.String()] = s.Value
	}
	return out
}

func readNetSNMP(t *testing.T, path string) map[string]float64 {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	m, err := parseNetSNMP(b)
	if err != nil {
		t.Fatalf("%s: %v", path, err)
	}
	return m
}

func TestNetstatSamplesFixture(t *testing.T) {
	n := readNetSNMP(t, "testdata/proc/7275/net/netstat")
	s := readNetSNMP(t, "testdata/proc/7275/net/snmp")
	want := map[string]float64{
		"tcp_ext_listen_overflows_total{}":      32,
		"tcp_ext_listen_drops_total{}":          32,
		"tcp_ext_req_q_full_drop_total{}":       0,
		"tcp_ext_req_q_full_do_cookies_total{}": 0,
		"tcp_ext_syncookies_sent_total{}":       0,
		"tcp_ext_syncookies_recv_total{}":       0,
		"tcp_ext_syncookies_failed_total{}":     0,
		"tcp_ext_time_wait_overflow_total{}":    0,
		"tcp_ext_abort_on_data_total{}":         0,
		"tcp_ext_abort_on_close_total{}":        2,
		"tcp_ext_abort_on_timeout_total{}":      0,
		"tcp_ext_abort_on_memory_total{}":       0,
		"tcp_ext_time_wait_total{}":             0,
		"tcp_ext_syn_retrans_total{}":           24,
		"tcp_active_opens_total{}":              10,
		"tcp_passive_opens_total{}":             2,
		"tcp_attempt_fails_total{}":             0,
		"tcp_estab_resets_total{}":              4,
		"tcp_in_errs_total{}":                   0,
		"tcp_out_rsts_total{}":                  2,
		"tcp_retrans_segs_total{}":              24,
		"tcp_curr_estab{}":                      0,
	}
	if diff := cmp.Diff(want, samplesByName(netstatSamples(n, s))); diff != "" {
		t.Errorf("netstatSamples (-want +got):\n%s", diff)
	}
}

func TestParseNetSNMP(t *testing.T) {
	for _, tc := range []struct {
		name    string
		in      string
		want    map[string]float64
		wantErr bool
	}{
		{name: "two protocols", in: "Tcp: A B\nTcp: 1 -1\nUdp: C\nUdp: 3\n",
			want: map[string]float64{"Tcp.A": 1, "Tcp.B": -1, "Udp.C": 3}},
		{name: "odd lines", in: "Tcp: A\n", wantErr: true},
		{name: "count mismatch", in: "Tcp: A B\nTcp: 1\n", wantErr: true},
		{name: "protocol mismatch", in: "Tcp: A\nUdp: 1\n", wantErr: true},
		{name: "not a number", in: "Tcp: A\nTcp: x\n", wantErr: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := parseNetSNMP([]byte(tc.in))
			if (err != nil) != tc.wantErr {
				t.Fatalf("err = %v, want error %v", err, tc.wantErr)
			}
			if diff := cmp.Diff(tc.want, got); diff != "" {
				t.Errorf("(-want +got):\n%s", diff)
			}
		})
	}
}

func TestNetstatSamplesMissingFields(t *testing.T) {
	// A kernel without a field yields no sample for it, not a zero.
	if got := netstatSamples(nil, nil); len(got) != 0 {
		t.Errorf("empty input gave %d samples, want 0", len(got))
	}
}

// collectNetstatFixture runs a netstat collector once on the fixture
// process and returns it and what it wrote.
func collectNetstatFixture(t *testing.T) (Collector, *signals.Store) {
	t.Helper()
	c, err := newNetstatCollector(Options{ProcRoot: "testdata/proc"})
	if err != nil {
		t.Fatal(err)
	}
	store := signals.New(4, 100)
	if err := c.Collect(context.Background(), workload.Process{PID: fixturePID}, store); err != nil {
		t.Fatal(err)
	}
	return c, store
}

func TestNetstatCollectFixture(t *testing.T) {
	c, store := collectNetstatFixture(t)
	if got, ok := store.Latest(signals.TCPExtListenOverflowsTotal, nil); !ok || got.V != 32 {
		t.Errorf("tcp_ext_listen_overflows_total = %v (present %v), want 32", got.V, ok)
	}
	if err := c.Collect(context.Background(), workload.Process{PID: 999999}, store); err == nil {
		t.Error("Collect for a missing pid: no error")
	}
}

func TestNetstatCollectReal(t *testing.T) {
	c, err := newNetstatCollector(Options{})
	if err != nil {
		t.Fatal(err)
	}
	store := signals.New(4, 100)
	if err := c.Collect(context.Background(), workload.Process{PID: os.Getpid()}, store); err != nil {
		t.Fatal(err)
	}
	for _, name := range []*signals.Desc{signals.TCPExtListenOverflowsTotal, signals.TCPActiveOpensTotal, signals.TCPCurrEstab} {
		if _, ok := store.Latest(name, nil); !ok {
			t.Errorf("%s not written", name)
		}
	}
}

// allDescs lists the signals this package writes (those of the sockets
// collector apart: socketsDescs), for the naming test.
func allDescs() []*signals.Desc {
	ds := []*signals.Desc{signals.TCPCurrEstab, signals.Sysctl,
		signals.ProcessThreads, signals.ProcessThreadsInSyscall, signals.ProcessNumThreads,
		signals.ListenQueueLength, signals.ListenBacklog, signals.ListenQueueFull, signals.ListenSynRecv,
		signals.ListenOverflowsTotal, signals.ListenOverflowsUnattributedTotal, signals.TCPExtListenOverflowsSampledTotal, signals.TCPExtListenDropsSampledTotal}
	for _, c := range netstatCounters {
		ds = append(ds, c.desc)
	}
	return ds
}

// TestSignalNames checks the rules promtool's linter (promlint) applies to
// names: snake_case, counters and only counters end in _total, no _count
// outside histograms, no abbreviated units or type names, help present,
// and no name declared twice.
func TestSignalNames(t *testing.T) {
	valid := regexp.MustCompile(`^[a-z][a-z0-9_]*$`)
	seen := map[string]bool{}
	for _, d := range allDescs() {
		if !valid.MatchString(d.Name) {
			t.Errorf("%s: not snake_case", d.Name)
		}
		if total := strings.HasSuffix(d.Name, "_total"); total != (d.Kind == signals.Counter) {
			t.Errorf("%s is a %s: counters, and only counters, end in _total", d.Name, d.Kind)
		}
		if strings.HasSuffix(d.Name, "_count") {
			t.Errorf("%s: _count is for histograms and summaries", d.Name)
		}
		for _, w := range strings.Split(d.Name, "_") {
			switch w {
			case "s", "ms", "us", "ns", "sec", "b", "kb", "mb", "gb", "tb", "pb", "m", "h", "d":
				t.Errorf("%s: abbreviated unit %q", d.Name, w)
			case "gauge", "counter":
				t.Errorf("%s: type in the name", d.Name)
			}
		}
		if d.Help == "" {
			t.Errorf("%s: no help", d.Name)
		}
		if seen[d.Name] {
			t.Errorf("%s declared twice", d.Name)
		}
		seen[d.Name] = true
	}
}

// TestNetstatCollectMatchesParse: the collector's in-place scan writes
// what netstatSamples makes of the parsed files.
func TestNetstatCollectMatchesParse(t *testing.T) {
	_, store := collectNetstatFixture(t)
	want := netstatSamples(readNetSNMP(t, "testdata/proc/7275/net/netstat"), readNetSNMP(t, "testdata/proc/7275/net/snmp"))
	if len(want) == 0 {
		t.Fatal("no samples in the fixture")
	}
	got := map[string]float64{}
	for _, s := range want {
		if v, ok := store.Latest(s.Desc, nil); ok {
			got[s.Desc.Name+"{}"] = v.V
		}
	}
	if diff := cmp.Diff(samplesByName(want), got); diff != "" {
		t.Errorf("collected (-want +got):\n%s", diff)
	}
}

// TestScanNetSNMPAllocates: a cycle's scan of both files allocates
// nothing.
func TestScanNetSNMPAllocates(t *testing.T) {
	var bs [2][]byte
	for i, name := range []string{"netstat", "snmp"} {
		b, err := os.ReadFile("testdata/proc/7275/net/" + name)
		if err != nil {
			t.Fatal(err)
		}
		bs[i] = b
	}
	var vals [64]float64
	allocs := testing.AllocsPerRun(100, func() {
		for i, b := range bs {
			if err := scanNetSNMP(b, func(proto, name []byte, v float64) {
				if slot, ok := netstatSlots[i][string(proto)][string(name)]; ok {
					vals[slot] = v
				}
			}); err != nil {
				t.Fatal(err)
			}
		}
	})
	if allocs != 0 {
		t.Errorf("scanning net/netstat and net/snmp: %v allocations, want 0", allocs)
	}
}

func TestParseCounter(t *testing.T) {
	for _, s := range []string{"0", "7", "-1", "123456789012345", "1234567890123456", "18446744073709551615", "1e3", "-0"} {
		want, _ := strconv.ParseFloat(s, 64)
		if got, err := parseCounter([]byte(s)); err != nil || got != want {
			t.Errorf("parseCounter(%q) = %v, %v; want %v", s, got, err, want)
		}
	}
	for _, s := range []string{"", "-", "x", "1-"} {
		if _, err := parseCounter([]byte(s)); err == nil {
			t.Errorf("parseCounter(%q): no error", s)
		}
	}
}
