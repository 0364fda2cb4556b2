package main

import (
	"fmt"
	"log/slog"
	"os"
	"runtime"
	"runtime/debug"

	"github.com/culprit-dev/culprit/collectors"
)

// This file sizes the agent's own Go runtime to its container, so that the
// agent never competes with the app for memory or CPU it does not have.

// setMaxProcs sets GOMAXPROCS to agent.max_procs (1 by default): a sidecar
// does little work at a time, and with one P a wake-up of its periodic
// work runs its goroutines in turn on one thread, where with two the
// runtime wakes a second thread to share them and hands goroutines
// between the two (a quarter to a third of the agent's idle CPU, measured).
// GOMAXPROCS in the environment is the operator's explicit choice and wins.
func setMaxProcs(cfg Config, log *slog.Logger) {
	n := cfg.Agent.MaxProcs
	if n <= 0 || os.Getenv("GOMAXPROCS") != "" {
		return
	}
	if prev := runtime.GOMAXPROCS(n); prev != n {
		log.Debug("GOMAXPROCS set", "procs", n, "was", prev, "from", "agent.max_procs")
	}
}

// setMemoryLimit gives the Go runtime a memory limit, so that the agent
// collects harder as its heap nears its container's limit rather than be
// OOM-killed beside the app: agent.memory_limit_bytes when set, else
// agent.memory_limit_ratio of its own cgroup's limit (v1 or v2, through
// /proc/self/cgroup). GOMEMLIMIT and GOGC in the environment are the
// operator's explicit choice and win over the derived limit and
// agent.gogc. The runtime counts its heap, stacks and metadata against the
// limit; eBPF maps (charged to the cgroup by the kernel) and the binary's
// pages are the share the ratio leaves out.
func setMemoryLimit(cfg Config, log *slog.Logger) {
	if n := cfg.Agent.GOGC; n > 0 && os.Getenv("GOGC") == "" {
		debug.SetGCPercent(n)
	}
	limit, from := int64(0), ""
	switch n := cfg.Agent.MemoryLimitBytes; {
	case n > 0:
		limit, from = n, "agent.memory_limit_bytes"
	case n < 0 || os.Getenv("GOMEMLIMIT") != "":
		return
	default:
		l, path, err := collectors.MemoryLimitOf(cfg.Collect.ProcRoot, cfg.Collect.SysRoot, os.Getpid())
		if err != nil || l <= 0 {
			log.Debug("no container memory limit found: the Go runtime runs without one", "err", err)
			return
		}
		limit, from = int64(float64(l)*cfg.Agent.MemoryLimitRatio), fmt.Sprintf("%.0f%% of cgroup %s's %d bytes", 100*cfg.Agent.MemoryLimitRatio, path, l)
	}
	debug.SetMemoryLimit(limit)
	log.Info("Go memory limit set", "bytes", limit, "from", from)
}
