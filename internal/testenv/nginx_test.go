package testenv

import (
	"bytes"
	"os"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"
)

// A real nginx: master and workers, its static file, and a healthy
// keep-alive load at a steady rate on exactly its connections.
func TestNginx(t *testing.T) {
	n := StartNginx(t, NginxOptions{Workers: 2})
	t.Logf("nginx master %d, workers %v, %s", n.PID, n.WorkerPIDs, n.URL)
	if len(n.WorkerPIDs) != 2 {
		t.Fatalf("workers %v, want 2", n.WorkerPIDs)
	}
	for _, w := range n.WorkerPIDs {
		kids, err := childPIDs(n.PID)
		if err != nil || !slices.Contains(kids, w) {
			t.Fatalf("worker %d is not a child of the master %d (%v, %v)", w, n.PID, kids, err)
		}
	}
	r := n.MustGet(t, "/index.html")
	if len(r.Body) != 1024 || !strings.HasPrefix(r.Body, "culprit nginx") {
		t.Fatalf("/index.html: %d bytes %q", len(r.Body), r.Body[:min(len(r.Body), 40)])
	}
	if r := n.MustGet(t, "/ok"); r.Body != "ok\n" {
		t.Fatalf("/ok: %q", r.Body)
	}

	load := n.StartLoad(t, HTTPLoadOptions{Conns: 4, Rate: 400, Path: "/index.html"})
	time.Sleep(time.Second)
	mid := load.Stats()
	time.Sleep(500 * time.Millisecond)
	st := load.Stop()
	t.Logf("healthy load: %v", st)
	if st.Errors > 0 || st.Conns != 4 {
		t.Errorf("load: %v (first error %v): want no error and 4 keep-alive connections", st, st.FirstError)
	}
	// Steady: about 400/s (less on a loaded machine), never as fast as
	// it can.
	if rate := float64(st.Requests) / st.Elapsed.Seconds(); rate < 200 || rate > 440 {
		t.Errorf("load ran at %.0f requests/s, want about 400", rate)
	}
	if mid.Requests >= st.Requests {
		t.Errorf("Stats() mid-run %d requests, at the end %d", mid.Requests, st.Requests)
	}
	if again := load.Stop(); again.Requests != st.Requests {
		t.Errorf("second Stop: %d requests, first %d", again.Requests, st.Requests)
	}

	// Stop: master and workers gone.
	if err := n.Stop(); err != nil {
		t.Fatal(err)
	}
	for _, pid := range append([]int{n.PID}, n.WorkerPIDs...) {
		if alive(pid) {
			t.Errorf("pid %d still there after Stop", pid)
		}
	}
}

// alive reports whether pid exists and is not a zombie.
func alive(pid int) bool {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return false
	}
	f := strings.Fields(string(b[bytes.LastIndexByte(b, ')')+1:]))
	return len(f) > 0 && f[0] != "Z"
}
