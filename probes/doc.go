// Package probes loads culprit's eBPF programs (C sources in bpf/, compiled
// by bpf2go into the committed *_bpfel.go/.o files here) and turns what they
// count in the kernel into signals. Every program is a tracepoint (tp_btf
// where possible) or an iterator: this kernel has no kprobes or fentry, and
// tp_btf needs only CAP_BPF and CAP_PERFMON. Each probe keeps its state in
// bounded maps. ListenQueues is not a probe: an iterator a collector reads
// on demand (the listeners' half-open connections).
package probes
