package collectors

import (
	"slices"
	"testing"

	"github.com/culprit-dev/culprit/signals"
)

// The registered collectors and the heap puller are the components
// signals names as collectors, no more and no fewer: rules name them in
// their needs, and the agent says what a missing one costs by its name.
func TestCollectorNamesAreComponents(t *testing.T) {
	names := append(Names(), (&PprofHeap{}).Name())
	slices.Sort(names)
	var want []string
	for _, c := range signals.Components() {
		if signals.ComponentKind(c) == signals.KindCollector {
			want = append(want, c)
		}
	}
	if !slices.Equal(names, want) {
		t.Errorf("collectors are named %v, signals' collector components are %v", names, want)
	}
}
