package rules

import (
	"fmt"
	"maps"
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
//
// The closes are grouped as they arrive, and each group counts those cut
// at an idle age under min_idle: a group whose median is so short (a busy
// server's clients closing in the middle of their traffic) is passed over
// without sorting. Regrouping and sorting the whole window at each
// evaluation was 4 % of the agent's CPU beside nginx under wrk (its
// clients close first, each close a few ms idle) and grew with the window
// (2 MB allocated per evaluation over 4096 closes, five times a second).
type IdleTimeout struct {
	o    IdleTimeoutOptions
	seq  uint64              // events of the source read so far
	kept []keptClose         // the closes that can count, oldest first: at most the source's Max
	next uint64              // id of the next close kept
	read []signals.ConnEvent // the closes read at this evaluation, reused

	// The kept closes by group (key), and the listeners they were grouped
	// by: when those change, everything is grouped again.
	groups      map[string]*closeGroup
	listenOwner map[string]string
}

// keptClose is a close kept for the window; id orders them.
type keptClose struct {
	signals.ConnEvent
	id uint64
}

// closeGroup is the kept closes of one group, oldest first, and how many
// of them were cut at an idle age under min_idle.
type closeGroup struct {
	owner string
	es    []groupedClose
	short int
}

// groupedClose is what a group needs of a kept close (a quarter of it).
type groupedClose struct {
	id    uint64
	t     time.Time
	idle  time.Duration
	reset bool
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
	listenOwner := map[string]string{} // port -> the owner of its listener
	for _, ls := range w.Store.Select(signals.TCPSockets) {
		if ls.Get("state") == "LISTEN" {
			listenOwner[ls.Get("port")] = ls.Get("owner")
		}
	}
	if r.groups == nil || !maps.Equal(listenOwner, r.listenOwner) {
		r.listenOwner = listenOwner
		r.groups = map[string]*closeGroup{}
		for _, k := range r.kept {
			r.add(k)
		}
	}
	from := w.Now.Add(-r.o.Window)
	// Only the connections of owners findings may be about (the
	// target's, or in namespace scope every process's but culprit's) are
	// kept: a neighbour's churn must not push the target's closes out.
	r.read, r.seq = w.Conns.After(r.seq, func(e signals.ConnEvent) bool { return cutWhileIdle(e) && w.owned(e.Owner) }, r.read[:0])
	for _, e := range r.read {
		k := keptClose{ConnEvent: e, id: r.next}
		r.next++
		r.kept = append(r.kept, k)
		r.add(k)
	}
	clear(r.read) // no strings held past their use
	// Out of the window, and past the source's Max (the oldest): the
	// groups lose the same closes, by time and by id.
	r.kept = slices.DeleteFunc(r.kept, func(k keptClose) bool { return k.T.Before(from) })
	var firstID uint64
	if n := len(r.kept) - w.Conns.Max(); n > 0 {
		r.kept = slices.Delete(r.kept, 0, n)
	}
	if len(r.kept) > 0 {
		firstID = r.kept[0].id
	}
	keys := make([]string, 0, len(r.groups))
	for key, g := range r.groups {
		g.es = slices.DeleteFunc(g.es, func(c groupedClose) bool {
			if !c.t.Before(from) && c.id >= firstID {
				return false
			}
			if c.idle < r.o.MinIdle {
				g.short--
			}
			return true
		})
		if len(g.es) == 0 {
			delete(r.groups, key)
			continue
		}
		keys = append(keys, key)
	}
	sort.Strings(keys)
	var out []Observation
	for _, k := range keys {
		if o, ok := r.group(k, r.groups[k]); ok {
			out = append(out, o)
		}
	}
	return out
}

// add puts a kept close in its group.
func (r *IdleTimeout) add(k keptClose) {
	key := k.Remote
	if lp := strconv.Itoa(k.LocalPort); r.listenOwner[lp] != "" {
		key = "clients of port " + lp
	} else if _, ok := localServer(k.Remote, r.listenOwner); ok {
		// The peer is a server in this namespace, reached over
		// loopback: nothing stands between the two, so a close at
		// one idle age is that server's own timeout, not an
		// intermediary's (and culprit's own server closing its idle
		// API clients is no finding at all). A mesh proxy in front
		// of the app is met as the clients of the app's port, above.
		return
	}
	key = ownerKey(k.Owner, key)
	g := r.groups[key]
	if g == nil {
		g = &closeGroup{owner: k.Owner}
		r.groups[key] = g
	}
	g.es = append(g.es, groupedClose{id: k.id, t: k.T, idle: k.Idle, reset: k.Kind == signals.ConnResetReceived})
	if k.Idle < r.o.MinIdle {
		g.short++
	}
}

func (r *IdleTimeout) group(key string, g *closeGroup) (Observation, bool) {
	owner, es := g.owner, g.es
	who := key
	if owner != ownerTarget {
		who = strings.TrimPrefix(key, owner+"/")
	}
	// The median (the sorted ages' middle, below) is under min_idle when
	// more than half of them are: no need to sort them to know.
	if len(es) < r.o.MinCloses || g.short > len(es)/2 {
		return Observation{}, false
	}
	idles := make([]time.Duration, len(es))
	resets := 0
	for i, c := range es {
		idles[i] = c.idle
		if c.reset {
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
