// Package rules turns signals into findings. Each rule (one file, named
// after the root cause it names) reads a window of the signal store and
// reports what it sees now as Observations; the Engine owns the lifecycle —
// it opens a finding once, updates it while the evidence lasts, resolves it
// after the evidence has been gone for a hold-down time — and writes every
// change as an Event with a global sequence number into the Journal, which
// the exporters read.
package rules
