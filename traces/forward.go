package traces

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/mem"

	"github.com/culprit-dev/culprit/signals"
)

// ForwardOptions configure a Forwarder ([traces] in agent.conf).
type ForwardOptions struct {
	Endpoint string // host:port of an OTLP/gRPC collector, plaintext
	// Queue and QueueBytes bound the requests waiting to be sent, in
	// number and in bytes (traces.forward_queue, traces.forward_queue_bytes).
	Queue, QueueBytes int
	// Timeout bounds one export to the collector, and Close's flush.
	Timeout time.Duration
	Store   *signals.Store
	Log     *slog.Logger
}

// Forwarder passes export requests (traces, metrics, logs) on to the pod's
// own collector, as the encoded requests they arrived as, through a queue
// bounded in requests and bytes; when the collector is slow or down,
// requests are dropped and counted rather than held.
type Forwarder struct {
	o      ForwardOptions
	conn   *grpc.ClientConn
	ctx    context.Context // cancelled when Close gives up flushing
	cancel context.CancelFunc
	done   chan struct{}
	wake   chan struct{}

	mu     sync.Mutex
	queue  []forwardItem
	bytes  int
	closed bool
	counts map[[2]string]float64
}

type forwardItem struct {
	signal, method string
	payload        []byte // the encoded Export*ServiceRequest
}

// NewForwarder dials endpoint lazily and queues at most queue requests
// (and the default 16 MiB). Kept for existing callers; NewForwarderOptions
// takes the byte bound and timeout too.
func NewForwarder(endpoint string, queue int, store *signals.Store, log *slog.Logger) (*Forwarder, error) {
	return NewForwarderOptions(ForwardOptions{Endpoint: endpoint, Queue: queue, Store: store, Log: log})
}

// NewForwarderOptions dials the endpoint lazily.
func NewForwarderOptions(o ForwardOptions) (*Forwarder, error) {
	if o.Queue <= 0 {
		o.Queue = 64
	}
	if o.QueueBytes <= 0 {
		o.QueueBytes = 16 << 20
	}
	if o.Timeout <= 0 {
		o.Timeout = 5 * time.Second
	}
	if o.Log == nil {
		o.Log = slog.New(slog.DiscardHandler)
	}
	conn, err := grpc.NewClient(o.Endpoint, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return nil, fmt.Errorf("forward endpoint %q (traces.forward_endpoint): %w", o.Endpoint, err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	f := &Forwarder{o: o, conn: conn, ctx: ctx, cancel: cancel, done: make(chan struct{}), wake: make(chan struct{}, 1), counts: map[[2]string]float64{}}
	go f.run()
	return f, nil
}

// enqueue forwards payload later, or drops it when the queue is full.
// The queue owns payload from now on.
func (f *Forwarder) enqueue(signal, method string, payload []byte) bool {
	f.mu.Lock()
	if f.closed || len(f.queue) >= f.o.Queue || f.bytes+len(payload) > f.o.QueueBytes {
		f.mu.Unlock()
		f.count(signal, "dropped")
		return false
	}
	f.queue = append(f.queue, forwardItem{signal: signal, method: method, payload: payload})
	f.bytes += len(payload)
	f.gaugeLocked()
	f.mu.Unlock()
	select {
	case f.wake <- struct{}{}:
	default:
	}
	return true
}

// next takes the oldest request, waiting for one; false once closed and
// empty.
func (f *Forwarder) next() (forwardItem, bool) {
	for {
		f.mu.Lock()
		if len(f.queue) > 0 {
			it := f.queue[0]
			f.queue[0] = forwardItem{}
			f.queue = f.queue[1:]
			if len(f.queue) == 0 {
				f.queue = nil // let the backing array go
			}
			f.bytes -= len(it.payload)
			f.gaugeLocked()
			f.mu.Unlock()
			return it, true
		}
		closed := f.closed
		f.mu.Unlock()
		if closed {
			return forwardItem{}, false
		}
		<-f.wake
	}
}

func (f *Forwarder) run() {
	defer close(f.done)
	for {
		it, ok := f.next()
		if !ok {
			return
		}
		if f.ctx.Err() != nil {
			f.count(it.signal, "dropped") // Close gave up on the flush
			continue
		}
		ctx, cancel := context.WithTimeout(f.ctx, f.o.Timeout)
		err := f.conn.Invoke(ctx, it.method, wireRequest(it.payload), &discardResponse{}, grpc.ForceCodecV2(forwardCodec{}))
		cancel()
		if err != nil {
			f.o.Log.Debug("forward OTLP export", "signal", it.signal, "err", err)
			f.count(it.signal, "error")
			continue
		}
		f.count(it.signal, "ok")
	}
}

func (f *Forwarder) count(signal, result string) {
	f.mu.Lock()
	defer f.mu.Unlock() // published in order
	k := [2]string{signal, result}
	f.counts[k]++
	if f.o.Store != nil {
		f.o.Store.Put(signals.OTLPForwardedRequestsTotal, signals.L("signal", signal, "result", result), f.counts[k], time.Now())
	}
}

// gaugeLocked publishes the queue's size; f.mu is held.
func (f *Forwarder) gaugeLocked() {
	if f.o.Store != nil {
		f.o.Store.Put(signals.OTLPForwardQueueBytes, nil, float64(f.bytes), time.Now())
	}
}

// Close sends what is queued, for at most Timeout, drops the rest
// (counted), then closes the connection.
func (f *Forwarder) Close() error {
	f.mu.Lock()
	f.closed = true
	f.mu.Unlock()
	select {
	case f.wake <- struct{}{}:
	default:
	}
	t := time.NewTimer(f.o.Timeout)
	defer t.Stop()
	select {
	case <-f.done:
	case <-t.C:
		f.cancel()
		<-f.done
	}
	f.cancel()
	if err := f.conn.Close(); err != nil {
		return fmt.Errorf("close forward connection: %w", err)
	}
	return nil
}

// wireRequest is an export request already encoded: sent as is.
type wireRequest []byte

// discardResponse takes the collector's answer, which is not needed: a
// partial success upstream is the collector's business.
type discardResponse struct{}

// forwardCodec sends wireRequest bytes unchanged and ignores responses.
type forwardCodec struct{}

var errForwardCodec = errors.New("forwardCodec: not a wireRequest")

func (forwardCodec) Marshal(v any) (mem.BufferSlice, error) {
	b, ok := v.(wireRequest)
	if !ok {
		return nil, errForwardCodec
	}
	return mem.BufferSlice{mem.SliceBuffer(b)}, nil
}

func (forwardCodec) Unmarshal(mem.BufferSlice, any) error { return nil }

func (forwardCodec) Name() string { return "proto" }
