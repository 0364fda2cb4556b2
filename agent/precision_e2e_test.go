package main

import (
	"fmt"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/culprit-dev/culprit/internal/testenv"
	culpritv1 "github.com/culprit-dev/culprit/proto/culprit/v1"
)

// Precision against real programs nobody here wrote: each test starts a
// real third-party server (internal/testenv: redis-server, nginx, a tokio +
// hyper service, a Node.js express service), a real agent watching it,
// creates the real condition, and checks what the agent says: the right
// finding naming the right function, and no finding that is not true. Each
// logs one line "precision: <scenario> | <expected> | <said> | <false
// findings>" for the README's precision table.

// findings collects the agent's events on a stream until stopped.
type findings struct {
	mu     sync.Mutex
	events []*culpritv1.FindingEvent
	done   chan struct{}
}

func collect(t testing.TB, a *Agent) *findings {
	t.Helper()
	ch, cancel := watch(t, client(t, a.GRPCAddr), 0)
	f := &findings{done: make(chan struct{})}
	go func() {
		defer close(f.done)
		for ev := range ch {
			f.mu.Lock()
			f.events = append(f.events, ev)
			f.mu.Unlock()
		}
	}()
	t.Cleanup(cancel)
	return f
}

// opened returns the OPENED events so far.
func (f *findings) opened() []*culpritv1.Finding {
	f.mu.Lock()
	defer f.mu.Unlock()
	var out []*culpritv1.Finding
	for _, ev := range f.events {
		if ev.Type == culpritv1.FindingEvent_TYPE_OPENED {
			out = append(out, ev.Finding)
		}
	}
	return out
}

// waitFor waits up to timeout for an opened finding of rule that match
// accepts, and returns it (nil on timeout).
func (f *findings) waitFor(rule string, timeout time.Duration, match func(*culpritv1.Finding) bool) *culpritv1.Finding {
	deadline := time.Now().Add(timeout)
	for {
		for _, fd := range f.opened() {
			if fd.Rule == rule && (match == nil || match(fd)) {
				return fd
			}
		}
		if time.Now().After(deadline) {
			return nil
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// describe is a finding in one line, for logs and failures.
func describe(fd *culpritv1.Finding) string {
	return fmt.Sprintf("%s/%s %q", fd.Rule, fd.Cause, fd.Title)
}

// precisionLine logs the scenario's line of the README's precision table.
func precisionLine(t testing.TB, scenario, expected string, said *culpritv1.Finding, falses []*culpritv1.Finding) {
	t.Helper()
	saidText := "nothing"
	if said != nil {
		saidText = said.Title
	}
	var fs []string
	for _, f := range falses {
		fs = append(fs, describe(f))
	}
	falseText := "none"
	if len(fs) > 0 {
		falseText = strings.Join(fs, "; ")
	}
	t.Logf("precision: %s | %s | %s | %s", scenario, expected, saidText, falseText)
}

// others are the opened findings other than the expected one.
func others(all []*culpritv1.Finding, expected *culpritv1.Finding) []*culpritv1.Finding {
	var out []*culpritv1.Finding
	for _, f := range all {
		if expected == nil || f.Id != expected.Id {
			out = append(out, f)
		}
	}
	return out
}

// waitAgentSees waits until the agent's snapshot shows the target's
// listener on port.
func waitAgentSees(t testing.TB, a *Agent, port int) {
	t.Helper()
	waitWatching(t, client(t, a.GRPCAddr), port)
}

func portOf(t testing.TB, addr string) int {
	t.Helper()
	u := addr
	if strings.Contains(addr, "://") {
		p, err := url.Parse(addr)
		if err != nil {
			t.Fatal(err)
		}
		u = p.Host
	}
	i := strings.LastIndexByte(u, ':')
	n, err := strconv.Atoi(u[i+1:])
	if err != nil {
		t.Fatalf("port of %q: %v", addr, err)
	}
	return n
}

// Healthy load on a real redis-server: clients doing PING/SET/GET over a
// few connections for several seconds. Nothing is wrong, so nothing is
// said.
func TestPrecisionRedisHealthySilent(t *testing.T) {
	r := testenv.StartRedis(t, testenv.RedisOptions{})
	a := startAgent(t, r.PID)
	waitAgentSees(t, a, portOf(t, r.Addr))
	f := collect(t, a)
	load := r.StartLoad(t, testenv.RedisLoadOptions{Conns: 8, Rate: 2000, Duration: 8 * time.Second})
	time.Sleep(9 * time.Second)
	load.Stop()
	st := load.Stats()
	if st.Requests < 1000 || st.Errors > 0 {
		t.Fatalf("the load did not run cleanly: %+v", st)
	}
	all := f.opened()
	precisionLine(t, "redis-server, healthy load ("+strconv.Itoa(int(st.Requests))+" commands)", "nothing", nil, all)
	for _, fd := range all {
		t.Errorf("healthy redis raised %s: %s", describe(fd), fd.RootCause)
	}
}

// Healthy keep-alive load on a real nginx (master and workers): silent.
func TestPrecisionNginxHealthySilent(t *testing.T) {
	n := testenv.StartNginx(t, testenv.NginxOptions{})
	a := startAgent(t, n.PID)
	waitAgentSees(t, a, portOf(t, n.Addr))
	f := collect(t, a)
	load := n.StartLoad(t, testenv.HTTPLoadOptions{Conns: 8, Rate: 1000, Path: "/index.html", Duration: 8 * time.Second})
	time.Sleep(9 * time.Second)
	load.Stop()
	st := load.Stats()
	if st.Requests < 1000 || st.Errors > 0 {
		t.Fatalf("the load did not run cleanly: %+v", st)
	}
	all := f.opened()
	precisionLine(t, "nginx, healthy keep-alive load ("+strconv.Itoa(int(st.Requests))+" requests)", "nothing", nil, all)
	for _, fd := range all {
		t.Errorf("healthy nginx raised %s: %s", describe(fd), fd.RootCause)
	}
}
