package signals

import (
	"maps"
	"slices"
)

// The components that write the evidence rules read, by the name their
// Status carries. Probes and collectors answer Name() with these, and
// rules name them in their needs (rules.Need), so that what a missing
// component costs is worked out from the rules that read it rather than
// written by hand next to the component. They live here because every
// side imports signals and rules imports neither probes nor collectors.
const (
	// eBPF probes (package probes).
	ProbeTCPListen   = "tcplisten"
	ProbeTCPLife     = "tcplife"
	ProbeProcSignals = "procsignals"
	ProbeSockCalls   = "sockcalls"
	ProbeSched       = "sched"
	ProbeCPUProfile  = "cpu_profile"

	// Collectors (package collectors).
	CollectorAcceptQueue = "accept_queue"
	CollectorSockets     = "sockets"
	CollectorNetstat     = "netstat"
	CollectorSysctl      = "sysctl"
	CollectorThreads     = "threads"
	CollectorFDs         = "fds"
	CollectorMemory      = "memory"
	CollectorCgroup      = "cgroup"
	CollectorCPUCgroup   = "cpu_cgroup"
	// CollectorPprofHeap pulls the app's heap profile; the agent wires it
	// apart from the collectors' registry (it needs the profile store).
	CollectorPprofHeap = "pprof_heap"

	// ReceiverOTLP receives the app's spans (package traces).
	ReceiverOTLP = "otlp"
)

// Component kinds, as Status.Kind carries them.
const (
	KindProbe     = "probe"
	KindCollector = "collector"
	KindReceiver  = "receiver"
)

var components = map[string]string{
	ProbeTCPListen:       KindProbe,
	ProbeTCPLife:         KindProbe,
	ProbeProcSignals:     KindProbe,
	ProbeSockCalls:       KindProbe,
	ProbeSched:           KindProbe,
	ProbeCPUProfile:      KindProbe,
	CollectorAcceptQueue: KindCollector,
	CollectorSockets:     KindCollector,
	CollectorNetstat:     KindCollector,
	CollectorSysctl:      KindCollector,
	CollectorThreads:     KindCollector,
	CollectorFDs:         KindCollector,
	CollectorMemory:      KindCollector,
	CollectorCgroup:      KindCollector,
	CollectorCPUCgroup:   KindCollector,
	CollectorPprofHeap:   KindCollector,
	ReceiverOTLP:         KindReceiver,
}

// Components are the names of every component above, sorted.
func Components() []string { return slices.Sorted(maps.Keys(components)) }

// ComponentKind is KindProbe, KindCollector or KindReceiver for a
// component above, "" for any other name.
func ComponentKind(name string) string { return components[name] }
