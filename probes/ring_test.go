package probes

import (
	"encoding/binary"
	"errors"
	"os"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/ringbuf"
)

// ringWithRecords is a real BPF ring buffer holding n 8-byte records
// (0..n-1), written by a socket filter that test runs (BPF_PROG_TEST_RUN)
// call bpf_ringbuf_output from, with a reader on it.
func ringWithRecords(t *testing.T, n int) *ringReader {
	t.Helper()
	m, err := ebpf.NewMap(&ebpf.MapSpec{Type: ebpf.RingBuf, MaxEntries: 4096})
	if err != nil {
		t.Skipf("SKIP: no BPF ring buffer here: %v", err)
	}
	t.Cleanup(func() { m.Close() })
	for i := range n {
		prog, err := ebpf.NewProgram(&ebpf.ProgramSpec{Type: ebpf.SocketFilter, License: "MIT", Instructions: asm.Instructions{
			asm.Mov.Imm(asm.R1, int32(i)),
			asm.StoreMem(asm.R10, -8, asm.R1, asm.DWord),
			asm.LoadMapPtr(asm.R1, m.FD()),
			asm.Mov.Reg(asm.R2, asm.R10),
			asm.Add.Imm(asm.R2, -8),
			asm.Mov.Imm(asm.R3, 8),
			asm.Mov.Imm(asm.R4, 0),
			asm.FnRingbufOutput.Call(),
			asm.Mov.Imm(asm.R0, 0),
			asm.Return(),
		}})
		if err != nil {
			t.Fatalf("a socket filter calling bpf_ringbuf_output: %v", err)
		}
		_, err = prog.Run(&ebpf.RunOptions{Data: make([]byte, 64)})
		prog.Close()
		if err != nil {
			t.Fatalf("BPF_PROG_TEST_RUN of a socket filter: %v", err)
		}
	}
	rd, err := newRingReader(m)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { rd.Close() })
	return rd
}

// drain hands every record, in order, and an empty ring ends it.
func TestRingDrainReadsEveryRecordInOrder(t *testing.T) {
	rd := ringWithRecords(t, 5)
	var got []uint64
	if err := rd.drain(func(b []byte) { got = append(got, binary.NativeEndian.Uint64(b)) }); err != nil {
		t.Fatal(err)
	}
	if len(got) != 5 {
		t.Fatalf("drained %v, want 0..4", got)
	}
	for i, v := range got {
		if v != uint64(i) {
			t.Fatalf("drained %v, want 0..4 in order", got)
		}
	}
	if err := rd.drain(func([]byte) { t.Error("a record from an empty ring") }); err != nil {
		t.Fatal(err)
	}
	rd.Close()
	if err := rd.drain(func([]byte) {}); !errors.Is(err, ringbuf.ErrClosed) {
		t.Errorf("drain after Close: %v, want ErrClosed", err)
	}
}

// A record handler may take its probe's lock while the probe stops, which
// holds that lock while it closes the reader (running.stop): Close must
// not wait for the handler. It did when handlers ran under the reader's
// own lock, and a sched test hung in CI at its cleanup.
func TestRingCloseDoesNotWaitForAHandler(t *testing.T) {
	rd := ringWithRecords(t, 1)
	var probeMu sync.Mutex
	probeMu.Lock() // as stop holds it
	var unlock sync.Once
	t.Cleanup(func() { unlock.Do(probeMu.Unlock) }) // before the reader's Close
	entered := make(chan struct{})
	var handled atomic.Int32
	drained := make(chan error, 1)
	go func() {
		drained <- rd.drain(func([]byte) {
			close(entered)
			probeMu.Lock() // as a handler counting under its probe's lock
			defer probeMu.Unlock()
			handled.Add(1)
		})
	}()
	<-entered
	closed := make(chan error, 1)
	go func() { closed <- rd.Close() }()
	select {
	case err := <-closed:
		if err != nil {
			t.Errorf("Close: %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Close waited for a record handler that waits for the lock Close was called under")
	}
	unlock.Do(probeMu.Unlock)
	if err := <-drained; err != nil && !errors.Is(err, ringbuf.ErrClosed) {
		t.Errorf("drain: %v", err)
	}
	if n := handled.Load(); n != 1 {
		t.Errorf("%d records handled, want the one", n)
	}
}

// A reader closed while its goroutine waits ends the wait with
// os.ErrClosed, which readRing takes as the end: the poller's own error
// for a file closed under a wait ("use of closed file") is not
// os.ErrClosed, and every probe's reader logged a warning at each stop.
func TestRingWaitEndsWithErrClosedOnClose(t *testing.T) {
	rd := ringWithRecords(t, 0)
	waited := make(chan error, 1)
	go func() { waited <- rd.wait() }()
	time.Sleep(100 * time.Millisecond) // in the poller by now
	if err := rd.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	select {
	case err := <-waited:
		if !errors.Is(err, os.ErrClosed) {
			t.Errorf("wait ended with %v, want os.ErrClosed", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Close did not end the wait")
	}
}
