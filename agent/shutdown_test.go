package main

import (
	"context"
	"strconv"
	"syscall"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/culprit-dev/culprit/internal/testenv"
	culpritv1 "github.com/culprit-dev/culprit/proto/culprit/v1"
)

// The agent binary, sent SIGTERM as the kubelet does, ends its watchers'
// streams with Unavailable after their last events (so they resume from
// there at the next agent) and exits 0 well within a grace period.
func TestAgentShutsDownCleanlyOnSIGTERM(t *testing.T) {
	s := testenv.Start(t, testenv.Options{Backlog: 4, Accept: false, SharedNetns: true})
	a := testenv.StartAgent(t, testenv.AgentOptions{Bin: culpritBinary(t), Args: []string{"--pid", strconv.Itoa(s.PID)}})
	c := client(t, a.GRPCAddr)
	waitWatching(t, c, s.Port)
	stream, err := c.WatchFindings(context.Background(), &culpritv1.WatchRequest{})
	if err != nil {
		t.Fatal(err)
	}
	s.MustDo(t, "dialasync 20")
	var last uint64
	for last == 0 {
		ev, err := stream.Recv()
		if err != nil {
			t.Fatalf("watch: %v", err)
		}
		last = ev.Sequence
	}
	start := time.Now()
	if err := a.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	for {
		ev, err := stream.Recv()
		if err != nil {
			if status.Code(err) != codes.Unavailable {
				t.Errorf("stream ended with %v, want Unavailable (resume from %d)", err, last)
			}
			break
		}
		last = ev.Sequence
	}
	select {
	case <-a.Exited():
		if err := a.ExitErr(); err != nil {
			t.Errorf("agent exited with %v after SIGTERM, want 0", err)
		}
		t.Logf("agent stopped %s after SIGTERM", time.Since(start).Round(time.Millisecond))
	case <-time.After(10 * time.Second):
		t.Fatal("agent still running 10 s after SIGTERM")
	}
}
