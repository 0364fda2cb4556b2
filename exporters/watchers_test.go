package exporters

import (
	"context"
	"testing"
	"time"

	culpritv1 "github.com/culprit-dev/culprit/proto/culprit/v1"
	"github.com/culprit-dev/culprit/rules"
	"github.com/culprit-dev/culprit/signals"
)

// 100 watchers that never read do not block the journal: recording
// 5,000 events with them attached stays under a millisecond each, a fresh
// watcher still gets live events, and a stalled one, when it reads again,
// gets a GAP marker and then the open findings (and can resume by
// sequence).
func TestHundredSlowWatchers(t *testing.T) {
	j := rules.NewJournal(256)
	ts := serve(t, GRPCOptions{Journal: j, Store: signals.New(4, 16), MaxBatch: 64})
	r := newRecorder(j)
	r.open("a", "accept_overflow", rules.SeverityCritical)

	record := func(n int) time.Duration {
		start := time.Now()
		for range n {
			r.update("a")
		}
		return time.Since(start)
	}
	alone := record(5000)

	var stalled []culpritv1.Diagnostics_WatchFindingsClient
	for range 100 {
		ctx, cancel := context.WithCancel(context.Background())
		t.Cleanup(cancel)
		s, err := ts.client.WatchFindings(ctx, &culpritv1.WatchRequest{})
		if err != nil {
			t.Fatal(err)
		}
		stalled = append(stalled, s) // never read until later
	}
	time.Sleep(200 * time.Millisecond) // all attached
	with := record(5000)
	t.Logf("5000 events: %s alone, %s with 100 stalled watchers", alone, with)
	// Attached watchers cost the recorder a wake-up each (lock
	// contention, more under -race), but a stalled one never blocks it:
	// recording stays well under a millisecond an event.
	if with > 5000*time.Millisecond {
		t.Errorf("stalled watchers blocked recording: %s for 5000 events (%s alone)", with, alone)
	}

	live := startWatch(t, ts.client, &culpritv1.WatchRequest{})
	live.next(t, 1) // CURRENT
	r.open("b", "fd_exhaustion", rules.SeverityWarning)
	if ev := live.next(t, 1)[0]; ev.GetType() != culpritv1.FindingEvent_TYPE_OPENED {
		t.Errorf("live watcher got %v", ev)
	}

	// One of the stalled ones reads now: it is far behind the 256-event
	// journal, so somewhere in what it gets is a GAP and then CURRENT.
	s := stalled[0]
	sawGap, sawCurrentAfter := false, false
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) && !sawCurrentAfter {
		ev, err := s.Recv()
		if err != nil {
			t.Fatalf("stalled watcher: %v", err)
		}
		if ev.GetType() == culpritv1.FindingEvent_TYPE_GAP {
			sawGap = true
		}
		if sawGap && ev.GetType() == culpritv1.FindingEvent_TYPE_CURRENT {
			sawCurrentAfter = true
		}
	}
	if !sawGap || !sawCurrentAfter {
		t.Errorf("stalled watcher: gap %v, current after it %v", sawGap, sawCurrentAfter)
	}
}
