package main

import "github.com/culprit-dev/culprit/rules"

// lost is what the rules lose while component does not run, worked out
// from their needs (rules.LostWithout): the Lost of the component's
// status, and of the warning that says it is missing.
func (a *Agent) lost(component string) []string { return rules.LostWithout(component, a.ruleSet) }
