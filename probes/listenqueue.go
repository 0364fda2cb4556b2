package probes

//go:generate go tool bpf2go -tags linux -target bpfel -type listen_queue listenQueue ../bpf/listen_queue.c -- -I../bpf/headers -I/usr/include -Wall -Werror -O2

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"sync"
	"unsafe"

	"github.com/cilium/ebpf/link"

	"github.com/culprit-dev/culprit/sockdiag"
)

// ListenQueue is one listening TCP socket's queues, as the kernel holds
// them on the listener.
type ListenQueue struct {
	Port   uint16
	Family uint8 // AF_INET or AF_INET6
	// HalfOpen counts its half-open connections: request sockets in
	// SYN_RECV, in the kernel's established hash (icsk_accept_queue.qlen).
	HalfOpen uint32
	// Queued counts the connections waiting for accept(); Backlog is
	// that queue's capacity.
	Queued, Backlog uint32
}

// ListenQueues reads the listeners of a network namespace with an eBPF
// tcp iterator (bpf/listen_queue.c) that stops where the listening hash
// ends: what a sock_diag dump of SYN_RECV sockets can only learn by
// walking every bucket of the established hash. It is not a Probe: it
// attaches nothing to the kernel's paths and costs nothing until Read.
type ListenQueues struct {
	mu   sync.Mutex
	objs listenQueueObjects
	it   *link.Iter
	rec  [unsafe.Sizeof(listenQueueListenQueue{})]byte
	buf  []ListenQueue // HalfOpen's, reused
}

// NewListenQueues loads and attaches the iterator. The error says why it
// could not (rights, a kernel without the tcp iterator).
func NewListenQueues() (*ListenQueues, error) {
	spec, err := loadListenQueue()
	if err != nil {
		return nil, fmt.Errorf("listenqueue: %w", err)
	}
	q := &ListenQueues{}
	if err := load("listenqueue", spec, &q.objs); err != nil {
		return nil, err
	}
	q.it, err = link.AttachIter(link.IterOptions{Program: q.objs.CulpritListenQueue})
	if err != nil {
		q.objs.Close()
		return nil, fmt.Errorf("listenqueue: attach iter/tcp: %w", err)
	}
	return q, nil
}

// maxListeners bounds one Read: a namespace with more listeners than
// this is read on its first maxListeners (a bound on the reads, whatever
// the namespace holds).
const maxListeners = 4096

// Read appends the listeners of the calling thread's network namespace to
// buf: the caller runs it on a thread in the namespace it means
// (sockdiag.InTargetNetns). Each read(2) asks for one record, so that the
// kernel returns as soon as it has one and the read after the last
// listener's stops the walk at the first socket of the established hash.
func (q *ListenQueues) Read(buf []ListenQueue) ([]ListenQueue, error) {
	q.mu.Lock()
	defer q.mu.Unlock()
	return q.readLocked(buf)
}

func (q *ListenQueues) readLocked(buf []ListenQueue) ([]ListenQueue, error) {
	if q.it == nil {
		return buf, errors.New("listenqueue: closed")
	}
	rd, err := q.it.Open()
	if err != nil {
		return buf, fmt.Errorf("listenqueue: open the iterator: %w", err)
	}
	defer rd.Close()
	for range maxListeners {
		if _, err := io.ReadFull(rd, q.rec[:]); err != nil {
			if errors.Is(err, io.EOF) {
				return buf, nil // no socket past the listeners
			}
			return buf, fmt.Errorf("listenqueue: read: %w", err)
		}
		// struct listen_queue, field by field.
		b, ne := q.rec[:], binary.NativeEndian
		if state := b[14]; state != sockdiag.Listen {
			return buf, nil // the established hash begins
		}
		buf = append(buf, ListenQueue{HalfOpen: ne.Uint32(b[0:]), Queued: ne.Uint32(b[4:]), Backlog: ne.Uint32(b[8:]),
			Port: ne.Uint16(b[12:]), Family: b[15]})
	}
	return buf, nil
}

// HalfOpen is the number of half-open connections on every listener of
// the calling thread's network namespace (collectors.HalfOpenCounter).
func (q *ListenQueues) HalfOpen() (int, error) {
	q.mu.Lock()
	defer q.mu.Unlock()
	var err error
	q.buf, err = q.readLocked(q.buf[:0])
	n := 0
	for _, l := range q.buf {
		n += int(l.HalfOpen)
	}
	return n, err
}

// Close detaches and unloads the iterator.
func (q *ListenQueues) Close() error {
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.it == nil {
		return nil
	}
	err := errors.Join(q.it.Close(), q.objs.Close())
	q.it = nil
	return err
}
