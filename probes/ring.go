package probes

import (
	"errors"
	"fmt"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
	"unsafe"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/ringbuf"
	"golang.org/x/sys/unix"
)

// ringReader reads a BPF ring buffer with no thread blocked in the kernel
// waiting for it: the ring's descriptor waits in the Go runtime's network
// poller, like a socket's, and the records are read without blocking.
//
// ringbuf.Reader waits in an epoll_wait system call of its own. With the
// agent on one P (agent.max_procs), the runtime's sysmon takes the P back
// from every such call and, having taken one, checks again 20 us later,
// backing off only after a millisecond: each wake-up of each reader (the
// flushes at every poll, the events that wake) set it spinning again.
// Beside nginx flat out sysmon was a fifth of the agent's CPU.
type ringReader struct {
	*ringbuf.Reader
	f  *os.File // a duplicate of the ring's descriptor, in the poller
	rc syscall.RawConn
	// mu orders wait's look at the ring before Close unmaps it (the
	// poller's own wait for wait to return is not one the race detector
	// sees).
	mu     sync.Mutex
	closed bool
	// closing is set before Close closes f: a wait that f's close ends
	// gets the poller's "use of closed file", which is not os.ErrClosed,
	// and each probe's reader logged it as a warning at every stop.
	closing atomic.Bool
	// drainMu makes drains take turns; rec is theirs.
	drainMu sync.Mutex
	rec     ringbuf.Record
}

// readNow is a deadline long past: the reader never waits in the kernel.
var readNow = time.Unix(1, 0)

func newRingReader(m *ebpf.Map) (*ringReader, error) {
	rd, err := ringbuf.NewReader(m)
	if err != nil {
		return nil, err
	}
	rd.SetDeadline(readNow)
	fd, err := unix.FcntlInt(uintptr(m.FD()), unix.F_DUPFD_CLOEXEC, 0)
	if err != nil {
		rd.Close()
		return nil, fmt.Errorf("duplicate the ring's descriptor: %w", err)
	}
	// Non-blocking: os.NewFile adds it to the runtime's poller.
	if err := unix.SetNonblock(fd, true); err != nil {
		unix.Close(fd)
		rd.Close()
		return nil, fmt.Errorf("ring descriptor non-blocking: %w", err)
	}
	f := os.NewFile(uintptr(fd), "ringbuf")
	// Only a descriptor in the poller takes deadlines: one that is not
	// would make every wait fail.
	if err := f.SetReadDeadline(time.Time{}); err != nil {
		f.Close()
		rd.Close()
		return nil, fmt.Errorf("ring descriptor not pollable by the runtime: %w", err)
	}
	rc, err := f.SyscallConn()
	if err != nil {
		f.Close()
		rd.Close()
		return nil, fmt.Errorf("ring descriptor: %w", err)
	}
	return &ringReader{Reader: rd, f: f, rc: rc}, nil
}

// wait returns when the ring holds records (nil), when Flush was called
// (os.ErrDeadlineExceeded) or when the reader was closed.
func (r *ringReader) wait() error {
	err := r.rc.Read(func(uintptr) bool {
		r.mu.Lock()
		defer r.mu.Unlock()
		return r.closed || r.AvailableBytes() > 0
	})
	switch {
	case errors.Is(err, os.ErrDeadlineExceeded):
		r.f.SetReadDeadline(time.Time{})
	case err != nil && r.closing.Load():
		return fmt.Errorf("ring reader closed: %w", os.ErrClosed)
	}
	return err
}

// drain hands handle every record the ring holds now, in the ring's
// order, and returns without waiting. An empty ring costs one atomic load:
// no record is asked for, so cilium's reader makes no epoll_wait call to
// learn it is empty (it makes one when a drain begins after a drain that
// ran the ring dry, with a deadline long past). Drains of the reading
// goroutine and of a poll (TCPLife's) take turns (drainMu). handle runs
// outside mu, which Close takes: a handler may take its probe's lock,
// which stop holds while it closes the reader. It returns
// ringbuf.ErrClosed once the reader is closed.
func (r *ringReader) drain(handle func([]byte)) error {
	r.drainMu.Lock()
	defer r.drainMu.Unlock()
	for {
		rec, err := r.next()
		if rec == nil || err != nil {
			return err
		}
		handle(rec)
	}
}

// next reads one record under mu (the ring is unmapped by Close), or nil
// when the ring is dry. The record is valid until the next call.
func (r *ringReader) next() ([]byte, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.closed {
		return nil, ringbuf.ErrClosed
	}
	if r.AvailableBytes() == 0 {
		return nil, nil
	}
	switch err := r.ReadInto(&r.rec); {
	case err == nil:
		return r.rec.RawSample, nil
	case errors.Is(err, os.ErrDeadlineExceeded):
		// What was available was discarded records: the ring is dry.
		return nil, nil
	default:
		return nil, err
	}
}

// Flush makes the reading goroutine read the ring now, records sent
// without a wake-up (BPF_RB_NO_WAKEUP) included, and then call its
// flushed callback (readRingFlushed).
func (r *ringReader) Flush() error {
	return r.f.SetReadDeadline(time.Now())
}

// Close ends the reading goroutine's wait and releases the ring.
func (r *ringReader) Close() error {
	r.closing.Store(true)
	err := r.f.Close()
	r.mu.Lock()
	defer r.mu.Unlock()
	r.closed = true
	return errors.Join(err, r.Reader.Close())
}

// copyRecord copies a ring record into dst, the bpf2go type of its C struct:
// the record is laid out as the kernel (little-endian, the only kind the
// bpfel objects load on) laid the struct out, which is what HostLayout
// gives the Go type. Copied, not decoded field by field through
// reflection (binary.Read: microseconds a record, tens for a big one). It
// reports false for a record shorter than the type.
func copyRecord[T any](dst *T, raw []byte) bool {
	n := unsafe.Sizeof(*dst)
	if uintptr(len(raw)) < n {
		return false
	}
	copy(unsafe.Slice((*byte)(unsafe.Pointer(dst)), n), raw)
	return true
}
