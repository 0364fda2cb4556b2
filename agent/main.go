package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"runtime/debug"
	"syscall"
)

// version is set at build time with -ldflags "-X main.version=...".
var version = "dev"

const usage = `culprit: tells you why your service is slow, drops connections or grows.

Usage:
  culprit agent    [--config agent.conf] [--pid N | --port N | --cmd REGEX] [flags]
  culprit findings [--addr 127.0.0.1:9462] [--follow] [--json | --table] [--all] [--severity S] [--rule R]
  culprit snapshot [--addr 127.0.0.1:9462] [--json]
  culprit profile  [--addr 127.0.0.1:9462] [--duration 10s | --lookback 30s] [--tid N,...] [-o cpu.pb.gz]
  culprit top      [--addr 127.0.0.1:9462] [--interval 1s] [--history 60]
  culprit demo     [--addr 127.0.0.1:8080] [--control 127.0.0.1:8081] [--backlog 8]
  culprit version  (also --version)

The client commands (findings, snapshot, profile, top) take --tls-ca,
--tls-cert, --tls-key and --token-file (or CULPRIT_TOKEN) for an agent whose
gRPC API is protected.

Run "culprit <command> -h" for the flags of a command.
`

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

func run(args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		fmt.Fprint(stderr, usage)
		return 2
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	var err error
	switch args[0] {
	case "agent":
		err = cmdAgent(ctx, args[1:], stdout, stderr)
	case "findings":
		err = cmdFindings(ctx, args[1:], stdout, stderr)
	case "snapshot":
		err = cmdSnapshot(ctx, args[1:], stdout, stderr)
	case "profile":
		err = cmdProfile(ctx, args[1:], stdout, stderr)
	case "top":
		err = cmdTop(ctx, args[1:], stdout, stderr)
	case "demo":
		err = cmdDemo(ctx, args[1:], stdout, stderr)
	case "version", "--version", "-version", "-v":
		fmt.Fprintln(stdout, versionString())
	case "-h", "--help", "help":
		fmt.Fprint(stdout, usage)
	default:
		fmt.Fprintf(stderr, "culprit: unknown command %q\n\n%s", args[0], usage)
		return 2
	}
	if errors.Is(err, flag.ErrHelp) {
		return 0
	}
	if err != nil {
		fmt.Fprintln(stderr, "culprit:", err)
		return 1
	}
	return 0
}

// versionString is the release the Makefile stamped, else the module
// version and VCS revision the Go toolchain recorded (go install, go
// build in a checkout), so a binary always says what it was built from.
func versionString() string {
	v := version
	bi, ok := debug.ReadBuildInfo()
	if !ok {
		return "culprit " + v
	}
	if v == "dev" && bi.Main.Version != "" && bi.Main.Version != "(devel)" {
		v = bi.Main.Version
	}
	var rev, modified string
	for _, s := range bi.Settings {
		switch s.Key {
		case "vcs.revision":
			rev = s.Value
		case "vcs.modified":
			if s.Value == "true" {
				modified = "+dirty"
			}
		}
	}
	if rev != "" {
		v += " (" + rev[:min(12, len(rev))] + modified + ")"
	}
	return "culprit " + v + " " + bi.GoVersion
}
