package traces

import (
	"context"
	"log/slog"
	"sync"
	"time"

	collectorpb "go.opentelemetry.io/proto/otlp/collector/trace/v1"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/culprit-dev/culprit/signals"
)

var (
	sigForwarded = &signals.Desc{Name: "otlp_forwarded_requests_total", Kind: signals.Counter,
		Help: "Export requests forwarded to traces.forward_endpoint, by result (ok, error, dropped: the queue was full)."}
)

// Forwarder passes export requests on to the pod's own collector through
// a bounded queue; when the collector is slow or down, requests are
// dropped and counted rather than held.
type Forwarder struct {
	conn   *grpc.ClientConn
	client collectorpb.TraceServiceClient
	queue  chan *collectorpb.ExportTraceServiceRequest
	store  *signals.Store
	log    *slog.Logger
	wg     sync.WaitGroup

	mu     sync.Mutex
	counts map[string]float64
}

// NewForwarder dials endpoint (host:port, OTLP gRPC, plaintext) lazily and
// queues at most queue requests.
func NewForwarder(endpoint string, queue int, store *signals.Store, log *slog.Logger) (*Forwarder, error) {
	conn, err := grpc.NewClient(endpoint, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return nil, err
	}
	f := &Forwarder{conn: conn, client: collectorpb.NewTraceServiceClient(conn),
		queue: make(chan *collectorpb.ExportTraceServiceRequest, max(queue, 1)), store: store, log: log, counts: map[string]float64{}}
	f.wg.Add(1)
	go f.run()
	return f, nil
}

// Enqueue forwards req later, or drops it when the queue is full.
func (f *Forwarder) Enqueue(req *collectorpb.ExportTraceServiceRequest) {
	select {
	case f.queue <- req:
	default:
		f.count("dropped")
	}
}

func (f *Forwarder) run() {
	defer f.wg.Done()
	for req := range f.queue {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		_, err := f.client.Export(ctx, req)
		cancel()
		if err != nil {
			f.log.Debug("forward spans", "err", err)
			f.count("error")
			continue
		}
		f.count("ok")
	}
}

func (f *Forwarder) count(result string) {
	f.mu.Lock()
	f.counts[result]++
	n := f.counts[result]
	f.mu.Unlock()
	if f.store != nil {
		f.store.Put(sigForwarded, signals.L("result", result), n, time.Now())
	}
}

// Close sends what is queued, then closes the connection.
func (f *Forwarder) Close() error {
	close(f.queue)
	f.wg.Wait()
	return f.conn.Close()
}
