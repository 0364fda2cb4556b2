package main

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"runtime"
	"syscall"
	"time"
)

// demoChild is the built-in demo that `culprit agent` starts, and watches,
// when no target is given.
type demoChild struct {
	pid  int
	cmd  *exec.Cmd
	done chan struct{} // closed once the demo has exited; waitErr is set then
	// waitErr is cmd.Wait's answer: nil for exit status 0.
	waitErr error
}

const (
	demoAddr    = "127.0.0.1:8080"
	demoControl = "127.0.0.1:8081"
)

// demoEnv is what the demo needs on top of the agent's environment.
// asyncpreemptoff: a spinning demo worker keeps its thread, as a Tokio
// worker would (faults.HotLoop explains how it still lets the runtime stop
// the world); madvdontneed=0: freed heap stays resident, as with glibc
// malloc (the spike fault); GOMAXPROCS: Ps to spare for the spinning
// workers, so the control port always has one.
func demoEnv() []string {
	return []string{"GODEBUG=asyncpreemptoff=1,madvdontneed=0", "GOMAXPROCS=16"}
}

// startDemoChild runs `culprit demo` on demoAddr and demoControl, its output
// going to out, and returns once its control port answers.
func startDemoChild(ctx context.Context, log *slog.Logger, out io.Writer) (*demoChild, error) {
	exe, err := os.Executable()
	if err != nil {
		return nil, fmt.Errorf("find own executable: %w", err)
	}
	cmd := exec.Command(exe, "demo", "--addr", demoAddr, "--control", demoControl)
	cmd.Env = append(os.Environ(), demoEnv()...)
	cmd.Stdout = out
	cmd.Stderr = out
	cmd.SysProcAttr = &syscall.SysProcAttr{
		// A process group of its own: Ctrl-C in the terminal goes to the
		// whole foreground group, and the demo must not die before the
		// agent, which would report that as a crash. The agent stops it.
		Setpgid: true,
		// An agent killed outright must not leave the demo holding its
		// ports, or the next `make run` cannot start one.
		Pdeathsig: syscall.SIGKILL,
	}
	d := &demoChild{cmd: cmd, done: make(chan struct{})}
	started := make(chan error)
	go d.run(started)
	if err := <-started; err != nil {
		return nil, fmt.Errorf("start demo %s: %w", exe, err)
	}
	d.pid = cmd.Process.Pid
	// Wait until it listens so the agent finds its sockets at once.
	deadline := time.Now().Add(5 * time.Second)
	for time.Now().Before(deadline) {
		select {
		case <-d.done:
			return nil, fmt.Errorf("demo exited at start (%s; is %s or %s in use?)", cmd.ProcessState, demoAddr, demoControl)
		case <-ctx.Done():
			d.stop()
			return nil, fmt.Errorf("waiting for the demo to listen: %w", ctx.Err())
		case <-time.After(50 * time.Millisecond):
		}
		if c, err := net.DialTimeout("tcp", demoControl, 200*time.Millisecond); err == nil {
			c.Close()
			log.Info("demo started", "pid", d.pid, "addr", demoAddr, "control", demoControl)
			return d, nil
		}
	}
	d.stop()
	return nil, fmt.Errorf("demo did not listen on %s within 5s", demoControl)
}

// run starts the demo, says so on started, and waits for it to exit.
func (d *demoChild) run(started chan<- error) {
	// The kernel sends Pdeathsig when the *thread* that forked the child
	// exits, and the Go runtime does end threads (a goroutine that exits
	// while locked, as the netns code's do). Locked and never unlocked,
	// this thread lives as long as the demo and is then discarded.
	runtime.LockOSThread()
	if err := d.cmd.Start(); err != nil {
		started <- err
		return
	}
	started <- nil
	d.waitErr = d.cmd.Wait()
	close(d.done)
}

// exited is closed when the demo has exited; for no demo (nil) it is a nil
// channel, which never is.
func (d *demoChild) exited() <-chan struct{} {
	if d == nil {
		return nil
	}
	return d.done
}

// unexpectedExit says that the demo has exited although the agent was not
// stopping (ctx not done), with its exit status; nil otherwise, and for no
// demo.
func (d *demoChild) unexpectedExit(ctx context.Context) error {
	if d == nil || ctx.Err() != nil {
		return nil
	}
	select {
	case <-d.done:
	default:
		return nil
	}
	if d.waitErr != nil {
		// "exit status 2", "signal: killed"
		return fmt.Errorf("the built-in demo (pid %d) exited unexpectedly: %w", d.pid, d.waitErr)
	}
	return fmt.Errorf("the built-in demo (pid %d) exited unexpectedly: %s", d.pid, d.cmd.ProcessState)
}

// stop interrupts the demo and waits for it to exit, killing it after 3 s.
func (d *demoChild) stop() {
	d.cmd.Process.Signal(os.Interrupt)
	select {
	case <-d.done:
	case <-time.After(3 * time.Second):
		d.cmd.Process.Kill()
		<-d.done
	}
}
