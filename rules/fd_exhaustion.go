package rules

import (
	"fmt"
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
	Window      time.Duration `toml:"window" range:"[10s,24h]"`        // growth is judged over this window
	NearRatio   float64       `toml:"near_ratio" range:"(0,1]"`         // open/soft limit at or above this is "near"
	MinIncrease float64       `toml:"min_increase" range:"[1,1000000]"` // FDs gained over Window before growth counts
	Steady      float64       `toml:"steady" range:"(0,1]"`             // share of samples that did not go down
	Horizon     time.Duration `toml:"horizon" range:"[1m,720h]"`       // forecasts further out than this stay silent
}

// DefaultFDExhaustionOptions are the defaults agent.conf documents.
func DefaultFDExhaustionOptions() FDExhaustionOptions {
	return FDExhaustionOptions{Window: time.Minute, NearRatio: 0.8, MinIncrease: 20, Steady: 0.8, Horizon: time.Hour}
}

// FDExhaustion warns before the process hits RLIMIT_NOFILE (seed 000,
// "Container and OS-Level Hardening"): accept() then fails with EMFILE and
// the service stops taking connections while looking healthy.
type FDExhaustion struct{ o FDExhaustionOptions }

func NewFDExhaustion(o FDExhaustionOptions) *FDExhaustion { return &FDExhaustion{o: o} }

func (*FDExhaustion) Name() string { return "fd_exhaustion" }

var fdKinds = []string{"socket", "file", "pipe", "anon_eventfd", "anon_eventpoll", "anon_timerfd", "anon_inotify", "anon_other", "other"}

func (r *FDExhaustion) Evaluate(w Window) []Observation {
	st, now := w.Store, w.Now
	open, ok := st.Latest("process_fds_open", nil)
	limit, okl := st.Latest("process_fd_limit", signals.L("type", "soft"))
	if !ok || !okl || limit.V <= 0 || now.Sub(open.T) > 3*time.Second {
		return nil
	}
	from := now.Add(-r.o.Window)
	tr, haveTrend := trendOf(st.Range("process_fds_open", nil, from))
	growing := haveTrend && tr.increase >= r.o.MinIncrease && tr.steady >= r.o.Steady && tr.span() >= r.o.Window/2
	eta, etaOK := time.Duration(0), false
	if growing {
		eta, etaOK = tr.until(limit.V)
	}
	near := open.V/limit.V >= r.o.NearRatio
	if !near && !(growing && etaOK && eta <= r.o.Horizon) {
		return nil
	}

	// Which kind grows (or, near the limit without growth, dominates).
	type kindGrowth struct {
		kind        string
		now, growth float64
	}
	var kinds []kindGrowth
	for _, k := range fdKinds {
		ls := signals.L("kind", k)
		cur, ok := st.Latest("process_open_fds", ls)
		if !ok {
			continue
		}
		g := 0.0
		if s := st.Range("process_open_fds", ls, from); len(s) > 0 {
			g = cur.V - s[0].V
		}
		kinds = append(kinds, kindGrowth{k, cur.V, g})
	}
	sort.Slice(kinds, func(i, j int) bool {
		if growing && kinds[i].growth != kinds[j].growth {
			return kinds[i].growth > kinds[j].growth
		}
		return kinds[i].now > kinds[j].now
	})
	culprit := "unknown"
	detail := ""
	var arts []Artifact
	if len(kinds) > 0 {
		culprit = kinds[0].kind
		for _, k := range kinds {
			if k.now > 0 {
				arts = append(arts, Artifact{Kind: "fd_kind", Value: k.kind, Detail: fmt.Sprintf("%.0f open, %+.0f in %s", k.now, k.growth, fmtDur(r.o.Window))})
			}
		}
	}
	if culprit == "socket" {
		detail = socketStateDetail(st, from)
	}

	ev := []Evidence{
		{Signal: "process_fds_open", Value: open.V, Threshold: r.o.NearRatio * limit.V, Unit: "fds", Note: "open file descriptors"},
		{Signal: `process_fd_limit{type="soft"}`, Value: limit.V, Unit: "fds", Note: "RLIMIT_NOFILE soft limit"},
	}
	if haveTrend {
		ev = append(ev, Evidence{Signal: "process_fds_open", Value: tr.slope * 60, Threshold: r.o.MinIncrease / r.o.Window.Minutes(), Unit: "fds/min", Window: tr.span(), Note: fmt.Sprintf("growth, %.0f%% of samples rising or flat", 100*tr.steady)})
	}
	cause, sev := CauseFDNearLimit, SeverityWarning
	if open.V/limit.V >= 0.95 {
		sev = SeverityCritical
	}
	var rc strings.Builder
	fmt.Fprintf(&rc, "%.0f of %.0f file descriptors open (%.0f%% of RLIMIT_NOFILE)", open.V, limit.V, 100*open.V/limit.V)
	if growing {
		cause = CauseFDLeak
		fmt.Fprintf(&rc, " and rising steadily by %.1f/min, mostly %s", tr.slope*60, kindWord(culprit))
		if etaOK {
			fmt.Fprintf(&rc, "; at this rate the limit is hit in %s", fmtDur(eta))
			if eta < 10*time.Minute {
				sev = SeverityCritical
			}
		}
	} else {
		fmt.Fprintf(&rc, ", mostly %s", kindWord(culprit))
	}
	if detail != "" {
		rc.WriteString("; " + detail)
	}
	fix := "Raise RLIMIT_NOFILE (ulimit -n, or the container runtime's nofile limit) to cover peak listeners + connections + files + epoll instances"
	if growing {
		fix = fixForKind(culprit, detail) + " Raising the limit only buys time."
	}
	return []Observation{{
		Key:         "process",
		Cause:       cause,
		Title:       fmt.Sprintf("file descriptors heading for the limit: %s", strings.ReplaceAll(kindWord(culprit), "descriptors", "FDs")),
		Symptom:     fmt.Sprintf("%.0f of %.0f file descriptors in use; at the limit accept() and open() fail with EMFILE", open.V, limit.V),
		RootCause:   rc.String(),
		Severity:    sev,
		Confidence:  0.85,
		Evidence:    ev,
		Artifacts:   arts,
		Remediation: fix,
		Labels:      map[string]string{"kind": culprit},
	}}
}

// socketStateDetail says which TCP state the target's sockets pile up in;
// CLOSE_WAIT growing means the app never closes sockets its peers closed.
func socketStateDetail(st *signals.Store, from time.Time) string {
	best, bestG, bestN := "", 0.0, 0.0
	for _, ls := range st.Select("process_tcp_sockets") {
		cur, ok := st.Latest("process_tcp_sockets", ls)
		if !ok {
			continue
		}
		g := 0.0
		if s := st.Range("process_tcp_sockets", ls, from); len(s) > 0 {
			g = cur.V - s[0].V
		}
		if g > bestG || (g == bestG && cur.V > bestN) {
			best, bestG, bestN = ls.Get("state"), g, cur.V
		}
	}
	if best == "" {
		return ""
	}
	return fmt.Sprintf("the sockets that grow are in %s (%.0f, %+.0f)", best, bestN, bestG)
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
	case kind == "socket" && strings.Contains(detail, "CLOSE_WAIT"):
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
