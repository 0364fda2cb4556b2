package rules

import (
	"fmt"
	"time"

	"github.com/culprit-dev/culprit/signals"
)

// CauseCloseWaitLeak is close_wait's root cause.
const CauseCloseWaitLeak = "close_wait_leak"

// CloseWaitOptions ([rules.close_wait] in agent.conf).
type CloseWaitOptions struct {
	Window      time.Duration `toml:"window" range:"[1s,24h]"`          // growth is judged over this window
	MinIncrease float64       `toml:"min_increase" range:"[1,1000000]"` // CLOSE_WAIT sockets gained over the window
	Steady      float64       `toml:"steady" range:"(0,1]"`             // share of samples that did not go down
	MinCount    float64       `toml:"min_count" range:"[1,1000000]"`    // or: at least this many...
	MinAge      time.Duration `toml:"min_age" range:"[1s,720h]"`        // ...the oldest idle this long
}

// DefaultCloseWaitOptions are the defaults agent.conf documents.
func DefaultCloseWaitOptions() CloseWaitOptions {
	return CloseWaitOptions{Window: time.Minute, MinIncrease: 20, Steady: 0.8, MinCount: 50, MinAge: 5 * time.Minute}
}

// CloseWait names sockets the peer closed that the app never closes
// (the "Hardening" playbook): each one holds a file descriptor and memory until
// the process dies, and the count only grows. The kernel cannot close them:
// CLOSE_WAIT ends only when the application calls close().
type CloseWait struct{ o CloseWaitOptions }

func NewCloseWait(o CloseWaitOptions) *CloseWait { return &CloseWait{o: o} }

func (*CloseWait) Name() string { return "close_wait" }

func (*CloseWait) Needs() []Need {
	return []Need{
		{Component: signals.CollectorSockets, What: "sockets in CLOSE_WAIT and the age of the oldest", Essential: true},
	}
}

func (r *CloseWait) Evaluate(w Window) []Observation {
	var out []Observation
	from := w.Now.Add(-r.o.Window)
	for _, ls := range w.Store.Select(signals.TCPSockets) {
		owner := ls.Get("owner")
		if ls.Get("state") != "CLOSE_WAIT" || !w.owned(owner) {
			continue
		}
		ss := w.Store.Range(signals.TCPSockets, ls, from)
		if len(ss) == 0 || !w.Fresh(ss[len(ss)-1].T, freshSockets) {
			continue
		}
		cur := ss[len(ss)-1].V
		// Growth measured from where it began, not averaged over the
		// window's quiet part.
		g, ok := growthOf(ss)
		// CLOSE_WAIT goes down only when the app closes sockets: growth
		// that pauses (a leak in bursts) is still sockets never closed.
		growing := ok && g.increase >= r.o.MinIncrease && g.steady >= r.o.Steady && g.rate > 0
		port := ls.Get("port")
		age, _ := w.Store.Latest(signals.TCPCloseWaitOldestSeconds, signals.L("owner", owner, "port", port))
		old := cur >= r.o.MinCount && time.Duration(age.V*float64(time.Second)) >= r.o.MinAge
		if !growing && !old {
			continue
		}
		where := "local port " + port
		if port == "ephemeral" {
			where = "outbound connections (ephemeral ports)"
		}
		how := count(cur, "socket", "") + " in CLOSE_WAIT"
		if growing {
			how += fmt.Sprintf(", %s more than %s ago (%s)", num(g.increase), duration(g.last.T.Sub(g.from().T)), rate(g.rate))
		}
		sev := SeverityWarning
		if cur >= 10*r.o.MinCount {
			sev = SeverityCritical
		}
		out = append(out, Observation{
			Key:         ownerKey(owner, port),
			Cause:       CauseCloseWaitLeak,
			Title:       fmt.Sprintf("CLOSE_WAIT leak on %s%s: the app does not close connections its peers closed", where, ownerTitle(owner)),
			Symptom:     fmt.Sprintf("%s on %s; the oldest has been idle %s", how, where, duration(time.Duration(age.V*float64(time.Second)))),
			RootCause:   "peers closed these connections (their FIN arrived) but the application never called close() on its end; only the app can end CLOSE_WAIT, so each holds a file descriptor and buffers until the process exits",
			Remediation: w.advice().CloseWait(),
			Severity:    sev,
			Confidence:  0.85,
			Evidence: []Evidence{
				{Signal: signals.TCPSockets.Name + ls.String(), Value: cur, Threshold: r.o.MinCount, Unit: "sockets"},
				{Signal: signals.TCPCloseWaitOldestSeconds.Name + signals.L("owner", owner, "port", port).String(), Value: age.V, Threshold: r.o.MinAge.Seconds(), Unit: "seconds", Note: "idle since the peer's last segment"},
			},
			Artifacts: []Artifact{{Kind: "endpoint", Value: where}},
			Labels:    map[string]string{"port": port, "owner": owner},
		})
	}
	return out
}
