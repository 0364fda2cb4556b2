// Package faults makes the real conditions culprit diagnoses — a listener
// with a chosen backlog whose accept loop can be paused, bursts of
// connections — for `culprit demo` and for the tests. Nothing here is a
// mock: every function opens real sockets.
package faults
