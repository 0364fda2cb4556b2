package main

import (
	"fmt"
	"os"
	"strconv"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"

	"github.com/culprit-dev/culprit/probes"
	"github.com/culprit-dev/culprit/rules"
)

type build struct {
	coll  *ebpf.Collection
	links []link.Link
}

var progs = []string{"culprit_sched_switch", "culprit_sched_wakeup", "culprit_sched_wakeup_new"}

// load loads the build at path as the agent loads its own with its
// default settings (rules.workers.idle_syscalls, sched.min_block,
// sched.busy_gap), watching tgids.
func load(path string, tgids []uint32) (*build, error) {
	coll, err := probes.LoadSchedBuild(path, probes.SchedOptions{
		MinBlock: 100 * time.Millisecond, BusyGap: time.Millisecond, QuietCalls: rules.DefaultIdleSyscalls,
	}, tgids)
	if err != nil {
		return nil, err
	}
	return &build{coll: coll}, nil
}

func (b *build) attach() error {
	for _, p := range progs {
		l, err := link.AttachTracing(link.TracingOptions{Program: b.coll.Programs[p]})
		if err != nil {
			return fmt.Errorf("%s: %w", p, err)
		}
		b.links = append(b.links, l)
	}
	return nil
}

func (b *build) detach() {
	for _, l := range b.links {
		l.Close()
	}
	b.links = nil
}

func stats(b *build) (ns [3]time.Duration, runs [3]uint64) {
	for i, p := range progs {
		s, err := b.coll.Programs[p].Stats()
		if err == nil {
			ns[i], runs[i] = s.Runtime, s.RunCount
		}
	}
	return
}

func main() {
	if len(os.Args) < 5 {
		fmt.Fprintln(os.Stderr, usage)
		os.Exit(2)
	}
	secs, err := strconv.Atoi(os.Args[3])
	if err != nil || secs < 2 {
		fmt.Fprintf(os.Stderr, "schedab: SECONDS must be a whole number of seconds, at least 2, not %q\n%s\n", os.Args[3], usage)
		os.Exit(2)
	}
	var tgids []uint32
	for _, a := range os.Args[4:] {
		n, err := strconv.ParseUint(a, 10, 32)
		if err != nil || n == 0 {
			fmt.Fprintf(os.Stderr, "schedab: %q is not a process id\n%s\n", a, usage)
			os.Exit(2)
		}
		tgids = append(tgids, uint32(n))
	}
	if err := run(os.Args[1:3], secs, tgids); err != nil {
		fmt.Fprintln(os.Stderr, "schedab:", err)
		os.Exit(1)
	}
}

const usage = "usage: schedab A.o B.o SECONDS TGID...   (as root, beside a load of the TGIDs)"

func run(objs []string, secs int, tgids []uint32) error {
	st, err := ebpf.EnableStats(uint32(0)) // BPF_STATS_RUN_TIME
	if err != nil {
		return fmt.Errorf("enable BPF run-time stats: %w", err)
	}
	defer st.Close()
	var bs [2]*build
	for i, p := range objs {
		b, err := load(p, tgids)
		if err != nil {
			return fmt.Errorf("load %s: %w", p, err)
		}
		defer b.coll.Close()
		bs[i] = b
	}
	for s := 0; s < secs; s++ {
		b := bs[s%2]
		if err := b.attach(); err != nil {
			b.detach()
			return fmt.Errorf("attach %s: %w", objs[s%2], err)
		}
		time.Sleep(time.Second)
		b.detach()
	}
	for i, b := range bs {
		ns, runs := stats(b)
		fmt.Printf("%s:", objs[i])
		for j := range progs {
			if runs[j] > 0 {
				fmt.Printf("  %s %d runs %.0f ns/run", progs[j][14:], runs[j], float64(ns[j])/float64(runs[j]))
			}
		}
		fmt.Println()
	}
	return nil
}
