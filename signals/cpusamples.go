package signals

import (
	"sync"
	"time"
)

// StackSample is a count of CPU samples of one thread in one (user, kernel)
// stack over one drain interval of the profiler. Addresses are raw: they
// are symbolized when a profile is built, because most samples are never
// looked at.
type StackSample struct {
	T      time.Time // end of the interval the samples were taken in
	Pid    int
	Tid    int
	Thread string
	// User is leaf first. When the sample carried a copy of its stack,
	// these are the frames unwound from it (symbolize.RecoverLeafAt: CFI,
	// frame pointers through JIT code), not only the frame-pointer walk;
	// an interpreted JavaScript frame is then the address of the bytecode
	// it ran, which the process's perf map names.
	User   []uint64
	Kernel []uint64 // leaf first
	Count  int64
}

// CPUSamples keeps the last max stack samples, so that a profile of any
// recent window (a finding's, or one asked for over gRPC) can be built
// without profiling again. It is safe for concurrent use.
type CPUSamples struct {
	log *Log[StackSample]

	mu     sync.RWMutex // guards period
	period time.Duration
}

// NewCPUSamples keeps at most max samples (at least one).
func NewCPUSamples(max int) *CPUSamples { return &CPUSamples{log: NewLog[StackSample](max)} }

// SetPeriod records the sampling period the samples were taken at.
func (c *CPUSamples) SetPeriod(d time.Duration) {
	c.mu.Lock()
	c.period = d
	c.mu.Unlock()
}

// Period is the sampling period, 0 when no profiler runs.
func (c *CPUSamples) Period() time.Duration {
	c.mu.RLock()
	defer c.mu.RUnlock()
	return c.period
}

// Add appends samples, evicting the oldest when full.
func (c *CPUSamples) Add(ss []StackSample) { c.log.Add(ss...) }

// Range returns the samples with from < T <= to, oldest first. The slices
// inside are shared and must not be modified.
func (c *CPUSamples) Range(from, to time.Time) []StackSample {
	return c.log.Filter(func(s StackSample) bool { return s.T.After(from) && !s.T.After(to) })
}

// Evicted is how many samples were pushed out by newer ones.
func (c *CPUSamples) Evicted() uint64 { return c.log.Evicted() }
