package rules

import (
	"time"

	"github.com/culprit-dev/culprit/signals"
)

// heapView is what the memory rules know about the app's live heap. Known
// is false without a fresh heap profile; rules then say "heap unknown"
// rather than guess (issue 3).
type heapView struct {
	Known  bool
	Inuse  float64
	Trend  trend
	Trendy bool
}

func heapOf(st *signals.Store, now time.Time, window, fresh time.Duration) heapView {
	last, ok := st.Latest("heap_inuse_bytes", nil)
	if !ok || now.Sub(last.T) > fresh {
		return heapView{}
	}
	h := heapView{Known: true, Inuse: last.V}
	h.Trend, h.Trendy = trendOf(st.Range("heap_inuse_bytes", nil, now.Add(-window)))
	return h
}

// goAndNativeFix is the allocator advice of seed 000 Problem C, for both
// runtimes culprit meets.
const goAndNativeFix = "Go: set GOMEMLIMIT so the runtime returns memory under pressure (debug.FreeOSMemory for one-off spikes). " +
	"glibc/Rust services: use jemalloc with background purging (tikv-jemallocator; MALLOC_CONF=background_thread:true,dirty_decay_ms:1000) " +
	"or cap arenas with MALLOC_ARENA_MAX=2; cap buffer sizes and stream bodies instead of buffering them."
