package profiles

import (
	"errors"
	"fmt"
	"time"

	"github.com/culprit-dev/culprit/rules"
	"github.com/culprit-dev/culprit/signals"
)

// Heap lets the heap_leak rule diff heap profiles without knowing pprof:
// the profile store and the diff live in signals, the rule gets
// allocation sites.
type Heap struct{ profiles *signals.Profiles }

// NewHeap reads the "heap" profiles of profiles (the pprof puller's).
func NewHeap(profiles *signals.Profiles) Heap { return Heap{profiles: profiles} }

var _ rules.HeapHistory = Heap{}

var errOneProfile = errors.New("fewer than two heap profiles in the window")

// GrowthSince diffs the oldest heap profile taken at or after from with
// the newest (rules.HeapHistory).
func (h Heap) GrowthSince(from time.Time, top int) ([]rules.AllocSite, time.Time, time.Time, error) {
	list := h.profiles.List("heap")
	i := 0
	for i < len(list) && list[i].T.Before(from) {
		i++
	}
	if len(list)-i < 2 {
		return nil, time.Time{}, time.Time{}, errOneProfile
	}
	older, newer := list[i], list[len(list)-1]
	growth, err := signals.DiffInuse(older.Profile, newer.Profile, top)
	if err != nil {
		return nil, older.T, newer.T, fmt.Errorf("diff heap profiles: %w", err)
	}
	sites := make([]rules.AllocSite, 0, len(growth))
	for _, g := range growth {
		sites = append(sites, rules.AllocSite{Function: g.Function, File: g.File, Line: g.Line, Bytes: g.Bytes, Objects: g.Objects})
	}
	return sites, older.T, newer.T, nil
}
