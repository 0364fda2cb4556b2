// Package collectors holds one file per polled source — /proc/net counters,
// sock_diag listeners, sysctls, the target's threads — each a Collector
// registered by name in its init. Collectors only read the system and write
// signals; parsing is kept in pure functions tested on fixtures under
// testdata/, the way prometheus/procfs does it.
package collectors
