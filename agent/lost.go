package main

import (
	"github.com/culprit-dev/culprit/rules"
	"github.com/culprit-dev/culprit/signals"
)

// lost is what the rules lose while component does not run, worked out
// from their needs (rules.LostWithout): the Lost of the component's
// status, and of the warning that says it is missing. Shared: not to be
// modified.
func (a *Agent) lost(component string) []string { return a.lostBy[component] }

// lostByComponent works out what each component's absence costs rs, once.
func lostByComponent(rs []rules.Rule) map[string][]string {
	m := map[string][]string{}
	for _, c := range signals.Components() {
		m[c] = rules.LostWithout(c, rs)
	}
	return m
}
