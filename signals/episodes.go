package signals

import "time"

// Episode is one interval in the life of one thread that a rule may name as
// a root cause: a long sleep off-CPU (a blocking call) or a long run
// without sleeping (CPU work that never yields), with the stack it began
// with. A number series cannot carry a stack, so episodes are kept apart.
type Episode struct {
	Kind     string // EpisodeBlock or EpisodeBusy
	Pid, Tid int
	Thread   string // the thread's name (comm) when the episode began
	Start    time.Time
	Duration time.Duration // so far, when Ongoing
	Ongoing  bool
	// Stack is symbolized, leaf first: the first KernelFrames entries are
	// kernel frames, the rest user frames.
	Stack        []string
	KernelFrames int
	// LibcFrames: how many user frames at the leaf are the C library's
	// (its syscall wrappers, or getaddrinfo's insides): what the app
	// called, not who called it.
	LibcFrames int
	Waker      int // tid that ended a block, 0 if unknown
}

// Episode kinds.
const (
	EpisodeBlock = "block"
	EpisodeBusy  = "busy"
)

// End is when the episode ended, or the time it was last seen going on.
func (e Episode) End() time.Time { return e.Start.Add(e.Duration) }

// Syscall is the system call the stack entered, from its kernel frames
// ("nanosleep" for __x64_sys_nanosleep), or "".
func (e Episode) Syscall() string {
	for i := 0; i < e.KernelFrames && i < len(e.Stack); i++ {
		f := e.Stack[i]
		for _, p := range []string{"__x64_sys_", "__arm64_sys_", "__se_sys_", "__do_sys_", "ksys_"} {
			if len(f) > len(p) && f[:len(p)] == p {
				return f[len(p):]
			}
		}
	}
	return ""
}

// UserStack is the user part of Stack, leaf first.
func (e Episode) UserStack() []string {
	if e.KernelFrames >= len(e.Stack) {
		return nil
	}
	return e.Stack[e.KernelFrames:]
}

// CallerStack is the user stack past the C library's leaf frames: it
// starts at the code that called into libc. When every user frame is the
// C library's, it is the whole user stack.
func (e Episode) CallerStack() []string {
	u := e.UserStack()
	if e.LibcFrames > 0 && e.LibcFrames < len(u) {
		return u[e.LibcFrames:]
	}
	return u
}

// KernelStack is the kernel part of Stack, leaf first.
func (e Episode) KernelStack() []string {
	return e.Stack[:min(e.KernelFrames, len(e.Stack))]
}

type episodeKey struct {
	kind  string
	tid   int
	start time.Time
}

// Episodes is a log of the last max episodes, and what each thread of
// the target was seen doing (Observe, Thread). An ongoing episode is
// replaced in place as it grows and when it ends, so a thread blocked for a
// minute is one entry, not sixty. It is safe for concurrent use.
type Episodes struct {
	log *Log[Episode] // keyed by keyOf
	// th is what each thread was seen doing (threads.go): the stack of a
	// blocking call is often too short to tell which runtime's thread
	// made it, its earlier idle waits are not.
	th threads
}

// NewEpisodes keeps at most max episodes (at least one).
func NewEpisodes(max int) *Episodes {
	return &Episodes{log: NewKeyedLog(max, keyOf)}
}

func keyOf(e Episode) episodeKey { return episodeKey{e.Kind, e.Tid, e.Start} }

// Put adds e, or replaces the episode of the same kind, thread and start
// (unless that one has ended and e says it is ongoing).
func (es *Episodes) Put(e Episode) { es.log.Put(e, keepEnd) }

// keepEnd: a late report that an episode is still going on must not undo
// its end.
func keepEnd(old, e Episode) bool { return old.Ongoing || !e.Ongoing }

// Since returns the episodes of kind that were going on at or after from,
// oldest first.
func (es *Episodes) Since(kind string, from time.Time) []Episode {
	return es.log.Filter(func(e Episode) bool { return e.Kind == kind && !e.End().Before(from) })
}

// Evicted is how many episodes were pushed out by newer ones.
func (es *Episodes) Evicted() uint64 { return es.log.Evicted() }
