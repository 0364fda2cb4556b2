package rules

import (
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/culprit-dev/culprit/signals"
)

// CauseNoConnectionReuse is port_exhaustion's root cause.
const CauseNoConnectionReuse = "no_connection_reuse"

// PortExhaustionOptions ([rules.port_exhaustion] in agent.conf).
type PortExhaustionOptions struct {
	Window    time.Duration `toml:"window" range:"[1s,1h]"`        // growth is judged over this window
	NearRatio float64       `toml:"near_ratio" range:"(0,1]"`      // TIME_WAIT toward one remote / usable ports at or above this is near
	Horizon   time.Duration `toml:"horizon" range:"[1s,24h]"`      // forecasts further out than this stay silent
	MinCount  float64       `toml:"min_count" range:"[1,1000000]"` // below this many TIME_WAIT sockets, silence
}

// DefaultPortExhaustionOptions are the defaults agent.conf documents.
func DefaultPortExhaustionOptions() PortExhaustionOptions {
	return PortExhaustionOptions{Window: 30 * time.Second, NearRatio: 0.5, Horizon: 5 * time.Minute, MinCount: 100}
}

// PortExhaustion names a client that opens a new connection per request to
// one remote and closes it first (a platform fault of the seeds): every such
// connection leaves a TIME_WAIT socket holding its local port for 60 s, and
// a 4-tuple toward one remote ip:port can only use ip_local_port_range's
// ports. At a few hundred connections a second connect() fails with
// EADDRNOTAVAIL.
//
// The ports toward a remote are the namespace's, whoever uses them, so the
// TIME_WAIT sockets are counted over every owner; the finding is the
// target's only when the target is the one connecting (its connect()
// calls to that remote, from the sockcalls probe, or its connections seen
// held before they closed). What it says is what the kernel will do:
// with tcp_tw_reuse in effect for that remote a TIME_WAIT port is reused
// by the next connect, so TIME_WAIT alone exhausts nothing, and connects
// that already failed with EADDRNOTAVAIL are said as such, not forecast.
type PortExhaustion struct{ o PortExhaustionOptions }

func NewPortExhaustion(o PortExhaustionOptions) *PortExhaustion { return &PortExhaustion{o: o} }

func (*PortExhaustion) Name() string { return "port_exhaustion" }

func (*PortExhaustion) Needs() []Need {
	return []Need{
		{Component: signals.CollectorSockets, What: "TIME_WAIT and established connections per remote", Essential: true},
		{Component: signals.CollectorSysctl, What: "the ephemeral port range (ip_local_port_range) and tcp_tw_reuse", Essential: true},
		{Component: signals.ProbeSockCalls, What: "connects already failing with EADDRNOTAVAIL, and the target's connects per remote"},
	}
}

// timeWaitLen is TCP_TIMEWAIT_LEN: how long a closed connection holds its
// port. A steady connect rate r leaves r*60 ports in TIME_WAIT.
const timeWaitLen = 60 * time.Second

// remotePorts is what one cycle of samples says of one remote.
type remotePorts struct {
	timeWait    []signals.Sample // summed over owners, by sample time
	targetTW    float64          // the target's, as far as known, now
	established float64          // all owners, now
	inUse       float64          // sockets toward it in any state, all owners, now
	targetConns float64          // connect() calls of the target toward it over the window
	failed      float64          // of them, failed with EADDRNOTAVAIL
	failedAt    time.Time        // when the first of those was counted
	connsKnown  bool             // the sockcalls probe counts the target's connects
}

func (r *PortExhaustion) Evaluate(w Window) []Observation {
	lo, ok1 := w.Store.Latest(signals.Sysctl, signals.L("name", "net.ipv4.ip_local_port_range.min"))
	hi, ok2 := w.Store.Latest(signals.Sysctl, signals.L("name", "net.ipv4.ip_local_port_range.max"))
	if !ok1 || !ok2 || hi.V < lo.V {
		return nil
	}
	usable := hi.V - lo.V + 1
	reuse, haveReuse := w.Store.Latest(signals.Sysctl, signals.L("name", "net.ipv4.tcp_tw_reuse"))
	from := w.Now.Add(-r.o.Window)
	remotes := map[string]*remotePorts{}
	get := func(remote string) *remotePorts {
		rp := remotes[remote]
		if rp == nil {
			rp = &remotePorts{}
			remotes[remote] = rp
		}
		return rp
	}
	for _, ls := range w.Store.Select(signals.TCPSocketsByRemote) {
		remote, state := ls.Get("remote"), ls.Get("state")
		if remote == "other" {
			continue
		}
		ss := w.Store.Range(signals.TCPSocketsByRemote, ls, from)
		if len(ss) == 0 || !w.Fresh(ss[len(ss)-1].T, freshSockets) {
			continue
		}
		rp := get(remote)
		cur := ss[len(ss)-1].V
		rp.inUse += cur
		switch state {
		case "ESTABLISHED":
			rp.established += cur
		case "TIME_WAIT":
			rp.timeWait = sumByTime(rp.timeWait, ss)
			if ls.Get("owner") == ownerTarget {
				rp.targetTW += cur
			}
		}
	}
	for _, ls := range w.Store.Select(signals.ProcessConnectsTotal) {
		if rp := remotes[ls.Get("remote")]; rp != nil {
			rp.connsKnown = true
			rp.targetConns += w.Store.Increase(signals.ProcessConnectsTotal, ls, from)
		}
	}
	for _, ls := range w.Store.Select(signals.ProcessConnectErrorsTotal) {
		if ls.Get("errno") != "EADDRNOTAVAIL" {
			continue
		}
		n := w.Store.Increase(signals.ProcessConnectErrorsTotal, ls, from)
		if n <= 0 {
			continue
		}
		// Exhausted so hard no TIME_WAIT series may exist yet for it.
		rp := get(ls.Get("remote"))
		rp.failed += n
		if at := firstRise(w.Store.Range(signals.ProcessConnectErrorsTotal, ls, from)); rp.failedAt.IsZero() || at.Before(rp.failedAt) {
			rp.failedAt = at
		}
	}
	// Connects fail at once, the sockets and sysctls are read every second:
	// a remote whose failures are newer than the last socket dump or
	// sysctl read waits for them, so the words about its ports (how many in
	// TIME_WAIT, of how many usable) are of the time the connects failed,
	// not of before. At most a collect interval; an open finding holds
	// meanwhile (the engine's hold-down).
	dumped, _ := w.Store.Latest(signals.TCPSocketsDumped, nil)
	names := make([]string, 0, len(remotes))
	for k := range remotes {
		names = append(names, k)
	}
	slices.Sort(names)
	var out []Observation
	for _, remote := range names {
		rp := remotes[remote]
		if rp.failed > 0 && (dumped.T.Before(rp.failedAt) || lo.T.Before(rp.failedAt) || hi.T.Before(rp.failedAt)) {
			continue
		}
		if rp.failed > 0 && rp.inUse < r.o.NearRatio*usable {
			// The probe counts a connect that failed within the call
			// before its SYN went out as EADDRNOTAVAIL, without seeing
			// the errno: the kernel's port search also fails (ENOMEM)
			// when it cannot allocate a bind bucket. With most of the
			// range not in use toward the remote, it was not the
			// ports: said as exhausted only when the sockets agree;
			// otherwise the failures are left out (docs/NOTES.md,
			// Sessions 19 and 20).
			rp.failed = 0
		}
		if o, ok := r.remote(w, remote, rp, usable, lo.V, hi.V, reuse.V, haveReuse); ok {
			out = append(out, o)
		}
	}
	return out
}

func (r *PortExhaustion) remote(w Window, remote string, rp *remotePorts, usable, lo, hi, reuse float64, haveReuse bool) (Observation, bool) {
	tw := 0.0
	if n := len(rp.timeWait); n > 0 {
		tw = rp.timeWait[n-1].V
	}
	// Whose: the target's connects toward it, or its connections seen
	// held before they closed. Nobody's known: not the target's problem,
	// and no owner to name in namespace scope either.
	connRate := rp.targetConns / r.o.Window.Seconds()
	mine := rp.failed > 0 || connRate > 0 || rp.targetTW > 0
	if !mine {
		return Observation{}, false
	}
	if rp.failed == 0 && tw < r.o.MinCount {
		return Observation{}, false
	}
	loopback := strings.HasPrefix(remote, "127.") || strings.HasPrefix(remote, "[::1]")
	reuseOn := haveReuse && (reuse == 1 || (reuse == 2 && loopback))
	if reuseOn && rp.failed == 0 {
		// The kernel reuses a TIME_WAIT port for a new connect (after 1 s,
		// timestamps on): TIME_WAIT alone runs nothing out here.
		return Observation{}, false
	}
	ratio := tw / usable
	// What the present connect rate leads to: TIME_WAIT levels off at
	// rate*60 s. Without the probe's connect counts, the growth of the
	// TIME_WAIT count since it began stands in for the rate.
	rateNow, rateFrom := connRate, "the target's connect() calls"
	if !rp.connsKnown {
		if g, ok := growthOf(rp.timeWait); ok && g.current && g.rate > 0 {
			rateNow, rateFrom = g.rate, "the growth of TIME_WAIT sockets"
		} else {
			rateNow = 0
		}
	}
	level := rateNow * timeWaitLen.Seconds()
	var forecast string
	eta, etaOK := time.Duration(0), false
	switch {
	case rp.failed > 0:
		forecast = fmt.Sprintf("already exhausted: %s failed with EADDRNOTAVAIL in the last %s", count(rp.failed, "connect", ""), duration(r.o.Window))
	case tw >= usable && haveReuse && !reuseOn:
		// No forecast of what is already so ("starts failing in about
		// 0 ms"): with no reuse, no port is left for this remote.
		forecast = "already exhausted: no usable port is free for a new connect() to it"
	case tw >= usable:
		forecast = "every usable port is taken"
	case rateNow > 0 && level >= usable:
		eta = time.Duration((usable - tw) / rateNow * float64(time.Second))
		etaOK = eta > 0
		forecast = fmt.Sprintf("at %s (%s) TIME_WAIT would level off at %s, more than the %s usable: connect() starts failing in about %s",
			rate(rateNow), rateFrom, count(level, "port", ""), num(usable), duration(max(eta, 0)))
	case rateNow > 0:
		forecast = fmt.Sprintf("at %s (%s) TIME_WAIT levels off near %s of the %s usable", rate(rateNow), rateFrom, count(level, "port", ""), num(usable))
	default:
		forecast = "it is not growing now"
	}
	if rp.failed == 0 && ratio < r.o.NearRatio && !(etaOK && eta <= r.o.Horizon) {
		return Observation{}, false
	}
	sev := SeverityWarning
	if ratio >= 0.9 || rp.failed > 0 || (etaOK && eta <= time.Minute) {
		sev = SeverityCritical
	}
	reuseNote := ""
	switch {
	case haveReuse && reuse == 0:
		reuseNote = " net.ipv4.tcp_tw_reuse=0 here, so none of them can be reused for new outbound connections."
	case haveReuse && reuse == 2 && !loopback:
		reuseNote = " net.ipv4.tcp_tw_reuse=2 reuses TIME_WAIT ports for loopback connections only, not toward " + remote + "."
	}
	title := fmt.Sprintf("Ephemeral ports toward %s running out: %s of %s in TIME_WAIT", remote, num(tw), num(usable))
	if tw >= usable && haveReuse && !reuseOn {
		title = fmt.Sprintf("Ephemeral ports toward %s exhausted: all %s in TIME_WAIT", remote, num(usable))
	}
	if rp.failed > 0 {
		title = fmt.Sprintf("Ephemeral ports toward %s exhausted: %s failed", remote, count(rp.failed, "connect", ""))
	}
	ev := []Evidence{
		{Signal: fmt.Sprintf("tcp_sockets_by_remote{remote=%q,state=\"TIME_WAIT\"}", remote), Value: tw, Threshold: r.o.NearRatio * usable, Unit: "sockets", Note: "every owner's: the ports toward a remote are the namespace's"},
		{Signal: `sysctl{name="net.ipv4.ip_local_port_range"}`, Value: usable, Unit: "ports", Note: fmt.Sprintf("%s-%s", num(lo), num(hi))},
	}
	if rp.connsKnown {
		ev = append(ev, Evidence{Signal: fmt.Sprintf("process_connects_total{remote=%q}", remote), Value: connRate, Unit: "/s", Window: r.o.Window, Note: "the target's connect() calls toward it"})
	}
	if rp.failed > 0 {
		ev = append(ev, Evidence{Signal: fmt.Sprintf("process_connect_errors_total{errno=\"EADDRNOTAVAIL\",remote=%q}", remote), Value: rp.failed, Unit: "connects", Window: r.o.Window, Note: "no local port left"})
	}
	return Observation{
		Key:   remote,
		Cause: CauseNoConnectionReuse,
		Title: title,
		Symptom: fmt.Sprintf("%s toward %s in TIME_WAIT (%s of the %s usable local ports, ip_local_port_range %s-%s) with %s established; %s",
			count(tw, "socket is", "sockets are"), remote, percent(ratio), num(usable), num(lo), num(hi), num(rp.established), forecast),
		RootCause:   fmt.Sprintf("the app opens a new connection to %s for each request and closes it first, so each leaves its local port in TIME_WAIT for 60 s: it does not reuse connections to this remote.%s", remote, reuseNote),
		Remediation: w.advice().ConnectionReuse(remote),
		Severity:    sev,
		Confidence:  0.85,
		Evidence:    ev,
		Artifacts:   []Artifact{{Kind: "endpoint", Value: remote, Detail: "the remote the app does not reuse connections to"}},
		Labels:      map[string]string{"remote": remote},
	}, true
}

// sumByTime adds series b into a by sample time (the sockets collector
// writes every owner's series of one cycle at one time); a time only one
// of them has keeps its value.
func sumByTime(a, b []signals.Sample) []signals.Sample {
	if len(a) == 0 {
		return append([]signals.Sample(nil), b...)
	}
	out := make([]signals.Sample, 0, max(len(a), len(b)))
	i, j := 0, 0
	for i < len(a) || j < len(b) {
		switch {
		case j == len(b) || (i < len(a) && a[i].T.Before(b[j].T)):
			out = append(out, a[i])
			i++
		case i == len(a) || b[j].T.Before(a[i].T):
			out = append(out, b[j])
			j++
		default:
			out = append(out, signals.Sample{T: a[i].T, V: a[i].V + b[j].V})
			i++
			j++
		}
	}
	return out
}

// firstRise is the time of the first sample of a counter above the one
// before it: when the first event of the window was counted. A window
// whose first sample is already the rise (a series born with its value)
// gives that sample's time.
func firstRise(ss []signals.Sample) time.Time {
	if t, ok := riseIn(ss); ok {
		return t
	}
	if len(ss) > 0 {
		return ss[0].T
	}
	return time.Time{}
}
