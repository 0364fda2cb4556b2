package probes

import (
	"errors"
	"fmt"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/cilium/ebpf/rlimit"
)

// load loads spec into objs (a bpf2go Objects struct). A kernel or
// privilege problem comes back as an error naming the probe.
func load(probe string, spec *ebpf.CollectionSpec, objs any) error {
	// Kernels before 5.11 charge BPF memory to RLIMIT_MEMLOCK; later ones
	// to the cgroup, where this is a no-op.
	if err := rlimit.RemoveMemlock(); err != nil {
		return fmt.Errorf("%s: remove memlock limit: %w", probe, err)
	}
	if err := spec.LoadAndAssign(objs, nil); err != nil {
		var ve *ebpf.VerifierError
		if errors.As(err, &ve) {
			return fmt.Errorf("%s: verifier rejected the programs: %+v", probe, ve)
		}
		return fmt.Errorf("%s: load programs (needs CAP_BPF and CAP_PERFMON): %w", probe, err)
	}
	return nil
}

type tracingProg struct {
	name string // for errors: "tp_btf/sched_switch"
	prog *ebpf.Program
}

// attachTracing attaches tp_btf programs; on error, what was attached is
// detached again.
func attachTracing(probe string, progs ...tracingProg) ([]link.Link, error) {
	var links []link.Link
	for _, p := range progs {
		l, err := link.AttachTracing(link.TracingOptions{Program: p.prog})
		if err != nil {
			closeLinks(links)
			return nil, fmt.Errorf("%s: attach %s: %w", probe, p.name, err)
		}
		links = append(links, l)
	}
	return links, nil
}

func closeLinks(links []link.Link) error {
	var errs []error
	for _, l := range links {
		errs = append(errs, l.Close())
	}
	return errors.Join(errs...)
}
