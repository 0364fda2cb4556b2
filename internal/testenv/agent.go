package testenv

import (
	"cmp"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// This file runs the agent itself, the built culprit binary, as a separate
// process: the tests of the real program (its footprint, its hardening
// against attacks, its shutdown, a sidecar in a pod's namespace) all start
// it the same way, wait for it to answer, and stop it as the kubelet does.
// It takes the binary by path, so it needs nothing of package main.

// AgentOptions say how StartAgent runs `culprit agent`.
type AgentOptions struct {
	// Bin is the culprit binary.
	Bin string
	// Args follow `culprit agent`: the target (--pid, --port) and --set
	// keys. StartAgent adds --grpc-addr and --http-addr on free ports
	// unless Args has them, and puts the OTLP receivers on ports of their
	// own unless Args sets traces.grpc_addr or traces.http_addr (their
	// defaults, 4317 and 4318, may be taken on the test machine).
	Args []string
	// Netns is the network namespace the agent runs in, as a sidecar
	// shares its pod's (NetnsOf a target); nil is the test's own. The
	// free ports are free there, and HTTPClient dials there.
	Netns *Netns
	// Wrap prefixes the command: prlimit, setpriv, unshare. Under a
	// wrapper that forks (--fork), Stop signals the agent under it, as
	// the kubelet's SIGTERM reaches a container's main process.
	Wrap []string
	// Env adds variables to the agent's environment (the test's own).
	Env []string
	// Cred runs the command as another user.
	Cred *syscall.Credential
	// BeforeExec, when set, is called with the PID the agent will have
	// before the agent runs (a shell holds the PID until then, and execs
	// it): a test moves it into a cgroup from its first instruction.
	BeforeExec func(pid int)
	// Ready is the HTTP path StartAgent waits to answer 200: /healthz
	// (the default: the agent serves) or /readyz (it watches its target).
	Ready string
	// ReadyTimeout bounds that wait (default 15 s).
	ReadyTimeout time.Duration
}

// Agent is the culprit binary running as an agent. The test's cleanup
// stops it (Stop) and, when the test failed, logs the end of its output.
type Agent struct {
	PID                int // the agent's, or its wrapper's
	GRPCAddr, HTTPAddr string
	Netns              *Netns
	// LogPath is where its stdout and stderr go.
	LogPath string

	cmd       *exec.Cmd
	forks     bool // under a wrapper that forks it (unshare --fork)
	exited    chan struct{}
	exitErr   error
	stopOnce  sync.Once
	once      sync.Once
	transport *http.Transport
}

// StartAgent runs `culprit agent` as o says and returns once it answers
// on o.Ready. It fails the test, with the agent's output, when the agent
// exits first or does not answer in time.
func StartAgent(t testing.TB, o AgentOptions) *Agent {
	t.Helper()
	ns := o.Netns
	if ns == nil {
		ns = OwnNetns()
	}
	freeAddr := func() string {
		p, err := ns.FreePort()
		if err != nil {
			t.Fatalf("testenv: a port for the agent: %v", err)
		}
		return "127.0.0.1:" + strconv.Itoa(p)
	}
	a := &Agent{Netns: ns, exited: make(chan struct{}), forks: slices.Contains(o.Wrap, "--fork")}
	args := slices.Clone(o.Args)
	if a.GRPCAddr = flagValue(args, "--grpc-addr"); a.GRPCAddr == "" {
		a.GRPCAddr = freeAddr()
		args = append(args, "--grpc-addr", a.GRPCAddr)
	}
	if a.HTTPAddr = flagValue(args, "--http-addr"); a.HTTPAddr == "" {
		a.HTTPAddr = freeAddr()
		args = append(args, "--http-addr", a.HTTPAddr)
	}
	// A later --set would win over the test's own: added only when
	// absent.
	for _, key := range []string{"traces.grpc_addr", "traces.http_addr"} {
		if !slices.ContainsFunc(args, func(s string) bool { return strings.HasPrefix(s, key+"=") }) {
			args = append(args, "--set", key+"=127.0.0.1:0")
		}
	}
	argv := append(append(slices.Clone(o.Wrap), o.Bin, "agent"), args...)
	if o.BeforeExec != nil {
		argv = append([]string{"sh", "-c", `read _ && exec "$@"`, "sh"}, argv...)
	}
	logf, err := os.CreateTemp(t.TempDir(), "agent-*.log")
	if err != nil {
		t.Fatalf("testenv: the agent's log: %v", err)
	}
	defer logf.Close() // the agent has its own copy
	a.LogPath = logf.Name()
	a.cmd = exec.Command(argv[0], argv[1:]...)
	a.cmd.Stdout, a.cmd.Stderr = logf, logf
	if len(o.Env) > 0 {
		a.cmd.Env = append(os.Environ(), o.Env...)
	}
	// Killed with the test binary: the spawner thread that forks it never
	// ends before the process does.
	a.cmd.SysProcAttr = &syscall.SysProcAttr{Credential: o.Cred, Pdeathsig: syscall.SIGKILL}
	var stdin io.WriteCloser
	if o.BeforeExec != nil {
		if stdin, err = a.cmd.StdinPipe(); err != nil {
			t.Fatalf("testenv: %v", err)
		}
	}
	if err := spawn(ns, a.cmd); err != nil {
		t.Fatalf("testenv: start the agent: %v", err)
	}
	a.PID = a.cmd.Process.Pid
	go func() { a.exitErr = a.cmd.Wait(); close(a.exited) }()
	t.Cleanup(func() {
		a.Stop(t)
		if t.Failed() {
			t.Logf("testenv: the agent's output (%s), last lines:\n%s", a.LogPath, readTail(a.LogPath, 200))
		}
	})
	if o.BeforeExec != nil {
		o.BeforeExec(a.PID)
		io.WriteString(stdin, "go\n")
		stdin.Close()
	}
	a.waitReady(t, cmp.Or(o.Ready, "/healthz"), cmp.Or(o.ReadyTimeout, 15*time.Second))
	return a
}

// flagValue is the value given to flag in args ("--flag value" or
// "--flag=value"), "" when absent.
func flagValue(args []string, flag string) string {
	for i, s := range args {
		if s == flag && i+1 < len(args) {
			return args[i+1]
		}
		if v, ok := strings.CutPrefix(s, flag+"="); ok {
			return v
		}
	}
	return ""
}

// waitReady polls path until it answers 200.
func (a *Agent) waitReady(t testing.TB, path string, timeout time.Duration) {
	t.Helper()
	c := a.HTTPClient()
	c.Timeout = time.Second
	deadline := time.Now().Add(timeout)
	for {
		select {
		case <-a.exited:
			t.Fatalf("testenv: the agent exited at start: %v\n%s", a.exitErr, a.Log())
		default:
		}
		resp, err := c.Get("http://" + a.HTTPAddr + path)
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return
			}
			err = fmt.Errorf("%s", resp.Status)
		}
		if time.Now().After(deadline) {
			t.Fatalf("testenv: the agent did not answer %s within %v (last: %v)\n%s", path, timeout, err, a.Log())
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// HTTPClient talks to the agent's HTTP listener from its namespace over
// keep-alive connections of one transport, as a Prometheus scrapes: the
// harness adds no connection churn of its own to a namespace being
// measured.
func (a *Agent) HTTPClient() *http.Client {
	a.once.Do(func() { a.transport = &http.Transport{DialContext: a.Netns.DialContext} })
	return &http.Client{Timeout: 5 * time.Second, Transport: a.transport}
}

// Signal sends sig to the agent (under a forking wrapper, to the agent
// itself).
func (a *Agent) Signal(sig syscall.Signal) error {
	pid := a.PID
	if a.forks {
		if kids, err := childPIDs(a.PID); err == nil && len(kids) == 1 {
			pid = kids[0]
		}
	}
	return syscall.Kill(pid, sig)
}

// Exited is closed once the agent's process (or its wrapper) has ended;
// ExitErr is then how.
func (a *Agent) Exited() <-chan struct{} { return a.exited }

// ExitErr is the agent's exit status as exec reports it (nil: exit 0).
// Read it after Exited is closed.
func (a *Agent) ExitErr() error { return a.exitErr }

// Stop sends SIGTERM, as the kubelet does, and waits for the agent to
// exit. One still running 10 s later fails the test and is killed. It does
// nothing once the agent has exited.
func (a *Agent) Stop(t testing.TB) {
	t.Helper()
	a.stopOnce.Do(func() {
		select {
		case <-a.exited:
			return
		default:
		}
		a.Signal(syscall.SIGTERM)
		select {
		case <-a.exited:
		case <-time.After(10 * time.Second):
			t.Errorf("testenv: the agent (pid %d) still running 10 s after SIGTERM", a.PID)
			a.cmd.Process.Kill()
			<-a.exited
		}
	})
}

// Log is the agent's output so far.
func (a *Agent) Log() string {
	b, err := os.ReadFile(a.LogPath)
	if err != nil {
		return fmt.Sprintf("(the agent's log: %v)", err)
	}
	return string(b)
}

// LogLines is the lines of the agent's output that contain s.
func (a *Agent) LogLines(s string) []string {
	var out []string
	for _, l := range strings.Split(a.Log(), "\n") {
		if strings.Contains(l, s) {
			out = append(out, l)
		}
	}
	return out
}
