package collectors

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sort"
	"time"

	"github.com/culprit-dev/culprit/signals"
	"github.com/culprit-dev/culprit/workload"
)

// Collector polls one source and writes what it reads into the store.
// Collect is called on every tick with the current target; it returns an
// error wrapping ErrNoData when the source has nothing for this target
// (logged at debug), any other error marks the collector degraded.
type Collector interface {
	Name() string
	Collect(ctx context.Context, tgt workload.Process, store *signals.Store) error
}

// Closer is implemented by collectors that hold kernel resources (a netlink
// socket); the agent closes them on shutdown.
type Closer interface{ Close() error }

// ErrNoData means the source exists but had nothing to report this cycle.
var ErrNoData = errors.New("collector returned no data")

// Options are what every collector factory may need.
type Options struct {
	ProcRoot string // normally /proc; tests point it at fixtures
	SysRoot  string // normally /sys
	Log      *slog.Logger
	// Interval is how often the agent calls Collect for this collector.
	Interval time.Duration
	// MaxThreads bounds the threads one Collect examines (collect.max_threads).
	MaxThreads int
	// Owners tells whose a socket is; the agent shares one among the
	// collectors (and probes) that need it. Nil: a collector makes its own.
	Owners *workload.SocketOwners
	// SocketsIdleInterval is the longest the sockets collector goes
	// without a dump while the namespace's TCP counters stand still
	// (collect.sockets_idle_interval); 0: its default, negative: never.
	SocketsIdleInterval time.Duration
	// SocketsBusyInterval is the longest it goes without one while only
	// segments move (collect.sockets_busy_interval); 0: its default,
	// negative: never.
	SocketsBusyInterval time.Duration
	// HalfOpen, when set, tells the accept-queue collector whether any
	// listener holds a half-open connection before it walks the
	// established hash for them (probes.ListenQueues); nil: it walks.
	HalfOpen HalfOpenCounter
	// SideStores receive what is not a number series: the pprof_heap
	// collector's heap profiles (Profiles; nil keeps only totals).
	signals.SideStores
}

// Factory builds a collector.
type Factory func(Options) (Collector, error)

type registration struct {
	name    string
	fast    bool // sampled at the fast (listen) interval rather than the normal one
	factory Factory
}

var registry = map[string]registration{}

// register is called from each collector file's init, so that adding a
// collector is adding a file.
func register(name string, fast bool, f Factory) {
	if _, dup := registry[name]; dup {
		panic(fmt.Sprintf("collector %q registered twice", name)) // programming error at init time
	}
	registry[name] = registration{name: name, fast: fast, factory: f}
}

// Names lists registered collectors, sorted.
func Names() []string {
	out := make([]string, 0, len(registry))
	for n := range registry {
		out = append(out, n)
	}
	sort.Strings(out)
	return out
}

// Fast reports whether the named collector is sampled at the fast interval.
func Fast(name string) bool { return registry[name].fast }

// New builds the named collector.
func New(name string, o Options) (Collector, error) {
	r, ok := registry[name]
	if !ok {
		return nil, fmt.Errorf("unknown collector %q (known: %v)", name, Names())
	}
	c, err := r.factory(o)
	if err != nil {
		return nil, fmt.Errorf("collector %s: %w", name, err)
	}
	return c, nil
}
