package rules

import (
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/culprit-dev/culprit/signals"
)

// Every rule says what it reads, and only components that exist: a need
// of a renamed or misspelt component would never be reported lost.
func TestEveryRuleDeclaresItsNeeds(t *testing.T) {
	rs := New(DefaultOptions(), 10*time.Second)
	for _, r := range rs {
		ns := r.Needs()
		if len(ns) == 0 {
			t.Errorf("%s declares no need: what it loses without a component would go unsaid", r.Name())
		}
		seen := map[string]bool{}
		for _, n := range ns {
			if signals.ComponentKind(n.Component) == "" {
				t.Errorf("%s needs %q, which is no component (signals.Components: %v)", r.Name(), n.Component, signals.Components())
			}
			if seen[n.Component] {
				t.Errorf("%s needs %s twice: say everything it loses in one phrase", r.Name(), n.Component)
			}
			seen[n.Component] = true
			if strings.TrimSpace(n.What) == "" {
				t.Errorf("%s needs %s for nothing it says (What is empty)", r.Name(), n.Component)
			}
		}
	}
}

// Whatever component is missing, some rule says what that costs: a
// component no rule reads would be one the agent runs for nothing.
func TestEveryComponentIsNeeded(t *testing.T) {
	rs := New(DefaultOptions(), 10*time.Second)
	for _, c := range signals.Components() {
		if len(LostWithout(c, rs)) == 0 {
			t.Errorf("no rule needs %s (%s)", c, signals.ComponentKind(c))
		}
	}
}

type needy struct {
	name  string
	needs []Need
}

func (n needy) Name() string                { return n.name }
func (needy) Evaluate(Window) []Observation { return nil }
func (n needy) Needs() []Need               { return n.needs }

func TestLostWithout(t *testing.T) {
	rs := []Rule{
		needy{"zeta", []Need{{Component: "sched", What: "the stack"}, {Component: "sched", What: "the stack"}}},
		needy{"alpha", []Need{{Component: "sched", What: "everything", Essential: true}, {Component: "otlp", What: "traces"}}},
		needy{"mid", []Need{{Component: "otlp", What: "spans", Essential: true}}},
	}
	if got, want := LostWithout("sched", rs), []string{"alpha: cannot run", "zeta: the stack"}; !slices.Equal(got, want) {
		t.Errorf("LostWithout(sched) = %q, want %q (sorted, once each)", got, want)
	}
	if got, want := LostWithout("otlp", rs), []string{"alpha: traces", "mid: cannot run"}; !slices.Equal(got, want) {
		t.Errorf("LostWithout(otlp) = %q, want %q", got, want)
	}
	if got := LostWithout("tcplife", rs); got != nil {
		t.Errorf("LostWithout of a component no rule needs = %q, want nil", got)
	}
}

// The real rules: what the sched probe's absence costs names the rules
// as they are registered (the probe's hand-written list once named a
// cpu_bound_worker that no longer existed).
func TestLostWithoutSchedNamesRealRules(t *testing.T) {
	rs := New(DefaultOptions(), 10*time.Second)
	names := map[string]bool{}
	for _, r := range rs {
		names[r.Name()] = true
	}
	lost := LostWithout(signals.ProbeSched, rs)
	for _, want := range []string{"blocking_worker: cannot run", "busy_worker: cannot run"} {
		if !slices.Contains(lost, want) {
			t.Errorf("LostWithout(sched) = %q, want it to hold %q", lost, want)
		}
	}
	for _, c := range signals.Components() {
		for _, l := range LostWithout(c, rs) {
			rule, what, ok := strings.Cut(l, ": ")
			if !ok || !names[rule] || what == "" {
				t.Errorf("LostWithout(%s) line %q does not start with a registered rule's name", c, l)
			}
		}
	}
}
