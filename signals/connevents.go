package signals

import "time"

// ConnEvent is one moment in the life of one TCP connection of the target's
// network namespace: how it ended (who closed first, and how long it had
// been idle), or how long its handshake took. The namespace holds the
// neighbours' connections too: Inode and Pid say whose it is.
type ConnEvent struct {
	T         time.Time
	Kind      string // ConnPeerClose, ConnLocalClose, ConnResetReceived, ConnOpened
	Remote    string // ip:port
	LocalPort int
	// Idle is the time since the later of the last data received and sent
	// (closes only); Lifetime is how long the connection was established,
	// or for ConnOpened the handshake time. 0 when unknown.
	Idle, Lifetime time.Duration
	// Inode is the socket's inode, as /proc/PID/fd shows it
	// (socket:[Inode]): match it against the target's fds. 0 when the
	// socket no longer had a file (orphaned by close) or never had one.
	Inode uint64
	// Pid is the process (tgid) that called connect, for connections
	// opened from this namespace; 0 for accepted ones and when unknown.
	Pid int
	// Owner is whose connection it was, as a socket series' owner label:
	// "target", "agent", another process's command name, or "unknown".
	Owner string
	// Bytes is the sequence space the connection used, both ways (closes
	// only): its data plus one for a SYN and one for a FIN, so 2 or less
	// for one that never carried data.
	Bytes uint64
}

// ConnEvent kinds.
const (
	ConnPeerClose     = "peer_close"
	ConnLocalClose    = "local_close"
	ConnResetReceived = "reset_received"
	ConnOpened        = "opened"
)

// ConnEvents keeps the last max connection events, for rules that need
// more than a count: the idle ages at which peers close connections. It
// is safe for concurrent use.
type ConnEvents struct {
	log *Log[ConnEvent]
}

// NewConnEvents keeps at most max events (at least one).
func NewConnEvents(max int) *ConnEvents { return &ConnEvents{log: NewLog[ConnEvent](max)} }

// Add appends e, evicting the oldest when full.
func (c *ConnEvents) Add(e ConnEvent) { c.log.Add(e) }

// Since returns the events at or after from, oldest first.
func (c *ConnEvents) Since(from time.Time) []ConnEvent {
	return c.log.Filter(func(e ConnEvent) bool { return !e.T.Before(from) })
}

// After appends to out the events added after the seq-th ever that keep
// accepts (nil: all), oldest first, and returns them with the number of
// events added so far, the seq of the next call (Log.After).
func (c *ConnEvents) After(seq uint64, keep func(ConnEvent) bool, out []ConnEvent) ([]ConnEvent, uint64) {
	return c.log.After(seq, keep, out)
}

// Max is the most events kept (probes.max_conn_events).
func (c *ConnEvents) Max() int { return c.log.Max() }

// Evicted is how many events were pushed out by newer ones.
func (c *ConnEvents) Evicted() uint64 { return c.log.Evicted() }
