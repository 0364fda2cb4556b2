package collectors

import (
	"bytes"
	"compress/gzip"
	"context"
	"errors"
	"math"
	"net"
	"net/http"
	"net/http/httptest"
	"net/http/pprof"
	"os"
	"runtime"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/pprof/profile"

	"github.com/culprit-dev/culprit/signals"
	"github.com/culprit-dev/culprit/workload"
)

// pprofKeep holds memory reachable while the test process's own heap is
// profiled, so the profile has a site that is certainly live.
var pprofKeep [][]byte

func latestValue(t *testing.T, st *signals.Store, d *signals.Desc, ls signals.Labels) (float64, bool) {
	t.Helper()
	s, ok := st.Latest(d, ls)
	return s.V, ok
}

// countingServer serves h and counts requests.
func countingServer(t *testing.T, h http.Handler) (*httptest.Server, *atomic.Int64) {
	t.Helper()
	var n atomic.Int64
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		n.Add(1)
		h.ServeHTTP(w, r)
	}))
	t.Cleanup(srv.Close)
	return srv, &n
}

func TestPprofHeapFetchesRealHandler(t *testing.T) {
	// 4 MiB allocations are all but certain to be sampled at the default
	// MemProfileRate (512 KiB), so the profile must show most of them.
	pprofKeep = nil
	for i := 0; i < 8; i++ {
		pprofKeep = append(pprofKeep, make([]byte, 4<<20))
	}
	runtime.GC() // the heap profile is as of the last completed GC
	srv, hits := countingServer(t, pprof.Handler("heap"))
	profs := signals.NewProfiles(4)
	st := signals.New(16, 256)
	c := NewPprofHeap(Options{SideStores: signals.SideStores{Profiles: profs}}, PprofOptions{URL: srv.URL + "/debug/pprof/heap", Timeout: 5 * time.Second, MaxBytes: 32 << 20, Interval: time.Hour})
	defer c.Close()
	if c.Name() != "pprof_heap" {
		t.Errorf("Name = %q", c.Name())
	}
	before := time.Now()
	if err := c.Collect(context.Background(), workload.Process{}, st); err != nil {
		t.Fatal(err)
	}
	inuse, _ := latestValue(t, st, signals.HeapInuseBytes, nil)
	if inuse < 16<<20 {
		t.Errorf("heap_inuse_bytes = %.0f, want at least half the 32 MiB this test keeps", inuse)
	}
	if v, ok := latestValue(t, st, signals.HeapInuseObjects, nil); !ok || v <= 0 {
		t.Errorf("heap_inuse_objects = %v, %v", v, ok)
	}
	if v, ok := latestValue(t, st, signals.HeapAllocBytesTotal, nil); !ok || v < inuse {
		t.Errorf("heap_alloc_bytes_total = %v, %v; want at least inuse %.0f", v, ok, inuse)
	}
	if v, _ := latestValue(t, st, signals.PprofLastSuccessTimestampSeconds, nil); v < float64(before.Unix()) || v > float64(time.Now().Unix()+1) {
		t.Errorf("pprof_last_success_timestamp_seconds = %v, want about %d", v, before.Unix())
	}
	if v, _ := latestValue(t, st, signals.PprofFetchesTotal, nil); v != 1 {
		t.Errorf("pprof_fetches_total = %v, want 1", v)
	}
	for _, r := range pprofReasons {
		if v, ok := latestValue(t, st, signals.PprofFetchErrorsTotal, signals.L("reason", r)); !ok || v != 0 {
			t.Errorf("pprof_fetch_errors_total{reason=%q} = %v, %v; want a 0 series", r, v, ok)
		}
	}
	tp, ok := profs.Latest("heap")
	if !ok {
		t.Fatal("no heap profile stored")
	}
	if _, ok := signals.SampleIndex(tp.Profile, signals.InuseSpace); !ok || tp.T.Before(before) {
		t.Errorf("stored profile at %v without inuse_space", tp.T)
	}

	// Called again before Interval has passed: no second fetch.
	if err := c.Collect(context.Background(), workload.Process{}, st); err != nil || hits.Load() != 1 {
		t.Errorf("second Collect within the interval: err %v, %d requests; want nil, 1", err, hits.Load())
	}
}

// TestPprofHeapInterval drives the collector's clock: it fetches once per
// Interval however often Collect is called, and between attempts repeats
// the last outcome.
func TestPprofHeapInterval(t *testing.T) {
	var fail atomic.Bool
	body := heapFixture(t, "heap-2.pb.gz")
	srv, hits := countingServer(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if fail.Load() {
			http.Error(w, "down", http.StatusServiceUnavailable)
			return
		}
		w.Write(body)
	}))
	profs := signals.NewProfiles(2)
	st := signals.New(16, 256)
	c := NewPprofHeap(Options{SideStores: signals.SideStores{Profiles: profs}}, PprofOptions{URL: srv.URL, Interval: 10 * time.Second})
	now := time.Unix(1_000_000, 0)
	c.now = func() time.Time { return now }
	collect := func() error { return c.Collect(context.Background(), workload.Process{}, st) }

	for _, step := range []struct {
		advance time.Duration
		fail    bool
		hits    int64
		wantErr bool
	}{
		{0, false, 1, false},
		{9 * time.Second, true, 1, false}, // not due: the last success stands
		{time.Second, true, 2, true},      // due: fails
		{time.Second, false, 2, true},     // not due: the failure stands
		{9 * time.Second, false, 3, false},
		{10 * time.Second, false, 4, false},
	} {
		now = now.Add(step.advance)
		fail.Store(step.fail)
		err := collect()
		if hits.Load() != step.hits || (err != nil) != step.wantErr {
			t.Fatalf("after +%v: %d requests, err %v; want %d requests, error %v", step.advance, hits.Load(), err, step.hits, step.wantErr)
		}
	}
	if n := len(profs.List("heap")); n != 2 {
		t.Errorf("store holds %d heap profiles, keep is 2", n)
	}
	if v, _ := latestValue(t, st, signals.PprofFetchesTotal, nil); v != 3 {
		t.Errorf("pprof_fetches_total = %v, want 3", v)
	}
	if v, _ := latestValue(t, st, signals.PprofFetchErrorsTotal, signals.L("reason", reasonHTTPStatus)); v != 1 {
		t.Errorf("http_status errors = %v, want 1", v)
	}
	if s, _ := st.Latest(signals.PprofLastSuccessTimestampSeconds, nil); s.V != float64(now.Unix()) {
		t.Errorf("last success = %v, want %d", s.V, now.Unix())
	}
}

func heapFixture(t testing.TB, name string) []byte {
	t.Helper()
	b, err := os.ReadFile("testdata/pprof/" + name)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func gzipped(t testing.TB, b []byte) []byte {
	t.Helper()
	var buf bytes.Buffer
	zw := gzip.NewWriter(&buf)
	if _, err := zw.Write(b); err != nil {
		t.Fatal(err)
	}
	if err := zw.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

func uncompressed(t testing.TB, gz []byte) []byte {
	t.Helper()
	p, err := profile.ParseData(gz)
	if err != nil {
		t.Fatal(err)
	}
	var buf bytes.Buffer
	if err := p.WriteUncompressed(&buf); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

// cpuProfile is a valid pprof profile that is not a heap profile.
func cpuProfile(t testing.TB) []byte {
	t.Helper()
	fn := &profile.Function{ID: 1, Name: "main.spin"}
	loc := &profile.Location{ID: 1, Line: []profile.Line{{Function: fn, Line: 3}}}
	p := &profile.Profile{
		SampleType: []*profile.ValueType{{Type: "samples", Unit: "count"}, {Type: "cpu", Unit: "nanoseconds"}},
		Sample:     []*profile.Sample{{Location: []*profile.Location{loc}, Value: []int64{1, 10_000_000}}},
		Location:   []*profile.Location{loc},
		Function:   []*profile.Function{fn},
	}
	var buf bytes.Buffer
	if err := p.Write(&buf); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

func TestPprofHeapFailures(t *testing.T) {
	closedURL := func(t *testing.T) string {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		addr := l.Addr().String()
		l.Close()
		return "http://" + addr + "/debug/pprof/heap"
	}
	big := bytes.Repeat([]byte{0}, 8<<10)
	// Bodies are made here: handlers run on server goroutines, where
	// t.Fatal must not be called.
	fixture := heapFixture(t, "heap-2.pb.gz")
	garbageGz := gzipped(t, []byte("\x0a\xff\xff\xff\xff\x0fnot a protobuf"))
	cpu := cpuProfile(t)
	bomb := gzipped(t, make([]byte, 16<<20)) // 16 KiB that expand to 16 MiB
	nested := gzipped(t, fixture)
	for _, tc := range []struct {
		name    string
		handler http.HandlerFunc
		url     func(*testing.T) string // instead of a server
		maxB    int64
		reason  string
		is      error
	}{
		{name: "garbage", reason: reasonMalformed, handler: func(w http.ResponseWriter, r *http.Request) {
			w.Write([]byte("<html>this is not a profile</html>"))
		}},
		{name: "gzipped garbage", reason: reasonMalformed, handler: func(w http.ResponseWriter, r *http.Request) {
			w.Write(garbageGz)
		}},
		{name: "truncated gzip", reason: reasonMalformed, handler: func(w http.ResponseWriter, r *http.Request) {
			w.Write(fixture[:len(fixture)/2])
		}},
		{name: "empty body", reason: reasonMalformed, handler: func(w http.ResponseWriter, r *http.Request) {}},
		{name: "not a heap profile", reason: reasonMalformed, is: signals.ErrNoInuseSpace, handler: func(w http.ResponseWriter, r *http.Request) {
			w.Write(cpu)
		}},
		{name: "slower than the timeout", reason: reasonTimeout, handler: func(w http.ResponseWriter, r *http.Request) {
			select {
			case <-r.Context().Done():
			case <-time.After(5 * time.Second):
			}
		}},
		{name: "stalls mid-body", reason: reasonTimeout, handler: func(w http.ResponseWriter, r *http.Request) {
			w.Write(fixture[:100])
			w.(http.Flusher).Flush()
			select {
			case <-r.Context().Done():
			case <-time.After(5 * time.Second):
			}
		}},
		{name: "announced too large", maxB: 4 << 10, reason: reasonTooLarge, handler: func(w http.ResponseWriter, r *http.Request) {
			w.Write(big) // one write: net/http sets Content-Length
		}},
		{name: "streamed too large", maxB: 4 << 10, reason: reasonTooLarge, handler: func(w http.ResponseWriter, r *http.Request) {
			for i := 0; i < 4; i++ { // chunked, no Content-Length
				w.Write(big[:2<<10+1])
				w.(http.Flusher).Flush()
			}
		}},
		{name: "gzip bomb", maxB: 64 << 10, reason: reasonTooLarge, handler: func(w http.ResponseWriter, r *http.Request) {
			w.Write(bomb)
		}},
		{name: "gzip inside gzip", reason: reasonMalformed, handler: func(w http.ResponseWriter, r *http.Request) {
			w.Write(nested)
		}},
		{name: "404", reason: reasonHTTPStatus, handler: http.NotFound},
		{name: "connection refused", reason: reasonConnect, url: closedURL},
	} {
		t.Run(tc.name, func(t *testing.T) {
			url := ""
			if tc.url != nil {
				url = tc.url(t)
			} else {
				srv := httptest.NewServer(tc.handler)
				defer srv.Close()
				url = srv.URL + "/debug/pprof/heap"
			}
			maxB := tc.maxB
			if maxB == 0 {
				maxB = 1 << 20
			}
			profs := signals.NewProfiles(2)
			st := signals.New(16, 256)
			c := NewPprofHeap(Options{SideStores: signals.SideStores{Profiles: profs}}, PprofOptions{URL: url, Timeout: 300 * time.Millisecond, MaxBytes: maxB})
			defer c.Close()
			err := c.Collect(context.Background(), workload.Process{}, st)
			if err == nil {
				t.Fatal("Collect succeeded")
			}
			if !strings.Contains(err.Error(), url) {
				t.Errorf("error %q does not name the URL %s", err, url)
			}
			if tc.is != nil && !errors.Is(err, tc.is) {
				t.Errorf("error %v is not %v", err, tc.is)
			}
			for _, r := range pprofReasons {
				want := 0.0
				if r == tc.reason {
					want = 1
				}
				if v, _ := latestValue(t, st, signals.PprofFetchErrorsTotal, signals.L("reason", r)); v != want {
					t.Errorf("pprof_fetch_errors_total{reason=%q} = %v, want %v (err: %v)", r, v, want, err)
				}
			}
			if v, _ := latestValue(t, st, signals.PprofFetchesTotal, nil); v != 0 {
				t.Errorf("pprof_fetches_total = %v after a failure", v)
			}
			if _, ok := st.Latest(signals.HeapInuseBytes, nil); ok {
				t.Error("heap_inuse_bytes written after a failure")
			}
			if _, ok := profs.Latest("heap"); ok {
				t.Error("a profile was stored after a failure")
			}
		})
	}
}

func TestPprofHeapPlainProfileAndRedaction(t *testing.T) {
	body := uncompressed(t, heapFixture(t, "heap-1.pb.gz"))
	var mode atomic.Int32
	srv, _ := countingServer(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if mode.Load() == 1 {
			http.NotFound(w, r)
			return
		}
		w.Write(body)
	}))
	url := strings.Replace(srv.URL, "http://", "http://culprit:s3cret@", 1)
	st := signals.New(16, 256)
	c := NewPprofHeap(Options{}, PprofOptions{URL: url, MaxBytes: 1 << 20}) // no store: totals only
	if err := c.Collect(context.Background(), workload.Process{}, st); err != nil {
		t.Fatalf("uncompressed profile: %v", err)
	}
	if v, _ := latestValue(t, st, signals.HeapInuseBytes, nil); v <= 0 {
		t.Errorf("heap_inuse_bytes = %v", v)
	}
	mode.Store(1)
	err := c.Collect(context.Background(), workload.Process{}, st)
	if err == nil || strings.Contains(err.Error(), "s3cret") || !strings.Contains(err.Error(), "culprit:xxxxx@") {
		t.Errorf("error %v: want the URL with its password redacted", err)
	}
}

func TestPprofHeapNoSource(t *testing.T) {
	c := NewPprofHeap(Options{SideStores: signals.SideStores{Profiles: signals.NewProfiles(2)}}, PprofOptions{})
	st := signals.New(16, 64)
	if err := c.Collect(context.Background(), workload.Process{}, st); !errors.Is(err, ErrNoData) {
		t.Errorf("empty URL: err = %v, want ErrNoData", err)
	}
	if n := st.Stats().Series; n != 0 {
		t.Errorf("%d series written without a source", n)
	}
}

func TestPprofHeapStopping(t *testing.T) {
	srv, _ := countingServer(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { <-r.Context().Done() }))
	st := signals.New(16, 64)
	c := NewPprofHeap(Options{}, PprofOptions{URL: srv.URL, Timeout: 5 * time.Second})
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	if err := c.Collect(ctx, workload.Process{}, st); err == nil {
		t.Fatal("Collect succeeded")
	}
	// The agent stopping is not the app's failure.
	if n := len(st.Select(signals.PprofFetchErrorsTotal)); n != 0 {
		t.Errorf("%d error series written when the agent's context ended", n)
	}
}

func TestParseHeapFixture(t *testing.T) {
	gz := heapFixture(t, "heap-2.pb.gz")
	for name, b := range map[string][]byte{"gzip": gz, "plain": uncompressed(t, gz)} {
		hp, err := parseHeap(b, 1<<20)
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		var inuse, objects, alloc int64
		for _, s := range hp.Profile.Sample {
			alloc += s.Value[1]
			objects += s.Value[2]
			inuse += s.Value[3]
		}
		// The capture program holds about 8+16 MiB of cache and 12 MiB of
		// records when it writes heap-2.
		if hp.InuseBytes != float64(inuse) || inuse < 30<<20 || inuse > 42<<20 {
			t.Errorf("%s: InuseBytes = %.0f, want the sum %d, about 36 MiB", name, hp.InuseBytes, inuse)
		}
		if !hp.HasObjects || hp.InuseObjects != float64(objects) || !hp.HasAlloc || hp.AllocBytes != float64(alloc) {
			t.Errorf("%s: totals %+v, want objects %d, alloc %d", name, hp, objects, alloc)
		}
	}
	if _, err := parseHeap(gz, int64(len(gz))); !errors.Is(err, errPprofTooLarge) {
		t.Errorf("decompressed size over the limit: err = %v, want too large", err)
	}
	// A profile with inuse_space only is enough.
	b := heapFixture(t, "heap-1.pb.gz")
	p, _ := profile.ParseData(b)
	p.SampleType, p.DefaultSampleType = p.SampleType[3:], ""
	for _, s := range p.Sample {
		s.Value = s.Value[3:]
	}
	var buf bytes.Buffer
	if err := p.Write(&buf); err != nil {
		t.Fatal(err)
	}
	hp, err := parseHeap(buf.Bytes(), 1<<20)
	if err != nil || hp.HasAlloc || hp.HasObjects || hp.InuseBytes <= 0 {
		t.Errorf("inuse_space-only profile: %+v, %v", hp, err)
	}
	if ss := hp.samples(); len(ss) != 1 || ss[0].Desc != signals.HeapInuseBytes {
		t.Errorf("samples of an inuse_space-only profile: %+v", ss)
	}
}

// FuzzParseHeap: whatever the app serves, parseHeap returns a heap profile
// or an error the collector classifies as malformed or too large. It never
// panics.
func FuzzParseHeap(f *testing.F) {
	gz := heapFixture(f, "heap-2.pb.gz")
	f.Add(gz)
	f.Add(uncompressed(f, gz))
	f.Add(heapFixture(f, "heap-1.pb.gz")[:300])
	f.Add(cpuProfile(f))
	f.Add([]byte("heap profile: 1: 4096 [2: 8192] @ heap/1048576\n1: 4096 [2: 8192] @ 0x1 0x2\n"))
	f.Add([]byte("\x1f\x8b"))
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, b []byte) {
		hp, err := parseHeap(b, 1<<20)
		if err != nil {
			if r := pprofErrorReason(err); r != reasonMalformed && r != reasonTooLarge {
				t.Fatalf("error %v classified %q", err, r)
			}
			return
		}
		if hp.Profile == nil || math.IsNaN(hp.InuseBytes) {
			t.Fatalf("success without a profile: %+v", hp)
		}
		if _, ok := signals.SampleIndex(hp.Profile, signals.InuseSpace); !ok {
			t.Fatal("success without inuse_space")
		}
	})
}
