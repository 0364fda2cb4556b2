package testenv

import (
	"bufio"
	"fmt"
	"net/http"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/google/pprof/profile"

	"github.com/culprit-dev/culprit/signals"
)

func fetchHeap(t *testing.T, url string) *profile.Profile {
	t.Helper()
	client := &http.Client{Timeout: 10 * time.Second}
	resp, err := client.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("GET %s: %s", url, resp.Status)
	}
	p, err := profile.Parse(resp.Body)
	if err != nil {
		t.Fatalf("GET %s: %v", url, err)
	}
	return p
}

func inuseBytes(t *testing.T, p *profile.Profile) int64 {
	t.Helper()
	i, ok := signals.SampleIndex(p, signals.InuseSpace)
	if !ok {
		t.Fatal("heap profile without inuse_space")
	}
	var sum int64
	for _, s := range p.Sample {
		sum += s.Value[i]
	}
	return sum
}

func hasFunction(p *profile.Profile, suffix string) bool {
	for _, f := range p.Function {
		if strings.HasSuffix(f.Name, suffix) {
			return true
		}
	}
	return false
}

// procStatusKiB reads one "Name: N kB" field of /proc/PID/status.
func procStatusKiB(t *testing.T, pid int, field string) int64 {
	t.Helper()
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		name, rest, ok := strings.Cut(sc.Text(), ":")
		if !ok || name != field {
			continue
		}
		v, err := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(rest), " kB"), 10, 64)
		if err != nil {
			t.Fatalf("%s: %v", field, err)
		}
		return v
	}
	t.Fatalf("no %s in /proc/%d/status", field, pid)
	return 0
}

func fdCount(t *testing.T, pid int) int {
	t.Helper()
	ents, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	if err != nil {
		t.Fatal(err)
	}
	return len(ents)
}

const mib64 = int64(mib)

func TestLeakerHeap(t *testing.T) {
	t.Parallel()
	l := StartLeaker(t, LeakerOptions{})
	before := fetchHeap(t, l.PprofURL)
	if ans := l.MustDo(t, "leakheap 32"); ans != "ok 32 MiB heap held" {
		t.Errorf("leakheap 32 = %q", ans)
	}
	after := fetchHeap(t, l.PprofURL)
	grew := inuseBytes(t, after) - inuseBytes(t, before)
	t.Logf("leakheap 32: inuse_space +%.1f MiB", float64(grew)/mib)
	if grew < 30*mib64 {
		t.Errorf("inuse_space grew by %d MiB, want at least 30", grew/mib64)
	}
	if !hasFunction(after, ".leakHeapSlowly") {
		t.Error("leakHeapSlowly is not in the heap profile's functions")
	}
	sites, err := signals.DiffInuse(before, after, 1)
	if err != nil {
		t.Fatal(err)
	}
	if len(sites) != 1 || !strings.HasSuffix(sites[0].Function, ".leakHeapSlowly") || sites[0].Bytes < 30*mib64 {
		t.Errorf("top growing site = %+v, want leakHeapSlowly with at least 30 MiB", sites)
	}

	l.MustDo(t, "release")
	if left := inuseBytes(t, fetchHeap(t, l.PprofURL)) - inuseBytes(t, before); left > 4*mib64 {
		t.Errorf("after release the heap is still %d MiB above where it started", left/mib64)
	}
}

func TestLeakerFDs(t *testing.T) {
	t.Parallel()
	l := StartLeaker(t, LeakerOptions{SharedNetns: true})
	before := fdCount(t, l.PID)
	l.MustDo(t, "leakfds 10")
	if got := fdCount(t, l.PID) - before; got != 10 {
		t.Errorf("leakfds 10 opened %d descriptors", got)
	}
	if ans := l.MustDo(t, "leakfds 3"); ans != "ok 13 fds held" {
		t.Errorf("leakfds 3 = %q, want 13 held", ans)
	}
	l.MustDo(t, "release")
	if got := fdCount(t, l.PID); got != before {
		t.Errorf("after release %d descriptors are open, %d before", got, before)
	}
}

func TestLeakerRetain(t *testing.T) {
	t.Parallel()
	l := StartLeaker(t, LeakerOptions{})
	heapBefore := inuseBytes(t, fetchHeap(t, l.PprofURL))
	rssBefore := procStatusKiB(t, l.PID, "VmRSS")
	l.MustDo(t, "retain 64")
	rssAfter := procStatusKiB(t, l.PID, "VmRSS")
	heapAfter := inuseBytes(t, fetchHeap(t, l.PprofURL))
	t.Logf("retain 64: VmRSS %d -> %d KiB, inuse_space %+d KiB", rssBefore, rssAfter, (heapAfter-heapBefore)>>10)
	if grew := (rssAfter - rssBefore) << 10; grew < 60*mib64 {
		t.Errorf("retain 64 raised VmRSS by %d MiB, want at least 60", grew/mib64)
	}
	if d := heapAfter - heapBefore; d > 4*mib64 || d < -4*mib64 {
		t.Errorf("retain 64 moved the heap profile's inuse_space by %d KiB; it is not Go heap", d>>10)
	}
	l.MustDo(t, "release")
	if left := (procStatusKiB(t, l.PID, "VmRSS") - rssBefore) << 10; left > 16*mib64 {
		t.Errorf("after release VmRSS is still %d MiB above where it started", left/mib64)
	}
}

func TestLeakerPrivateNetns(t *testing.T) {
	t.Parallel()
	l := StartLeaker(t, LeakerOptions{PrivateNetns: true})
	self, err := os.Readlink("/proc/self/ns/net")
	if err != nil {
		t.Fatal(err)
	}
	child, err := os.Readlink("/proc/" + strconv.Itoa(l.PID) + "/ns/net")
	if err != nil {
		t.Fatal(err)
	}
	if self == child {
		t.Fatalf("leaker shares the test's network namespace %s", self)
	}
	l.MustDo(t, "leakfds 1")
	for _, bad := range []string{"bogus", "leakheap", "leakheap -1", "retain x"} {
		if _, err := l.Do(bad); err == nil {
			t.Errorf("%q accepted", bad)
		}
	}
}

// The background leaks run at the rate asked, by the clock, and stop.
func TestLeakerBackgroundRates(t *testing.T) {
	t.Parallel()
	l := StartLeaker(t, LeakerOptions{})
	fds0, heap0 := fdCount(t, l.PID), inuseBytes(t, fetchHeap(t, l.PprofURL))
	start := time.Now()
	l.MustDo(t, "fdrate 40")
	l.MustDo(t, "heaprate 8")
	time.Sleep(2 * time.Second)
	fds, heap := fdCount(t, l.PID)-fds0, inuseBytes(t, fetchHeap(t, l.PprofURL))-heap0
	el := time.Since(start).Seconds()
	t.Logf("in %.2f s: %d fds (%.1f/s), %.1f MiB heap (%.1f MiB/s)", el, fds, float64(fds)/el, float64(heap)/mib, float64(heap)/mib/el)
	if r := float64(fds) / el; r < 34 || r > 46 {
		t.Errorf("fdrate 40 leaked %.1f fds a second", r)
	}
	if r := float64(heap) / mib / el; r < 6.8 || r > 9.2 {
		t.Errorf("heaprate 8 leaked %.1f MiB a second (as the heap profile sees it)", r)
	}
	l.MustDo(t, "stop")
	held := l.MustDo(t, "held")
	time.Sleep(300 * time.Millisecond)
	if again := l.MustDo(t, "held"); again != held {
		t.Errorf("still leaking after stop: %q then %q", held, again)
	}
	l.MustDo(t, "nofile 64")
	if _, err := l.Do("leakfds 100"); err == nil {
		t.Error("100 fds opened under RLIMIT_NOFILE 64")
	}
	l.MustDo(t, "release")
}
