package probes

import (
	"slices"
	"testing"

	"github.com/culprit-dev/culprit/signals"
)

// The probes are the components signals names as probes, no more and no
// fewer: rules name them in their needs, and the agent says what a
// missing one costs by its Name.
func TestProbeNamesAreComponents(t *testing.T) {
	ps := []Probe{
		NewTCPListen(Options{}),
		NewTCPLife(Options{}),
		NewProcSignals(Options{}),
		NewSockCalls(SockCallsOptions{}),
		NewSched(SchedOptions{}),
		NewCPUProfile(CPUProfileOptions{StackBytes: -1}),
	}
	var names, want []string
	for _, p := range ps {
		names = append(names, p.Name())
	}
	for _, c := range signals.Components() {
		if signals.ComponentKind(c) == signals.KindProbe {
			want = append(want, c)
		}
	}
	slices.Sort(names)
	if !slices.Equal(names, want) {
		t.Errorf("probes are named %v, signals' probe components are %v", names, want)
	}
}
