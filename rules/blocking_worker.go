package rules

import (
	"fmt"
	"sort"
	"strings"
	"time"

	"github.com/culprit-dev/culprit/signals"
	"github.com/culprit-dev/culprit/workload"
)

// Causes of blocking_worker: a blocking call on a worker of a pool
// (Tokio's multi-thread workers, actix's, a named pool), or on an event
// loop that runs its callbacks alone (Node.js's main thread, redis, an
// nginx worker, asyncio).
const (
	CauseBlockingCallOnWorker    = "blocking_call_on_worker"
	CauseBlockingCallOnEventLoop = "blocking_call_on_event_loop"
)

// BlockingWorkerOptions ([rules.blocking_worker] in agent.conf).
type BlockingWorkerOptions struct {
	Window time.Duration `toml:"window" range:"[1s,1h]"` // blocks are looked for over this window
	// MinBlock: a sleep this long on a worker or event loop outside its
	// idle wait is a blocking call. A sleep in an idle call (epoll, poll)
	// whose stack does not tell counts when work waited this long during
	// it.
	MinBlock time.Duration `toml:"min_block" range:"[10ms,1m]"`
}

// DefaultBlockingWorkerOptions are the defaults agent.conf documents.
func DefaultBlockingWorkerOptions() BlockingWorkerOptions {
	return BlockingWorkerOptions{Window: 10 * time.Second, MinBlock: 250 * time.Millisecond}
}

// BlockingWorker names a blocking call made on an async runtime's worker
// thread or on an event loop (seed 000 Problems A and F; "The Async
// Runtime Trap"): while the thread sleeps in the kernel, every task or
// callback queued on it waits, so one slow fsync or DNS lookup stalls
// unrelated requests. The evidence is the thread, how long it slept, and
// the stack it went to sleep with. Which threads count, and which sleeps
// are their idle waits, comes from their stacks (threads.go).
type BlockingWorker struct {
	o BlockingWorkerOptions
}

func NewBlockingWorker(o BlockingWorkerOptions) *BlockingWorker {
	return &BlockingWorker{o: o}
}

func (*BlockingWorker) Name() string { return "blocking_worker" }

func (*BlockingWorker) Needs() []Need {
	return []Need{
		{Component: signals.ProbeSched, What: "which thread blocked, for how long, and the blocking call's stack", Essential: true},
		{Component: signals.ProbeSockCalls, What: "data waiting unread while a thread blocked (on a runtime culprit does not know, a block counts only with work seen waiting)"},
		{Component: signals.CollectorAcceptQueue, What: "connections waiting in an accept queue while a thread blocked"},
		{Component: signals.ReceiverOTLP, What: "the traces of the requests a block held up"},
	}
}

// poolBlocks are the blocks of one pool (or loop) in the window.
type poolBlocks struct {
	worst     signals.Episode
	judgement blockJudgement
	count     int
	total     time.Duration
	threads   map[int]bool
}

func (r *BlockingWorker) Evaluate(w Window) []Observation {
	if w.Episodes == nil {
		return nil
	}
	from := w.Now.Add(-r.o.Window)
	byPool := map[string]*poolBlocks{}
	for _, e := range w.Episodes.Since(signals.EpisodeBlock, from) {
		if e.Duration < r.o.MinBlock {
			continue
		}
		j, blocked := judgeBlock(w, e, r.o.MinBlock)
		if !blocked {
			continue
		}
		pool := j.thread.pool
		pb := byPool[pool]
		if pb == nil {
			pb = &poolBlocks{threads: map[int]bool{}}
			byPool[pool] = pb
		}
		pb.count++
		pb.total += e.Duration
		pb.threads[e.Tid] = true
		if e.Duration > pb.worst.Duration {
			pb.worst, pb.judgement = e, j
		}
	}
	pools := make([]string, 0, len(byPool))
	for p := range byPool {
		pools = append(pools, p)
	}
	sort.Strings(pools)
	var out []Observation
	for _, p := range pools {
		out = append(out, r.observation(w, p, byPool[p]))
	}
	return out
}

func (r *BlockingWorker) observation(w Window, pool string, pb *poolBlocks) Observation {
	e, j := pb.worst, pb.judgement
	j.withWork(w, e)
	v := j.thread
	fn := culpritOf(e, v.runtime)
	call := e.Syscall()
	blocking := "a blocking " + call + " call"
	if call == "" {
		// Asleep outside any system call (a page fault waiting on I/O):
		// "a blocking the kernel call" was once said.
		call = "the kernel"
		blocking = "a call that blocks in the kernel"
	}
	where, named := fn, fn
	if fn == "" {
		where = "an unknown function (no user stack: built without frame pointers?)"
		named = "an unknown function"
	}
	sev := SeverityWarning
	if e.Duration >= time.Second {
		sev = SeverityCritical
	}
	sofar := ""
	if e.Ongoing {
		sofar = " so far, still blocked"
	}
	rt := runtimeName(v.runtime)
	loop := v.role == signals.RoleEventLoop
	o := Observation{
		Key:        pool,
		Cause:      CauseBlockingCallOnWorker,
		Severity:   sev,
		Confidence: 0.9,
		Evidence: []Evidence{
			{Signal: fmt.Sprintf("thread_blocked_seconds{thread=%q,tid=\"%d\"}", e.Thread, e.Tid), Value: e.Duration.Seconds(), Threshold: r.o.MinBlock.Seconds(), Unit: "seconds", Note: "off-CPU in " + call},
		},
		Artifacts: []Artifact{threadArtifact(e), stackArtifact(e, 24)},
		Labels:    map[string]string{"pool": pool, "role": v.role.String()},
	}
	if v.runtime != signals.RuntimeUnknown {
		o.Labels["runtime"] = string(v.runtime)
	}
	others := ""
	if pb.count > 1 {
		noun := "worker"
		if loop {
			noun = "thread"
		}
		others = fmt.Sprintf(" (%s on %s in the last %s, %s in all)", count(float64(pb.count), "such block", ""),
			count(float64(len(pb.threads)), noun, ""), duration(r.o.Window), duration(pb.total))
	}
	waited := ""
	if j.waited >= minWaitedWords || (j.waited > 0 && j.how == looksIdle) {
		// At least: data already queued when the sockcalls probe began
		// watching counts from then, and a queue from the first sample
		// that saw it hold connections.
		waited = fmt.Sprintf(" (%s for at least %s)", j.what, duration(j.waited))
		ev := j.evidence
		if j.how == looksIdle || (v.runtime == signals.RuntimeUnknown && !v.byName) {
			// Work seen waiting is what made this sleep a finding.
			ev.Threshold = r.o.MinBlock.Seconds()
		}
		o.Evidence = append(o.Evidence, ev)
	}
	switch {
	case !loop:
		o.Title = fmt.Sprintf("Blocking call on async worker %s: %s in %s", e.Thread, named, call)
		o.Symptom = fmt.Sprintf("worker thread %s (tid %d) slept in %s for %s%s; it ran no task meanwhile%s", e.Thread, e.Tid, call, duration(e.Duration), sofar, waited)
		o.RootCause = fmt.Sprintf("%s makes %s on a worker thread of the %q pool%s", where, blocking, pool, others)
		if rt != "" && !v.byName {
			o.RootCause = fmt.Sprintf("%s makes %s on a worker thread of %s's %q pool%s", where, blocking, rt, pool, others)
		}
	case j.how == nestedLoop:
		o.Cause = CauseBlockingCallOnEventLoop
		runner := ""
		if j.cls.Runner != "" && j.cls.Runner != fn {
			runner = " (" + j.cls.Runner + ")"
		}
		what := "a synchronous call"
		if strings.Contains(j.cls.Runner, "SyncProcessRunner") {
			what = "a synchronous child process (execSync, execFileSync or spawnSync)"
		}
		o.Title = fmt.Sprintf("Blocking call on the event loop of %s: %s waits in a nested event loop", e.Thread, named)
		o.Symptom = fmt.Sprintf("event-loop thread %s (tid %d) waited in %s for %s%s inside a nested event loop; its own loop ran no callback meanwhile%s", e.Thread, e.Tid, call, duration(e.Duration), sofar, waited)
		o.RootCause = fmt.Sprintf("%s waits for %s: it runs a second event loop%s on the event-loop thread of %s, so the wait looks like the loop's idle %s, yet the loop itself stands still until it returns%s",
			where, what, runner, rtOr(rt, "the process"), call, others)
	case j.how == looksIdle:
		o.Cause = CauseBlockingCallOnEventLoop
		o.Title = fmt.Sprintf("Blocking call on the event loop of %s: %s in %s while work waited", e.Thread, named, call)
		o.Symptom = fmt.Sprintf("event-loop thread %s (tid %d) slept in %s for %s%s, outside the wait it idles in, while work waited for it%s", e.Thread, e.Tid, call, duration(e.Duration), sofar, waited)
		o.RootCause = fmt.Sprintf("%s sleeps in %s on the event-loop thread of %s: the call looks like an idle wait, but it is not where this loop waits for work, and the work that arrived meanwhile was not served until it returned%s",
			where, call, rtOr(rt, "the process"), others)
		o.Confidence = 0.7
	default:
		o.Cause = CauseBlockingCallOnEventLoop
		o.Title = fmt.Sprintf("Blocking call on the event loop of %s: %s in %s", e.Thread, named, call)
		o.Symptom = fmt.Sprintf("event-loop thread %s (tid %d) slept in %s for %s%s; its loop ran no other callback meanwhile%s", e.Thread, e.Tid, call, duration(e.Duration), sofar, waited)
		o.RootCause = fmt.Sprintf("%s makes %s on the event-loop thread of %s%s", where, blocking, rtOr(rt, "the process"), others)
	}
	signal := "blocks_on_workers"
	if loop {
		signal = "blocks_on_event_loop"
	}
	o.Evidence = append(o.Evidence, Evidence{Signal: fmt.Sprintf("%s{pool=%q}", signal, pool), Value: float64(pb.count), Unit: "blocks", Window: r.o.Window, Note: "sleeps over the threshold outside idle waits"})
	if fn != "" {
		o.Artifacts = append(o.Artifacts, Artifact{Kind: "frame", Value: fn, Detail: "the function that made the blocking call"})
	}
	adv := advisorFor(w, v)
	o.Remediation = adv.BlockingCall(where, e.Syscall())
	if j.how == nestedLoop && strings.Contains(j.cls.Runner, "SyncProcessRunner") && adv.Runtime().Lang == workload.LangNode {
		// The advice names fs and crypto; this one is a child process.
		o.Remediation += " For a child process, child_process.exec, execFile or spawn run it without blocking the loop."
	}
	o.Artifacts = append(o.Artifacts, tracesDuring(w.Spans, e.Start, e.End(), e.Tid, 3)...)
	return o
}

// minWaitedWords is the least time work waited that the words tell: the
// ages are lower bounds counted from when watching began (sockcalls
// attaches its socket hooks once a sleep is noticed), so a shorter one
// says only that watching had just begun ("for at least 0 ms" was seen).
// It is the probes' poll, the age past which a socket counts as waiting.
const minWaitedWords = 100 * time.Millisecond

// rtOr is the runtime's name, or alt when it is unknown.
func rtOr(rt, alt string) string {
	if rt == "" {
		return alt
	}
	return rt
}
