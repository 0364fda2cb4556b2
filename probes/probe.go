package probes

import (
	"context"
	"log/slog"
	"time"

	"github.com/culprit-dev/culprit/signals"
	"github.com/culprit-dev/culprit/workload"
)

// Probe is one eBPF program set. Start loads and attaches it and returns an
// error (wrapping the kernel's) when it cannot, so the agent can say which
// findings lose evidence (from the rules' needs: rules.LostWithout of the
// probe's Name, one of signals.Probe*); after a successful Start the probe
// writes signals into the store until ctx ends. Close detaches and frees
// kernel objects.
type Probe interface {
	Name() string
	Start(ctx context.Context, tracker *workload.Tracker, store *signals.Store) error
	Close() error
}

// Options are what every probe needs.
type Options struct {
	Log *slog.Logger
	// PollInterval is how often kernel maps are read into signals while
	// they change (probes.poll_interval).
	PollInterval time.Duration
	// IdlePollInterval is the longest a probe whose maps stopped changing
	// waits between polls (probes.idle_poll_interval); 0 or anything below
	// PollInterval polls at PollInterval always.
	IdlePollInterval time.Duration
	// MaxEntries bounds every BPF hash map of the probe.
	MaxEntries uint32
	// RingBufferBytes bounds the probe's event ring buffer (power of two, page multiple).
	RingBufferBytes uint32
	// Owners tells whose a socket is (shared with the collectors); nil:
	// the probe makes its own.
	Owners *workload.SocketOwners
	// OthersOwners: findings may be about other processes' sockets
	// (rules.scope = "namespace"), so the owner of another process's
	// connection is worth a read of every fd table in the namespace;
	// otherwise a connection event's owner is looked for in the target's.
	OthersOwners bool
	// SideStores receive what is not a number series: the sched probe's
	// episodes, tcplife's connection events, cpu_profile's samples.
	signals.SideStores
}
