package main

import (
	"context"
	"os"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/culprit-dev/culprit/signals"
	"github.com/culprit-dev/culprit/workload"
)

// This file keeps the agent on its target: it finds the target again after
// a restart, sees its exit at once through a pidfd, and tells the rules its
// runtime so remedies are worded for it.

// trackTarget checks the target on the shared clock (signals.Ticker), on
// the same wake-ups as the collectors. While it is not found, every
// refind_interval, the clock kept hot; while it is found, its exit is seen
// at once through a pidfd, and the periodic check (for a PID namespace
// that hides it, a zombie) comes at the clock's pace. What was one wake-up
// of the process every refind_interval is then none.
func (a *Agent) trackTarget(ctx context.Context, res *workload.Resolver, interval time.Duration) {
	tick := signals.NewTicker(interval)
	defer tick.Stop()
	exited := make(chan struct{}, 1)
	var watched workload.Process
	var stopWatch func()
	defer func() {
		if stopWatch != nil {
			stopWatch()
		}
	}()
	var checked time.Time
	for {
		// A target whose exit a pidfd watches is checked again only now
		// and then (Refresh reads and parses its stat).
		if stopWatch == nil || time.Since(checked) >= watchedCheck {
			a.Tracker.Refresh()
			checked = time.Now()
		}
		cur, ok := a.Tracker.Current()
		switch {
		case !ok:
			signals.Hot(time.Now().Add(2 * interval)) // look again soon
		case cur.PID != watched.PID || cur.StartTime != watched.StartTime:
			if stopWatch != nil {
				stopWatch()
			}
			watched, stopWatch = cur, watchExit(cur.PID, exited)
			if stopWatch != nil && !res.Alive(cur) {
				// It ended between the check and the pidfd: look now.
				stopWatch, watched = nil, workload.Process{}
				continue
			}
		}
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		case <-exited:
			watched = workload.Process{}
			if stopWatch != nil {
				stopWatch()
				stopWatch = nil
			}
		}
	}
}

// watchedCheck is how often a target watched by a pidfd is checked anyway.
const watchedCheck = 30 * time.Second

// watchExit signals exited when process pid ends, through a pidfd polled by
// the runtime's network poller (no thread waits on it). It returns how to
// stop watching; nil when the kernel has no pidfd (the periodic check is
// then all there is).
func watchExit(pid int, exited chan<- struct{}) func() {
	fd, err := unix.PidfdOpen(pid, unix.PIDFD_NONBLOCK)
	if err != nil {
		return nil
	}
	f := os.NewFile(uintptr(fd), "pidfd")
	rc, err := f.SyscallConn()
	if err != nil {
		f.Close()
		return nil
	}
	done := make(chan struct{})
	go func() {
		// Read waits for readability in the poller; a pidfd is readable
		// once the process has exited.
		err := rc.Read(func(fd uintptr) bool {
			pfd := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
			n, _ := unix.Poll(pfd, 0)
			return n > 0
		})
		select {
		case <-done:
			return // stopped: the file was closed under the wait
		default:
		}
		if err == nil {
			select {
			case exited <- struct{}{}:
			default:
			}
		}
	}()
	return func() {
		close(done)
		f.Close()
	}
}

// detectRuntime tells the rules the target's runtime, once per target
// process: a few ms of reading its executable and maps. What it was found
// from is logged once, so a remedy in the wrong terms can be traced.
func (a *Agent) detectRuntime(cfg Config) func(workload.Process) workload.Runtime {
	return func(p workload.Process) workload.Runtime {
		rt, err := workload.DetectRuntime(cfg.Collect.ProcRoot, p.PID)
		if err != nil {
			a.log.Warn("runtime of the target unknown; remedies stay runtime-neutral", "pid", p.PID, "err", err)
			return rt
		}
		a.log.Info("target runtime", "pid", p.PID, "runtime", rt.String(), "from", strings.Join(rt.Sources, "; "))
		return rt
	}
}
