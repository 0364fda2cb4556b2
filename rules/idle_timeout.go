package rules

import (
	"fmt"
	"net/netip"
	"slices"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/culprit-dev/culprit/signals"
)

// CauseIntermediaryIdleTimeout is idle_timeout's root cause.
const CauseIntermediaryIdleTimeout = "intermediary_idle_timeout"

// ConnEventSource is what idle_timeout reads: how connections ended
// (signals.ConnEvents, from the tcplife probe), read by what was added
// since the last read (signals.Log.After).
type ConnEventSource interface {
	After(seq uint64, keep func(signals.ConnEvent) bool, out []signals.ConnEvent) ([]signals.ConnEvent, uint64)
	Max() int
}

// IdleTimeoutOptions ([rules.idle_timeout] in agent.conf).
type IdleTimeoutOptions struct {
	Window    time.Duration `toml:"window" range:"[1s,24h]"`        // closes are looked at over this window
	MinCloses int           `toml:"min_closes" range:"[2,1000000]"` // peer closes of one peer group before judging
	Tolerance float64       `toml:"tolerance" range:"(0,1]"`        // idle ages within this fraction of the median are "the same"
	MinShare  float64       `toml:"min_share" range:"(0,1]"`        // share of closes at the same idle age
	MinIdle   time.Duration `toml:"min_idle" range:"[1ms,24h]"`     // shorter idle ages are ordinary request/response closes
}

// DefaultIdleTimeoutOptions are the defaults agent.conf documents.
func DefaultIdleTimeoutOptions() IdleTimeoutOptions {
	return IdleTimeoutOptions{Window: 5 * time.Minute, MinCloses: 10, Tolerance: 0.1, MinShare: 0.8, MinIdle: time.Second}
}

// IdleTimeout names an intermediary (a load balancer, NAT gateway,
// firewall, service-mesh proxy) that cuts idle connections (seed 000
// "Platform"): many connections closed or reset by the peer at the same
// idle age. The app's next request on such a connection fails, or its pool
// hands out dead connections.
//
// It reads only the events added since its last evaluation and keeps the
// few that can count (a peer's close or reset of a connection that
// carried data) for the window: copying every event of the window at each
// evaluation (five a second, up to probes.max_conn_events of them) was
// most of its cost beside a busy server. One IdleTimeout reads one
// source.
type IdleTimeout struct {
	o    IdleTimeoutOptions
	seq  uint64              // events of the source read so far
	kept []signals.ConnEvent // the closes that can count, oldest first: at most the source's Max
}

// cutWhileIdle is whether e can be a connection an intermediary cut: closed
// or reset by the peer after carrying data. A connection that never carried
// data was not cut while idle after use: a client that connected and left,
// or gave up while its connection waited in an accept queue. (The count is
// of sequence space: the SYN and the FIN take one each.)
func cutWhileIdle(e signals.ConnEvent) bool {
	return (e.Kind == signals.ConnPeerClose || e.Kind == signals.ConnResetReceived) && e.Bytes > 2
}

func NewIdleTimeout(o IdleTimeoutOptions) *IdleTimeout {
	return &IdleTimeout{o: o}
}

func (*IdleTimeout) Name() string { return "idle_timeout" }

func (*IdleTimeout) Needs() []Need {
	return []Need{
		{Component: signals.ProbeTCPLife, What: "how connections ended: who closed, after how long idle, having carried how much", Essential: true},
		{Component: signals.CollectorSockets, What: "which ports listen, so that a port's clients are judged together"},
	}
}

func (r *IdleTimeout) Evaluate(w Window) []Observation {
	if w.Conns == nil {
		return nil
	}
	// Peers of a listening port connect from ever-changing ports: group
	// them by the local port; outbound connections by the remote. Only the
	// connections of owners findings may be about (the target's, or in
	// namespace scope every process's but culprit's), each owner apart.
	listening := map[string]bool{}
	listenOwner := map[string]string{} // port -> the owner of its listener
	for _, ls := range w.Store.Select(signals.TCPSockets) {
		if ls.Get("state") == "LISTEN" {
			listening[ls.Get("port")] = true
			listenOwner[ls.Get("port")] = ls.Get("owner")
		}
	}
	from := w.Now.Add(-r.o.Window)
	// Only the connections of owners findings may be about (the
	// target's, or in namespace scope every process's but culprit's) are
	// kept: a neighbour's churn must not push the target's closes out.
	r.kept, r.seq = w.Conns.After(r.seq, func(e signals.ConnEvent) bool { return cutWhileIdle(e) && w.owned(e.Owner) }, r.kept)
	r.kept = slices.DeleteFunc(r.kept, func(e signals.ConnEvent) bool { return e.T.Before(from) })
	if n := len(r.kept) - w.Conns.Max(); n > 0 {
		r.kept = slices.Delete(r.kept, 0, n)
	}
	groups := map[string][]signals.ConnEvent{}
	owners := map[string]string{}
	for _, e := range r.kept {
		key := e.Remote
		if lp := strconv.Itoa(e.LocalPort); listening[lp] {
			key = "clients of port " + lp
		} else if _, ok := localServer(e.Remote, listenOwner); ok {
			// The peer is a server in this namespace, reached over
			// loopback: nothing stands between the two, so a close at
			// one idle age is that server's own timeout, not an
			// intermediary's (and culprit's own server closing its idle
			// API clients is no finding at all). A mesh proxy in front
			// of the app is met as the clients of the app's port, above.
			continue
		}
		key = ownerKey(e.Owner, key)
		owners[key] = e.Owner
		groups[key] = append(groups[key], e)
	}
	keys := make([]string, 0, len(groups))
	for k := range groups {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	var out []Observation
	for _, k := range keys {
		if o, ok := r.group(k, owners[k], groups[k]); ok {
			out = append(out, o)
		}
	}
	return out
}

func (r *IdleTimeout) group(key, owner string, es []signals.ConnEvent) (Observation, bool) {
	who := key
	if owner != ownerTarget {
		who = strings.TrimPrefix(key, owner+"/")
	}
	if len(es) < r.o.MinCloses {
		return Observation{}, false
	}
	idles := make([]time.Duration, len(es))
	resets := 0
	for i, e := range es {
		idles[i] = e.Idle
		if e.Kind == signals.ConnResetReceived {
			resets++
		}
	}
	slices.Sort(idles)
	median := idles[len(idles)/2]
	if median < r.o.MinIdle {
		return Observation{}, false
	}
	tol := time.Duration(r.o.Tolerance * float64(median))
	same := 0
	for _, d := range idles {
		if d >= median-tol && d <= median+tol {
			same++
		}
	}
	share := float64(same) / float64(len(idles))
	if share < r.o.MinShare {
		return Observation{}, false
	}
	how := "closed (FIN)"
	if resets > len(es)/2 {
		how = "reset (RST)"
	}
	beat := time.Duration(0.8 * float64(median)).Round(100 * time.Millisecond)
	age := duration(median.Round(10 * time.Millisecond))
	return Observation{
		Key:   key,
		Cause: CauseIntermediaryIdleTimeout,
		Title: fmt.Sprintf("Connections with %s cut after %s idle%s: an intermediary's idle timeout", who, age, ownerTitle(owner)),
		Symptom: fmt.Sprintf("%d of %s with %s were %s by the peer after %s ±%s without traffic, in the last %s",
			same, count(float64(len(es)), "connection", ""), who, how, age, percent(r.o.Tolerance), duration(r.o.Window)),
		RootCause: fmt.Sprintf("something between the app and %s closes connections idle for %s: a load balancer, NAT gateway, firewall or proxy idle timeout (the ends themselves close at varied ages). Requests sent on a connection just cut fail with a reset or EOF",
			who, age),
		Remediation: fmt.Sprintf("Keep connections busier than the timeout or retire them first: send heartbeats or TCP keepalives every %s or less, set the connection pool's idle timeout (max idle time) below %s, or raise the intermediary's idle timeout.",
			duration(beat), age),
		Severity:   SeverityWarning,
		Confidence: 0.5 + 0.4*share,
		Evidence: []Evidence{
			{Signal: fmt.Sprintf("tcp_connection_ends_total{how=%q}", "peer_close"), Value: float64(len(es)), Threshold: float64(r.o.MinCloses), Unit: "connections", Window: r.o.Window},
			{Signal: "idle age at the peer's close (median)", Value: median.Seconds(), Threshold: r.o.MinIdle.Seconds(), Unit: "seconds"},
			{Signal: "share of closes at that idle age", Value: share, Threshold: r.o.MinShare, Unit: "ratio"},
		},
		Artifacts: []Artifact{{Kind: "endpoint", Value: who}},
		Labels:    map[string]string{"peer": who, "owner": owner},
	}, true
}

// localServer reports whether remote is a loopback address at a port some
// process of the namespace listens on, and that listener's owner.
func localServer(remote string, listenOwner map[string]string) (string, bool) {
	ap, err := netip.ParseAddrPort(remote)
	if err != nil || !ap.Addr().Unmap().IsLoopback() {
		return "", false
	}
	owner, ok := listenOwner[strconv.Itoa(int(ap.Port()))]
	return owner, ok
}
