package probes

import (
	"encoding/binary"
	"os"
	"os/signal"
	"runtime"
	"syscall"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/culprit-dev/culprit/signals"
)

// A counter whose key first shows up after the first poll (the first
// connect errors toward a remote) starts at 0 at the poll before: an
// increase over a window that holds both polls counts all of its value.
// Keys of the first poll are the baseline; gauges get no 0.
func TestSeriesSetCounterBornAtZero(t *testing.T) {
	st := signals.New(64, 64)
	errs := newSeriesSet[string](st, signals.ProcessConnectErrorsTotal)
	gauge := newSeriesSet[string](st, signals.ProcessUnreadOldestSeconds)
	t0 := time.Now()
	l := func(remote string) func() signals.Labels {
		return func() signals.Labels { return signals.L("errno", "EADDRNOTAVAIL", "remote", remote) }
	}
	errs.put("a", l("10.0.0.1:80"), 7, t0)
	errs.put("a", l("10.0.0.1:80"), 7, t0.Add(100*time.Millisecond))
	errs.touch(t0.Add(150 * time.Millisecond)) // no read: the map did not move
	errs.put("b", l("10.0.0.2:80"), 500, t0.Add(200*time.Millisecond))
	if ss := st.Range(signals.ProcessConnectErrorsTotal, l("10.0.0.2:80")(), t0); len(ss) != 2 || !ss[0].T.Equal(t0.Add(100*time.Millisecond)) || ss[0].V != 0 {
		t.Errorf("the new counter's samples %v, want 0 at the last read (+100ms), then 500", ss)
	}
	gauge.touch(t0.Add(100 * time.Millisecond))
	gauge.put("g", func() signals.Labels { return nil }, 3, t0.Add(200*time.Millisecond))

	if got := st.Increase(signals.ProcessConnectErrorsTotal, l("10.0.0.2:80")(), t0); got != 500 {
		t.Errorf("increase of the counter born at the third poll: %v, want 500", got)
	}
	if got := st.Increase(signals.ProcessConnectErrorsTotal, l("10.0.0.1:80")(), t0); got != 0 {
		t.Errorf("increase of the first poll's counter: %v, want 0 (its first value is the baseline)", got)
	}
	if s, ok := st.Latest(signals.ProcessUnreadOldestSeconds, nil); !ok || s.V != 3 {
		t.Errorf("gauge latest %v %v, want 3", s, ok)
	}
	if n := len(st.Range(signals.ProcessUnreadOldestSeconds, nil, t0)); n != 1 {
		t.Errorf("gauge has %d samples, want 1 (no 0 before a gauge)", n)
	}
}

// Each CPU bumps its own cache line of change counters (changes.h), and
// a counter is the sum over the lines: signals sent to a target from each
// CPU in turn move the sum once per signal, and every CPU's line holds
// its own. Real probe objects (procsignals), real signals.
func TestChangesPerCPU(t *testing.T) {
	cpus, err := ebpf.PossibleCPU()
	if err != nil {
		t.Fatal(err)
	}
	if runtime.NumCPU() < 2 {
		t.Skip("SKIP: one CPU: no line of another CPU to tell apart")
	}
	spec, err := loadProcSignals()
	if err != nil {
		t.Fatal(err)
	}
	objs := &procSignalsObjects{}
	if err := load("procsignals", spec, objs); err != nil {
		t.Fatal(err)
	}
	defer objs.Close()
	if got, want := objs.Changes.MaxEntries(), uint32(changesLine*(1+cpus)); got != want {
		t.Fatalf("changes has %d entries, want %d (a line per CPU and line 0)", got, want)
	}
	links, err := attachTracing("procsignals", tracingProg{"tp_btf/signal_generate", objs.CulpritSignalGenerate})
	if err != nil {
		t.Fatal(err)
	}
	defer closeLinks(links)
	if err := setTargets(objs.TargetTgids, []uint32{uint32(os.Getpid())}); err != nil {
		t.Fatal(err)
	}
	signal.Ignore(syscall.SIGQUIT) // generated all the same; nobody dies
	defer signal.Reset(syscall.SIGQUIT)
	ch := newChanges(objs.Changes, 1)
	before := ch.value(0)
	// signal_generate runs on the sender's CPU.
	const perCPU = 3
	for cpu := 0; cpu < 2; cpu++ {
		func() {
			runtime.LockOSThread()
			defer runtime.UnlockOSThread()
			var set unix.CPUSet
			set.Set(cpu)
			if err := unix.SchedSetaffinity(0, &set); err != nil {
				t.Fatalf("pin to CPU %d: %v", cpu, err)
			}
			for i := 0; i < perCPU; i++ {
				if err := unix.Kill(os.Getpid(), syscall.SIGQUIT); err != nil {
					t.Fatal(err)
				}
			}
		}()
	}
	if got := ch.value(0) - before; got != 2*perCPU {
		t.Errorf("counter moved by %d, want %d (one per signal, summed over CPUs)", got, 2*perCPU)
	}
	for cpu := 0; cpu < 2; cpu++ {
		off := 8 * changesLine * (1 + cpu)
		if v := binary.NativeEndian.Uint64(ch.buf[off:]); v < perCPU {
			t.Errorf("CPU %d's line holds %d, want at least %d", cpu, v, perCPU)
		}
	}
	if !ch.moved(0) || ch.moved(0) {
		t.Error("moved: want true once after the signals, then false")
	}
}
