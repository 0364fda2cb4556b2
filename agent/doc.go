// Command culprit is the sidecar agent and its CLI: `culprit agent` watches
// one process and serves findings over gRPC and signals on /metrics,
// `culprit findings` reads and follows findings, `culprit snapshot` prints
// every signal, and `culprit demo` is a small service with fault switches to
// watch on a fresh machine. This package holds flags, configuration, wiring
// and lifecycle; the diagnosis lives in the packages it wires together.
package main
