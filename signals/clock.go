package signals

import (
	"sync"
	"time"
)

// clockGrain is the period of the process's shared clock while it is hot.
// Tickers whose period is a multiple of it fire together, on its ticks.
const clockGrain = 100 * time.Millisecond

// hotFor is how long one Hot keeps the clock at its grain.
const hotFor = 2 * time.Second

// SocketsFreshFor is how long a sample of the sockets collector
// (collectors/sockets.go) stands for now, a bound it keeps and the rules
// rely on (rules/fresh.go freshSockets). While connections churn in a
// namespace where a dump is dear, it spaces its dumps and writes nothing
// in between, so that no count is restamped as new: its last dump's
// samples then age up to this less a collect interval.
const SocketsFreshFor = 5 * time.Second

// Ticker delivers ticks like a time.Ticker, on the process's shared clock.
//
// The agent's periodic work (the fast collector and the probe polls every
// 100 ms, the rules every 200 ms, the collectors every second) would
// otherwise wake the process once per ticker per period; on a VM a wake-up
// costs a millisecond or more of CPU whatever little it does (measured on
// this project's VM: a Go program doing nothing but a 100 ms ticker used
// 1.3% of a core, with a 1 s ticker 0.6%). Tickers whose period is a
// multiple of 100 ms share one runtime timer instead.
//
// And the clock idles: while nothing is hot (Hot: an event, a queue
// holding connections, a finding going on), it ticks only every idle
// interval (SetIdle, probes.idle_poll_interval, 1 s), and a ticker of a
// shorter period gets a tick then, unless it is Strict (its period is
// kept: a target being looked for). Pollers that idle so are the ones whose
// sources wake the clock (eBPF events) or that are exact without (a sample
// that is provably unchanged is written for every tick it missed). Other
// periods get a time.Ticker of their own.
type Ticker struct {
	C <-chan time.Time

	c      chan time.Time
	every  uint64 // in grains
	strict bool
	own    *time.Ticker
}

// NewTicker returns a ticker firing every d (which must be positive), every
// idle interval while the clock idles. Like time.Ticker, it drops ticks a
// slow reader misses.
func NewTicker(d time.Duration) *Ticker { return newTicker(d, false) }

// NewStrictTicker returns a ticker that keeps its period while the clock
// idles.
func NewStrictTicker(d time.Duration) *Ticker { return newTicker(d, true) }

func newTicker(d time.Duration, strict bool) *Ticker {
	if d <= 0 || d%clockGrain != 0 {
		tk := time.NewTicker(d)
		return &Ticker{C: tk.C, own: tk}
	}
	c := make(chan time.Time, 1)
	t := &Ticker{C: c, c: c, every: uint64(d / clockGrain), strict: strict}
	shared.add(t)
	return t
}

// Stop turns the ticker off; no more ticks are sent.
func (t *Ticker) Stop() {
	if t.own != nil {
		t.own.Stop()
		return
	}
	shared.remove(t)
}

// Hot keeps the shared clock at its 100 ms grain until until (and at least
// hotFor from now), waking it at once if it idles. It costs a mutex.
func Hot(until time.Time) { shared.hot(until) }

// HotNow is Hot for hotFor from now.
func HotNow() { Hot(time.Now().Add(hotFor)) }

// Idle reports whether the shared clock idles now: pollers then arm their
// wake-ups (eBPF programs that wake the process when something happens).
func Idle() bool {
	shared.mu.Lock()
	defer shared.mu.Unlock()
	return shared.idleNow(time.Now())
}

// SetIdle sets the interval of the clock while nothing is hot (the
// process's; the agent sets probes.idle_poll_interval). Zero or less than
// the grain: never idle.
func SetIdle(d time.Duration) {
	shared.mu.Lock()
	defer shared.mu.Unlock()
	shared.idleEvery = uint64(max(d, 0) / clockGrain)
	shared.poke()
}

// clock is the shared timer: it runs while it has tickers.
type clock struct {
	mu        sync.Mutex
	tickers   map[*Ticker]struct{}
	stop      chan struct{}
	wake      chan struct{} // Hot while idle
	hotUntil  time.Time
	idleEvery uint64 // in grains; <= 1: never idle
}

// The clock never idles until SetIdle says it may: the agent does.
var shared = &clock{tickers: map[*Ticker]struct{}{}, wake: make(chan struct{}, 1)}

func (c *clock) add(t *Ticker) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.tickers[t] = struct{}{}
	if c.stop == nil {
		c.stop = make(chan struct{})
		go c.run(c.stop)
	}
	c.poke()
}

func (c *clock) remove(t *Ticker) {
	c.mu.Lock()
	defer c.mu.Unlock()
	delete(c.tickers, t)
	if len(c.tickers) == 0 && c.stop != nil {
		close(c.stop)
		c.stop = nil
	}
}

func (c *clock) hot(until time.Time) {
	until = later(until, time.Now().Add(hotFor))
	c.mu.Lock()
	defer c.mu.Unlock()
	if !until.After(c.hotUntil) {
		return
	}
	wasIdle := c.idleNow(time.Now())
	c.hotUntil = until
	if wasIdle {
		c.poke()
	}
}

func later(a, b time.Time) time.Time {
	if a.After(b) {
		return a
	}
	return b
}

// poke wakes the clock's goroutine so it reconsiders its next tick.
func (c *clock) poke() {
	select {
	case c.wake <- struct{}{}:
	default:
	}
}

func (c *clock) idleNow(now time.Time) bool {
	return c.idleEvery > 1 && !now.Before(c.hotUntil)
}

// grainOf numbers the grain boundary at or before t (Unix time in grains),
// so that ticks fall on wall-clock multiples of their periods and every
// ticker of a period fires on the same wake-up.
func grainOf(t time.Time) uint64 { return uint64(t.UnixNano() / int64(clockGrain)) }

// next is the first grain after n at which some ticker is due, idle or hot.
func (c *clock) next(n uint64, now time.Time) uint64 {
	if !c.idleNow(now) {
		return n + 1
	}
	best := (n/c.idleEvery + 1) * c.idleEvery
	for t := range c.tickers {
		if t.strict {
			if g := (n/t.every + 1) * t.every; g < best {
				best = g
			}
		}
	}
	return best
}

// run ticks until stop: at each grain while hot, at the idle interval (and
// strict tickers' periods) while idle. A ticker of every k grains fires at
// the grains that are multiples of k; while idle, one shorter than the idle
// interval fires at the idle ticks instead.
func (c *clock) run(stop chan struct{}) {
	timer := time.NewTimer(time.Hour)
	defer timer.Stop()
	last := grainOf(time.Now())
	for {
		c.mu.Lock()
		now := time.Now()
		n := c.next(max(last, grainOf(now)), now)
		c.mu.Unlock()
		at := time.Unix(0, int64(n)*int64(clockGrain))
		timer.Reset(time.Until(at))
		select {
		case <-stop:
			return
		case <-c.wake:
			if !timer.Stop() {
				select {
				case <-timer.C:
				default:
				}
			}
			continue
		case now := <-timer.C:
			c.mu.Lock()
			last = n
			idle := c.idleNow(now)
			for t := range c.tickers {
				// Due at its own multiples; while idle, a non-strict ticker
				// shorter than the idle interval at the idle ticks.
				due := n%t.every == 0 || (idle && !t.strict && t.every < c.idleEvery && n%c.idleEvery == 0)
				if !due {
					continue
				}
				select {
				case t.c <- now:
				default: // the reader is behind: drop, as time.Ticker does
				}
			}
			c.mu.Unlock()
		}
	}
}
