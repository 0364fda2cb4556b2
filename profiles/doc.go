// Package profiles turns the raw profiles the agent keeps into what the
// rules and the gRPC API read. CPU is the CPU profiler's raw samples
// (signals.CPUSamples) seen as the hottest functions and stacks of a
// thread (rules.HotFrames, rules.HotStacks) or as a pprof profile of a
// window (exporters.ProfileSource); symbolization happens here, on demand,
// because most samples are never looked at. Heap is the app's heap
// profiles (signals.Profiles) seen as the allocation sites that grew
// between two of them (rules.HeapHistory), so the heap_leak rule needs no
// pprof.
//
// The stores stay in signals and the symbol tables in symbolize; this
// package only joins them, so that package main only wires.
package profiles
