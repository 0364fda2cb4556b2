package rules

import (
	"fmt"
	"math"
	"sort"
	"strings"
	"time"

	"github.com/culprit-dev/culprit/signals"
)

// Causes of fd_exhaustion.
const (
	CauseFDNearLimit = "fd_near_limit"
	CauseFDLeak      = "fd_leak"
)

// FDExhaustionOptions ([rules.fd_exhaustion] in agent.conf).
type FDExhaustionOptions struct {
	Window      time.Duration `toml:"window" range:"[10s,24h]"`         // where growth began is looked for within this window
	NearRatio   float64       `toml:"near_ratio" range:"(0,1]"`         // open/soft limit at or above this is "near"
	MinIncrease float64       `toml:"min_increase" range:"[1,1000000]"` // FDs gained since the growth began before it counts
	Steady      float64       `toml:"steady" range:"(0,1]"`             // share of the growth's samples that did not go down
	Horizon     time.Duration `toml:"horizon" range:"[1m,720h]"`        // forecasts further out than this stay silent
	// MinDuration: growth must have lasted this long to be a leak, so a
	// burst of new connections is not one.
	MinDuration time.Duration `toml:"min_duration" range:"[0s,1h]"`
}

// DefaultFDExhaustionOptions are the defaults agent.conf documents.
func DefaultFDExhaustionOptions() FDExhaustionOptions {
	return FDExhaustionOptions{Window: time.Minute, NearRatio: 0.8, MinIncrease: 20, Steady: 0.8, Horizon: time.Hour, MinDuration: 10 * time.Second}
}

// FDExhaustion warns before the process hits RLIMIT_NOFILE (seed 000,
// "Container and OS-Level Hardening"): accept() then fails with EMFILE and
// the service stops taking connections while looking healthy.
type FDExhaustion struct {
	o FDExhaustionOptions
	h hysteresis
	// grew is the last leak told while it grew (grewOK). A steady leak (a
	// rise every sample) that stops is, a few flat samples later, a flat
	// regime of its own after a change point: measured alone it is no
	// growth, and the finding resolved with its last words ("leaking ...
	// heading for the limit", the demo's leak-fds) while the leaked
	// descriptors stayed open. Remembered, it is told as a leak that
	// stopped, in the past tense, while it began within the window and
	// every sample since its last rise stands where that rise left them.
	grew   growth
	grewOK bool
}

// stoppedLeak is the remembered leak when it applies now (see grew): the
// series split it off (its regime began after the leak's), it stopped
// (growth.stopped), and the descriptors it gained are still open, within a
// tenth of its growth of the level its last rise reached.
func (r *FDExhaustion) stoppedLeak(s []signals.Sample, g growth, now time.Time) (growth, bool) {
	m := r.grew
	if !r.grewOK || now.Sub(m.start) > r.o.Window || !g.first.T.After(m.first.T) {
		return growth{}, false
	}
	// Flat for longer than it ever paused while it grew, and for two of
	// its sampling intervals (growth.stopped): a pause between bursts is
	// no stop, whatever regime the series is cut into.
	if len(s) == 0 || m.n < 2 {
		return growth{}, false
	}
	flat, step := s[len(s)-1].T.Sub(m.lastRise), m.last.T.Sub(m.first.T)/time.Duration(m.n-1)
	if flat <= m.pause || flat < 2*step {
		return growth{}, false
	}
	level, after := 0.0, 0
	for _, x := range s {
		switch {
		case x.T.Before(m.lastRise):
		case x.T.Equal(m.lastRise):
			level = x.V
		case after == 0 && level == 0:
			return growth{}, false // the last rise left the window's samples
		default:
			if math.Abs(x.V-level) > 0.1*m.increase {
				return growth{}, false
			}
			after++
		}
	}
	return m, after > 0
}

func NewFDExhaustion(o FDExhaustionOptions) *FDExhaustion { return &FDExhaustion{o: o} }

func (*FDExhaustion) Name() string { return "fd_exhaustion" }

func (*FDExhaustion) Needs() []Need {
	return []Need{
		{Component: signals.CollectorFDs, What: "open file descriptors and their limit", Essential: true},
		{Component: signals.CollectorSockets, What: "which TCP state the sockets pile up in (pending connects in SYN_SENT can then read as a leak)"},
	}
}

var fdKinds = []string{"socket", "file", "pipe", "anon_eventfd", "anon_eventpoll", "anon_timerfd", "anon_inotify", "anon_other", "other"}

func (r *FDExhaustion) Evaluate(w Window) []Observation {
	st, now := w.Store, w.Now
	open, ok := w.FreshLatest(signals.ProcessFDsOpen, nil, freshSlow)
	limit, okl := w.FreshLatest(signals.ProcessFDLimit, signals.L("type", "soft"), freshSlow)
	if !ok || !okl || limit.V <= 0 {
		return nil
	}
	// A leak is growth that is happening now, measured from where it
	// began: a series that rose once and stays flat near the limit is
	// near the limit, not leaking.
	series := st.Range(signals.ProcessFDsOpen, nil, now.Add(-r.o.Window))
	g, haveG := growthOf(series)
	flatSince := false
	if m, ok := r.stoppedLeak(series, g, now); ok {
		g, haveG, flatSince = m, true, true
	} else if r.grewOK && !g.first.T.Equal(r.grew.first.T) {
		r.grewOK = false
	}
	long := haveG && g.duration() >= r.o.MinDuration && g.rate > 0
	// The floor, not the last sample: a burst of connections that open
	// and close again lifts a sample or two, a leak lifts every one.
	leaking := r.h.hold("leak", now,
		long && g.current && g.increase >= r.o.MinIncrease && g.floor >= r.o.MinIncrease && g.steady >= r.o.Steady,
		long && g.rising && g.increase >= r.o.MinIncrease && g.floor > 0 && g.steady >= r.o.Steady-0.1)
	eta, etaOK := time.Duration(0), false
	// still: the growth has not stopped (growth.stopped). A leak that
	// stopped is told in the past tense, without a forecast, and up to
	// its last rise, so that no flat time after it is averaged into its
	// rate or its span: "rising ... at this rate the limit is hit in 8m"
	// after the last descriptor was opened is untrue.
	still := true
	if leaking {
		still = !flatSince && !g.stopped()
		if still {
			r.grew, r.grewOK = g, true
			eta, etaOK = g.until(limit.V)
		} else if ran := g.lastRise.Sub(g.start); ran > 0 {
			g.rate, g.last.T = g.increase/ran.Seconds(), g.lastRise
		}
	}
	if leaking && connectsPending(w, g.from().T, g.increase) {
		// The descriptors that grow are sockets in SYN_SENT: connects
		// still in progress (an upstream that does not answer, or one
		// whose accept queue is full). They end when the connect gives
		// up; that is no leak, whatever it says about the upstream.
		leaking, eta, etaOK = false, 0, false
	}
	share := open.V / limit.V
	near := r.h.hold("near", now, share >= r.o.NearRatio, share >= r.o.NearRatio*releaseBand)
	// A leak reported as heading for the limit stays reported, in the
	// past tense, while it is held after it stopped: the watchers learn
	// the stop then (an UPDATED), not from the RESOLVED a hold-down later.
	soon := r.h.hold("soon", now, leaking && etaOK && eta <= r.o.Horizon, leaking && (!still || etaOK && eta <= r.o.Horizon*5/4))
	if !near && !soon {
		return nil
	}

	// By kind: which grew since the growth began or, without growth, which
	// holds the most.
	type kindCount struct {
		kind      string
		now, grew float64
	}
	var kinds []kindCount
	for _, k := range fdKinds {
		ls := signals.L("kind", k)
		cur, ok := w.FreshLatest(signals.ProcessOpenFDs, ls, freshSlow)
		if !ok {
			continue
		}
		kc := kindCount{kind: k, now: cur.V}
		if leaking {
			if s := st.Range(signals.ProcessOpenFDs, ls, g.from().T); len(s) > 0 {
				kc.grew = cur.V - s[0].V
			}
		}
		kinds = append(kinds, kc)
	}
	sort.SliceStable(kinds, func(i, j int) bool {
		if leaking && kinds[i].grew != kinds[j].grew {
			return kinds[i].grew > kinds[j].grew
		}
		return kinds[i].now > kinds[j].now
	})
	culprit := "unknown"
	var arts []Artifact
	for _, k := range kinds {
		if k.now <= 0 && k.grew == 0 {
			continue
		}
		d := num(k.now) + " open"
		if leaking {
			d += fmt.Sprintf(", %s since the growth began", signed(k.grew))
		}
		arts = append(arts, Artifact{Kind: "fd_kind", Value: k.kind, Detail: d})
	}
	// The culprit must be what grew (or, near the limit, what is held):
	// a kind that did not grow is not named as the leak.
	if len(kinds) > 0 && (kinds[0].grew > 0 || (!leaking && kinds[0].now > 0)) {
		culprit = kinds[0].kind
	}
	detail := ""
	if culprit == "socket" {
		since := time.Time{}
		if leaking {
			since = g.from().T
		}
		detail = socketStateDetail(w, since)
	}

	ev := []Evidence{
		{Signal: signals.ProcessFDsOpen.Name, Value: open.V, Threshold: r.o.NearRatio * limit.V, Unit: "fds", Note: "open file descriptors"},
		{Signal: `process_fd_limit{type="soft"}`, Value: limit.V, Unit: "fds", Note: "RLIMIT_NOFILE soft limit"},
	}
	cause, sev := CauseFDNearLimit, SeverityWarning
	if r.h.hold("critical-share", now, share >= 0.95, share >= 0.95*releaseBand) {
		sev = SeverityCritical
	}
	var rc strings.Builder
	fmt.Fprintf(&rc, "%s of %s file descriptors open (%s of RLIMIT_NOFILE)", num(open.V), num(limit.V), percent(share))
	if leaking {
		cause = CauseFDLeak
		rateNote := fmt.Sprintf("rate since the growth began (least squares over its %s); %s of them rising or flat", count(float64(g.n), "sample", ""), percent(g.steady))
		if !still {
			rateNote = "rate from where the growth began to its last rise at " + g.lastRise.Format("15:04:05")
		}
		ev = append(ev,
			Evidence{Signal: signals.ProcessFDsOpen.Name, Value: g.rate * 60, Unit: "fds/min", Window: g.duration(), Note: rateNote},
			Evidence{Signal: signals.ProcessFDsOpen.Name, Value: g.increase, Threshold: r.o.MinIncrease, Unit: "fds", Window: g.duration(), Note: "opened since the growth began"})
		of := ""
		if culprit != "unknown" {
			of = fmt.Sprintf(" (%s of them %s)", signed(kinds[0].grew), kindWord(culprit))
		}
		if still {
			fmt.Fprintf(&rc, " and rising by %s %s, %s%s", rate(g.rate), g.over(), signed(g.increase), of)
		} else {
			fmt.Fprintf(&rc, "; they rose by %s %s, %s%s, and have not grown since %s", rate(g.rate), g.over(), signed(g.increase), of, g.lastRise.Format("15:04:05"))
		}
		if etaOK {
			if eta == 0 {
				rc.WriteString("; the limit is reached")
			} else {
				fmt.Fprintf(&rc, "; at this rate the limit is hit in %s", duration(eta))
			}
			if r.h.hold("critical-eta", now, eta < 10*time.Minute, eta < 12*time.Minute) {
				sev = SeverityCritical
			}
		}
	} else {
		rc.WriteString(", near the limit, without steady growth now")
		if culprit != "unknown" {
			k := kinds[0]
			word := "the most are"
			if k.now > open.V/2 {
				word = "mostly"
			}
			fmt.Fprintf(&rc, "; %s %s (%s)", word, kindWord(culprit), num(k.now))
		}
	}
	if detail != "" {
		rc.WriteString("; " + detail)
	}
	fix := "Raise RLIMIT_NOFILE (ulimit -n, or the container runtime's nofile limit) to cover peak listeners + connections + files + epoll instances"
	title := "File descriptors near the limit: " + num(open.V) + " of " + num(limit.V)
	if leaking {
		fix = fixForKind(culprit, detail) + " Raising the limit only buys time."
		what := ""
		if culprit != "unknown" {
			what = " " + strings.ReplaceAll(kindWord(culprit), "descriptors", "FDs")
		}
		title = fmt.Sprintf("File descriptors leaking: %s%s, heading for the limit", rate(g.rate), what)
		if !still {
			title = fmt.Sprintf("File descriptors leaked: %s%s until %s, still open", rate(g.rate), what, g.lastRise.Format("15:04:05"))
		}
	}
	return []Observation{{
		Key:         "process",
		Cause:       cause,
		Title:       title,
		Symptom:     fmt.Sprintf("%s of %s file descriptors in use; at the limit accept() and open() fail with EMFILE", num(open.V), num(limit.V)),
		RootCause:   rc.String(),
		Severity:    sev,
		Confidence:  0.85,
		Evidence:    ev,
		Artifacts:   arts,
		Remediation: fix,
		Labels:      map[string]string{"kind": culprit},
		Stopped:     leaking && !still,
	}}
}

// signed is a change with its sign: "+600", "-3", "0".
func signed(x float64) string {
	if x > 0 {
		return "+" + num(x)
	}
	return num(x)
}

// connectsPending reports whether most of the growth since from (grew
// descriptors) is the target's TCP sockets in SYN_SENT.
func connectsPending(w Window, from time.Time, grew float64) bool {
	st := w.Store
	ls := signals.L("state", "SYN_SENT")
	cur, ok := w.FreshLatest(signals.ProcessTCPSockets, ls, freshSockets)
	if !ok || grew <= 0 {
		return false
	}
	s := st.Range(signals.ProcessTCPSockets, ls, from)
	return len(s) > 0 && cur.V-s[0].V >= grew/2
}

// socketStateDetail says in which TCP state the target's sockets pile up:
// with since set, the state that grew since then (CLOSE_WAIT growing
// means the app never closes sockets its peers closed); otherwise the
// state holding the most. These are TCP sockets only: socket descriptors
// also count UNIX and UDP ones.
func socketStateDetail(w Window, since time.Time) string {
	st := w.Store
	best, bestG, bestN := "", 0.0, 0.0
	for _, ls := range st.Select(signals.ProcessTCPSockets) {
		cur, ok := w.FreshLatest(signals.ProcessTCPSockets, ls, freshSockets)
		if !ok {
			continue
		}
		g := 0.0
		if s := st.Range(signals.ProcessTCPSockets, ls, since); !since.IsZero() && len(s) > 0 {
			g = cur.V - s[0].V
		}
		if g > bestG || (g == bestG && cur.V > bestN) {
			best, bestG, bestN = ls.Get("state"), g, cur.V
		}
	}
	switch {
	case best == "" || bestN == 0:
		return ""
	case bestG > 0:
		return fmt.Sprintf("the TCP sockets that grow are in %s (%s, %s)", best, num(bestN), signed(bestG))
	case since.IsZero():
		return fmt.Sprintf("most of its TCP sockets are in %s (%s)", best, num(bestN))
	}
	return "" // growing, but not in TCP sockets: UNIX or UDP ones
}

func kindWord(kind string) string {
	switch kind {
	case "socket":
		return "socket descriptors"
	case "file":
		return "regular-file descriptors"
	case "pipe":
		return "pipe descriptors"
	case "anon_eventfd", "anon_eventpoll", "anon_timerfd", "anon_inotify", "anon_other":
		return strings.TrimPrefix(kind, "anon_") + " descriptors"
	}
	return "descriptors of unknown kind"
}

func fixForKind(kind, detail string) string {
	switch {
	case kind == "socket" && strings.Contains(detail, "grow are in CLOSE_WAIT"):
		return "Sockets the peer closed are never closed by the app: close (drop) the connection when a read returns EOF, and on every error path."
	case kind == "socket":
		return "Sockets are opened and never closed: reuse connections through one pooled client per upstream and close response bodies."
	case kind == "file":
		return "Files are opened and never closed: close them on every path (defer f.Close(), RAII)."
	case kind == "pipe":
		return "Pipes leak: usually child processes whose stdin/stdout are never closed or waited for."
	}
	return "Descriptors leak: find the code path that opens them without closing (lsof -p PID shows what they point at)."
}
