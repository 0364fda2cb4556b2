package rules

import (
	"math/rand/v2"
	"reflect"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/culprit-dev/culprit/signals"
	"github.com/culprit-dev/culprit/workload"
)

// putSeries writes vals one second apart, the last at now.
func putSeries(st *signals.Store, d *signals.Desc, ls signals.Labels, now time.Time, vals ...float64) {
	for i, v := range vals {
		st.Put(d, ls, v, now.Add(time.Duration(i-len(vals)+1)*time.Second))
	}
}

// closeWaitStore holds the target's CLOSE_WAIT sockets on port 8080 (vals,
// a second apart up to now) and the oldest one's idle age.
func closeWaitStore(now time.Time, age float64, vals ...float64) *signals.Store {
	st := signals.New(100, 100)
	putSeries(st, signals.TCPSockets, signals.L("owner", "target", "port", "8080", "state", "CLOSE_WAIT"), now, vals...)
	st.Put(signals.TCPCloseWaitOldestSeconds, signals.L("owner", "target", "port", "8080"), age, now)
	return st
}

func TestCloseWaitLeak(t *testing.T) {
	now := time.Now()
	r := NewCloseWait(CloseWaitOptions{Window: 10 * time.Second, MinIncrease: 5, Steady: 0.8, MinCount: 50, MinAge: time.Minute})
	st := closeWaitStore(now, 9, 0, 1, 2, 4, 5, 7, 8, 9, 11, 12, 14)
	obs := r.Evaluate(Window{Store: st, Now: now})
	if len(obs) != 1 || obs[0].Cause != CauseCloseWaitLeak || !strings.Contains(obs[0].Title, "8080") {
		t.Fatalf("growing CLOSE_WAIT: %+v", obs)
	}
	// Silence: CLOSE_WAIT that comes and goes (the app closes, a little
	// late), and a steady few.
	for _, vals := range [][]float64{{0, 3, 0, 2, 4, 0, 1, 3, 0, 2, 1}, {3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3}} {
		st := closeWaitStore(now, 2, vals...)
		if obs := r.Evaluate(Window{Store: st, Now: now}); len(obs) != 0 {
			t.Errorf("%v raised %+v", vals, obs)
		}
	}
}

// The sockets collector spaces its dumps while connections churn in a
// namespace where one is dear, writing nothing in between
// (signals.SocketsFreshFor): its last samples stand for now meanwhile, and
// say the same as when they were taken. Past that, they are the past.
func TestCloseWaitLeakReadWhileDumpsAreSpaced(t *testing.T) {
	now := time.Now()
	r := NewCloseWait(CloseWaitOptions{Window: 20 * time.Second, MinIncrease: 5, Steady: 0.8, MinCount: 50, MinAge: time.Minute})
	st := closeWaitStore(now, 9, 0, 1, 2, 4, 5, 7, 8, 9, 11, 12, 14)
	at := r.Evaluate(Window{Store: st, Now: now})
	if len(at) != 1 {
		t.Fatalf("growing CLOSE_WAIT, read when sampled: %+v", at)
	}
	later := r.Evaluate(Window{Store: st, Now: now.Add(signals.SocketsFreshFor)})
	if len(later) != 1 || later[0].Title != at[0].Title || later[0].RootCause != at[0].RootCause {
		t.Fatalf("read %v after the last dump: %+v, want what was said at it: %+v", signals.SocketsFreshFor, later, at)
	}
	if obs := r.Evaluate(Window{Store: st, Now: now.Add(signals.SocketsFreshFor + time.Millisecond)}); len(obs) != 0 {
		t.Errorf("read past %v after the last dump: %+v", signals.SocketsFreshFor, obs)
	}
}

func portStore(now time.Time, tw ...float64) *signals.Store {
	st := signals.New(100, 100)
	st.Put(signals.Sysctl, signals.L("name", "net.ipv4.ip_local_port_range.min"), 40000, now)
	st.Put(signals.Sysctl, signals.L("name", "net.ipv4.ip_local_port_range.max"), 40199, now)
	st.Put(signals.Sysctl, signals.L("name", "net.ipv4.tcp_tw_reuse"), 0, now)
	putSeries(st, signals.TCPSocketsByRemote, signals.L("owner", "target", "remote", "10.0.0.5:5432", "state", "TIME_WAIT"), now, tw...)
	return st
}

func TestPortExhaustion(t *testing.T) {
	now := time.Now()
	r := NewPortExhaustion(PortExhaustionOptions{Window: 10 * time.Second, NearRatio: 0.5, Horizon: 5 * time.Minute, MinCount: 20})
	obs := r.Evaluate(Window{Store: portStore(now, 40, 50, 60, 70, 80, 90, 100, 110, 120, 130, 140), Now: now})
	if len(obs) != 1 || obs[0].Cause != CauseNoConnectionReuse || !strings.Contains(obs[0].Title, "10.0.0.5:5432") ||
		!strings.Contains(obs[0].Symptom, "starts failing in about") || !strings.Contains(obs[0].RootCause, "tcp_tw_reuse=0") {
		t.Fatalf("TIME_WAIT toward one remote: %+v", obs)
	}
	// Silence: a steady low TIME_WAIT count (keep-alive with occasional
	// reconnects).
	if obs := r.Evaluate(Window{Store: portStore(now, 12, 11, 12, 12, 13, 12, 11, 12, 12, 12, 12), Now: now}); len(obs) != 0 {
		t.Errorf("steady TIME_WAIT raised %+v", obs)
	}
}

func TestRSTStormPaths(t *testing.T) {
	now := time.Now()
	// mk: the target listens on 8080; resets on port (per second: the
	// series steps), accepts on 8080, and the namespace's aborts.
	mk := func(port, reason string, resets, accepts, aborts float64) *signals.Store {
		st := signals.New(100, 100)
		st.Put(signals.TCPSockets, signals.L("owner", "target", "port", "8080", "state", "LISTEN"), 1, now)
		st.SetStatus(signals.Status{Component: "tcplife", Kind: "probe", State: signals.StateRunning})
		var rs, as, ab []float64
		for i := 0; i < 6; i++ {
			rs, as, ab = append(rs, resets*float64(i)), append(as, accepts*float64(i)), append(ab, aborts*float64(i))
		}
		putSeries(st, signals.TCPResetsSentTotal, signals.L("port", port, "reason", reason), now, rs...)
		putSeries(st, signals.ProcessAcceptsTotal, signals.L("port", "8080"), now, as...)
		putSeries(st, signals.TCPExtAbortOnDataTotal, nil, now, ab...)
		return st
	}
	r := NewRSTStorm(DefaultRSTStormOptions())
	if obs := r.Evaluate(Window{Store: mk("8080", "no_socket", 100, 10, 0), Now: now}); len(obs) != 1 || obs[0].Cause != CauseRSTClosedPort || obs[0].Confidence != 0.9 {
		t.Fatalf("resets to the target's port, no socket: %+v", obs)
	}
	if obs := r.Evaluate(Window{Store: mk("8080", "tcp_abort_on_data", 100, 50, 90), Now: now}); len(obs) != 1 || obs[0].Cause != CauseRSTAppAbort {
		t.Fatalf("resets from aborts: %+v", obs)
	}
	// Silence: a few resets a second; a busy healthy service resetting 1%
	// of its thousands of connections; another process's port; and, with
	// only the namespace's counters, nothing can be said of whose.
	for name, st := range map[string]*signals.Store{
		"trickle":        mk("8080", "no_socket", 3, 10, 0),
		"healthy churn":  mk("8080", "tcp_flags", 59, 5500, 0),
		"neighbour port": mk("9090", "no_socket", 500, 10, 0),
	} {
		if obs := r.Evaluate(Window{Store: st, Now: now}); len(obs) != 0 {
			t.Errorf("%s raised %+v", name, obs)
		}
	}
	// Healthy churn while accepts are not counted (sockcalls counts them
	// while a queue holds connections): the accept series stood still,
	// which is no "every connection ends in a reset"; the handshakes on
	// the port are the connections made.
	st := mk("8080", "tcp_flags", 59, 0, 0)
	st.SetStatus(signals.Status{Component: signals.ProbeSockCalls, Kind: "probe", State: signals.StateRunning})
	st.Put(signals.ProcessAcceptsCountedSince, nil, 0, now)
	var hs []float64
	for i := 0; i < 6; i++ {
		hs = append(hs, 5500*float64(i))
	}
	putSeries(st, signals.TCPListenHandshakesTotal, signals.L("port", "8080"), now, hs...)
	if obs := r.Evaluate(Window{Store: st, Now: now}); len(obs) != 0 {
		t.Errorf("healthy churn, accepts not counted: %+v", obs)
	}
	st.Put(signals.ProcessAcceptsCountedSince, nil, float64(now.Add(-2*time.Second).UnixNano())/1e9, now)
	if obs := r.Evaluate(Window{Store: st, Now: now}); len(obs) != 0 {
		t.Errorf("healthy churn, accepts counted for only part of the window: %+v", obs)
	}

	st = signals.New(100, 100)
	putSeries(st, signals.TCPOutRstsTotal, nil, now, 0, 100, 200, 300, 400, 500)
	if obs := NewRSTStorm(DefaultRSTStormOptions()).Evaluate(Window{Store: st, Now: now}); len(obs) != 0 {
		t.Errorf("namespace counters alone blamed the target: %+v", obs)
	}
	if obs := NewRSTStorm(DefaultRSTStormOptions()).Evaluate(Window{Store: st, Now: now, Scope: ScopeNamespace}); len(obs) != 1 || !strings.Contains(obs[0].Title, "by the namespace") {
		t.Errorf("namespace scope, namespace counters: %+v", obs)
	}
}

func TestPoolExhaustion(t *testing.T) {
	now := time.Now()
	r := NewPoolExhaustion(PoolExhaustionOptions{Window: 5 * time.Second, MinConns: 2, MinQueue: 0.5})
	mk := func(conns []float64, queue float64) *signals.Store {
		st := signals.New(100, 100)
		putSeries(st, signals.TCPSocketsByRemote, signals.L("owner", "target", "remote", "10.0.0.9:5432", "state", "ESTABLISHED"), now, conns...)
		putSeries(st, signals.ListenQueueLength, signals.L("addr", "0.0.0.0", "port", "8080"), now, queue, queue, queue, queue, queue, queue, queue)
		return st
	}
	obs := r.Evaluate(Window{Store: mk([]float64{4, 4, 4, 4, 4, 4, 4}, 12), Now: now})
	if len(obs) != 1 || obs[0].Cause != CausePoolAtCeiling || !strings.Contains(obs[0].Title, "10.0.0.9:5432") || !strings.Contains(obs[0].Title, "4 connections") {
		t.Fatalf("flat pool with a queue: %+v", obs)
	}
	// With the app's traces, the finding says how long requests waited
	// before their DB span started.
	var l spanList
	for i := range 5 {
		l = append(l, request(i, now.Add(-time.Duration(i)*time.Second), 500*time.Millisecond, 400*time.Millisecond, 50*time.Millisecond, true)...)
	}
	obs = r.Evaluate(Window{Store: mk([]float64{4, 4, 4, 4, 4, 4, 4}, 12), Now: now, Inputs: Inputs{Spans: l}})
	if len(obs) != 1 || obs[0].Evidence[len(obs[0].Evidence)-1].Value != 0.4 {
		t.Errorf("span evidence: %+v", obs)
	}
	// Silence: a flat pool with nothing queued (idle pooled connections),
	// and a pool that grows and shrinks with load.
	if obs := r.Evaluate(Window{Store: mk([]float64{4, 4, 4, 4, 4, 4, 4}, 0), Now: now}); len(obs) != 0 {
		t.Errorf("idle pool raised %+v", obs)
	}
	if obs := r.Evaluate(Window{Store: mk([]float64{3, 5, 4, 6, 5, 4, 6}, 3), Now: now}); len(obs) != 0 {
		t.Errorf("elastic pool raised %+v", obs)
	}
}

// A pool flat at its ceiling while requests queue stays told while the
// sockets collector spaces its dumps 4 s apart (connections churning in a
// namespace where a dump is dear): the count that stood when the window
// began counts, so the window never holds too few samples to judge.
func TestPoolExhaustionWhileDumpsAreSpaced(t *testing.T) {
	t0 := time.Now()
	r := NewPoolExhaustion(PoolExhaustionOptions{Window: 10 * time.Second, MinConns: 2, MinQueue: 0.5})
	st := signals.New(100, 100)
	pool := signals.L("owner", "target", "remote", "10.0.0.9:5432", "state", "ESTABLISHED")
	queue := signals.L("addr", "0.0.0.0", "port", "8080")
	for ms := 0; ms <= 40000; ms += 100 {
		now := t0.Add(time.Duration(ms) * time.Millisecond)
		if ms%4000 == 0 {
			st.Put(signals.TCPSocketsByRemote, pool, 20, now)
		}
		st.Put(signals.ListenQueueLength, queue, 12, now)
		if ms < 12000 {
			continue // the first dumps: the window fills
		}
		if obs := r.Evaluate(Window{Store: st, Now: now}); len(obs) != 1 || !strings.Contains(obs[0].Title, "20 connections") {
			t.Fatalf("%v in, dumps 4 s apart: %+v", now.Sub(t0), obs)
		}
	}
}

// connLog is the real connection event log (signals.ConnEvents) holding
// evs, as the tcplife probe fills it.
func connLog(evs ...signals.ConnEvent) *signals.ConnEvents {
	l := signals.NewConnEvents(4096)
	for _, e := range evs {
		l.Add(e)
	}
	return l
}

func TestIdleTimeout(t *testing.T) {
	now := time.Now()
	opts := IdleTimeoutOptions{Window: time.Minute, MinCloses: 10, Tolerance: 0.1, MinShare: 0.8, MinIdle: time.Second}
	r := NewIdleTimeout(opts)
	mk := func(idles ...time.Duration) []signals.ConnEvent {
		var out []signals.ConnEvent
		for _, d := range idles {
			out = append(out, signals.ConnEvent{T: now, Kind: signals.ConnPeerClose, Remote: "10.0.0.7:443", LocalPort: 40001, Idle: d, Owner: "target", Bytes: 512})
		}
		return out
	}
	cut := []time.Duration{}
	for i := range 12 {
		cut = append(cut, 350*time.Second+time.Duration(i)*100*time.Millisecond)
	}
	obs := r.Evaluate(Window{Store: signals.New(10, 10), Now: now, Inputs: Inputs{Conns: connLog(mk(cut...)...)}})
	if len(obs) != 1 || obs[0].Cause != CauseIntermediaryIdleTimeout || !strings.Contains(obs[0].Title, "10.0.0.7:443") || !strings.Contains(obs[0].Title, "5m51s") {
		t.Fatalf("closes at 350 s idle: %+v", obs)
	}
	// The same closes on a neighbour's connections, or culprit's own (its
	// API's clients going idle), are not the target's.
	for _, owner := range []string{"envoy", "agent", "unknown"} {
		theirs := mk(cut...)
		for i := range theirs {
			theirs[i].Owner = owner
		}
		if obs := NewIdleTimeout(opts).Evaluate(Window{Store: signals.New(10, 10), Now: now, Inputs: Inputs{Conns: connLog(theirs...)}}); len(obs) != 0 {
			t.Errorf("%s's connections cut when idle blamed the target: %+v", owner, obs)
		}
	}
	// Silence: peers closing at varied idle ages (clients going away), and
	// closes of busy connections (idle under a second).
	for _, idles := range [][]time.Duration{
		{1 * time.Second, 3 * time.Second, 9 * time.Second, 20 * time.Second, 2 * time.Second, 40 * time.Second, 5 * time.Second, 12 * time.Second, 7 * time.Second, 30 * time.Second, 60 * time.Second},
		{10 * time.Millisecond, 12 * time.Millisecond, 11 * time.Millisecond, 10 * time.Millisecond, 10 * time.Millisecond, 13 * time.Millisecond, 10 * time.Millisecond, 11 * time.Millisecond, 12 * time.Millisecond, 10 * time.Millisecond},
	} {
		if obs := NewIdleTimeout(opts).Evaluate(Window{Store: signals.New(10, 10), Now: now, Inputs: Inputs{Conns: connLog(mk(idles...)...)}}); len(obs) != 0 {
			t.Errorf("%v raised %+v", idles, obs)
		}
	}
}

func synStore(now time.Time, cookies []float64, synRecv, sources, opens float64) *signals.Store {
	st := signals.New(100, 100)
	putSeries(st, signals.TCPExtReqQFullDoCookiesTotal, nil, now, cookies...)
	putSeries(st, signals.TCPExtReqQFullDropTotal, nil, now, 0, 0, 0, 0, 0, 0)
	putSeries(st, signals.TCPPassiveOpensTotal, nil, now, 0, opens/5, 2*opens/5, 3*opens/5, 4*opens/5, opens)
	ls := signals.L("addr", "0.0.0.0", "port", "443")
	st.Put(signals.ListenSynRecv, ls, synRecv, now)
	st.Put(signals.ListenSynRecvSources, ls, sources, now)
	st.Put(signals.ListenBacklog, ls, 128, now)
	st.Put(signals.Sysctl, signals.L("name", "net.ipv4.tcp_syncookies"), 1, now)
	st.Put(signals.Sysctl, signals.L("name", "net.ipv4.tcp_max_syn_backlog"), 256, now)
	return st
}

func TestSYNBacklogFloodOrBurst(t *testing.T) {
	now := time.Now()
	r := NewSYNBacklog(SYNBacklogOptions{Recent: 5 * time.Second, MinDrops: 10, MinSources: 20})
	obs := r.Evaluate(Window{Store: synStore(now, []float64{0, 100, 200, 300, 400, 500}, 128, 120, 3), Now: now})
	if len(obs) != 1 || obs[0].Cause != CauseSYNFlood || !strings.Contains(obs[0].Remediation, "syncookies") {
		t.Fatalf("flood: %+v", obs)
	}
	obs = r.Evaluate(Window{Store: synStore(now, []float64{0, 10, 20, 30, 40, 50}, 128, 3, 5000), Now: now})
	if len(obs) != 1 || obs[0].Cause != CauseSYNBurst || !strings.Contains(obs[0].Remediation, "tcp_max_syn_backlog") {
		t.Fatalf("burst: %+v", obs)
	}
	// A burst that began at the newest sample waits for the accept queue's
	// verdict (the same burst often overflows it too, and is then one
	// accept_overflow finding).
	if obs := r.Evaluate(Window{Store: synStore(now, []float64{0, 0, 0, 0, 0, 50}, 128, 3, 5000), Now: now}); len(obs) != 0 {
		t.Errorf("a burst seen for less than %s: %+v", synBurstSettle, obs)
	}
	st := synStore(now, []float64{0, 10, 20, 30, 40, 50}, 128, 3, 5000)
	putSeries(st, signals.ListenOverflowsTotal, signals.L("addr", "0.0.0.0", "port", "443"), now, 0, 0, 5, 9, 9, 9)
	if obs := r.Evaluate(Window{Store: st, Now: now}); len(obs) != 0 {
		t.Errorf("a burst that overflows the accept queue too is accept_overflow's: %+v", obs)
	}
	// Silence: a busy listener whose SYN queue never overflows.
	if obs := r.Evaluate(Window{Store: synStore(now, []float64{0, 0, 0, 0, 1, 1}, 40, 35, 5000), Now: now}); len(obs) != 0 {
		t.Errorf("no overflow raised %+v", obs)
	}
}

func TestStalledShutdown(t *testing.T) {
	now := time.Now()
	r := NewStalledShutdown(StalledShutdownOptions{Grace: 30 * time.Second, Fraction: 0.5})
	mk := func(sigAgo time.Duration, established float64) *signals.Store {
		st := signals.New(10, 100)
		if sigAgo > 0 {
			st.Put(signals.ProcessLastSignalTimestampSeconds, signals.L("signal", "SIGTERM", "sender", "1"), float64(now.Add(-sigAgo).UnixNano())/1e9, now)
		}
		st.Put(signals.TCPSockets, signals.L("owner", "target", "port", "8080", "state", "ESTABLISHED"), established, now)
		return st
	}
	obs := r.Evaluate(Window{Store: mk(20*time.Second, 12), Now: now, HasTarget: true})
	if len(obs) != 1 || obs[0].Cause != CauseStalledShutdown || !strings.Contains(obs[0].Symptom, "12 on port 8080") || !strings.Contains(obs[0].Symptom, "SIGKILL comes in about 10s") {
		t.Fatalf("stalled: %+v", obs)
	}
	// The count of a dump taken 4 s ago (dumps spaced while connections
	// churn in a namespace where one is dear) is told as of then; a
	// dump from before SIGTERM counts nothing after it.
	st := mk(20*time.Second, 0)
	st.Put(signals.TCPSockets, signals.L("owner", "target", "port", "8080", "state", "ESTABLISHED"), 12, now.Add(-4*time.Second))
	obs = r.Evaluate(Window{Store: st, Now: now, HasTarget: true})
	if len(obs) != 1 || !strings.Contains(obs[0].Title, "12 connections still open 16 s after SIGTERM") || !strings.Contains(obs[0].Symptom, "20 s ago, and 16 s after it still held 12") {
		t.Fatalf("a count 4 s old: %+v", obs)
	}
	r2 := NewStalledShutdown(StalledShutdownOptions{Grace: 4 * time.Second, Fraction: 0.5})
	st = mk(3*time.Second, 0)
	st.Put(signals.TCPSockets, signals.L("owner", "target", "port", "8080", "state", "ESTABLISHED"), 12, now.Add(-4*time.Second))
	if obs := r2.Evaluate(Window{Store: st, Now: now, HasTarget: true}); len(obs) != 0 {
		t.Fatalf("a count taken before SIGTERM told as still open after it: %+v", obs)
	}
	// Silence: no SIGTERM; SIGTERM and every connection gone; too early to tell.
	for _, tc := range []struct {
		ago   time.Duration
		conns float64
	}{{0, 12}, {20 * time.Second, 0}, {5 * time.Second, 12}} {
		if obs := r.Evaluate(Window{Store: mk(tc.ago, tc.conns), Now: now, HasTarget: true}); len(obs) != 0 {
			t.Errorf("%v after SIGTERM with %v connections raised %+v", tc.ago, tc.conns, obs)
		}
	}
}

// A noisy neighbour in the same network namespace: the same conditions on
// sockets another process holds, or culprit itself, never make a finding
// about the target; in namespace scope another process's do, titled with
// its name, and culprit's own never.
func TestNetworkRulesBlameOnlyTheOwner(t *testing.T) {
	now := time.Now()
	cw := NewCloseWait(CloseWaitOptions{Window: 10 * time.Second, MinIncrease: 5, Steady: 0.8, MinCount: 50, MinAge: time.Minute})
	pool := NewPoolExhaustion(PoolExhaustionOptions{Window: 5 * time.Second, MinConns: 2, MinQueue: 0.5})
	stall := NewStalledShutdown(StalledShutdownOptions{Grace: 30 * time.Second, Fraction: 0.5})
	for _, owner := range []string{"envoy", "agent", "unknown"} {
		st := signals.New(100, 100)
		putSeries(st, signals.TCPSockets, signals.L("owner", owner, "port", "8080", "state", "CLOSE_WAIT"), now, 0, 1, 2, 4, 5, 7, 8, 9, 11, 12, 14)
		st.Put(signals.TCPCloseWaitOldestSeconds, signals.L("owner", owner, "port", "8080"), 9, now)
		putSeries(st, signals.TCPSocketsByRemote, signals.L("owner", owner, "remote", "127.0.0.1:9462", "state", "ESTABLISHED"), now, 4, 4, 4, 4, 4, 4, 4)
		putSeries(st, signals.ListenQueueLength, signals.L("addr", "0.0.0.0", "port", "8080"), now, 12, 12, 12, 12, 12, 12, 12)
		st.Put(signals.ProcessLastSignalTimestampSeconds, signals.L("signal", "SIGTERM", "sender", "1"), float64(now.Add(-20*time.Second).UnixNano())/1e9, now)
		st.Put(signals.TCPSockets, signals.L("owner", owner, "port", "ephemeral", "state", "ESTABLISHED"), 20, now)
		for _, r := range []Rule{cw, pool, stall} {
			if obs := r.Evaluate(Window{Store: st, Now: now, HasTarget: true, Scope: ScopeTarget}); len(obs) != 0 {
				t.Errorf("%s's sockets made %s blame the target: %+v", owner, r.Name(), obs)
			}
		}
		obs := cw.Evaluate(Window{Store: st, Now: now, Scope: ScopeNamespace})
		switch owner {
		case "envoy":
			if len(obs) != 1 || obs[0].Key != "envoy/8080" || !strings.Contains(obs[0].Title, "(process envoy, not the target)") {
				t.Errorf("namespace scope, envoy's CLOSE_WAIT leak: %+v", obs)
			}
		default:
			if len(obs) != 0 {
				t.Errorf("namespace scope made a finding of %s's sockets: %+v", owner, obs)
			}
		}
	}
}

// Port exhaustion says what the kernel will do: tcp_tw_reuse in effect for
// the remote makes TIME_WAIT harmless; connects that already failed are
// said as such; TIME_WAIT toward a remote the target does not connect to
// is not the target's.
func TestPortExhaustionTruths(t *testing.T) {
	now := time.Now()
	r := NewPortExhaustion(PortExhaustionOptions{Window: 10 * time.Second, NearRatio: 0.5, Horizon: 5 * time.Minute, MinCount: 20})
	mk := func(owner, remote string, reuse float64, failed float64, tw ...float64) *signals.Store {
		st := signals.New(100, 100)
		st.Put(signals.Sysctl, signals.L("name", "net.ipv4.ip_local_port_range.min"), 40000, now)
		st.Put(signals.Sysctl, signals.L("name", "net.ipv4.ip_local_port_range.max"), 40199, now)
		st.Put(signals.Sysctl, signals.L("name", "net.ipv4.tcp_tw_reuse"), reuse, now)
		st.Put(signals.TCPSocketsDumped, nil, 500, now)
		putSeries(st, signals.TCPSocketsByRemote, signals.L("owner", owner, "remote", remote, "state", "TIME_WAIT"), now, tw...)
		if owner == "unknown" {
			// The target's connects, as the sockcalls probe counts them.
			putSeries(st, signals.ProcessConnectsTotal, signals.L("remote", remote), now, 0, 10, 20, 30, 40, 50, 60, 70, 80, 90, 100)
		}
		if failed > 0 {
			putSeries(st, signals.ProcessConnectErrorsTotal, signals.L("errno", "EADDRNOTAVAIL", "remote", remote), now, 0, 0, 0, 0, 0, 0, 0, 0, 0, failed/2, failed)
		}
		return st
	}
	rising := []float64{40, 50, 60, 70, 80, 90, 100, 110, 120, 130, 140}
	// The target's connects, their TIME_WAIT nobody's: still the target's.
	obs := r.Evaluate(Window{Store: mk("unknown", "10.0.0.5:5432", 0, 0, rising...), Now: now})
	if len(obs) != 1 || !strings.Contains(obs[0].Symptom, "at 10/s (the target's connect() calls)") {
		t.Errorf("target connecting at 10/s: %+v", obs)
	}
	// tcp_tw_reuse=1, or 2 toward loopback: the kernel reuses the ports.
	for _, tc := range []struct {
		remote string
		reuse  float64
	}{{"10.0.0.5:5432", 1}, {"127.0.0.1:5432", 2}} {
		if obs := r.Evaluate(Window{Store: mk("target", tc.remote, tc.reuse, 0, rising...), Now: now}); len(obs) != 0 {
			t.Errorf("tcp_tw_reuse=%v toward %s: %+v", tc.reuse, tc.remote, obs)
		}
	}
	// Already failing, even with reuse on: said as such, not forecast.
	obs = r.Evaluate(Window{Store: mk("target", "127.0.0.1:5432", 2, 10309, rising...), Now: now})
	if len(obs) != 1 || !strings.Contains(obs[0].Symptom, "already exhausted: 10309 connects failed") || strings.Contains(obs[0].Symptom, "starts failing in") || obs[0].Severity != SeverityCritical {
		t.Errorf("10309 failed connects: %+v", obs)
	}
	// Connects that failed without a local port while most of the range
	// is free toward the remote: not the ports, so not said as exhausted
	// (nor anything else, with reuse on toward loopback).
	wide := mk("target", "127.0.0.1:5432", 2, 6, rising...)
	wide.Put(signals.Sysctl, signals.L("name", "net.ipv4.ip_local_port_range.min"), 32768, now)
	wide.Put(signals.Sysctl, signals.L("name", "net.ipv4.ip_local_port_range.max"), 60999, now)
	if obs := r.Evaluate(Window{Store: wide, Now: now}); len(obs) != 0 {
		t.Errorf("6 failed connects with 140 of 28,232 ports in use: %+v", obs)
	}
	// The same range with most of it in use toward the remote (in any
	// state: SYN_SENT ones hold ports too): exhausted.
	full := mk("target", "127.0.0.1:5432", 2, 6, rising...)
	full.Put(signals.Sysctl, signals.L("name", "net.ipv4.ip_local_port_range.min"), 32768, now)
	full.Put(signals.Sysctl, signals.L("name", "net.ipv4.ip_local_port_range.max"), 60999, now)
	putSeries(full, signals.TCPSocketsByRemote, signals.L("owner", "target", "remote", "127.0.0.1:5432", "state", "SYN_SENT"), now, 20000)
	if obs := r.Evaluate(Window{Store: full, Now: now}); len(obs) != 1 || !strings.Contains(obs[0].Symptom, "already exhausted: 6 connects failed") {
		t.Errorf("6 failed connects with 20,140 of 28,232 ports in use: %+v", obs)
	}
	// Connects failed after the last socket dump: the TIME_WAIT count is
	// of before the failures, so nothing is said until the next dump.
	st0 := mk("target", "10.0.0.5:5432", 0, 10309, rising...)
	st0.Forget(signals.TCPSocketsDumped, func(signals.Labels) bool { return false })
	st0.Put(signals.TCPSocketsDumped, nil, 500, now.Add(-3*time.Second))
	if obs := r.Evaluate(Window{Store: st0, Now: now}); len(obs) != 0 {
		t.Errorf("failures newer than the last socket dump: %+v", obs)
	}
	// Every usable port in TIME_WAIT with reuse off, before the failures
	// are counted: exhausted now, not "starts failing in about 0 ms".
	obs = r.Evaluate(Window{Store: mk("target", "127.0.0.1:5432", 0, 0, 100, 120, 140, 160, 180, 200, 200, 200, 200, 200, 200), Now: now})
	if len(obs) != 1 || !strings.Contains(obs[0].Symptom, "already exhausted: no usable port is free") || strings.Contains(obs[0].Symptom, "starts failing in") {
		t.Errorf("200 of 200 ports in TIME_WAIT: %+v", obs)
	}
	// A neighbour's TIME_WAIT, and the target not connecting there.
	st := signals.New(100, 100)
	st.Put(signals.Sysctl, signals.L("name", "net.ipv4.ip_local_port_range.min"), 40000, now)
	st.Put(signals.Sysctl, signals.L("name", "net.ipv4.ip_local_port_range.max"), 40199, now)
	st.Put(signals.Sysctl, signals.L("name", "net.ipv4.tcp_tw_reuse"), 0, now)
	putSeries(st, signals.TCPSocketsByRemote, signals.L("owner", "unknown", "remote", "10.0.0.5:5432", "state", "TIME_WAIT"), now, rising...)
	if obs := r.Evaluate(Window{Store: st, Now: now}); len(obs) != 0 {
		t.Errorf("TIME_WAIT the target has no part in: %+v", obs)
	}
}

// Advice fits the program at hand: the same CLOSE_WAIT leak in a Go
// service and in a Tokio service gets each its own remedy, never the
// other's.
func TestNetworkAdviceFitsTheRuntime(t *testing.T) {
	now := time.Now()
	cw := NewCloseWait(CloseWaitOptions{Window: 10 * time.Second, MinIncrease: 5, Steady: 0.8, MinCount: 50, MinAge: time.Minute})
	st := closeWaitStore(now, 9, 0, 1, 2, 4, 5, 7, 8, 9, 11, 12, 14)
	for _, tc := range []struct {
		rt        workload.Runtime
		forbidden []string
	}{
		{workload.Runtime{Lang: workload.LangGo, Version: "1.26"}, []string{"tokio", "Tokio", "actix", "drop("}},
		{workload.Runtime{Lang: workload.LangRust, Frameworks: []workload.Framework{{Name: workload.FwTokio}}}, []string{"resp.Body", "goroutine", "defer "}},
	} {
		obs := cw.Evaluate(Window{Store: st, Now: now, Runtime: tc.rt})
		if len(obs) != 1 {
			t.Fatalf("%s: %+v", tc.rt, obs)
		}
		for _, f := range tc.forbidden {
			if strings.Contains(obs[0].Remediation, f) {
				t.Errorf("%s: remediation mentions %q: %s", tc.rt, f, obs[0].Remediation)
			}
		}
	}
}

// A CLOSE_WAIT leak in bursts (20 sockets every two samples) is a leak
// even when the newest samples are flat.
func TestCloseWaitLeakInBursts(t *testing.T) {
	now := time.Now()
	r := NewCloseWait(CloseWaitOptions{Window: 4 * time.Second, MinIncrease: 10, Steady: 0.6, MinCount: 50, MinAge: 5 * time.Minute})
	st := signals.New(100, 100)
	putSeries(st, signals.TCPSockets, signals.L("owner", "target", "port", "8080", "state", "CLOSE_WAIT"), now, 0, 0, 20, 20, 40, 40, 60, 60)
	st.Put(signals.TCPCloseWaitOldestSeconds, signals.L("owner", "target", "port", "8080"), 2, now)
	if obs := r.Evaluate(Window{Store: st, Now: now}); len(obs) != 1 {
		t.Fatalf("a leak in bursts: %+v", obs)
	}
}

// Peers that close connections at one idle age over loopback, at a port
// some process of the namespace listens on, are that server's own
// timeout: nothing stands between, so no intermediary is named (and
// culprit's own API server closing idle clients is no finding).
func TestIdleTimeoutNotALocalServer(t *testing.T) {
	now := time.Now()
	r := NewIdleTimeout(IdleTimeoutOptions{Window: time.Minute, MinCloses: 5, Tolerance: 0.1, MinShare: 0.8, MinIdle: time.Second})
	st := signals.New(10, 10)
	st.Put(signals.TCPSockets, signals.L("owner", "agent", "port", "9461", "state", "LISTEN"), 1, now)
	evs := connLog()
	for i := 0; i < 10; i++ {
		evs.Add(signals.ConnEvent{T: now, Kind: signals.ConnPeerClose, Remote: "127.0.0.1:9461", LocalPort: 40000 + i, Idle: 2 * time.Second, Owner: "target", Bytes: 512})
	}
	if obs := r.Evaluate(Window{Store: st, Now: now, Inputs: Inputs{Conns: evs}}); len(obs) != 0 {
		t.Errorf("a local server's own idle timeout named an intermediary: %+v", obs)
	}
}

// Connections that never carried data, closed by their peer at one age
// (clients that connect and leave, or give up while queued), are not cut
// by an intermediary while idle.
func TestIdleTimeoutNeedsData(t *testing.T) {
	now := time.Now()
	r := NewIdleTimeout(IdleTimeoutOptions{Window: time.Minute, MinCloses: 5, Tolerance: 0.1, MinShare: 0.8, MinIdle: time.Second})
	evs := connLog()
	for i := 0; i < 20; i++ {
		evs.Add(signals.ConnEvent{T: now, Kind: signals.ConnPeerClose, Remote: "10.0.0.7:443", LocalPort: 40000 + i, Idle: time.Second, Owner: "target", Bytes: 2})
	}
	if obs := r.Evaluate(Window{Store: signals.New(10, 10), Now: now, Inputs: Inputs{Conns: evs}}); len(obs) != 0 {
		t.Errorf("connections that carried nothing named an idle timeout: %+v", obs)
	}
}

// idle_timeout groups closes as they arrive: at every evaluation it says
// what a rule that grouped its whole window afresh says (a new rule, which
// reads the whole log), as closes come and leave the window and listeners
// open and close under them. Random closes of several owners, ports and
// remotes, some cut at one idle age.
func TestIdleTimeoutGroupsAsTheyCome(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	opts := IdleTimeoutOptions{Window: 30 * time.Second, MinCloses: 5, Tolerance: 0.1, MinShare: 0.6, MinIdle: time.Second}
	for _, scope := range []string{ScopeTarget, ScopeNamespace} {
		r := NewIdleTimeout(opts)
		evs := signals.NewConnEvents(1 << 16)
		t0 := time.Now()
		owners := []string{"target", "target", "envoy", "agent", "unknown"}
		remotes := []string{"10.0.0.7:443", "10.0.0.8:5432", "127.0.0.1:8080", "127.0.0.1:9"}
		found := 0
		for tick := range 300 {
			now := t0.Add(time.Duration(tick) * 500 * time.Millisecond)
			st := signals.New(10, 10)
			// The target listens on 8080 for the first and last hundred
			// ticks; a neighbour on 9 from tick 150.
			if tick < 100 || tick >= 200 {
				st.Put(signals.TCPSockets, signals.L("owner", "target", "port", "8080", "state", "LISTEN"), 1, now)
			}
			if tick >= 150 {
				st.Put(signals.TCPSockets, signals.L("owner", "envoy", "port", "9", "state", "LISTEN"), 1, now)
			}
			for range rng.IntN(6) {
				idle := time.Duration(rng.IntN(3000)) * time.Millisecond
				if rng.IntN(3) > 0 {
					idle = 350*time.Second + time.Duration(rng.IntN(1000))*time.Millisecond
				}
				kind := signals.ConnPeerClose
				if rng.IntN(4) == 0 {
					kind = signals.ConnResetReceived
				}
				lport := 40000 + rng.IntN(50)
				if rng.IntN(3) == 0 {
					lport = 8080
				}
				evs.Add(signals.ConnEvent{T: now, Kind: kind, Remote: remotes[rng.IntN(len(remotes))], LocalPort: lport,
					Idle: idle, Owner: owners[rng.IntN(len(owners))], Bytes: uint64(rng.IntN(4) * 100)})
			}
			w := Window{Store: st, Now: now, Scope: scope, Inputs: Inputs{Conns: evs}}
			got := r.Evaluate(w)
			want := NewIdleTimeout(opts).Evaluate(w)
			if !reflect.DeepEqual(got, want) {
				t.Fatalf("scope %s, tick %d: grouped as they came:\n%+v\nall at once:\n%+v", scope, tick, got, want)
			}
			found += len(got)
		}
		if found == 0 {
			t.Fatalf("scope %s: no finding in 300 evaluations: the comparison compared nothing", scope)
		}
	}
}

// signals.TCPSocketsDumped is the sockets collector's count of the last dump.

// idle_timeout reads only the events added since its last evaluation and
// keeps the closes that can count for its window: closes read earlier
// still count when the log has since turned over with a neighbour's
// churn, leave with the window, and a busy log costs an evaluation
// nothing it already read (the whole window was copied at each one,
// five times a second).
func TestIdleTimeoutReadsWhatIsNew(t *testing.T) {
	t0 := time.Now()
	r := NewIdleTimeout(IdleTimeoutOptions{Window: time.Minute, MinCloses: 10, Tolerance: 0.1, MinShare: 0.8, MinIdle: time.Second})
	evs := signals.NewConnEvents(64)
	cut := func(at time.Time, n int) {
		for i := range n {
			evs.Add(signals.ConnEvent{T: at, Kind: signals.ConnPeerClose, Remote: "10.0.0.7:443", LocalPort: 40000 + i, Idle: 350 * time.Second, Owner: "target", Bytes: 512})
		}
	}
	churn := func(at time.Time, n int) {
		for i := range n {
			evs.Add(signals.ConnEvent{T: at, Kind: signals.ConnPeerClose, Remote: "127.0.0.1:80", LocalPort: 50000 + i%1000, Idle: time.Millisecond, Owner: "wrk", Bytes: 100000})
		}
	}
	eval := func(now time.Time) []Observation {
		return r.Evaluate(Window{Store: signals.New(10, 10), Now: now, Inputs: Inputs{Conns: evs}})
	}
	cut(t0, 6)
	if obs := eval(t0); len(obs) != 0 {
		t.Fatalf("6 closes, fewer than min_closes: %+v", obs)
	}
	churn(t0.Add(time.Second), 200) // the log (64) turns over three times
	cut(t0.Add(10*time.Second), 6)
	obs := eval(t0.Add(10 * time.Second))
	if len(obs) != 1 || !strings.Contains(obs[0].Symptom, "12 of 12 connections") {
		t.Fatalf("6 closes read before the log turned over and 6 after: want one finding over 12, got %+v", obs)
	}
	if obs := eval(t0.Add(65 * time.Second)); len(obs) != 0 {
		t.Fatalf("the first 6 closes left the window: %+v", obs)
	}

	// A full log of a neighbour's churn, 20 new events per evaluation.
	evs = signals.NewConnEvents(4096)
	r = NewIdleTimeout(IdleTimeoutOptions{Window: time.Minute, MinCloses: 10, Tolerance: 0.1, MinShare: 0.8, MinIdle: time.Second})
	churn(t0, 4096)
	eval(t0)
	var m0, m1 runtime.MemStats
	runtime.ReadMemStats(&m0)
	for i := range 100 {
		churn(t0.Add(time.Duration(i)*200*time.Millisecond), 20)
		eval(t0.Add(time.Duration(i) * 200 * time.Millisecond))
	}
	runtime.ReadMemStats(&m1)
	if grew := m1.TotalAlloc - m0.TotalAlloc; grew > 1<<20 {
		t.Errorf("100 evaluations beside a full log of a neighbour's churn allocated %d KB: the window is copied again", grew>>10)
	}

	// The target's own clients closing in the middle of their traffic
	// (nginx under wrk): every close counts, none is long idle. A window
	// full of them, 20 new per evaluation, is neither grouped again nor
	// sorted at each.
	evs = signals.NewConnEvents(4096)
	r = NewIdleTimeout(IdleTimeoutOptions{Window: time.Minute, MinCloses: 10, Tolerance: 0.1, MinShare: 0.8, MinIdle: time.Second})
	st := signals.New(10, 10)
	st.Put(signals.TCPSockets, signals.L("owner", "target", "port", "8080", "state", "LISTEN"), 1, t0)
	clients := func(at time.Time, n int) {
		for i := range n {
			evs.Add(signals.ConnEvent{T: at, Kind: signals.ConnPeerClose, Remote: "127.0.0.1:50000", LocalPort: 8080, Idle: time.Duration(i%7) * time.Millisecond, Owner: "target", Bytes: 100000})
		}
	}
	clients(t0, 4096)
	r.Evaluate(Window{Store: st, Now: t0, Inputs: Inputs{Conns: evs}})
	runtime.ReadMemStats(&m0)
	for i := range 100 {
		clients(t0.Add(time.Duration(i)*200*time.Millisecond), 20)
		if obs := r.Evaluate(Window{Store: st, Now: t0.Add(time.Duration(i) * 200 * time.Millisecond), Inputs: Inputs{Conns: evs}}); len(obs) != 0 {
			t.Fatalf("busy clients closing named an idle timeout: %+v", obs)
		}
	}
	runtime.ReadMemStats(&m1)
	if grew := m1.TotalAlloc - m0.TotalAlloc; grew > 1<<20 {
		t.Errorf("100 evaluations over a window of 4096 of the target's busy clients' closes allocated %d KB: the window is grouped again", grew>>10)
	}
}
