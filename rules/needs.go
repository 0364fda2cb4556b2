package rules

import "slices"

// Need is one component a rule reads evidence from (a probe, a collector,
// the OTLP receiver, the heap puller: signals.Probe*, signals.Collector*,
// signals.ReceiverOTLP), and what the rule loses when it does not run.
// Rules declare their needs next to the code that reads the evidence, so
// that what a disabled or failed component costs (LostWithout) is worked
// out from the rules rather than written by hand beside the component,
// where it drifts from them.
type Need struct {
	Component string
	// What is what the rule no longer finds or says without the
	// component, as a phrase ("the hottest functions of the busy
	// thread"); for an essential need, what the rule reads from it.
	What string
	// Essential: the rule cannot run at all without the component.
	// Otherwise it says less, never something else.
	Essential bool
}

// LostWithout is what the rules rs lose while component does not run: one
// line per rule that needs it, "rule: what is lost", or "rule: cannot run"
// when the rule cannot do without it; sorted, without duplicates. Nil when
// no rule reads the component.
func LostWithout(component string, rs []Rule) []string {
	var out []string
	for _, r := range rs {
		for _, n := range r.Needs() {
			if n.Component != component {
				continue
			}
			if n.Essential {
				out = append(out, r.Name()+": cannot run")
			} else {
				out = append(out, r.Name()+": "+n.What)
			}
		}
	}
	slices.Sort(out)
	return slices.Compact(out)
}
