package traces

import (
	"context"
	"errors"
	"testing"
	"time"
)

// The budget's rules: large requests leave the last eighth to small ones,
// a waiter gets in as soon as bytes are released, one that waits too long
// is told the receiver is busy, and a request that can never fit is told
// at once.
func TestBudget(t *testing.T) {
	b := newBudget(32 << 20) // reserve 4 MB, small up to 1 MB
	ctx := context.Background()
	if err := b.acquire(ctx, 28<<20, 0); err != nil {
		t.Fatalf("28 MB of 32: %v", err)
	}
	if err := b.acquire(ctx, 2<<20, 0); !errors.Is(err, errBusy) {
		t.Errorf("a 2 MB request took the small requests' reserve: %v", err)
	}
	for range 4 {
		if err := b.acquire(ctx, 1<<20, 0); err != nil {
			t.Fatalf("a 1 MB request in the reserve: %v", err)
		}
	}
	if err := b.acquire(ctx, 1, 0); !errors.Is(err, errBusy) {
		t.Errorf("a byte over the whole budget: %v", err)
	}
	if err := b.acquire(ctx, 29<<20, time.Second); !errors.Is(err, errOverBudget) {
		t.Errorf("a request larger than the budget allows: %v", err)
	}
	// A waiter gets in when bytes are released, not after its wait.
	go func() { time.Sleep(50 * time.Millisecond); b.release(2 << 20) }()
	start := time.Now()
	if err := b.acquire(ctx, 1<<20, 10*time.Second); err != nil || time.Since(start) > 5*time.Second {
		t.Errorf("waiter: %v after %v", err, time.Since(start))
	}
	// Its context ends the wait too.
	cctx, cancel := context.WithTimeout(ctx, 50*time.Millisecond)
	defer cancel()
	if err := b.acquire(cctx, 8<<20, 10*time.Second); !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("cancelled waiter: %v", err)
	}
	// A hold gives back exactly what it took, once.
	h := &hold{b: b}
	before := b.inUse()
	if err := h.grow(ctx, 512<<10, 0); err != nil {
		t.Fatal(err)
	}
	if err := h.resize(ctx, 100, 0); err != nil || b.inUse() != before+100 {
		t.Errorf("resize down: %v, %d in use", err, b.inUse()-before)
	}
	h.release()
	h.release()
	h.abandon()
	if b.inUse() != before {
		t.Errorf("%d bytes left after release", b.inUse()-before)
	}
	if h.claim() {
		t.Error("a released hold was claimed")
	}
}
