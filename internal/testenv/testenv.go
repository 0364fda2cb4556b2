package testenv

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/vishvananda/netlink"

	"github.com/culprit-dev/culprit/internal/faults"
)

const roleEnv = "CULPRIT_TESTENV_ROLE"

// Main must be called from TestMain of every package that uses Start: in
// the re-executed child it runs the server role and exits.
func Main(m interface{ Run() int }) {
	if os.Getenv(roleEnv) == "server" {
		os.Exit(serverMain())
	}
	os.Exit(m.Run())
}

// Server is a child process listening in its own network namespace.
type Server struct {
	PID  int
	Port int
	cmd  *exec.Cmd
	in   io.WriteCloser
	out  *bufio.Reader
	mu   sync.Mutex
}

// Options for Start.
type Options struct {
	Backlog int
	// Accept starts the accept loop open (a healthy server).
	Accept bool
	// SharedNetns keeps the child in the test's network namespace.
	SharedNetns bool
}

// Start runs a server child. It fails the test when it cannot (creating a
// network namespace needs root, which CI has).
func Start(t testing.TB, o Options) *Server {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), roleEnv+"=server",
		"CULPRIT_TESTENV_BACKLOG="+strconv.Itoa(o.Backlog),
		"CULPRIT_TESTENV_ACCEPT="+strconv.FormatBool(o.Accept))
	if !o.SharedNetns {
		cmd.SysProcAttr = &syscall.SysProcAttr{Cloneflags: syscall.CLONE_NEWNET}
	}
	cmd.Stderr = os.Stderr
	in, err := cmd.StdinPipe()
	if err != nil {
		t.Fatalf("testenv: stdin: %v", err)
	}
	outp, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatalf("testenv: stdout: %v", err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatalf("testenv: start server child (needs root for a network namespace): %v", err)
	}
	s := &Server{PID: cmd.Process.Pid, cmd: cmd, in: in, out: bufio.NewReader(outp)}
	t.Cleanup(s.Close)
	line, err := s.read()
	if err != nil {
		t.Fatalf("testenv: server child did not start: %v", err)
	}
	if _, err := fmt.Sscanf(line, "port %d", &s.Port); err != nil {
		t.Fatalf("testenv: unexpected greeting %q", line)
	}
	return s
}

func (s *Server) read() (string, error) {
	type res struct {
		l   string
		err error
	}
	ch := make(chan res, 1)
	go func() {
		l, err := s.out.ReadString('\n')
		ch <- res{strings.TrimSpace(l), err}
	}()
	select {
	case r := <-ch:
		return r.l, r.err
	case <-time.After(30 * time.Second):
		return "", fmt.Errorf("no answer from server child in 30s")
	}
}

// Do sends one command and returns the child's answer:
//
//	accept on|off   open or close the accept gate
//	dial N          open N connections and keep them (answers "ok N established")
//	dialasync N     start opening N connections in the background, answer at once
//	burst N         open N connections and close each once established
//	close           close every kept client connection
func (s *Server) Do(cmd string) (string, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, err := fmt.Fprintln(s.in, cmd); err != nil {
		return "", fmt.Errorf("send %q: %w", cmd, err)
	}
	ans, err := s.read()
	if err != nil {
		return "", fmt.Errorf("%q: %w", cmd, err)
	}
	if !strings.HasPrefix(ans, "ok") {
		return ans, fmt.Errorf("%q: %s", cmd, ans)
	}
	return ans, nil
}

// MustDo is Do that fails the test on error.
func (s *Server) MustDo(t testing.TB, cmd string) string {
	t.Helper()
	ans, err := s.Do(cmd)
	if err != nil {
		t.Fatalf("testenv: %v", err)
	}
	return ans
}

// Close stops the child.
func (s *Server) Close() {
	s.in.Close()
	done := make(chan struct{})
	go func() { s.cmd.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		s.cmd.Process.Kill()
		<-done
	}
}

func serverMain() int {
	if lo, err := netlink.LinkByName("lo"); err == nil {
		if err := netlink.LinkSetUp(lo); err != nil {
			fmt.Fprintln(os.Stderr, "testenv: lo up:", err)
			return 1
		}
	}
	backlog, _ := strconv.Atoi(os.Getenv("CULPRIT_TESTENV_BACKLOG"))
	accept, _ := strconv.ParseBool(os.Getenv("CULPRIT_TESTENV_ACCEPT"))
	l, err := faults.ListenTCP("127.0.0.1:0", backlog)
	if err != nil {
		fmt.Fprintln(os.Stderr, "testenv:", err)
		return 1
	}
	addr := l.Addr().String()
	gate := faults.NewGate()
	gate.Set(accept)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go faults.Serve(ctx, l, gate, faults.DrainAndClose)
	fmt.Printf("port %d\n", l.Addr().(*net.TCPAddr).Port)

	var (
		keptMu sync.Mutex
		kept   []net.Conn
	)
	keep := func(cs []net.Conn) {
		keptMu.Lock()
		kept = append(kept, cs...)
		keptMu.Unlock()
	}
	sc := bufio.NewScanner(os.Stdin)
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) == 0 {
			continue
		}
		n := 0
		if len(f) > 1 {
			n, _ = strconv.Atoi(f[1])
		}
		switch f[0] {
		case "accept":
			gate.Set(len(f) > 1 && f[1] == "on")
			fmt.Println("ok")
		case "dial":
			conns := faults.Dial(ctx, addr, n, 10*time.Second)
			keep(conns)
			fmt.Printf("ok %d established\n", len(conns))
		case "dialasync":
			go func() { keep(faults.Dial(ctx, addr, n, 10*time.Second)) }()
			fmt.Println("ok")
		case "burst":
			fmt.Printf("ok %d established\n", faults.Burst(ctx, addr, n, 10*time.Second))
		case "close":
			keptMu.Lock()
			for _, c := range kept {
				c.Close()
			}
			kept = nil
			keptMu.Unlock()
			fmt.Println("ok")
		default:
			fmt.Printf("error unknown command %q\n", f[0])
		}
	}
	return 0
}
