package signals

// SideStores are the bounded stores beside the series Store, for what a
// number series cannot carry: episodes with their stacks, connection
// events, raw CPU samples, heap profiles and spans. One value carries them
// from the agent to the probes and collectors that write them (embedded in
// their Options) and to the rules that read them (rules.Inputs), so a
// writer never gets its store positionally and a new store is wired in one
// place. A nil field is a store nobody keeps: its writer makes a small one
// of its own or writes nothing.
type SideStores struct {
	Episodes *Episodes   // block and busy episodes of the target's threads (sched probe)
	Conns    *ConnEvents // how the target's connections ended (tcplife probe)
	Samples  *CPUSamples // recent CPU samples of the target (cpu_profile probe)
	Profiles *Profiles   // the app's heap profiles (pprof_heap collector)
	Spans    *Spans      // the app's spans (OTLP receiver)
}
