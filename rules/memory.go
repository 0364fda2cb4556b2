package rules

import (
	"time"

	"github.com/culprit-dev/culprit/signals"
)

// heapView is what the memory rules know about the app's live heap. Known
// is false without a fresh heap profile; rules then say "heap unknown"
// rather than guess (issue 3).
type heapView struct {
	Known bool
	Inuse float64
	// Growth is the heap's present regime (growthOf), HasGrowth false
	// with too few profiles in the window.
	Growth    growth
	HasGrowth bool
	// Change is the heap's change from the oldest profile of the window
	// to the newest, over Span; HasChange false with fewer than two.
	Change    float64
	Span      time.Duration
	HasChange bool
}

func heapOf(w Window, window, fresh time.Duration) heapView {
	st, now := w.Store, w.Now
	last, ok := w.FreshLatest(signals.HeapInuseBytes, nil, fresh)
	if !ok {
		return heapView{}
	}
	h := heapView{Known: true, Inuse: last.V}
	s := st.Range(signals.HeapInuseBytes, nil, now.Add(-window))
	h.Growth, h.HasGrowth = growthOf(s)
	if len(s) >= 2 {
		h.Change, h.Span, h.HasChange = s[len(s)-1].V-s[0].V, s[len(s)-1].T.Sub(s[0].T), true
	}
	return h
}
