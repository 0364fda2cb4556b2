package rules

import (
	"context"
	"fmt"
	"log/slog"
	"math"
	"reflect"
	"slices"
	"sort"
	"strings"
	"sync/atomic"
	"time"

	"github.com/culprit-dev/culprit/signals"
	"github.com/culprit-dev/culprit/workload"
)

// Window is what a rule reads: the store (read-only by convention: rules
// never Put), the time of this evaluation, the target if there is one, and
// the sources that are not number series (Inputs). Every rule reaches its
// evidence through it, and only through it.
type Window struct {
	Store     *signals.Store
	Now       time.Time
	Target    workload.Process
	HasTarget bool
	// Scope is ScopeTarget or ScopeNamespace: whose sockets findings are
	// about ([rules] scope).
	Scope string
	// Runtime is the target's language and runtime, as far as detected:
	// remediation is written in its terms (Advisor).
	Runtime workload.Runtime
	Inputs
	// memo keeps judgements of episodes between evaluations (judgeBlock);
	// nil: every episode is judged afresh.
	memo *judgeMemo
}

// advice is the Advisor for the target at hand.
func (w Window) advice() Advisor { return NewAdvisor(w.Runtime) }

// Inputs are the evidence besides the signal store: thread episodes,
// spans, connection events, CPU profiles, heap profiles, and which threads
// are workers. Any of the interfaces may be nil (the probe or receiver
// behind it does not run); rules then say less, never something else.
type Inputs struct {
	Episodes EpisodeSource   // block and busy episodes of the target's threads (sched probe)
	Spans    SpanSource      // the app's spans (OTLP receiver)
	Conns    ConnEventSource // how connections ended (tcplife probe)
	Hot      HotFrames       // where a thread spent its CPU (cpu_profile probe)
	Heap     HeapHistory     // the app's heap profiles over time (pprof puller)
	Pools    WorkerPools     // which threads are workers ([rules.workers])
}

// Rule names one root cause. Evaluate reports what it sees now; it must be
// cheap (it runs several times a second) and must not block. Needs says
// which components the rule reads and what it loses without each
// (LostWithout): a constant list, read while the rule runs, so it must
// not touch the rule's state.
type Rule interface {
	Name() string
	Evaluate(w Window) []Observation
	Needs() []Need
}

// EngineOptions bound and pace the engine.
type EngineOptions struct {
	// Interval between evaluations when nothing wakes the engine earlier,
	// while the shared clock is hot (signals.Ticker). While it idles (no
	// finding open or in its hold-down, no observation, no event or full
	// accept queue for two seconds) the engine evaluates at the clock's
	// idle interval: an evaluation runs every rule over the store (a few
	// hundred microseconds with cold caches), five times a second
	// otherwise. A finding whose evidence arrives with no wake-up (a
	// collector's sample) is then seen up to that interval later, and every
	// evaluation after it is fast again.
	Interval time.Duration
	// MinGap is the least time between two evaluations, so a storm of probe
	// events cannot turn the engine into a busy loop.
	MinGap time.Duration
	// ResolveAfter is the hold-down: a finding resolves only after its rule
	// has not reported it for this long, which is what stops flapping.
	ResolveAfter time.Duration
	// MinUpdateInterval spaces out updates that change only numbers; a
	// change of cause or severity is sent at once.
	MinUpdateInterval time.Duration
	// MaxOpen bounds the open findings; observations beyond it are dropped
	// and counted.
	MaxOpen int
	// UpdateThreshold is the relative change of an evidence value that is
	// worth an UPDATED event (0.2: 20%); smaller moves update the finding
	// in place, silently. 0 means every change.
	UpdateThreshold float64
	Log             *slog.Logger
	// Inputs are handed to every rule in its Window.
	Inputs Inputs
	// Scope is handed to every rule in its Window (ScopeTarget if empty).
	Scope string
	// DetectRuntime tells the target's runtime; it is called once per
	// target process (a restart is a new one). Nil: unknown, and advice
	// is runtime-neutral.
	DetectRuntime func(workload.Process) workload.Runtime
}

type active struct {
	f          Finding
	lastSeen   time.Time
	lastUpdate time.Time
	// sent is the observation of the last event: changes are judged
	// against what watchers were told, not against the current state
	// (which moves silently), or a change held back by
	// min_update_interval would never be sent.
	sent Observation
	// told is the range of each evidence value watchers have been told
	// since the finding opened or its cause last changed. A windowed count
	// that rises with each burst and falls between them would otherwise
	// be news twice per burst; returning into what was already said is
	// not news, leaving it is.
	told map[string]span
}

// span is the lowest and highest value told of one piece of evidence.
type span struct{ lo, hi float64 }

// tell widens told by o's evidence (a fresh map when o's cause is new).
func (a *active) tell(o Observation, fresh bool) {
	if fresh || a.told == nil {
		a.told = make(map[string]span, len(o.Evidence))
	}
	for _, ev := range o.Evidence {
		s, ok := a.told[ev.Signal]
		if !ok {
			s = span{ev.Value, ev.Value}
		}
		a.told[ev.Signal] = span{min(s.lo, ev.Value), max(s.hi, ev.Value)}
	}
}

// Engine runs rules and keeps each finding's lifecycle.
type Engine struct {
	rules   []Rule
	store   *signals.Store
	journal *Journal
	tracker *workload.Tracker
	o       EngineOptions
	active  map[string]*active // by rule/key
	// The runtime of the current target process, detected once per process.
	rtOf    workload.Process
	runtime workload.Runtime
	dropped atomic.Uint64
	evals   atomic.Uint64
	opened  atomic.Uint64
	// evalNanos and lastEval are the time spent evaluating, in all and
	// in the last evaluation: what the rules cost the agent's CPU.
	evalNanos atomic.Uint64
	lastEval  atomic.Int64
	// memo: episodes judged in earlier evaluations are not judged again
	// while nothing they were judged from changed.
	memo *judgeMemo
	// hot: the last evaluation had a finding active or an observation.
	hot bool
}

// NewEngine returns an engine writing into journal.
func NewEngine(rs []Rule, store *signals.Store, journal *Journal, tracker *workload.Tracker, o EngineOptions) *Engine {
	if o.MaxOpen < 1 {
		o.MaxOpen = 1
	}
	return &Engine{rules: rs, store: store, journal: journal, tracker: tracker, o: o, active: make(map[string]*active), memo: newJudgeMemo()}
}

// Run evaluates on every tick and whenever the store is notified of an
// event, until ctx ends. On the way out it leaves findings as they are: an
// agent that stops has not seen the evidence go away.
func (e *Engine) Run(ctx context.Context) {
	// On the process's shared clock: evaluations come on the same
	// wake-ups as the collectors' and probes' polls, every Interval while
	// the clock is hot and every idle interval while it idles. The engine
	// keeps it hot while it has a reason to look often: a finding open or
	// in its hold-down, an observation, a wake-up (events and full queues
	// make it hot themselves).
	tick := signals.NewTicker(e.o.Interval)
	defer tick.Stop()
	var last time.Time
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		case <-e.store.Wake():
			if wait := e.o.MinGap - time.Since(last); wait > 0 {
				select {
				case <-ctx.Done():
					return
				case <-time.After(wait):
				}
			}
		}
		last = time.Now()
		e.Evaluate(last)
		if e.hot {
			signals.HotNow()
		}
	}
}

// Evaluate runs every rule once at now and applies the lifecycle.
func (e *Engine) Evaluate(now time.Time) {
	e.evals.Add(1)
	// Timed on the wall clock, not now: tests evaluate at made-up times.
	start := time.Now()
	defer func() {
		d := time.Since(start)
		e.evalNanos.Add(uint64(d))
		e.lastEval.Store(int64(d))
	}()
	e.memo.next()
	w := Window{Store: e.store, Now: now, Scope: e.o.Scope, Inputs: e.o.Inputs, memo: e.memo}
	if w.Scope == "" {
		w.Scope = ScopeTarget
	}
	if e.tracker != nil {
		w.Target, w.HasTarget = e.tracker.Current()
	}
	if w.HasTarget && e.o.DetectRuntime != nil {
		if w.Target.PID != e.rtOf.PID || w.Target.StartTime != e.rtOf.StartTime {
			e.rtOf, e.runtime = w.Target, e.o.DetectRuntime(w.Target)
		}
		w.Runtime = e.runtime
	}
	seen := make(map[string]bool)
	var obs []pending
	for _, r := range e.rules {
		_, symptom := r.(Symptom)
		for _, o := range e.evalRule(r, w) {
			k := r.Name() + "/" + o.Key
			if seen[k] {
				continue // a rule reporting one key twice: first wins
			}
			seen[k] = true
			obs = append(obs, pending{rule: r.Name(), key: k, o: o, symptom: symptom})
		}
	}
	e.explain(obs)
	e.explainFacets(obs)
	e.hot = len(obs) > 0 || len(e.active) > 0
	for _, p := range obs {
		if p.explainedBy != "" {
			delete(seen, p.key) // an open one resolves after the hold-down
			continue
		}
		e.observe(p.rule, p.key, p.o, now)
	}
	keys := make([]string, 0, len(e.active))
	for k := range e.active {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		a := e.active[k]
		if seen[k] || now.Sub(a.lastSeen) < max(e.o.ResolveAfter, a.f.Linger) {
			continue
		}
		a.f.State = StateResolved
		a.f.Resolved = now
		e.journal.Record(EventResolved, a.f, now)
		delete(e.active, k)
		e.o.Log.Info("finding resolved", "id", a.f.ID, "rule", a.f.Rule, "key", a.f.Key, "lasted", now.Sub(a.f.FirstSeen).Round(time.Millisecond))
	}
}

// Symptom is implemented by rules that report a symptom other rules may
// explain: latency_spike's slow requests are often the very requests a
// blocking worker held up. Such an observation carries the trace ids of
// its slowest requests; when one of them is on another rule's observation
// or open finding, that finding is the root cause, the symptom is not
// reported on its own, and the explaining finding names the route instead
// (DESIGN: "p99 outlier explained").
type Symptom interface {
	Rule
	Symptom()
}

// Facet is implemented by rules whose observation on a key can be one
// side of a fault that a more specific cause of another rule names on the
// same key. throughput_plateau's "work queues while the CPU idles" on a
// listener whose app stopped accepting is that stall (accept_overflow's
// app_not_accepting); reported on its own, its "a lock, a bounded pool"
// would be untrue advice. worker_imbalance's "the pool's load is pinned
// to one worker" of a worker that spins is busy_worker's run without an
// await point. While such a cause is observed, or open, on the same key
// (and on the same thread, when the facet names one), the facet is not
// reported (an open one resolves after its hold-down).
type Facet interface {
	Rule
	FacetOf() []RuleCause
}

// RuleCause names one cause of one rule.
type RuleCause struct{ Rule, Cause string }

type pending struct {
	rule, key   string
	o           Observation
	symptom     bool
	explainedBy string // the rule/key of the finding that explains it
}

// explain marks the symptom observations that share a trace id with a
// root-cause observation of this evaluation or an open finding, and adds
// the symptom's route to the explaining observation.
func (e *Engine) explain(obs []pending) {
	owner := map[string]int{} // trace id -> index in obs of a root cause
	for i, p := range obs {
		if p.symptom {
			continue
		}
		for _, a := range p.o.Artifacts {
			if _, ok := owner[a.Value]; a.Kind == "trace" && !ok {
				owner[a.Value] = i
			}
		}
	}
	var openOwner map[string]string // trace id -> rule/key, of open findings
	for i := range obs {
		p := &obs[i]
		if !p.symptom {
			continue
		}
		for _, a := range p.o.Artifacts {
			if a.Kind != "trace" {
				continue
			}
			if j, ok := owner[a.Value]; ok {
				p.explainedBy = obs[j].key
				ex := &obs[j].o
				ex.Artifacts = append(slices.Clone(ex.Artifacts), Artifact{Kind: "route", Value: p.o.Key, Detail: p.o.Title})
				break
			}
			if openOwner == nil {
				openOwner = e.openTraceOwners()
			}
			if k, ok := openOwner[a.Value]; ok {
				p.explainedBy = k
				break
			}
		}
	}
}

// explainFacets marks the observations of Facet rules whose key has one
// of the causes they are a facet of, observed now or open.
func (e *Engine) explainFacets(obs []pending) {
	for i := range obs {
		p := &obs[i]
		f, ok := e.ruleOf(p.rule).(Facet)
		if !ok || p.explainedBy != "" {
			continue
		}
	causes:
		for _, rc := range f.FacetOf() {
			k := rc.Rule + "/" + p.o.Key
			for _, q := range obs {
				if q.key == k && q.o.Cause == rc.Cause && sameThread(p.o.Artifacts, q.o.Artifacts) {
					p.explainedBy = k
					break causes
				}
			}
			if a, ok := e.active[k]; ok && a.f.Cause == rc.Cause && sameThread(p.o.Artifacts, a.f.Artifacts) {
				p.explainedBy = k
				break
			}
		}
	}
}

// sameThread reports whether the explaining artifacts name the thread
// the facet's do (any, when the facet names none).
func sameThread(facet, explaining []Artifact) bool {
	for _, a := range facet {
		if a.Kind != "thread" {
			continue
		}
		return slices.ContainsFunc(explaining, func(b Artifact) bool { return b.Kind == "thread" && b.Value == a.Value })
	}
	return true
}

// ruleOf is the rule named name (nil if none).
func (e *Engine) ruleOf(name string) Rule {
	for _, r := range e.rules {
		if r.Name() == name {
			return r
		}
	}
	return nil
}

// openTraceOwners maps the trace ids on open findings of root-cause rules
// to those findings (they may be in their hold-down, not observed now).
func (e *Engine) openTraceOwners() map[string]string {
	symptoms := map[string]bool{}
	for _, r := range e.rules {
		if _, ok := r.(Symptom); ok {
			symptoms[r.Name()] = true
		}
	}
	out := map[string]string{}
	for k, a := range e.active {
		if symptoms[a.f.Rule] {
			continue
		}
		for _, art := range a.f.Artifacts {
			if art.Kind == "trace" {
				out[art.Value] = k
			}
		}
	}
	return out
}

// evalRule contains a faulty rule: its failure is logged and the other
// rules still run.
func (e *Engine) evalRule(r Rule, w Window) (obs []Observation) {
	defer func() {
		if p := recover(); p != nil {
			e.o.Log.Error("rule failed", "rule", r.Name(), "panic", fmt.Sprint(p))
			obs = nil
		}
	}()
	return r.Evaluate(w)
}

func (e *Engine) observe(rule, k string, o Observation, now time.Time) {
	a, ok := e.active[k]
	if !ok {
		if len(e.active) >= e.o.MaxOpen {
			e.dropped.Add(1)
			return
		}
		e.opened.Add(1)
		f := Finding{
			ID:          fmt.Sprintf("%s:%s:%d", rule, sanitize(o.Key), now.UnixMilli()),
			Rule:        rule,
			Observation: o,
			State:       StateOpen,
			FirstSeen:   now,
			LastSeen:    now,
		}
		ev := e.journal.Record(EventOpened, f, now)
		a := &active{f: ev.Finding, lastSeen: now, lastUpdate: now, sent: ev.Finding.Observation}
		a.tell(a.sent, true)
		e.active[k] = a
		e.o.Log.Info("finding opened", "id", f.ID, "rule", rule, "cause", o.Cause, "severity", o.Severity.String(), "root_cause", o.RootCause)
		return
	}
	a.lastSeen = now
	a.f.LastSeen = now
	if sameObservation(a.sent, o) {
		// Nothing new since the last event (the current state may have
		// drifted and come back).
		if !sameObservation(a.f.Observation, o) {
			a.f.Observation = o
			e.journal.Touch(a.f)
		}
		return
	}
	causeChanged := a.sent.Cause != o.Cause || a.sent.Severity != o.Severity
	if !causeChanged {
		// What the finding learned stays in it: the thread, stack and
		// function of a stall are the point even after the stall ends.
		o = retainLearned(a.f.Observation, o)
	}
	material := causeChanged || a.sent.Stopped != o.Stopped || a.sent.StopEstimated != o.StopEstimated || materialChange(a.told, a.sent, o, e.o.UpdateThreshold)
	if !material || (!causeChanged && now.Sub(a.lastUpdate) < e.o.MinUpdateInterval) {
		// Current in ListFindings and GetFinding; not worth an event.
		a.f.Observation = o
		e.journal.Touch(a.f)
		return
	}
	a.f.Observation = o
	ev := e.journal.Record(EventUpdated, a.f, now)
	a.f = ev.Finding
	a.sent = o
	a.tell(o, causeChanged)
	a.lastUpdate = now
	if causeChanged {
		e.o.Log.Info("finding changed", "id", a.f.ID, "cause", o.Cause, "severity", o.Severity.String())
	}
}

func sameObservation(a, b Observation) bool { return reflect.DeepEqual(a, b) }

// LearnedKinds are artifacts a finding keeps once it has them: what it
// found out about the cause, which later observations may no longer see
// (the stall ended, the blocked thread woke up), and the routes whose
// latency it explains (the spike is judged once a second, over a few
// seconds: it may be seen in one evaluation only). A new one is news.
var LearnedKinds = []string{"thread", "stack", "frame", "route"}

// retainLearned gives next the learned artifacts of prev whose kind next
// lacks.
func retainLearned(prev, next Observation) Observation {
	var keep []Artifact
	for _, kind := range LearnedKinds {
		if slices.ContainsFunc(next.Artifacts, func(a Artifact) bool { return a.Kind == kind }) {
			continue
		}
		for _, a := range prev.Artifacts {
			if a.Kind == kind {
				keep = append(keep, a)
			}
		}
	}
	if len(keep) > 0 {
		next.Artifacts = append(slices.Clone(next.Artifacts), keep...)
	}
	return next
}

// materialChange reports whether next says something watchers were not
// told: an evidence value that left the range told of it (told) by more
// than threshold (relative), evidence that is new, or a learned artifact
// (thread, stack, frame) that is new or different since prev. Numbers
// drifting inside the threshold, numbers going back to values already
// told, and texts that differ only by those numbers, are not news.
func materialChange(told map[string]span, prev, next Observation, threshold float64) bool {
	if threshold <= 0 {
		return true
	}
	for _, ev := range next.Evidence {
		s, ok := told[ev.Signal]
		if !ok {
			return true
		}
		// A share moves by share points: 3% of samples full becoming 2%
		// is not a third less of anything an operator acts on. (Ratios
		// above 1, "p99 now / before", stay relative.)
		beyond := func(edge float64) bool {
			scale := math.Abs(edge)
			if ev.Unit == "ratio" {
				scale = math.Max(scale, 1)
			}
			d := math.Abs(ev.Value - edge)
			return d > threshold*math.Max(scale, 1e-9) && d >= 1e-9
		}
		if (ev.Value > s.hi && beyond(s.hi)) || (ev.Value < s.lo && beyond(s.lo)) {
			return true
		}
	}
	seen := map[string]bool{}
	for _, a := range prev.Artifacts {
		if slices.Contains(LearnedKinds, a.Kind) {
			seen[a.Kind+"\x00"+a.Value] = true
		}
	}
	for _, a := range next.Artifacts {
		if slices.Contains(LearnedKinds, a.Kind) && !seen[a.Kind+"\x00"+a.Value] {
			return true
		}
	}
	return false
}

func sanitize(s string) string {
	return strings.Map(func(r rune) rune {
		if r == ' ' || r == '/' {
			return '_'
		}
		return r
	}, s)
}

// Stats are the engine's own counters, for /metrics.
type EngineStats struct {
	// Evaluations counts the cycles run (every rule evaluated once per
	// cycle), Opened the findings opened, Dropped the observations not
	// opened because rules.max_open_findings were open.
	Evaluations, Opened, Dropped uint64
	// Open is the findings open now.
	Open int
	// EvalTime is the time spent evaluating since the engine started,
	// LastEval the time the last evaluation took.
	EvalTime, LastEval time.Duration
}

// Stats is safe to call from another goroutine: the counters are atomic,
// and Open is read from the journal rather than the engine's own map.
func (e *Engine) Stats() EngineStats {
	open, _ := e.journal.Open()
	return EngineStats{Evaluations: e.evals.Load(), Opened: e.opened.Load(), Dropped: e.dropped.Load(), Open: len(open),
		EvalTime: time.Duration(e.evalNanos.Load()), LastEval: time.Duration(e.lastEval.Load())}
}
