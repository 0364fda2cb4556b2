// Package testenv runs the real conditions tests need in a child process:
// the test binary re-executes itself in a fresh network namespace as a TCP
// server whose accept loop the test pauses, resumes, and loads from inside
// that namespace. A private namespace keeps the kernel's namespace-wide
// counters (ListenOverflows) to the test's own sockets, so tests in
// parallel packages cannot disturb each other's numbers.
package testenv
