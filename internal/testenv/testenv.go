package testenv

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"os"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vishvananda/netlink"

	"github.com/culprit-dev/culprit/internal/faults"
)

const roleEnv = "CULPRIT_TESTENV_ROLE"

// Main must be called from TestMain of every package that uses Start or
// StartLeaker: in the re-executed child it runs the child's role (server
// or leaker) and exits.
func Main(m interface{ Run() int }) {
	switch os.Getenv(roleEnv) {
	case "server":
		os.Exit(serverMain())
	case "workers":
		os.Exit(workersMain())
	case "leaker":
		os.Exit(leakerMain())
	}
	os.Exit(m.Run())
}

// Server is a child process listening in its own network namespace. Its
// commands (Do):
//
//	accept on|off   open or close the accept gate
//	dial N          open N connections and keep them (answers "ok N established")
//	dialasync N     start opening N connections in the background, answer at once
//	burst N         open N connections and close each once established
//	close           close every kept client connection
type Server struct {
	PID  int
	Port int
	*child
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
	c, greeting := startChild(t, "server", o.SharedNetns,
		"CULPRIT_TESTENV_BACKLOG="+strconv.Itoa(o.Backlog),
		"CULPRIT_TESTENV_ACCEPT="+strconv.FormatBool(o.Accept))
	s := &Server{PID: c.pid, child: c}
	if _, err := fmt.Sscanf(greeting, "port %d", &s.Port); err != nil {
		t.Fatalf("testenv: unexpected greeting %q", greeting)
	}
	return s
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
