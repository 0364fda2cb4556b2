// Package workload finds the process culprit watches (the target), by PID,
// by a port it listens on, or by a command-line regular expression, and
// finds it again when the app restarts under a new PID. Collectors and
// probes ask the Tracker for the current Process on every cycle instead of
// caching a PID. It is not called target: target/ is cargo's and Maven's
// build directory, which their ignore files skip.
package workload
