package probes

import (
	"strconv"
	"testing"
	"time"

	"github.com/culprit-dev/culprit/internal/testenv"
	"github.com/culprit-dev/culprit/signals"
)

// A server that closes connections idle for 600 ms (an intermediary's
// idle timeout): its clients see a peer close at an idle age of about
// 600 ms, toward the server's address; the server side closes first.
// Connecting to a closed port counts resets sent with reason no_socket.
func TestTCPLifeIdleAgeAtPeerClose(t *testing.T) {
	s := testenv.Start(t, testenv.Options{Backlog: 64, Accept: true})
	st := signals.New(600, 1000)
	evs := signals.NewConnEvents(1024)
	runProbe(t, s.PID, NewTCPLife(Options{Log: testLog, PollInterval: 50 * time.Millisecond, MaxEntries: 1024, RingBufferBytes: 1 << 16}, evs), st)
	time.Sleep(300 * time.Millisecond) // the netns filter is set at the first poll
	from := time.Now()
	s.MustDo(t, "idletimeout 600")
	s.MustDo(t, "dial 10")
	time.Sleep(1500 * time.Millisecond)
	remote := "127.0.0.1:" + strconv.Itoa(s.Port)
	var peer, local, opened int
	for _, e := range evs.Since(from) {
		switch {
		case e.Kind == signals.ConnPeerClose && e.Remote == remote:
			peer++
			if e.Idle < 450*time.Millisecond || e.Idle > 800*time.Millisecond {
				t.Errorf("peer close at idle %v, want about 600ms", e.Idle)
			}
			if e.Lifetime < 500*time.Millisecond {
				t.Errorf("lifetime %v, want about 600ms", e.Lifetime)
			}
		case e.Kind == signals.ConnLocalClose && e.LocalPort == s.Port:
			local++
		case e.Kind == signals.ConnOpened && e.Remote == remote:
			opened++
		}
	}
	if peer != 10 || local != 10 || opened != 10 {
		t.Errorf("peer closes %d, server-side closes %d, opens %d; want 10 each", peer, local, opened)
	}
	s.MustDo(t, "dialclosed 20")
	waitValue(t, st, "tcp_resets_sent_total", signals.L("reason", "no_socket"), func(v float64) bool { return v >= 20 }, ">= 20")
}
