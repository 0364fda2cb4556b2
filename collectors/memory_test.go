package collectors

import (
	"context"
	"os"
	"testing"
	"time"

	"github.com/culprit-dev/culprit/internal/testenv"
	"github.com/culprit-dev/culprit/signals"
	"github.com/culprit-dev/culprit/workload"
)

func sleep() { time.Sleep(20 * time.Millisecond) }

func TestParseStatusMemory(t *testing.T) {
	b, err := os.ReadFile("testdata/proc_memory/status")
	if err != nil {
		t.Fatal(err)
	}
	m, err := parseStatusMemory(b)
	if err != nil {
		t.Fatal(err)
	}
	if m.VmRSS <= 0 || m.RssAnon <= 0 || m.VmRSS != m.RssAnon+m.RssFile+m.RssShmem {
		t.Fatalf("status memory %+v: VmRSS must be RssAnon+RssFile+RssShmem", m)
	}
	if _, err := parseStatusMemory([]byte("Name:\tkthreadd\nState:\tS\n")); err == nil {
		t.Fatal("a kernel thread's status gave memory")
	}
	if _, err := parseStatusMemory([]byte("VmRSS:\t12 MB\nVmSize:\t1 kB\nRssAnon:\t1 kB\nRssFile:\t1 kB\nRssShmem:\t0 kB\n")); err == nil {
		t.Fatal("bad unit accepted")
	}
}

// Memory retained outside the heap shows as anonymous RSS.
func TestMemoryCollectorSeesRetainedRSS(t *testing.T) {
	l := testenv.StartLeaker(t, testenv.LeakerOptions{})
	c := newMemoryCollector(Options{})
	st := signals.New(16, 100)
	tgt := workload.Process{PID: l.PID}
	if err := c.Collect(context.Background(), tgt, st); err != nil {
		t.Fatal(err)
	}
	before, _ := st.Latest(signals.ProcessMemoryRSSBytes, signals.L("kind", "anon"))
	l.MustDo(t, "retain 64")
	if err := c.Collect(context.Background(), tgt, st); err != nil {
		t.Fatal(err)
	}
	after, _ := st.Latest(signals.ProcessMemoryRSSBytes, signals.L("kind", "anon"))
	if grew := after.V - before.V; grew < 60<<20 {
		t.Fatalf("anonymous RSS grew by %.1f MiB after retaining 64 MiB", grew/(1<<20))
	}
}

func TestMemoryCollectorRollupAndSwitches(t *testing.T) {
	c := newMemoryCollector(Options{})
	st := signals.New(16, 100)
	if err := c.Collect(context.Background(), workload.Process{PID: os.Getpid()}, st); err != nil {
		t.Fatal(err)
	}
	if p, _ := st.Latest(signals.ProcessMemoryPSSBytes, nil); p.V <= 0 {
		t.Errorf("pss = %v", p.V)
	}
	if v, _ := st.Latest(signals.ProcessContextSwitchesTotal, signals.L("kind", "voluntary")); v.V <= 0 {
		t.Errorf("voluntary context switches = %v", v.V)
	}
	got := parseKBLines([]byte("Pss:  10 kB\nSwap:   0 kB\nvoluntary_ctxt_switches:\t42\n"), "Pss", "Swap", "voluntary_ctxt_switches")
	if got["Pss"] != 10240 || got["Swap"] != 0 || got["voluntary_ctxt_switches"] != 42 {
		t.Errorf("parseKBLines = %v", got)
	}
}
