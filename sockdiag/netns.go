package sockdiag

import (
	"errors"
	"fmt"
	"path/filepath"
	"runtime"
	"strconv"

	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// SelfNetnsIno is the inode of the agent's own network namespace (its main
// thread's). It is read from the real /proc even when a collector's proc
// root points at fixtures: it describes the agent, not the target. A
// goroutine that joined another namespace may run on the main thread, so
// code that must know where *this* thread is asks ThreadNetnsIno.
func SelfNetnsIno() (uint64, error) {
	var st unix.Stat_t
	if err := unix.Stat("/proc/self/ns/net", &st); err != nil {
		return 0, fmt.Errorf("stat /proc/self/ns/net: %w", err)
	}
	return st.Ino, nil
}

// ThreadNetnsIno is the network namespace of the calling OS thread; the
// caller must hold runtime.LockOSThread for the answer to mean anything.
func ThreadNetnsIno() (uint64, error) {
	var st unix.Stat_t
	if err := unix.Stat("/proc/thread-self/ns/net", &st); err != nil {
		return 0, fmt.Errorf("stat /proc/thread-self/ns/net: %w", err)
	}
	return st.Ino, nil
}

// ErrTargetMoved means the PID now names another network namespace than
// the target the tracker described: the process was replaced.
var ErrTargetMoved = errors.New("target's network namespace changed")

// OpenNetns opens the network namespace of pid and checks that it is the
// one the tracker saw (want), so that a reused PID is not mistaken for the
// target.
func OpenNetns(procRoot string, pid int, want uint64) (netns.NsHandle, error) {
	path := filepath.Join(procRoot, strconv.Itoa(pid), "ns", "net")
	ns, err := netns.GetFromPath(path)
	if err != nil {
		return netns.None(), fmt.Errorf("open %s: %w", path, err)
	}
	var st unix.Stat_t
	if err := unix.Fstat(int(ns), &st); err != nil {
		ns.Close()
		return netns.None(), fmt.Errorf("fstat %s: %w", path, err)
	}
	if st.Ino != want {
		ns.Close()
		return netns.None(), fmt.Errorf("%s is netns %d, the target's was %d: %w", path, st.Ino, want, ErrTargetMoved)
	}
	return ns, nil
}

// InNetns runs fn on an OS thread that has joined ns. Namespaces belong to
// threads, so the work runs in a goroutine of its own, locked to its
// thread; if the thread cannot be moved back to its original namespace it
// stays locked and the runtime discards it when the goroutine ends, rather
// than letting another goroutine run in the target's namespace.
func InNetns(ns netns.NsHandle, fn func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := netns.Get()
		if err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("open the agent thread's netns: %w", err)
			return
		}
		defer orig.Close()
		if err := netns.Set(ns); err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("setns into the target's netns: %w", err)
			return
		}
		ferr := fn()
		if err := netns.Set(orig); err != nil {
			errc <- fmt.Errorf("setns back to the agent's netns: %w", err)
			return // thread stays locked and is discarded
		}
		runtime.UnlockOSThread()
		errc <- ferr
	}()
	return <-errc
}

// InTargetNetns runs fn in the network namespace netnsIno of pid: on the
// calling thread when that thread is already there (no setns, which needs
// CAP_SYS_ADMIN), else on a thread that joins it. netnsIno 0 means unknown:
// the agent's own.
func InTargetNetns(procRoot string, pid int, netnsIno uint64, fn func() error) error {
	here := func() (bool, error) {
		runtime.LockOSThread()
		defer runtime.UnlockOSThread()
		if netnsIno != 0 {
			ino, err := ThreadNetnsIno()
			if err != nil || ino != netnsIno {
				return false, nil
			}
		}
		return true, fn()
	}
	done, err := here()
	if done {
		return err
	}
	ns, err := OpenNetns(procRoot, pid, netnsIno)
	if err != nil {
		return err
	}
	defer ns.Close()
	return InNetns(ns, fn)
}
