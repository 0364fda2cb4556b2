package traces

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"runtime"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	collectorpb "go.opentelemetry.io/proto/otlp/collector/trace/v1"
	tracepb "go.opentelemetry.io/proto/otlp/trace/v1"
	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"

	"github.com/culprit-dev/culprit/signals"
)

// These tests are the attacks that broke the receiver, run as an
// unprivileged neighbour in the pod would: real clients over loopback
// against the real servers.

// liveHeap is the live heap after a full collection.
func liveHeap() int64 {
	// Twice: buffers that gRPC (client and server, both in this process)
	// returned to its pools survive one collection in sync.Pool's victim
	// cache. One 4 MB message's buffers are then up to 8 MB that nothing
	// holds, which made this measure flaky (8.1 MB once in CI).
	runtime.GC()
	runtime.GC()
	var m runtime.MemStats
	runtime.ReadMemStats(&m)
	return int64(m.HeapAlloc)
}

// heapPeak samples the live heap every interval until stop is closed and
// returns the highest sample.
func heapPeak(stop <-chan struct{}, every time.Duration) <-chan int64 {
	out := make(chan int64, 1)
	go func() {
		var peak int64
		t := time.NewTicker(every)
		defer t.Stop()
		for {
			peak = max(peak, liveHeap())
			select {
			case <-stop:
				out <- peak
				return
			case <-t.C:
			}
		}
	}()
	return out
}

// normalExport sends one small, valid trace export over OTLP/HTTP as an
// SDK would, retrying (as SDKs do) on connection errors and 503 until
// deadline. It returns how long it took and the attempts made.
func normalExport(t *testing.T, addr string, deadline time.Duration) (time.Duration, int) {
	t.Helper()
	body, _ := proto.Marshal(validRequest())
	client := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	start := time.Now()
	for n := 1; ; n++ {
		resp, err := client.Post("http://"+addr+"/v1/traces", "application/x-protobuf", bytes.NewReader(body))
		if err == nil {
			_, _ = io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return time.Since(start), n
			}
			if resp.StatusCode != http.StatusServiceUnavailable {
				t.Fatalf("normal export: HTTP %d", resp.StatusCode)
			}
		}
		if time.Since(start) > deadline {
			t.Fatalf("normal export not answered within %v (%d attempts, last error %v)", deadline, n, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// 200 OTLP/HTTP uploads that each send all but the last byte of a 4 MB
// body once made RSS go from 99 MB to 1.8 GB. Now the in-flight budget
// holds what they send: three are read (12 of the 16 MB), the rest wait
// and are refused, those read are cut at the read timeout, a normal
// export gets in while they hang, and the live heap never grows by much
// more than the budget.
func TestSlowUploadsAreBounded(t *testing.T) {
	const (
		attackers = 200
		size      = 4 << 20
		budget    = 16 << 20
	)
	r, _, st := startReceiver(t, Options{MaxRequestBytes: size, MaxInflightBytes: budget, MaxConnections: 256,
		InflightWait: 500 * time.Millisecond, ReadTimeout: 3 * time.Second, HeaderTimeout: 2 * time.Second})
	payload := bytes.Repeat([]byte{0x0a}, size-1) // shared by every attacker: no client-side copies
	base := liveHeap()
	stop := make(chan struct{})
	peak := heapPeak(stop, 200*time.Millisecond)

	type result struct {
		status string
		took   time.Duration
	}
	results := make(chan result, attackers)
	start := time.Now()
	for range attackers {
		go func() {
			c, err := net.Dial("tcp", r.HTTPAddr)
			if err != nil {
				results <- result{"dial: " + err.Error(), time.Since(start)}
				return
			}
			defer c.Close()
			fmt.Fprintf(c, "POST /v1/traces HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-protobuf\r\nContent-Length: %d\r\n\r\n", size)
			_ = c.SetWriteDeadline(time.Now().Add(15 * time.Second))
			_, _ = c.Write(payload) // all but the last byte, then hang
			_ = c.SetReadDeadline(time.Now().Add(20 * time.Second))
			resp, err := http.ReadResponse(bufio.NewReader(c), nil)
			if err != nil {
				results <- result{"closed", time.Since(start)}
				return
			}
			resp.Body.Close()
			results <- result{resp.Status, time.Since(start)}
		}()
	}
	// Wait until the budget is taken by the attack, then export.
	deadline := time.Now().Add(10 * time.Second)
	for r.budget.inUse() < 3*size && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
	}
	held := r.budget.inUse()
	if held < 3*size {
		t.Fatalf("the attack holds %d bytes of the budget, want at least %d", held, 3*size)
	}
	took, tries := normalExport(t, r.HTTPAddr, 2500*time.Millisecond)
	if still := r.budget.inUse(); still < 3*size {
		t.Errorf("the attack let go of the budget (%d bytes held) before the normal export was answered", still)
	}
	t.Logf("normal export answered in %v (%d attempts) while the attack held %.1f MB of the budget", took.Round(time.Millisecond), tries, float64(held)/(1<<20))

	byStatus := map[string]int{}
	var last time.Duration
	for range attackers {
		res := <-results
		byStatus[res.status]++
		last = max(last, res.took)
	}
	close(stop)
	grew := <-peak - base
	t.Logf("attack answered: %v; the last after %v; live heap peaked %.1f MB above the start", byStatus, last.Round(time.Millisecond), float64(grew)/(1<<20))
	if grew > budget+12<<20 {
		t.Errorf("live heap grew %.1f MB during the attack, more than the %d MB budget and 12 MB of connections", float64(grew)/(1<<20), budget>>20)
	}
	if last > 3*time.Second+500*time.Millisecond+3*time.Second {
		t.Errorf("an upload was still connected after %v: read timeout 3 s", last)
	}
	if byStatus["200 OK"] > 0 || byStatus["503 Service Unavailable"] < attackers/2 {
		t.Errorf("answers %v: want the waiting uploads refused with 503", byStatus)
	}
	if v, _ := st.Latest(signals.OTLPRequestsTotal, traceLabels("http", "busy")); int(v.V) != byStatus["503 Service Unavailable"] {
		t.Errorf("busy requests counted %v, answered %d", v.V, byStatus["503 Service Unavailable"])
	}
	if v, _ := st.Latest(signals.OTLPRequestsTotal, traceLabels("http", "timeout")); v.V < 1 {
		t.Errorf("no upload counted as timed out")
	}
	waitFor(t, 5*time.Second, func() bool { return r.budget.inUse() == 0 }, "the budget to be given back")
}

func waitFor(t *testing.T, d time.Duration, ok func() bool, what string) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !ok() {
		if time.Now().After(deadline) {
			t.Fatalf("gave up after %v waiting for %s", d, what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// slowConn dials addr and sends msg a byte every interval until the
// server closes the connection; it returns how long the server kept it.
func slowConn(addr string, msg []byte, every time.Duration, done chan<- time.Duration, stop <-chan struct{}) {
	start := time.Now()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		done <- 0
		return
	}
	defer c.Close()
	closed := make(chan struct{})
	go func() {
		// The server closing (or answering and closing) ends the read.
		_, _ = io.Copy(io.Discard, c)
		close(closed)
	}()
	for i := 0; ; i++ {
		if i < len(msg) {
			if _, err := c.Write(msg[i : i+1]); err != nil {
				break
			}
		}
		select {
		case <-closed:
			done <- time.Since(start)
			return
		case <-stop:
			done <- -1
			return
		case <-time.After(every):
		}
	}
	<-closed
	done <- time.Since(start)
}

// 1000 connections sending a byte a second held 1083 descriptors for 90 s.
// Now the listener holds at most MaxConnections, a silent connection is
// evicted for a new one, a slow one is cut at the header or read
// timeout, and a normal export gets in during the flood.
func TestSlowConnectionsAreCut(t *testing.T) {
	const (
		conns   = 1000
		maxConn = 64
	)
	o := Options{MaxConnections: maxConn, HeaderTimeout: time.Second, ReadTimeout: 2 * time.Second, IdleTimeout: 2 * time.Second}
	for _, transport := range []string{"http", "grpc"} {
		t.Run(transport, func(t *testing.T) {
			r, _, _ := startReceiver(t, o)
			addr, headers, body := r.HTTPAddr, []byte("POST /v1/traces HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-protobuf\r\n\r\n"),
				[]byte("POST /v1/traces HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-protobuf\r\nContent-Length: 1000\r\n\r\n")
			if transport == "grpc" {
				addr, headers, body = r.GRPCAddr, []byte(http2.ClientPreface), []byte(http2.ClientPreface)
			}
			done := make(chan time.Duration, conns)
			stop := make(chan struct{})
			defer close(stop)
			var maxOpen atomic.Int64
			sampled, sampling := make(chan struct{}), make(chan struct{})
			go func() {
				defer close(sampling)
				for {
					g, h := r.Connections()
					maxOpen.Store(max(maxOpen.Load(), int64(g+h)))
					select {
					case <-sampled:
						return
					case <-time.After(10 * time.Millisecond):
					}
				}
			}()
			for i := range conns {
				msg := headers
				if i%2 == 1 {
					// Whole headers at once, then the body a byte a
					// second: the read timeout's case.
					msg = body
					go func() {
						c, err := net.Dial("tcp", addr)
						if err != nil {
							done <- 0
							return
						}
						start := time.Now()
						_, _ = c.Write(msg)
						slowRest(c, start, done, stop)
					}()
					continue
				}
				go slowConn(addr, msg, time.Second, done, stop)
			}
			time.Sleep(1500 * time.Millisecond) // the flood is on
			if transport == "http" {
				took, tries := normalExport(t, addr, 5*time.Second)
				t.Logf("normal export answered in %v (%d attempts) during the flood", took.Round(time.Millisecond), tries)
			} else {
				took := grpcExport(t, addr, 5*time.Second)
				t.Logf("normal gRPC export answered in %v during the flood", took.Round(time.Millisecond))
			}
			var longest time.Duration
			for range conns {
				d := <-done
				if d < 0 {
					t.Fatal("a slow connection was never cut")
				}
				longest = max(longest, d)
			}
			close(sampled)
			<-sampling
			t.Logf("%d slow connections: the longest kept %v; at most %d open at once", conns, longest.Round(time.Millisecond), maxOpen.Load())
			// Header timeout 1 s, read timeout 2 s (the gRPC preface is
			// cut by the connection timeout, 1 s); 3 s of slack for a
			// loaded machine under -race.
			if longest > 2*time.Second+3*time.Second {
				t.Errorf("a slow connection was kept %v", longest)
			}
			if maxOpen.Load() > maxConn+1 {
				t.Errorf("%d connections open at once, cap %d", maxOpen.Load(), maxConn)
			}
		})
	}
}

// slowRest sends a byte a second on c until the server closes it.
func slowRest(c net.Conn, start time.Time, done chan<- time.Duration, stop <-chan struct{}) {
	defer c.Close()
	closed := make(chan struct{})
	go func() { _, _ = io.Copy(io.Discard, c); close(closed) }()
	for {
		select {
		case <-closed:
			done <- time.Since(start)
			return
		case <-stop:
			done <- -1
			return
		case <-time.After(time.Second):
			_, _ = c.Write([]byte{0})
		}
	}
}

// grpcExport sends one valid export over OTLP/gRPC, retrying as SDKs do.
func grpcExport(t *testing.T, addr string, deadline time.Duration) time.Duration {
	t.Helper()
	start := time.Now()
	for {
		conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		_, err = collectorpb.NewTraceServiceClient(conn).Export(ctx, validRequest())
		cancel()
		conn.Close()
		if err == nil {
			return time.Since(start)
		}
		if time.Since(start) > deadline {
			t.Fatalf("gRPC export not answered within %v: %v", deadline, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// A gRPC stream that announces a message and sends it a byte a second is
// cut by the stream's deadline, and the budget it held is given back.
func TestSlowGRPCStreamIsCut(t *testing.T) {
	r, _, st := startReceiver(t, Options{ReadTimeout: time.Second, InflightWait: 200 * time.Millisecond, WriteTimeout: 500 * time.Millisecond})
	c, err := net.Dial("tcp", r.GRPCAddr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	fr := http2.NewFramer(c, c)
	_, _ = c.Write([]byte(http2.ClientPreface))
	if err := fr.WriteSettings(); err != nil {
		t.Fatal(err)
	}
	var hb bytes.Buffer
	enc := hpack.NewEncoder(&hb)
	for _, f := range [][2]string{{":method", "POST"}, {":scheme", "http"}, {":path", signalTraces.method()}, {":authority", "x"},
		{"content-type", "application/grpc"}, {"te", "trailers"}} {
		_ = enc.WriteField(hpack.HeaderField{Name: f[0], Value: f[1]})
	}
	if err := fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: hb.Bytes(), EndHeaders: true}); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	// A gRPC message prefix announcing 100000 bytes, then a byte a second.
	if err := fr.WriteData(1, false, []byte{0, 0, 1, 0x86, 0xa0}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 2*time.Second, func() bool { return r.budget.inUse() > 0 }, "the stream to take its share of the budget")
	ended := make(chan string, 1)
	go func() {
		for {
			f, err := fr.ReadFrame()
			if err != nil {
				ended <- "connection closed: " + err.Error()
				return
			}
			switch f := f.(type) {
			case *http2.RSTStreamFrame:
				ended <- "RST_STREAM " + f.ErrCode.String()
				return
			case *http2.MetaHeadersFrame:
				if f.StreamEnded() {
					ended <- "trailers " + fmt.Sprint(f.Fields)
					return
				}
			case *http2.HeadersFrame:
				if f.StreamEnded() {
					ended <- "trailers"
					return
				}
			}
		}
	}()
	for {
		select {
		case how := <-ended:
			took := time.Since(start)
			t.Logf("slow stream ended after %v: %s", took.Round(time.Millisecond), how)
			if took > 1700*time.Millisecond+3*time.Second {
				t.Errorf("the stream was kept %v; its deadline is 1.7 s", took)
			}
			waitFor(t, 3*time.Second, func() bool { return r.budget.inUse() == 0 }, "the stream's budget to be given back")
			if v, _ := st.Latest(signals.OTLPRequestsTotal, traceLabels("grpc", "timeout")); v.V != 1 {
				t.Errorf("timed-out streams counted %v, want 1", v.V)
			}
			return
		case <-time.After(time.Second):
			_ = fr.WriteData(1, false, []byte{0})
			if time.Since(start) > 15*time.Second {
				t.Fatal("the slow stream was never cut")
			}
		}
	}
}

// 100 spans with 4 MB names once kept 430 MB of live heap through the span
// store. Strings are now cut to traces.max_string_bytes in copies of their
// own, so the names are not kept at all.
func TestHugeSpanNamesAreCut(t *testing.T) {
	spans := signals.NewSpansBounded(65536, 32<<20)
	r, _, st := startReceiver(t, Options{Spans: spans, MaxRequestBytes: 5 << 20, MaxInflightBytes: 32 << 20})
	conn, err := grpc.NewClient(r.GRPCAddr, grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithDefaultCallOptions(grpc.MaxCallSendMsgSize(8<<20)))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	client := collectorpb.NewTraceServiceClient(conn)
	base := liveHeap()
	now := uint64(time.Now().UnixNano())
	for i := range 100 {
		req := validRequest()
		sp := req.ResourceSpans[0].ScopeSpans[0].Spans[0]
		sp.SpanId = []byte{byte(i + 1), 2, 3, 4, 5, 6, 7, 8}
		sp.Name = strings.Repeat(string(rune('a'+i%26)), 4<<20)
		sp.StartTimeUnixNano, sp.EndTimeUnixNano = now-1e6, now
		req.ResourceSpans[0].ScopeSpans[0].Spans = []*tracepb.Span{sp}
		if _, err := client.Export(context.Background(), req); err != nil {
			t.Fatalf("export %d: %v", i, err)
		}
	}
	grew := liveHeap() - base
	ss := spans.Stats()
	t.Logf("after 100 spans with 4 MB names: %d spans, %d bytes held; live heap grew %.1f MB", ss.Spans, ss.Bytes, float64(grew)/(1<<20))
	if ss.Spans != 100 || ss.Bytes > 100*1024 {
		t.Errorf("store %+v: want 100 spans of under 1 KB each", ss)
	}
	for _, sp := range spans.Overlapping(time.Unix(0, int64(now)).Add(-time.Minute), time.Now()) {
		if len(sp.Name) > DefaultMaxStringBytes || len(sp.Route) > DefaultMaxStringBytes {
			t.Fatalf("a kept name of %d bytes", len(sp.Name))
		}
	}
	if grew > 2<<20 { // one kept name (4 MB) fails it; measured 0.3 MB
		t.Errorf("live heap grew %.1f MB for 100 spans", float64(grew)/(1<<20))
	}
	if v, _ := st.Latest(signals.OTLPSpanStringsTruncatedTotal, nil); v.V != 100 { // the names (routes default to them, cut)
		t.Errorf("truncated strings counted %v, want 100", v.V)
	}
}

// An export whose decoding would multiply its size (4 MB of empty spans
// decode to 600 MB of structs) is priced before it is decoded and refused.
func TestDecodeBombRefused(t *testing.T) {
	r, _, st := startReceiver(t, Options{MaxRequestBytes: 4 << 20, MaxInflightBytes: 64 << 20})
	// Empty spans, 2 bytes each on the wire (field 2 of ScopeSpans, length
	// 0), just under max_request_bytes, encoded by hand: building 2
	// million Span structs to marshal them is slow under -race.
	scope := bytes.Repeat([]byte{0x12, 0x00}, 2<<20-64)
	resource := protowire.AppendBytes(protowire.AppendTag(nil, 2, protowire.BytesType), scope) // ResourceSpans.scope_spans
	wire := protowire.AppendBytes(protowire.AppendTag(nil, 1, protowire.BytesType), resource)  // ExportTraceServiceRequest.resource_spans
	for _, tc := range []struct{ ct, body string }{
		{"application/x-protobuf", string(wire)},
		{"application/json", `{"resourceSpans":[{"scopeSpans":[{"spans":[` + strings.Repeat("{},", 1<<20) + `{}]}]}]}`},
	} {
		var code int
		var msg string
		alloc := allocated(func() {
			resp, err := http.Post("http://"+r.HTTPAddr+"/v1/traces", tc.ct, strings.NewReader(tc.body))
			if err != nil {
				t.Fatal(err)
			}
			b, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			code, msg = resp.StatusCode, string(b)
		})
		t.Logf("%s bomb of %d bytes: HTTP %d, %.1f MB allocated while handling it", tc.ct, len(tc.body), code, float64(alloc)/(1<<20))
		// 413 for the decoding cost (a bad encoding would be 400).
		if code != http.StatusRequestEntityTooLarge || !strings.Contains(msg, "decoding this request would take") {
			t.Errorf("%s bomb: HTTP %d %q", tc.ct, code, msg)
		}
		if alloc > 3*uint64(len(tc.body))+8<<20 {
			t.Errorf("%s bomb: %d bytes allocated for a %d-byte body", tc.ct, alloc, len(tc.body))
		}
	}
	if v, _ := st.Latest(signals.OTLPRequestsTotal, traceLabels("http", "too_large")); v.V != 2 {
		t.Errorf("too_large counted %v, want 2", v.V)
	}
}
