package exporters

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
	"google.golang.org/grpc"

	"github.com/culprit-dev/culprit/exporters/rawh2"
	culpritv1 "github.com/culprit-dev/culprit/proto/culprit/v1"
	"github.com/culprit-dev/culprit/rules"
	"github.com/culprit-dev/culprit/signals"
)

// The cost of one refused 15 MB authorization header: what the server
// read of it (the figure the tests bound generously) and the time to
// refuse it.
func BenchmarkRefusedHugeHeader(b *testing.B) {
	hs := serveHardB(b)
	var written int64
	before := hs.counted.read.Load()
	b.ResetTimer()
	for range b.N {
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		r, err := rawh2.SendHugeHeader(ctx, hs.addr, culpritv1.Diagnostics_ListFindings_FullMethodName, "authorization", 15<<20)
		cancel()
		if err != nil {
			b.Fatal(err)
		}
		if !r.ServerClosed {
			b.Fatal("the server took the whole header")
		}
		written += r.Written
	}
	b.StopTimer()
	b.ReportMetric(float64(hs.counted.read.Load()-before)/float64(b.N), "server-read-B/op")
	b.ReportMetric(float64(written)/float64(b.N), "in-sockets-B/op")
}

// serveHardB is serveHard for benchmarks: the service behind the agent's
// options, on a counted and capped listener.
func serveHardB(b *testing.B) *hardServer {
	b.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	cl := &countingListener{Listener: l}
	lim, err := NewConnLimiter(cl, "agent.grpc_addr", 64, nil)
	if err != nil {
		b.Fatal(err)
	}
	opts, err := ServerSecurity{Conns: lim}.ServerOptions()
	if err != nil {
		b.Fatal(err)
	}
	srv := grpc.NewServer(opts...)
	NewGRPC(GRPCOptions{Journal: rules.NewJournal(8), Store: signals.New(4, 16)}).Register(srv)
	go srv.Serve(lim)
	b.Cleanup(srv.Stop)
	return &hardServer{addr: l.Addr().String(), lim: lim, counted: cl}
}

// Accepting a flood of idle connections at the HTTP listener's cap (256):
// the time per connection (accept, evict the oldest idle, close it) and
// the connections the listener held at the end.
func BenchmarkIdleFloodAtCap(b *testing.B) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	lim, err := NewConnLimiter(l, "agent.http_addr", 256, nil)
	if err != nil {
		b.Fatal(err)
	}
	lim.ForHTTP()
	mux := http.NewServeMux()
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) { fmt.Fprintln(w, "ok") })
	srv := NewHTTPServer(mux, HTTPLimits{}, nil)
	go srv.Serve(lim)
	b.Cleanup(func() { srv.Close() })
	addr := l.Addr().String()
	var held []net.Conn
	release := func() {
		for _, c := range held {
			c.Close()
		}
		held = held[:0]
	}
	b.Cleanup(release)
	b.ResetTimer()
	for i := range b.N {
		// Source addresses that pick ports at connect: the client's port
		// search must not be what is measured.
		d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.IPv4(127, 0, 0, byte(2+i%8))},
			Control: func(_, _ string, rc syscall.RawConn) error {
				return rc.Control(func(fd uintptr) { syscall.SetsockoptInt(int(fd), syscall.IPPROTO_IP, unix.IP_BIND_ADDRESS_NO_PORT, 1) })
			}}
		c, err := d.Dial("tcp", addr)
		if err != nil {
			b.Fatal(err)
		}
		if i%2 == 0 {
			io.WriteString(c, "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
		}
		held = append(held, c)
		if len(held) == 8192 {
			release()
		}
	}
	b.StopTimer()
	st := lim.Stats()
	b.ReportMetric(float64(st.Open), "open-at-end")
	b.ReportMetric(float64(st.Evicted)/float64(b.N), "evicted/op")
}
