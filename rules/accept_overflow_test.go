package rules

import (
	"strings"
	"testing"
	"time"

	"github.com/culprit-dev/culprit/signals"
)

// listenerHistory writes what the collectors would have written for one
// listener: every 100 ms for 5 s, the queue length and the cumulative drops
// given by the functions of the sample's age.
type listenerHistory struct {
	backlog   float64
	qlen      func(age time.Duration) float64 // age = time before now
	drops     func(age time.Duration) float64
	opens     func(age time.Duration) float64 // the app's accepts; nil: no eBPF
	somaxconn float64
}

var ls8080 = signals.L("addr", "127.0.0.1", "port", "8080")

func (h listenerHistory) store(now time.Time) *signals.Store {
	st := signals.New(600, 1000)
	for age := 5 * time.Second; age >= 0; age -= 100 * time.Millisecond {
		t := now.Add(-age)
		q := h.qlen(age)
		st.Put(signals.ListenBacklog, ls8080, h.backlog, t)
		st.Put(signals.ListenQueueLength, ls8080, q, t)
		full := 0.0
		if q > h.backlog {
			full = 1
		}
		st.Put(signals.ListenQueueFull, ls8080, full, t)
		st.Put(signals.ListenOverflowsTotal, ls8080, h.drops(age), t)
		if h.opens != nil {
			st.Put(signals.ProcessAcceptsTotal, signals.L("port", "8080"), h.opens(age), t)
		}
	}
	st.Put(signals.Sysctl, signals.L("name", "net.core.somaxconn"), h.somaxconn, now)
	st.Put(signals.ProcessThreads, signals.L("state", "S"), 5, now)
	st.Put(signals.ProcessThreads, signals.L("state", "R"), 0, now)
	st.Put(signals.ProcessThreadsInSyscall, signals.L("syscall", "futex"), 4, now)
	st.Put(signals.ProcessThreadsInSyscall, signals.L("syscall", "epoll_wait"), 1, now)
	return st
}

func defaultAO() *AcceptOverflow {
	return NewAcceptOverflow(DefaultAcceptOverflowOptions())
}

func TestAcceptOverflowSilentWhenHealthy(t *testing.T) {
	now := time.Unix(10000, 0)
	// Busy but healthy: the queue holds a few connections, never full, no drops.
	h := listenerHistory{backlog: 128, somaxconn: 4096,
		qlen:  func(age time.Duration) float64 { return float64(int(age/time.Millisecond) % 7) },
		drops: func(time.Duration) float64 { return 42 }, // old drops, before the window: no increase
		opens: func(age time.Duration) float64 { return 10000 - age.Seconds()*500 },
	}
	if obs := defaultAO().Evaluate(Window{Store: h.store(now), Now: now}); len(obs) != 0 {
		t.Fatalf("healthy listener raised %d observations: %+v", len(obs), obs[0])
	}
}

func TestAcceptOverflowAppNotAccepting(t *testing.T) {
	now := time.Unix(10000, 0)
	// Full for the last 2 s, drops rising, no accept.
	h := listenerHistory{backlog: 8, somaxconn: 4096,
		qlen: func(age time.Duration) float64 {
			if age <= 2*time.Second {
				return 9
			}
			return 0
		},
		drops: func(age time.Duration) float64 {
			if age <= 2*time.Second {
				return float64(20 - int(age.Seconds()*5))
			}
			return 0
		},
		opens: func(age time.Duration) float64 {
			if age <= 2*time.Second {
				return 100
			}
			return 100 - float64(int((age-2*time.Second)/time.Second))
		},
	}
	obs := defaultAO().Evaluate(Window{Store: h.store(now), Now: now})
	if len(obs) != 1 {
		t.Fatalf("got %d observations, want 1", len(obs))
	}
	o := obs[0]
	if o.Cause != CauseAppNotAccepting {
		t.Fatalf("cause = %s, want %s; root cause: %s", o.Cause, CauseAppNotAccepting, o.RootCause)
	}
	for _, want := range []string{"127.0.0.1:8080", "backlog 8", "accepted no connection", "futex×4"} {
		if !strings.Contains(o.RootCause, want) {
			t.Errorf("root cause %q does not mention %q", o.RootCause, want)
		}
	}
	if o.Severity != SeverityCritical || o.Confidence < 0.85 {
		t.Errorf("severity %v confidence %v", o.Severity, o.Confidence)
	}
}

// After a stall the app accepts again; the drops of the last seconds are
// the stall's, and must not be blamed on the backlog.
func TestAcceptOverflowRecoveringStallKeepsCause(t *testing.T) {
	now := time.Unix(10000, 0)
	h := listenerHistory{backlog: 8, somaxconn: 4096,
		qlen: func(age time.Duration) float64 {
			if age > 500*time.Millisecond && age <= 3*time.Second {
				return 9
			}
			return 0
		},
		drops: func(age time.Duration) float64 {
			if age <= 1*time.Second {
				return 30
			}
			return float64(30 - int(age.Seconds()*3))
		},
	}
	obs := defaultAO().Evaluate(Window{Store: h.store(now), Now: now})
	if len(obs) != 1 || obs[0].Cause != CauseAppNotAccepting {
		t.Fatalf("got %+v, want app_not_accepting while the stall's drops are recent", obs)
	}
	if !strings.Contains(obs[0].RootCause, "accepts again") {
		t.Errorf("root cause does not say the app recovered: %s", obs[0].RootCause)
	}
}

// Drops, the queue one short of full, no accept seen by eBPF: a stall that
// has not lasted stall_after yet, not a small backlog.
func TestAcceptOverflowNoBacklogVerdictWithoutAccepts(t *testing.T) {
	now := time.Unix(10000, 0)
	h := listenerHistory{backlog: 4, somaxconn: 4096,
		qlen: func(age time.Duration) float64 {
			if age < time.Second {
				return 4
			}
			return 0
		},
		drops: func(age time.Duration) float64 {
			if age < time.Second {
				return 25
			}
			return 0
		},
		opens: func(age time.Duration) float64 { return 7 },
	}
	if obs := defaultAO().Evaluate(Window{Store: h.store(now), Now: now}); len(obs) != 0 {
		t.Fatalf("judged without evidence of accepts: %s: %s", obs[0].Cause, obs[0].RootCause)
	}
}

func TestAcceptOverflowWaitsBeforeCallingAStall(t *testing.T) {
	now := time.Unix(10000, 0)
	h := listenerHistory{backlog: 8, somaxconn: 4096,
		qlen: func(age time.Duration) float64 {
			if age < 200*time.Millisecond {
				return 9
			}
			return 0
		},
		drops: func(age time.Duration) float64 {
			if age < 200*time.Millisecond {
				return 3
			}
			return 0
		},
	}
	if obs := defaultAO().Evaluate(Window{Store: h.store(now), Now: now}); len(obs) != 0 {
		t.Fatalf("queue full for 200ms (< stall_after) already judged: %+v", obs[0])
	}
}

func TestAcceptOverflowBacklogTooSmall(t *testing.T) {
	now := time.Unix(10000, 0)
	// A burst 1 s ago overflowed the queue, which the app drained at once.
	h := listenerHistory{backlog: 128, somaxconn: 128,
		qlen: func(age time.Duration) float64 {
			if age == time.Second {
				return 129
			}
			return 0
		},
		drops: func(age time.Duration) float64 {
			if age <= time.Second {
				return 57
			}
			return 0
		},
		opens: func(age time.Duration) float64 { return 5000 - age.Seconds()*100 },
	}
	obs := defaultAO().Evaluate(Window{Store: h.store(now), Now: now})
	if len(obs) != 1 {
		t.Fatalf("got %d observations, want 1", len(obs))
	}
	o := obs[0]
	if o.Cause != CauseBacklogTooSmall {
		t.Fatalf("cause = %s, want %s; root cause: %s", o.Cause, CauseBacklogTooSmall, o.RootCause)
	}
	if !strings.Contains(o.Remediation, "capped by net.core.somaxconn=128") {
		t.Errorf("remediation does not name the somaxconn cap: %s", o.Remediation)
	}
	if !strings.Contains(o.Symptom, "57 connection attempts dropped") || !strings.Contains(o.Symptom, "retries included") {
		t.Errorf("symptom %q does not count the drops", o.Symptom)
	}
}

// A burst on a tiny backlog keeps the queue full for longer than
// stall_after, but the app accepts all along: a burst the app drains, not
// an app that stopped accepting (this once flaked as app_not_accepting
// under -race, when the queue stayed full 304-349 ms). Only when the queue
// stays full for saturate_after despite accepts is the app saturated.
func TestAcceptOverflowBurstVersusStall(t *testing.T) {
	now := time.Unix(10000, 0)
	full := func(run time.Duration) func(time.Duration) float64 {
		return func(age time.Duration) float64 {
			if age <= run {
				return 3
			}
			return 0
		}
	}
	accepting := func(age time.Duration) float64 { return 5000 - age.Seconds()*40 }
	drops := func(age time.Duration) float64 { return 900 - age.Seconds()*100 }
	burst := listenerHistory{backlog: 2, somaxconn: 4096, qlen: full(350 * time.Millisecond), drops: drops, opens: accepting}
	if obs := defaultAO().Evaluate(Window{Store: burst.store(now), Now: now}); len(obs) != 1 || obs[0].Cause != CauseBacklogTooSmall {
		t.Errorf("a 350 ms burst the app accepts through: %+v", obs)
	}
	stall := listenerHistory{backlog: 2, somaxconn: 4096, qlen: full(350 * time.Millisecond), drops: drops,
		opens: func(age time.Duration) float64 { return 5000 }}
	if obs := defaultAO().Evaluate(Window{Store: stall.store(now), Now: now}); len(obs) != 1 || obs[0].Cause != CauseAppNotAccepting || !strings.Contains(obs[0].RootCause, "accepted no connection") {
		t.Errorf("350 ms full without an accept: %+v", obs)
	}
	o := defaultAO()
	o.o.SaturateAfter = 2 * time.Second
	sat := listenerHistory{backlog: 2, somaxconn: 4096, qlen: full(3 * time.Second), drops: drops, opens: accepting}
	obs := o.Evaluate(Window{Store: sat.store(now), Now: now})
	if len(obs) != 1 || obs[0].Cause != CauseAppNotAccepting || !strings.Contains(obs[0].RootCause, "accepted only 120 connections (40/s) while more arrived") {
		t.Errorf("3 s full while accepting 40/s: %+v", obs)
	}
}

// The probe runs but saw no handshake on the port at all (its queue was
// full before the agent started): that is zero accepts, not "unknown".
func TestAcceptOverflowProbeRunningNoHandshakes(t *testing.T) {
	now := time.Unix(10000, 0)
	h := listenerHistory{backlog: 16, somaxconn: 4096,
		qlen:  func(time.Duration) float64 { return 17 },
		drops: func(age time.Duration) float64 { return 300 - age.Seconds()*30 },
	}
	st := h.store(now)
	st.SetStatus(signals.Status{Component: "sockcalls", Kind: "probe", State: signals.StateRunning})
	obs := defaultAO().Evaluate(Window{Store: st, Now: now})
	if len(obs) != 1 || obs[0].Cause != CauseAppNotAccepting {
		t.Fatalf("got %+v", obs)
	}
	if !strings.Contains(obs[0].RootCause, "accepted no connection") || obs[0].Confidence < 0.85 {
		t.Errorf("probe running but treated as unavailable: %s (confidence %v)", obs[0].RootCause, obs[0].Confidence)
	}
}

// With the sched probe on, the stall names the thread that blocked during
// it — but a main thread waiting for its stdin on a pipe is idle, not the
// cause (a test child blocked in anon_pipe_read was named once), and the
// thread states stay in the root cause either way.
func TestAcceptOverflowStalledThread(t *testing.T) {
	now := time.Unix(10000, 0)
	h := listenerHistory{backlog: 4, somaxconn: 4096,
		qlen: func(age time.Duration) float64 {
			if age <= time.Second {
				return 5
			}
			return 0
		},
		drops: func(age time.Duration) float64 { return float64(50 - int(age.Seconds()*10)) },
		opens: func(time.Duration) float64 { return 100 },
	}
	stdinRead := []string{"__schedule", "schedule", "anon_pipe_read", "vfs_read", "ksys_read", "do_syscall_64",
		"syscall.Syscall", "os.(*File).Read", "bufio.(*Scanner).Scan", "main.commands", "runtime.goexit"}
	fsyncStack := []string{"__schedule", "io_schedule", "jbd2_log_wait_commit", "ext4_sync_file", "__x64_sys_fsync", "do_syscall_64",
		"syscall.Syscall", "os.(*File).Sync", "app.saveSession", "app.serve", "runtime.goexit"}
	reader := signals.Episode{Kind: signals.EpisodeBlock, Tid: 7, Thread: "app", Start: now.Add(-900 * time.Millisecond), Duration: 900 * time.Millisecond, Ongoing: true, Stack: stdinRead, KernelFrames: 6}
	fsyncer := signals.Episode{Kind: signals.EpisodeBlock, Tid: 9, Thread: "app", Start: now.Add(-800 * time.Millisecond), Duration: 800 * time.Millisecond, Ongoing: true, Stack: fsyncStack, KernelFrames: 6}

	for _, tc := range []struct {
		name  string
		eps   []signals.Episode
		named string // "" when no thread may be named
	}{
		{"stdin reader only", []signals.Episode{reader}, ""},
		{"stdin reader and a blocked fsync", []signals.Episode{reader, fsyncer}, "tid 9"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := NewAcceptOverflow(AcceptOverflowOptions{Window: 10 * time.Second, Recent: 2 * time.Second, StallAfter: 300 * time.Millisecond, MinDrops: 1})
			obs := r.Evaluate(Window{Store: h.store(now), Now: now, Inputs: Inputs{Episodes: episodes(tc.eps...), Pools: testPools}})
			if len(obs) != 1 || obs[0].Cause != CauseAppNotAccepting {
				t.Fatalf("got %+v, want app_not_accepting", obs)
			}
			rc := obs[0].RootCause
			if !strings.Contains(rc, "Threads:") {
				t.Errorf("root cause lacks the thread states: %s", rc)
			}
			if strings.Contains(rc, "tid 7") {
				t.Errorf("root cause names the thread reading its stdin: %s", rc)
			}
			if tc.named == "" && strings.Contains(rc, "During the stall") {
				t.Errorf("root cause names a thread: %s", rc)
			}
			if tc.named != "" && !(strings.Contains(rc, tc.named) && strings.Contains(rc, "fsync") && strings.Contains(rc, "app.saveSession")) {
				t.Errorf("root cause does not name %s blocked in fsync from app.saveSession: %s", tc.named, rc)
			}
		})
	}
}

// Thread states in words: "all asleep" only when none runs. Seen in the
// demo: "Threads: 6 running, 15 sleeping ...; all its threads are asleep".
func TestDescribeThreadsSaysWhatRuns(t *testing.T) {
	now := time.Now()
	for _, tc := range []struct {
		r, s float64
		want string
	}{
		{0, 21, "all its threads are asleep"},
		{6, 15, "6 of its 21 threads run, none of them accepting"},
		{20, 1, "its threads are all on CPU"},
	} {
		st := signals.New(8, 64)
		st.Put(signals.ProcessThreads, signals.L("state", "R"), tc.r, now)
		st.Put(signals.ProcessThreads, signals.L("state", "S"), tc.s, now)
		if got := describeThreads(st).summary; !strings.Contains(got, tc.want) {
			t.Errorf("%v running, %v sleeping: %q, want %q in it", tc.r, tc.s, got, tc.want)
		}
	}
}
