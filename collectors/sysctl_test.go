package collectors

import (
	"context"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
	"github.com/vishvananda/netns"

	"github.com/culprit-dev/culprit/internal/testenv"
	"github.com/culprit-dev/culprit/signals"
	"github.com/culprit-dev/culprit/sockdiag"
	"github.com/culprit-dev/culprit/workload"
)

func TestParseSysctl(t *testing.T) {
	for _, tc := range []struct {
		name, sysctl, in string
		want             map[string]float64
		wantErr          bool
	}{
		{name: "integer", sysctl: "net.core.somaxconn", in: "4096\n",
			want: map[string]float64{`sysctl{name="net.core.somaxconn"}`: 4096}},
		{name: "port range", sysctl: "net.ipv4.ip_local_port_range", in: "32768\t60999\n",
			want: map[string]float64{
				`sysctl{name="net.ipv4.ip_local_port_range.min"}`: 32768,
				`sysctl{name="net.ipv4.ip_local_port_range.max"}`: 60999}},
		{name: "empty", sysctl: "net.core.somaxconn", in: "\n", wantErr: true},
		{name: "two values for one", sysctl: "net.core.somaxconn", in: "1 2\n", wantErr: true},
		{name: "one value for a range", sysctl: "net.ipv4.ip_local_port_range", in: "1\n", wantErr: true},
		{name: "not a number", sysctl: "net.ipv4.tcp_syncookies", in: "yes\n", wantErr: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := parseSysctl(tc.sysctl, []byte(tc.in))
			if (err != nil) != tc.wantErr {
				t.Fatalf("err = %v, want error %v", err, tc.wantErr)
			}
			if err != nil {
				return
			}
			if diff := cmp.Diff(tc.want, samplesByName(got)); diff != "" {
				t.Errorf("(-want +got):\n%s", diff)
			}
		})
	}
}

func TestReadSysctlsFixture(t *testing.T) {
	got, err := readSysctls("testdata/proc")
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]float64{
		`sysctl{name="net.core.somaxconn"}`:               4096,
		`sysctl{name="net.ipv4.tcp_max_syn_backlog"}`:     2048,
		`sysctl{name="net.ipv4.tcp_abort_on_overflow"}`:   0,
		`sysctl{name="net.ipv4.tcp_syncookies"}`:          1,
		`sysctl{name="net.ipv4.tcp_syn_retries"}`:         6,
		`sysctl{name="net.ipv4.tcp_syn_linear_timeouts"}`: 4,
		`sysctl{name="net.ipv4.ip_local_port_range.min"}`: 32768,
		`sysctl{name="net.ipv4.ip_local_port_range.max"}`: 60999,
		`sysctl{name="net.ipv4.tcp_tw_reuse"}`:            2,
		`sysctl{name="net.ipv4.tcp_fin_timeout"}`:         60,
	}
	if diff := cmp.Diff(want, samplesByName(got)); diff != "" {
		t.Errorf("(-want +got):\n%s", diff)
	}
	if got, err := readSysctls(t.TempDir()); err != nil || len(got) != 0 {
		t.Errorf("missing sysctls: got %v, %v; want nothing, no error", got, err)
	}
}

// TestSysctlCollectorSameNetns reads the fixtures through Collect: a target
// in the agent's own namespace is read under ProcRoot directly.
func TestSysctlCollectorSameNetns(t *testing.T) {
	c, err := newSysctlCollector(Options{ProcRoot: "testdata/proc"})
	if err != nil {
		t.Fatal(err)
	}
	store := signals.New(4, 100)
	if err := c.Collect(context.Background(), workload.Process{PID: fixturePID}, store); err != nil {
		t.Fatal(err)
	}
	if got, ok := store.Latest(signals.Sysctl, signals.L("name", "net.ipv4.tcp_max_syn_backlog")); !ok || got.V != 2048 {
		t.Errorf("tcp_max_syn_backlog = %v (present %v), want 2048", got.V, ok)
	}
}

func resolve(t *testing.T, pid int) workload.Process {
	t.Helper()
	r, err := workload.NewResolver("/proc")
	if err != nil {
		t.Fatal(err)
	}
	p, err := r.Resolve(workload.Selector{PID: pid})
	if err != nil {
		t.Fatal(err)
	}
	return p
}

func readIntFile(t *testing.T, path string) int {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	v, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil {
		t.Fatalf("%s: %v", path, err)
	}
	return v
}

// TestSysctlOtherNetns is the measurement the collector's comment reports:
// /proc/sys/net follows the reading thread's network namespace, so a
// setting changed inside the target's namespace is seen only by a thread
// that joined it, not through /proc/PID/root/proc/sys.
func TestSysctlOtherNetns(t *testing.T) {
	s := testenv.Start(t, testenv.Options{Backlog: 8, Accept: true})
	tgt := resolve(t, s.PID)
	own := readIntFile(t, "/proc/sys/net/core/somaxconn")
	want := own + 1234

	ns, err := sockdiag.OpenNetns("/proc", s.PID, tgt.NetnsIno)
	if err != nil {
		t.Fatal(err)
	}
	defer ns.Close()
	err = sockdiag.InNetns(ns, func() error {
		return os.WriteFile("/proc/sys/net/core/somaxconn", []byte(strconv.Itoa(want)), 0o644)
	})
	if err != nil {
		t.Fatal(err)
	}
	if got := readIntFile(t, "/proc/sys/net/core/somaxconn"); got != own {
		t.Fatalf("the agent's somaxconn changed to %d: the write leaked out of the child's netns", got)
	}
	viaRoot := readIntFile(t, filepath.Join("/proc", strconv.Itoa(s.PID), "root/proc/sys/net/core/somaxconn"))
	t.Logf("via /proc/%d/root/proc/sys: %d (agent %d, child %d)", s.PID, viaRoot, own, want)
	if viaRoot != own {
		t.Errorf("/proc/PID/root/proc/sys showed %d; this kernel resolves it in the target's netns, update sysctlCollector's comment", viaRoot)
	}

	c, err := newSysctlCollector(Options{})
	if err != nil {
		t.Fatal(err)
	}
	store := signals.New(4, 100)
	if err := c.Collect(context.Background(), tgt, store); err != nil {
		t.Fatal(err)
	}
	if got, ok := store.Latest(signals.Sysctl, signals.L("name", "net.core.somaxconn")); !ok || got.V != float64(want) {
		t.Errorf("collector read somaxconn %v (present %v), want the child's %d", got.V, ok, want)
	}
	// The thread that read it went back to the agent's namespace.
	self, err := netns.Get()
	if err != nil {
		t.Fatal(err)
	}
	defer self.Close()
	if !self.Equal(mustNetns(t, "/proc/self/ns/net")) {
		t.Error("the test thread is not in the agent's netns")
	}
}

func mustNetns(t *testing.T, path string) netns.NsHandle {
	t.Helper()
	ns, err := netns.GetFromPath(path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ns.Close() })
	return ns
}
