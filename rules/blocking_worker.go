package rules

import (
	"fmt"
	"sort"
	"time"

	"github.com/culprit-dev/culprit/signals"
)

// CauseBlockingCallOnWorker is blocking_worker's root cause.
const CauseBlockingCallOnWorker = "blocking_call_on_worker"

// BlockingWorkerOptions ([rules.blocking_worker] in agent.conf).
type BlockingWorkerOptions struct {
	Window   time.Duration `toml:"window" range:"[1s,1h]"`      // blocks are looked for over this window
	MinBlock time.Duration `toml:"min_block" range:"[10ms,1m]"` // a sleep this long on a worker is a blocking call
}

// DefaultBlockingWorkerOptions are the defaults agent.conf documents.
func DefaultBlockingWorkerOptions() BlockingWorkerOptions {
	return BlockingWorkerOptions{Window: 10 * time.Second, MinBlock: 250 * time.Millisecond}
}

// BlockingWorker names a blocking call made on an async runtime's worker
// thread (seed 000 Problems A and F; "The Async Runtime Trap"): while the
// worker sleeps in the kernel, every task queued on it waits, so one slow
// fsync or DNS lookup stalls unrelated requests. The evidence is the
// thread, how long it slept, and the stack it went to sleep with.
type BlockingWorker struct {
	o BlockingWorkerOptions
}

func NewBlockingWorker(o BlockingWorkerOptions) *BlockingWorker {
	return &BlockingWorker{o: o}
}

func (*BlockingWorker) Name() string { return "blocking_worker" }

func (r *BlockingWorker) Evaluate(w Window) []Observation {
	if w.Episodes == nil {
		return nil
	}
	from := w.Now.Add(-r.o.Window)
	type poolBlocks struct {
		pool    string
		worst   signals.Episode
		count   int
		total   time.Duration
		threads map[int]bool
	}
	byPool := map[string]*poolBlocks{}
	for _, e := range w.Episodes.Since(signals.EpisodeBlock, from) {
		if e.Duration < r.o.MinBlock {
			continue
		}
		pool, ok := w.Pools.Pool(e.Thread)
		if !ok || w.Pools.Idle(e.Syscall()) {
			continue
		}
		pb := byPool[pool]
		if pb == nil {
			pb = &poolBlocks{pool: pool, threads: map[int]bool{}}
			byPool[pool] = pb
		}
		pb.count++
		pb.total += e.Duration
		pb.threads[e.Tid] = true
		if e.Duration > pb.worst.Duration {
			pb.worst = e
		}
	}
	pools := make([]string, 0, len(byPool))
	for p := range byPool {
		pools = append(pools, p)
	}
	sort.Strings(pools)
	var out []Observation
	for _, p := range pools {
		out = append(out, r.observation(w, byPool[p].worst, p, byPool[p].count, len(byPool[p].threads), byPool[p].total))
	}
	return out
}

func (r *BlockingWorker) observation(w Window, e signals.Episode, pool string, count, threads int, total time.Duration) Observation {
	fn := culpritFrame(e.CallerStack())
	call := e.Syscall()
	if call == "" {
		call = "the kernel"
	}
	where := fn
	if where == "" {
		where = "an unknown function (no user stack: built without frame pointers?)"
	}
	sev := SeverityWarning
	if e.Duration >= time.Second {
		sev = SeverityCritical
	}
	now := "for"
	if e.Ongoing {
		now = "so far, still blocked, for"
	}
	o := Observation{
		Key:     pool,
		Cause:   CauseBlockingCallOnWorker,
		Title:   fmt.Sprintf("Blocking call on async worker %s: %s in %s", e.Thread, fn, call),
		Symptom: fmt.Sprintf("worker thread %s (tid %d) slept in %s %s %s; every task queued on it waited as long", e.Thread, e.Tid, call, now, seconds(e.Duration)),
		RootCause: fmt.Sprintf("%s makes a blocking %s call on a worker thread of the %q pool (%d such blocks on %d worker(s) in the last %s, %s in all)",
			where, call, pool, count, threads, r.o.Window, seconds(total)),
		Remediation: fmt.Sprintf("move %s off the async worker: tokio::task::spawn_blocking, actix-web's web::block, or a dedicated thread pool; or use the async version of the call", where),
		Severity:    sev,
		Confidence:  0.9,
		Evidence: []Evidence{
			{Signal: fmt.Sprintf("thread_blocked_seconds{thread=%q,tid=\"%d\"}", e.Thread, e.Tid), Value: e.Duration.Seconds(), Threshold: r.o.MinBlock.Seconds(), Unit: "seconds", Note: "off-CPU in " + call},
			{Signal: fmt.Sprintf("blocks_on_workers{pool=%q}", pool), Value: float64(count), Unit: "blocks", Window: r.o.Window, Note: "sleeps over the threshold outside idle waits"},
		},
		Artifacts: []Artifact{threadArtifact(e), stackArtifact(e, 24)},
		Labels:    map[string]string{"pool": pool},
	}
	if fn != "" {
		o.Artifacts = append(o.Artifacts, Artifact{Kind: "frame", Value: fn, Detail: "the function that made the blocking call"})
	}
	o.Artifacts = append(o.Artifacts, tracesDuring(w.Spans, e.Start, e.End(), e.Tid, 3)...)
	return o
}
