package rules

import (
	"time"
)

// Severity orders findings for filtering.
type Severity int

const (
	SeverityInfo Severity = iota + 1
	SeverityWarning
	SeverityCritical
)

func (s Severity) String() string {
	switch s {
	case SeverityInfo:
		return "info"
	case SeverityWarning:
		return "warning"
	case SeverityCritical:
		return "critical"
	}
	return "unknown"
}

// State of a finding.
type State int

const (
	StateOpen State = iota + 1
	StateResolved
)

func (s State) String() string {
	if s == StateResolved {
		return "resolved"
	}
	return "open"
}

// Evidence is one number that convinced the rule, with what it was held
// against, so a reader can check the reasoning.
type Evidence struct {
	Signal    string  // the signal, with labels: listen_overflows_total{port="8080"}
	Value     float64 // what was measured
	Threshold float64 // what it was compared with (0 if none)
	Unit      string  // "connections", "seconds", "/s"
	Window    time.Duration
	Note      string // a few words: "queue full without an accept"
}

// Artifact points at something concrete: a thread, a stack, a trace id, a
// remote endpoint.
type Artifact struct {
	Kind   string // "thread", "stack", "frame", "trace", "route", "endpoint", "listener"
	Value  string
	Detail string
}

// Observation is what a rule sees now for one key (one listener, one
// thread pool, one upstream). Rules are stateless about lifecycle: they
// report every evaluation, and the Engine decides open/update/resolve.
type Observation struct {
	Key         string // stable within the rule: "127.0.0.1:8080"
	Cause       string // machine-readable root cause: "app_not_accepting"
	Title       string
	Symptom     string
	RootCause   string
	Remediation string
	Severity    Severity
	Confidence  float64 // 0..1
	Evidence    []Evidence
	Artifacts   []Artifact
	Labels      map[string]string // e.g. port, for the Prometheus series
	// Linger is how long the episode this observation belongs to can go
	// without evidence and still be the same episode (0: the engine's
	// resolve_after). An accept queue overflowing in bursts is silent
	// between bursts, and clients retry dropped SYNs 1, 3 and 7 s later:
	// one fault, one finding, not one per burst.
	Linger time.Duration
	// Stopped says the symptom has stopped while the finding stays open
	// (a growth told in the past tense, "grew ... has not grown since"):
	// the words changed from present to past, which watchers must be
	// told even when no number moved (seen: a stopped heap leak streamed
	// as "still grows" until it resolved 15 s later).
	Stopped bool
	// StopEstimated says the stop's time is estimated from coarse samples
	// (heap profiles seconds apart), not measured: when a measured one
	// follows, watchers are told that too, though no number moved past
	// the update threshold (seen in CI: "slowed or stopped about T" was
	// streamed, and "has not grown since T", read from the RSS, came
	// only with the resolution 13 s later).
	StopEstimated bool
}

// Finding is an Observation with its lifecycle.
type Finding struct {
	ID   string
	Rule string
	Observation
	State     State
	FirstSeen time.Time
	LastSeen  time.Time
	Resolved  time.Time
	Sequence  uint64 // sequence of the last event about this finding
}

// EventType says what happened to a finding.
type EventType int

const (
	EventOpened EventType = iota + 1
	EventUpdated
	EventResolved
)

func (t EventType) String() string {
	switch t {
	case EventOpened:
		return "opened"
	case EventUpdated:
		return "updated"
	case EventResolved:
		return "resolved"
	}
	return "unknown"
}

// Event is one change of one finding. Sequences are global, start at 1 and
// have no holes, so a client that remembers the last one it saw can resume.
type Event struct {
	Sequence uint64
	Type     EventType
	Time     time.Time
	Finding  Finding
}
